//! The worker side of the process workloads (`drain_*`, `e2e_process_*`): the bench binary
//! started as `natasks-bench --child-worker natasks|raw ...` runs one worker in a process
//! of its own, as a service would, and reports to the parent over a line protocol. The
//! apalis peer (`bench/peers/apalis`) takes the same options and speaks the same protocol.
//!
//! ```text
//! natasks-bench --child-worker natasks|raw --mode drain|e2e --url URL --stream NAME
//!     --prefix PREFIX --queue Q --concurrency C --fetch-batch B --max-ack-pending M
//!     --tasks N [--warmup W] [--count-allocs 1]
//! ```
//!
//! * `ready` once set up (the stream exists, the consumer is created). `drain` then waits
//!   for `go` on stdin before it starts consuming; `e2e` starts consuming at once and says
//!   `ready` only after `W` warm-up tasks, so the parent's clock starts on a warm worker.
//! * `done elapsed_ns=E [allocs=A bytes=B]` at the `N`-th measured task: `E` from the start
//!   of consuming (`drain`) or from the `W`-th task (`e2e`); with `--count-allocs 1`, the
//!   allocations (and bytes) the whole process made over that interval.
//! * `stop` on stdin, or its end: a graceful stop, then `stopped` and exit 0.
//! * `error MESSAGE` and a non-zero exit on any failure.
//!
//! Both workers decode the payload into the same `Payload` struct with serde, check it,
//! count it, and ack. The natasks worker is the library as a user writes it (a typed
//! `Json<T>` handler). The raw worker is the cheapest honest async-nats equivalent: one
//! task polling `messages()` with `for_each_concurrent(concurrency)`, so its handlers run
//! inside that task with no spawn per message.

use std::collections::HashMap;
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, ReplayPolicy};
use async_nats::jetstream::{self, Context};
use futures_util::{StreamExt, TryStreamExt};
use natasks::{HandlerError, Json, RunError, ShutdownHandle, Worker};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::alloc_count::{self, Snapshot};
use crate::BoxError;

type Res<T> = Result<T, BoxError>;

/// The first argument that turns the bench binary into a child worker.
pub const FLAG: &str = "--child-worker";

/// Pull-request lifetime, as the natasks default `fetch_timeout`.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Consumer ack wait, as the natasks default.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for the raw worker's last acks at stop.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// The payload every task carries, decoded by every worker.
#[derive(Debug, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Natasks,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Drain,
    E2e,
}

#[derive(Debug)]
struct Args {
    kind: Kind,
    mode: Mode,
    url: String,
    stream: String,
    prefix: String,
    queue: String,
    concurrency: usize,
    fetch_batch: usize,
    max_ack_pending: i64,
    tasks: usize,
    warmup: usize,
    count_allocs: bool,
}

fn parse(args: &[String]) -> Res<Args> {
    let mut args = args.iter();
    let kind = match args.next().map(String::as_str) {
        Some("natasks") => Kind::Natasks,
        Some("raw") => Kind::Raw,
        other => return Err(format!("{FLAG} takes natasks or raw, not {other:?}").into()),
    };
    let mut values = HashMap::new();
    while let Some(flag) = args.next() {
        let name = flag.strip_prefix("--").ok_or_else(|| format!("unexpected {flag:?}"))?;
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        values.insert(name.to_owned(), value.clone());
    }
    let mut take = |name: &str| {
        values.remove(name).ok_or_else(|| BoxError::from(format!("--{name} is required")))
    };
    let number = |value: String| -> Res<usize> {
        value.parse().map_err(|_| format!("{value:?} is not a number").into())
    };
    let mode = match take("mode")?.as_str() {
        "drain" => Mode::Drain,
        "e2e" => Mode::E2e,
        other => return Err(format!("unknown mode {other:?}").into()),
    };
    let args = Args {
        kind,
        mode,
        url: take("url")?,
        stream: take("stream")?,
        prefix: take("prefix")?,
        queue: take("queue")?,
        concurrency: number(take("concurrency")?)?,
        fetch_batch: number(take("fetch-batch")?)?,
        max_ack_pending: number(take("max-ack-pending")?)? as i64,
        tasks: number(take("tasks")?)?,
        warmup: take("warmup").map_or(Ok(0), number)?,
        count_allocs: take("count-allocs").is_ok_and(|v| v == "1"),
    };
    if let Some(extra) = values.keys().next() {
        return Err(format!("unknown option --{extra}").into());
    }
    Ok(args)
}

