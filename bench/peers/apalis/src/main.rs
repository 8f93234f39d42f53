//! `natasks-bench-apalis`: the apalis peer of `natasks-bench`.
//!
//! An apalis worker (apalis 1.0 with the apalis-nats JetStream backend) run as a child
//! process by the process workloads of `natasks-bench` (`drain_*`, `e2e_process_*`), with
//! the same command line and line protocol as `natasks-bench --child-worker`:
//!
//! ```text
//! natasks-bench-apalis --mode drain|e2e --url URL --stream NAME --prefix PREFIX --queue Q
//!     --concurrency C --max-ack-pending M --tasks N [--warmup W]
//! ```
//!
//! * prints `ready` once set up: `drain` then waits for `go` on stdin and starts
//!   consuming; `e2e` starts consuming at once and prints `ready` after `W` tasks;
//! * prints `done elapsed_ns=E` at its `N`-th measured task, `E` measured from the start
//!   of consuming (`drain`) or from the `W`-th task (`e2e`);
//! * on `stop` or the end of stdin, stops the worker, prints `stopped` and exits.
//!
//! apalis-nats keeps each queue in a stream of its own whose only subject is the stream
//! name. Its `Config` is public, so here it is pointed at the stream and subject the
//! natasks benchmark created (`<prefix>.<queue>` in stream `NAME`): every implementation
//! then drains the same messages from the same stream, dispatched the same way.

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_nats::{Config, NatsJetStream};
use async_nats::jetstream::consumer::{pull, AckPolicy, ReplayPolicy};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::sync::Notify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Consumer ack wait, as natasks' default.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// The payload every task carries (apalis' codec wants `Serialize` too).
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    user_id: u64,
    email: String,
    tags: Vec<String>,
}

impl Payload {
    /// Whether the payload decoded to what the benchmark publishes.
    fn is_expected(&self) -> bool {
        self.user_id == 42 && !self.email.is_empty() && self.tags.len() == 3
    }
}

/// Counts processed tasks; notes the warm-up mark and the last measured task.
#[derive(Debug)]
struct Counter {
    count: AtomicUsize,
    warmup: usize,
    target: usize,
    warm: Notify,
    done: Notify,
    warm_at: OnceLock<Instant>,
    done_at: OnceLock<Instant>,
}

impl Counter {
    fn hit(&self) {
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.warmup {
            let _ = self.warm_at.set(Instant::now());
            self.warm.notify_one();
        }
        if n == self.target {
            let _ = self.done_at.set(Instant::now());
            self.done.notify_one();
        }
    }
}

/// The typed handler: apalis decodes the JSON payload; the handler checks it and counts.
async fn handle(payload: Payload, counter: Data<Arc<Counter>>) -> Result<(), BoxDynError> {
    if !black_box(&payload).is_expected() {
        return Err(format!("unexpected payload {payload:?}").into());
    }
    counter.hit();
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Drain,
    E2e,
}

#[derive(Debug)]
struct Args {
    mode: Mode,
    url: String,
    stream: String,
    subject: String,
    concurrency: usize,
    max_ack_pending: i64,
    tasks: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut values = std::collections::HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let name = flag.strip_prefix("--").ok_or_else(|| format!("unexpected {flag:?}"))?;
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        values.insert(name.to_owned(), value);
    }
    let mut take = |name: &str| {
        values.remove(name).ok_or_else(|| BoxError::from(format!("--{name} is required")))
    };
    let number = |value: String| -> Result<usize, BoxError> {
        value.parse().map_err(|_| format!("{value:?} is not a number").into())
    };
    let mode = match take("mode")?.as_str() {
        "drain" => Mode::Drain,
        "e2e" => Mode::E2e,
        other => return Err(format!("unknown mode {other:?}").into()),
    };
    let args = Args {
        mode,
        url: take("url")?,
        stream: take("stream")?,
        subject: format!("{}.{}", take("prefix")?, take("queue")?),
        concurrency: number(take("concurrency")?)?,
        max_ack_pending: number(take("max-ack-pending")?)? as i64,
        tasks: number(take("tasks")?)?,
        warmup: take("warmup").map_or(Ok(0), number)?,
    };
    if let Some(extra) = values.keys().next() {
        return Err(format!("unknown option --{extra}").into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match parse_args() {
        Ok(args) => run(args).await,
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("natasks-bench-apalis: {err}");
            println!("error {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let client = async_nats::connect(&args.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let warmup = if args.mode == Mode::E2e { args.warmup } else { 0 };
    let counter = Arc::new(Counter {
        count: AtomicUsize::new(0),
        warmup,
        target: warmup + args.tasks,
        warm: Notify::new(),
        done: Notify::new(),
        warm_at: OnceLock::new(),
        done_at: OnceLock::new(),
    });

    // The consumer natasks creates, field for field, under apalis' durable name.
    let mut config = Config::new(&args.stream)
        .with_pull_consumer()
        .durable()
        .with_description("apalis bench consumer")
        .with_ack_policy(AckPolicy::Explicit)
        .with_ack_wait(ACK_WAIT)
        .with_filter_subject(args.subject.clone())
        .with_max_ack_pending(args.max_ack_pending)
        .with_replay_policy(ReplayPolicy::Instant);
    config.stream.subjects = vec![args.subject.clone()];
    // Created here so that setting up is not part of the measured drain; apalis adopts it.
    js.get_stream(&args.stream).await?.create_consumer(config.consumer.clone()).await?;

    let backend: NatsJetStream<Payload, pull::Config> =
        NatsJetStream::new(client.clone()).with_config(config);
    let worker = WorkerBuilder::new("natasks-bench-apalis")
        .backend(backend)
        .concurrency(args.concurrency)
        .data(counter.clone())
        .build(handle);

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    if args.mode == Mode::Drain {
        say("ready");
        match stdin.next_line().await? {
            Some(line) if line == "go" => {}
            other => return Err(format!("expected \"go\" on stdin, got {other:?}").into()),
        }
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let mut running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
        Ok::<(), std::io::Error>(())
    }));

    if args.mode == Mode::E2e {
        if !wait(&counter.warm, &mut stdin, &mut running).await? {
            return Ok(());
        }
        say("ready");
    }
    if !wait(&counter.done, &mut stdin, &mut running).await? {
        return Ok(());
    }
    let from = match args.mode {
        Mode::Drain => start,
        Mode::E2e => *counter.warm_at.get().ok_or("no warm-up mark")?,
    };
    let done_at = *counter.done_at.get().ok_or("no done mark")?;
    say(&format!("done elapsed_ns={}", done_at.duration_since(from).as_nanos()));

    // Wait for `stop` (or the parent going away), then stop gracefully.
    let _ = stdin.next_line().await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .map_err(|_| "the worker did not stop within 30s")???;
    client.flush().await?;
    say("stopped");
    Ok(())
}

/// Waits for `mark`; `false` if stdin closed first (the parent went away), an error if the
/// worker ended.
async fn wait(
    mark: &Notify,
    stdin: &mut Lines<BufReader<Stdin>>,
    running: &mut tokio::task::JoinHandle<Result<(), WorkerError>>,
) -> Result<bool, BoxError> {
    tokio::select! {
        () = mark.notified() => Ok(true),
        line = stdin.next_line() => match line? {
            None => Ok(false),
            Some(line) => Err(format!("unexpected {line:?} on stdin while running").into()),
        },
        ended = running => Err(format!("the worker ended early: {:?}", ended?).into()),
    }
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
