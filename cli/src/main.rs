//! `natasks`: the operator command line for natasks queues.
//!
//! See queue depths, dispatch tasks, inspect and requeue dead letters, declare and remove
//! periodic schedules, list and cancel delayed tasks, follow tracked tasks (status, result,
//! cancel, live events), show a workflow's steps. Every command talks to NATS directly; nothing runs in the
//! background.

mod batch;
mod conn;
mod dispatch;
mod dlq;
mod events;
mod filter;
mod output;
mod queue;
mod queues;
mod schedules;
mod search;
mod task;
mod tasks;
mod ui;
mod workflow;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The error of a command: one line for the operator, exit code 1.
#[derive(Debug)]
pub struct Error(pub String);

impl Error {
    /// An error with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The result of a command.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to an error, keeping the whole cause chain on one line.
pub trait Context<T> {
    /// `what: cause`.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Error(format!("{}: {}", what(), one_line(&err))))
    }
}

/// [`natasks::one_line`], with control characters (a server's multi-line error text)
/// turned into spaces: an error is one line on the terminal.
pub fn one_line(err: &dyn std::error::Error) -> String {
    natasks::one_line(err).replace(char::is_control, " ")
}

/// Operate natasks queues on NATS JetStream: queue depths, dispatch, dead letters, periodic
/// schedules, delayed tasks, and tracked tasks' status, results, cancellation and events.
#[derive(Debug, Parser)]
#[command(name = "natasks", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by every command: where to connect and how, the stream layout, and the
/// output format. Shown under a heading of their own in every command's help.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct Global {
    /// NATS server URL(s), comma separated.
    #[arg(
        short = 's',
        long = "server",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub server: String,
    /// User credentials file (JWT and seed).
    #[arg(long, global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// NKey seed file.
    #[arg(long, global = true, value_name = "FILE")]
    pub nkey: Option<PathBuf>,
    /// User name (with --password).
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Password (with --user).
    #[arg(long, global = true)]
    pub password: Option<String>,
    /// Authentication token.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// TLS client certificate (with --tlskey).
    #[arg(long, global = true, value_name = "FILE")]
    pub tlscert: Option<PathBuf>,
    /// TLS client private key (with --tlscert).
    #[arg(long, global = true, value_name = "FILE")]
    pub tlskey: Option<PathBuf>,
    /// TLS CA certificate to verify the server with.
    #[arg(long, global = true, value_name = "FILE")]
    pub tlsca: Option<PathBuf>,
    /// The JetStream stream holding the queues.
    #[arg(long, global = true, default_value = natasks::wire::DEFAULT_STREAM)]
    pub stream: String,
    /// Subject prefix: queue `q` is subject `<prefix>.q`.
    #[arg(long, global = true, default_value = natasks::wire::DEFAULT_SUBJECT_PREFIX)]
    pub subject_prefix: String,
    /// Prefix of the workers' durable consumers: queue `q` is consumed by `<prefix>-q`.
    #[arg(long, global = true, default_value = natasks::wire::DEFAULT_CONSUMER_PREFIX)]
    pub consumer_prefix: String,
    /// Suffix of dead-letter queues: queue `q` dead-letters into `q<suffix>`.
    #[arg(long, global = true, default_value = natasks::wire::DEFAULT_DLQ_SUFFIX)]
    pub dlq_suffix: String,
    /// Machine-readable JSON output on stdout.
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every queue with its pending, in-flight, redelivered and dead-letter counts, pause,
    /// limit and rates.
    Queues,
    /// Pause or resume a queue, set its limit of tasks in flight or its rate limits.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Dispatch a task (now, after a delay, or at a time).
    Dispatch(dispatch::DispatchArgs),
    /// Dispatch the tasks of a JSON-lines file together: all are stored or none.
    Batch(batch::BatchArgs),
    /// Inspect, requeue, delete and purge dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// A queue's tasks by state (pending, in flight, scheduled, dead), one task in full,
    /// and deleting tasks.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Find tasks by name, header, payload text or JSON field, or last error, over
    /// pending, in-flight, scheduled and dead tasks. Reads the stream; consumes nothing.
    Search(search::SearchArgs),
    /// Periodic schedules and delayed tasks: list (the default), add, remove, cancel.
    Schedules(schedules::SchedulesArgs),
    /// Status, result and cancellation of a task dispatched with tracking, by its id.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Live tail of tracked tasks' lifecycle events until Ctrl-C (one line, or with --json
    /// one JSON object, per event). Shows what happens while it runs, nothing earlier.
    Events(events::EventsArgs),
    /// Serve the web dashboard: queues with live counts, tasks, dead letters, schedules,
    /// search, and actions (beyond loopback only with authentication).
    Ui(ui::UiArgs),
    /// The steps of a workflow (a chain or a group with its callback), by its id.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCommand),
}

async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Queues => queues::run(g).await,
        Command::Queue(cmd) => queue::run(g, cmd).await,
        Command::Dispatch(args) => dispatch::run(g, args).await,
        Command::Batch(args) => batch::run(g, args).await,
        Command::Dlq(cmd) => dlq::run(g, cmd).await,
        Command::Tasks(cmd) => tasks::run(g, cmd).await,
        Command::Search(args) => search::run(g, args).await,
        Command::Schedules(args) => schedules::run(g, args).await,
        Command::Task(cmd) => task::run(g, cmd).await,
        Command::Events(args) => events::run(g, args).await,
        Command::Ui(args) => ui::run(g, args).await,
        Command::Workflow(cmd) => workflow::run(g, cmd).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", output::safe(&err.to_string()));
            ExitCode::FAILURE
        }
    }
}