/// Runs the child worker with the arguments after [`FLAG`].
pub async fn main(args: &[String]) -> ExitCode {
    let result = match parse(args) {
        Ok(args) => run(args).await,
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("natasks-bench child worker: {err}");
            say(&format!("error {err}"));
            ExitCode::FAILURE
        }
    }
}

/// Counts processed tasks; notes the warm-up mark and the last measured task.
struct Counter {
    count: AtomicUsize,
    warmup: usize,
    target: usize,
    warm: Notify,
    done: Notify,
    warm_at: OnceLock<Instant>,
    done_at: OnceLock<(Instant, Snapshot)>,
    failed: OnceLock<String>,
}

impl Counter {
    fn new(warmup: usize, tasks: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            warmup,
            target: warmup + tasks,
            warm: Notify::new(),
            done: Notify::new(),
            warm_at: OnceLock::new(),
            done_at: OnceLock::new(),
            failed: OnceLock::new(),
        })
    }

    /// Called by a handler for each processed task.
    fn hit(&self) {
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.warmup {
            let _ = self.warm_at.set(Instant::now());
            self.warm.notify_one();
        }
        if n == self.target {
            let _ = self.done_at.set((Instant::now(), Snapshot::now()));
            self.done.notify_one();
        }
    }

    /// Called by a handler that got something it should not have: the run fails at once.
    fn fail(&self, what: String) {
        let _ = self.failed.set(what);
        self.warm.notify_one();
        self.done.notify_one();
    }

    /// Checks a decoded payload and counts it.
    fn process(&self, payload: &Payload) -> Result<(), String> {
        if !black_box(payload).is_expected() {
            let what = format!("unexpected payload {payload:?}");
            self.fail(what.clone());
            return Err(what);
        }
        self.hit();
        Ok(())
    }
}

/// A worker that was set up and not yet started.
enum Prepared {
    Natasks(Worker),
    Raw(PullConsumer),
}

/// A running worker.
enum Running {
    Natasks { shutdown: ShutdownHandle, task: JoinHandle<Result<(), RunError>> },
    Raw { task: JoinHandle<Res<()>>, acked: Arc<AtomicUsize> },
}

async fn run(args: Args) -> Res<()> {
    let client = async_nats::connect(&args.url).await?;
    let js = jetstream::new(client.clone());
    let warmup = if args.mode == Mode::E2e { args.warmup } else { 0 };
    let counter = Counter::new(warmup, args.tasks);
    let prepared = prepare(&args, &js, &counter).await?;

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    if args.mode == Mode::Drain {
        say("ready");
        match stdin.next_line().await? {
            Some(line) if line == "go" => {}
            other => return Err(format!("expected \"go\" on stdin, got {other:?}").into()),
        }
    }
    let counting = args.count_allocs.then(alloc_count::counting);
    let start = (Instant::now(), Snapshot::now());
    let running = start_consuming(&args, prepared, &counter).await?;

    if args.mode == Mode::E2e {
        if !wait(&counter, &counter.warm, &mut stdin).await? {
            return Ok(());
        }
        say("ready");
    }
    if !wait(&counter, &counter.done, &mut stdin).await? {
        return Ok(());
    }
    drop(counting);
    let (done_at, allocs_then) = *counter.done_at.get().ok_or("no done mark")?;
    let from = match args.mode {
        Mode::Drain => start.0,
        Mode::E2e => *counter.warm_at.get().ok_or("no warm-up mark")?,
    };
    let mut line = format!("done elapsed_ns={}", done_at.duration_since(from).as_nanos());
    if args.count_allocs {
        line.push_str(&format!(
            " allocs={} bytes={}",
            allocs_then.allocations - start.1.allocations,
            allocs_then.bytes - start.1.bytes
        ));
    }
    say(&line);

    // Wait for `stop` (or the parent going away), then stop gracefully.
    let _ = stdin.next_line().await;
    stop(running, &counter).await?;
    client.flush().await?;
    say("stopped");
    Ok(())
}

/// Sets the worker up (creating its consumer) without consuming yet.
async fn prepare(args: &Args, js: &Context, counter: &Arc<Counter>) -> Res<Prepared> {
    match args.kind {
        Kind::Natasks => {
            let counter = counter.clone();
            let handler = move |Json(payload): Json<Payload>| {
                let counter = counter.clone();
                async move { counter.process(&payload).map_err(HandlerError::dead_letter) }
            };
            let worker = Worker::builder(js.clone(), &args.queue)
                .stream_name(args.stream.clone())
                .subject_prefix(args.prefix.clone())
                .concurrency(args.concurrency)
                .fetch_batch(args.fetch_batch)
                .handle(crate::workloads::TASK_NAME, handler)
                .build()
                .await?;
            Ok(Prepared::Natasks(worker))
        }
        Kind::Raw => {
            let stream = js.get_stream(&args.stream).await?;
            // The consumer natasks creates, field for field (natasks' consumer_config).
            let consumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(format!("raw-{}", args.queue)),
                    description: Some("raw bench consumer".to_owned()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    filter_subject: format!("{}.{}", args.prefix, args.queue),
                    max_ack_pending: args.max_ack_pending,
                    replay_policy: ReplayPolicy::Instant,
                    ..Default::default()
                })
                .await?;
            Ok(Prepared::Raw(consumer))
        }
    }
}

async fn start_consuming(args: &Args, prepared: Prepared, counter: &Arc<Counter>) -> Res<Running> {
    match prepared {
        Prepared::Natasks(worker) => {
            let shutdown = worker.shutdown_handle();
            let task = tokio::spawn(async move { worker.run().await });
            Ok(Running::Natasks { shutdown, task })
        }
        Prepared::Raw(consumer) => {
            let messages = consumer
                .stream()
                .max_messages_per_batch(args.fetch_batch)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_EXPIRES / 4)
                .messages()
                .await?;
            let acked = Arc::new(AtomicUsize::new(0));
            let (concurrency, counter, acked_by_task) =
                (args.concurrency, counter.clone(), acked.clone());
            let task = tokio::spawn(async move {
                let result = messages
                    .filter(|item| {
                        // A missed heartbeat is reported, not fatal: the stream re-pulls.
                        let missed = matches!(item, Err(err) if err.kind() == MessagesErrorKind::MissingHeartbeat);
                        std::future::ready(!missed)
                    })
                    .map_err(BoxError::from)
                    .try_for_each_concurrent(concurrency, |message| {
                        let (counter, acked) = (&counter, &acked_by_task);
                        async move {
                            let payload: Payload = serde_json::from_slice(&message.payload)?;
                            counter.process(&payload)?;
                            message.ack().await?;
                            acked.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                    })
                    .await;
                if let Err(err) = &result {
                    counter.fail(format!("raw worker failed: {err}"));
                }
                result
            });
            Ok(Running::Raw { task, acked })
        }
    }
}

/// Waits for `mark`; `false` if stdin closed first (the parent went away).
async fn wait(counter: &Counter, mark: &Notify, stdin: &mut Lines<BufReader<Stdin>>) -> Res<bool> {
    let reached = tokio::select! {
        () = mark.notified() => true,
        line = stdin.next_line() => match line? {
            None => false,
            Some(line) => return Err(format!("unexpected {line:?} on stdin while running").into()),
        },
    };
    if let Some(failure) = counter.failed.get() {
        return Err(failure.clone().into());
    }
    Ok(reached)
}

async fn stop(running: Running, counter: &Counter) -> Res<()> {
    match running {
        Running::Natasks { shutdown, task } => {
            shutdown.shutdown();
            tokio::time::timeout(STOP_LIMIT, task)
                .await
                .map_err(|_| format!("the worker did not stop within {STOP_LIMIT:?}"))???;
        }
        Running::Raw { task, acked } => {
            // Every processed task acked, then the pull stream goes.
            let deadline = Instant::now() + STOP_LIMIT;
            while acked.load(Ordering::Relaxed) < counter.count.load(Ordering::Acquire) {
                if Instant::now() > deadline {
                    return Err(format!("acks still outstanding after {STOP_LIMIT:?}").into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            task.abort();
            let _ = task.await;
        }
    }
    Ok(())
}

/// Writes one protocol line to stdout and flushes it.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
