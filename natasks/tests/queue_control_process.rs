//! Queue control with real worker processes: the queue's limit of tasks in flight and its
//! rate hold across three worker processes, a worker process serving several queues is
//! killed mid-backlog without losing a task, and a pause holds across a server restart
//! while a worker process runs.
//!
//! The worker processes are this test binary itself: the ignored test
//! `queue_control_worker_process` is the worker program (it needs `NATASKS_QC_WORKER_URL`,
//! and fails without it); the scenarios start it as child processes with `--ignored`. It is
//! ignored so that a plain run does not count it as a test. A child prints one line per
//! handler start and end, `start <id> <unix_micros> <attempt> <queue>` and
//! `end <id> <unix_micros>`, after a marker; the parent reads them with deadlines. Handler
//! runs in different processes share no memory, so overlaps and rates are computed from
//! these timestamps (every process reads the same system clock). A child stops gracefully
//! when its stdin closes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use common::*;
use natasks::admin::{Admin, Rate};
use natasks::{Client, Task, Worker};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, ChildStdin, Command};

/// Name of every task of these scenarios.
const TASK: &str = "qc.task";
/// The child worker connects here; it is a child only when this is set.
const URL_ENV: &str = "NATASKS_QC_WORKER_URL";
/// The child's queues, `name:weight` separated by commas; the first is the builder's queue.
const QUEUES_ENV: &str = "NATASKS_QC_WORKER_QUEUES";
/// The child's concurrency.
const CONCURRENCY_ENV: &str = "NATASKS_QC_WORKER_CONCURRENCY";
/// How long the child's handler works, in milliseconds.
const WORK_ENV: &str = "NATASKS_QC_WORKER_WORK_MS";
/// The child's ack wait, in milliseconds.
const ACK_WAIT_ENV: &str = "NATASKS_QC_WORKER_ACK_WAIT_MS";
/// Starts every line a child prints for its parent.
const MARKER: &str = "@qc-worker: ";
/// Longest life of a child, should its parent never stop it.
const WORKER_LIFETIME: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// The worker program
// ---------------------------------------------------------------------------------------

/// The child worker program: a worker on the queues of `NATASKS_QC_WORKER_QUEUES`, printing
/// `ready`, then `start`/`end` lines for every handler run and `connection <event>` lines,
/// until its stdin closes (then it stops gracefully) or it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker program of the queue-control process scenarios, started by them"]
async fn queue_control_worker_process() {
    let url = std::env::var(URL_ENV)
        .unwrap_or_else(|_| panic!("{URL_ENV} is not set: this is a child process"));
    let setting = |name: &str| -> u64 {
        let value = std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
        value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is a number"))
    };
    let queues: Vec<(String, u32)> = std::env::var(QUEUES_ENV)
        .expect("queues set with the URL")
        .split(',')
        .map(|entry| {
            let (name, weight) = entry.split_once(':').expect("name:weight");
            (name.to_owned(), weight.parse().expect("weight"))
        })
        .collect();
    let work = Duration::from_millis(setting(WORK_ENV));
    let client = async_nats::ConnectOptions::new()
        .event_callback(|event| async move { emit(&format!("connection {event}")) })
        .connect(&url)
        .await
        .expect("child worker connects");
    let handler = move |task: Task| async move {
        let id = String::from_utf8_lossy(task.payload()).into_owned();
        let delivery = task.delivery().expect("received tasks carry delivery details");
        emit(&format!("start {id} {} {} {}", unix_micros(), delivery.attempt, delivery.queue));
        tokio::time::sleep(work).await;
        emit(&format!("end {id} {}", unix_micros()));
        Ok::<(), std::convert::Infallible>(())
    };
    let (first, first_weight) = queues[0].clone();
    let mut builder = Worker::builder(jetstream::new(client), &first)
        .concurrency(setting(CONCURRENCY_ENV) as usize)
        .ack_wait(Duration::from_millis(setting(ACK_WAIT_ENV)))
        .handle(TASK, handler);
    if queues.len() > 1 {
        builder = builder.weight(first_weight);
        for (queue, weight) in &queues[1..] {
            builder = builder.queue(queue.clone(), *weight);
        }
    }
    let worker = builder.build().await.expect("child worker builds");
    // Stdin closing is the signal to stop; a thread of its own reads it.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    emit("ready");
    let stop = async {
        tokio::select! {
            _ = closed_rx => {}
            () = tokio::time::sleep(WORKER_LIFETIME) => {}
        }
    };
    worker.run_until(stop).await.expect("child worker runs");
    emit("stopped");
}

/// One line on stdout, flushed at once (the parent reads it while we run).
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER}{line}").expect("write to stdout");
    out.flush().expect("flush stdout");
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_micros() as u64
}

// ---------------------------------------------------------------------------------------
// The parent side
// ---------------------------------------------------------------------------------------

/// A handler start or end printed by a child.
#[derive(Debug, Clone)]
struct Event {
    start: bool,
    id: String,
    /// When the child printed it, in microseconds since 1970.
    micros: u64,
    /// Starts only.
    attempt: u64,
    /// Starts only.
    queue: String,
    /// The child's label.
    worker: &'static str,
}

/// Every event of every child of a scenario, in the order read.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Event>>>);

impl Log {
    fn all(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    fn starts(&self) -> Vec<Event> {
        self.all().into_iter().filter(|e| e.start).collect()
    }

    /// Ids whose handler ended at least once, in any child.
    fn ended(&self) -> BTreeSet<String> {
        self.all().into_iter().filter(|e| !e.start).map(|e| e.id).collect()
    }

    fn ends(&self) -> usize {
        self.all().iter().filter(|e| !e.start).count()
    }

    /// Waits until `condition` holds for the events, or panics after `limit`.
    async fn wait(&self, limit: Duration, what: &str, condition: impl Fn(&[Event]) -> bool) {
        let log = self.clone();
        eventually(limit, what, || {
            let holds = condition(&log.0.lock().unwrap());
            async move { holds }
        })
        .await;
    }
}

/// How a child worker is set up.
#[derive(Clone, Copy)]
struct Setup {
    /// `name:weight` separated by commas.
    queues: &'static str,
    concurrency: usize,
    work: Duration,
    ack_wait: Duration,
}

/// A child worker process.
struct ChildWorker {
    label: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Connection events (`connected`, `disconnected`, ...) in the order printed.
    connection: Arc<Mutex<Vec<String>>>,
    /// Reads the child's stdout until it closes.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl ChildWorker {
    /// Starts this test binary as a worker and waits until it is ready (its consumers
    /// exist).
    async fn start(url: &str, setup: Setup, log: &Log, label: &'static str) -> ChildWorker {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut child = Command::new(exe)
            .args([
                "queue_control_worker_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(URL_ENV, url)
            .env(QUEUES_ENV, setup.queues)
            .env(CONCURRENCY_ENV, setup.concurrency.to_string())
            .env(WORK_ENV, setup.work.as_millis().to_string())
            .env(ACK_WAIT_ENV, setup.ack_wait.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the child worker process");
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let connection = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (sink, events) = (log.clone(), connection.clone());
        let reader = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // The test harness may print on the same line before our marker.
                let Some(at) = line.find(MARKER) else { continue };
                let words: Vec<&str> = line[at + MARKER.len()..].split_whitespace().collect();
                match words.as_slice() {
                    ["ready"] => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    ["stopped"] => {}
                    ["connection", event @ ..] => events.lock().unwrap().push(event.join(" ")),
                    ["start", id, micros, attempt, queue] => sink.0.lock().unwrap().push(Event {
                        start: true,
                        id: (*id).to_owned(),
                        micros: micros.parse().expect("micros"),
                        attempt: attempt.parse().expect("attempt"),
                        queue: (*queue).to_owned(),
                        worker: label,
                    }),
                    ["end", id, micros] => sink.0.lock().unwrap().push(Event {
                        start: false,
                        id: (*id).to_owned(),
                        micros: micros.parse().expect("micros"),
                        attempt: 0,
                        queue: String::new(),
                        worker: label,
                    }),
                    _ => panic!("unexpected line from child worker {label}: {line}"),
                }
            }
        });
        tokio::time::timeout(DEADLINE, ready_rx)
            .await
            .unwrap_or_else(|_| panic!("child worker {label} not ready in time"))
            .unwrap_or_else(|_| panic!("child worker {label} exited before it was ready"));
        ChildWorker { label, child, stdin, connection, reader: Some(reader) }
    }

    fn connection_events(&self) -> Vec<String> {
        self.connection.lock().unwrap().clone()
    }

    /// Closes its stdin, waits for a clean exit and reads the rest of what it printed.
    async fn stop(mut self) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("child worker {} did not stop in time", self.label))
            .expect("wait for the child worker");
        assert!(status.success(), "child worker {} exited with {status:?}", self.label);
        self.finish_reading().await;
    }

    /// SIGKILL, check it died of it, and read the rest of what it printed.
    async fn kill(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("killed worker did not exit")
            .expect("wait for the killed worker");
        assert_eq!(status.signal(), Some(9), "worker exited with {status:?}, not by SIGKILL");
        self.finish_reading().await;
    }

    async fn finish_reading(&mut self) {
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(DEADLINE, reader)
                .await
                .expect("stdout of the child worker not closed")
                .expect("stdout reader panicked");
        }
    }
}

/// Dispatches `<prefix>-0` .. `<prefix>-<n-1>` to `queue`, the id as payload.
async fn dispatch(client: &Client, queue: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        client.dispatch(Task::new(TASK, id.clone()), queue).await.unwrap();
        ids.push(id);
    }
    ids
}

/// The most handler runs in progress at once, from start and end times; at equal times an
/// end counts first (its task was acknowledged before the next one could be delivered).
fn max_overlap(events: &[Event]) -> usize {
    let mut edges: Vec<(u64, bool)> = events.iter().map(|e| (e.micros, e.start)).collect();
    // `false` (end) sorts before `true` (start) at the same time.
    edges.sort();
    let (mut now, mut most) = (0usize, 0usize);
    for (_, start) in edges {
        if start {
            now += 1;
            most = most.max(now);
        } else {
            now = now.saturating_sub(1);
        }
    }
    most
}

/// Handler runs per worker label.
fn by_worker(starts: &[Event]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for event in starts {
        *counts.entry(event.worker).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------------------
// 1. The queue's limit of tasks in flight holds across three worker processes.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_limit_holds_across_three_worker_processes() {
    const TASKS: usize = 40;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let log = Log::default();
    let setup = Setup {
        queues: "reports:1",
        concurrency: 4,
        work: Duration::from_millis(100),
        ack_wait: Duration::from_secs(30),
    };
    // The first worker creates the queue's consumer; the limit is set while it runs; the
    // other two adopt it when they start.
    let a = ChildWorker::start(&server.url(), setup, &log, "a").await;
    let info = Admin::new(js.clone()).set_limit("reports", Some(2)).await.unwrap();
    assert_eq!((info.limit, info.limit_set), (Some(2), true));
    let b = ChildWorker::start(&server.url(), setup, &log, "b").await;
    let c = ChildWorker::start(&server.url(), setup, &log, "c").await;
    let started = Instant::now();
    let ids = dispatch(&client, "reports", "r", TASKS).await;
    log.wait(DEADLINE, "every task to end", |events| {
        events.iter().filter(|e| !e.start).count() >= TASKS
    })
    .await;
    let took = started.elapsed();
    for worker in [a, b, c] {
        worker.stop().await;
    }

    let events = log.all();
    let starts = log.starts();
    let most = max_overlap(&events);
    let workers = by_worker(&starts);
    println!(
        "queue-limit: {TASKS} tasks in {took:?}, at most {most} running at once (12 slots), by worker {workers:?}"
    );
    assert_eq!(log.ended(), ids.iter().cloned().collect(), "every task ran");
    assert!(most <= 2, "the limit is 2, {most} ran at once");
    assert_eq!(most, 2, "the limit, not something else, bounded the runs");
    assert!(workers.len() >= 2, "the tasks were shared by several processes: {workers:?}");
    // 40 tasks of 100 ms, two at a time: about 2 s.
    assert!(
        took >= Duration::from_millis(1900),
        "{TASKS} tasks in {took:?}: the limit did not hold"
    );
    let info = Admin::new(js).queue("reports").await.unwrap();
    assert_eq!(info.limit, Some(2), "restarted workers keep the operator's limit");
}

// ---------------------------------------------------------------------------------------
// 2. A rate limit holds across three worker processes, without spending attempts.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_three_worker_processes() {
    const TASKS: usize = 30;
    const RATE: usize = 5;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let log = Log::default();
    let setup = Setup {
        queues: "api:1",
        concurrency: 4,
        work: Duration::from_millis(5),
        // Short, so that a wait that did not renew its lease would show as a redelivery.
        ack_wait: Duration::from_secs(2),
    };
    let a = ChildWorker::start(&server.url(), setup, &log, "a").await;
    let admin = Admin::new(js.clone());
    let info = admin.set_rate("api", None, Some(Rate::per_second(RATE as u32).unwrap())).await;
    assert_eq!(info.unwrap().rates.len(), 1);
    let b = ChildWorker::start(&server.url(), setup, &log, "b").await;
    let c = ChildWorker::start(&server.url(), setup, &log, "c").await;
    // The rate counts starts per second of the clock. The first starts come at once, when
    // the tasks arrive; dispatching early in a second keeps those starts and the ones at
    // the next second's turn apart.
    let into_second = unix_micros() % 1_000_000;
    if into_second > 200_000 {
        tokio::time::sleep(Duration::from_micros(1_100_000 - into_second)).await;
    }
    let ids = dispatch(&client, "api", "t", TASKS).await;
    log.wait(Duration::from_secs(30), "every task to end", |events| {
        events.iter().filter(|e| !e.start).count() >= TASKS
    })
    .await;
    for worker in [a, b, c] {
        worker.stop().await;
    }

    let starts = log.starts();
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for start in &starts {
        *per_second.entry(start.micros / 1_000_000).or_default() += 1;
    }
    let first = *per_second.keys().next().unwrap();
    let relative: Vec<(u64, usize)> = per_second.iter().map(|(s, n)| (s - first, *n)).collect();
    println!("rate: starts per second {relative:?}, by worker {:?}", by_worker(&starts));
    assert_eq!(log.ended(), ids.iter().cloned().collect(), "every task ran");
    assert_eq!(starts.len(), TASKS, "no task ran twice");
    assert!(per_second.values().all(|&n| n <= RATE), "at most {RATE} a second: {relative:?}");
    assert!(per_second.len() >= TASKS / RATE, "{TASKS} tasks at {RATE}/s: {relative:?}");
    let retried: Vec<_> = starts.iter().filter(|s| s.attempt != 1).collect();
    assert!(retried.is_empty(), "waiting for the rate spends no attempt: {retried:?}");
    assert!(by_worker(&starts).len() >= 2, "several processes shared the tasks");
}

// ---------------------------------------------------------------------------------------
// 3. A worker process serving several queues is killed mid-backlog; a fresh one finishes.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_queue_worker_process_killed_mid_backlog_loses_nothing() {
    const PER_QUEUE: usize = 100;
    const QUEUES: [&str; 3] = ["critical", "default", "low"];
    const ACK_WAIT: Duration = Duration::from_secs(2);
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let log = Log::default();
    let setup = Setup {
        queues: "critical:3,default:2,low:1",
        concurrency: 4,
        work: Duration::from_millis(20),
        ack_wait: ACK_WAIT,
    };
    // A backlog in every queue before the worker starts.
    let mut ids = BTreeSet::new();
    for queue in QUEUES {
        ids.extend(dispatch(&client, queue, queue, PER_QUEUE).await);
    }
    let mut first = ChildWorker::start(&server.url(), setup, &log, "first").await;
    log.wait(DEADLINE, "some tasks of every queue to end", |events| {
        let ended: BTreeSet<&str> =
            events.iter().filter(|e| !e.start).map(|e| e.id.as_str()).collect();
        QUEUES
            .iter()
            .all(|q| ended.iter().filter(|id| id.starts_with(&format!("{q}-"))).count() >= 5)
    })
    .await;
    first.kill().await;
    let killed_at = unix_micros();
    let before = log.all();
    let ended_before = log.ended();
    let in_flight: BTreeSet<String> = before
        .iter()
        .filter(|e| e.start && !ended_before.contains(&e.id))
        .map(|e| e.id.clone())
        .collect();
    let mut started_by_queue: BTreeMap<String, usize> = BTreeMap::new();
    for event in before.iter().filter(|e| e.start) {
        *started_by_queue.entry(event.queue.clone()).or_default() += 1;
    }
    assert_eq!(
        started_by_queue.len(),
        QUEUES.len(),
        "every queue was being worked: {started_by_queue:?}"
    );
    let mut left: BTreeMap<&str, usize> = BTreeMap::new();
    for queue in QUEUES {
        let prefix = format!("{queue}-");
        let done = ended_before.iter().filter(|id| id.starts_with(&prefix)).count();
        left.insert(queue, PER_QUEUE - done);
        assert!(done < PER_QUEUE, "{queue} was drained before the kill");
    }

    let second = ChildWorker::start(&server.url(), setup, &log, "second").await;
    log.wait(Duration::from_secs(30), "every task to end in one worker or the other", |events| {
        let ended: BTreeSet<&str> =
            events.iter().filter(|e| !e.start).map(|e| e.id.as_str()).collect();
        ended.len() >= ids.len()
    })
    .await;
    for queue in QUEUES {
        let subject = format!("natasks.{queue}");
        eventually(DEADLINE, &format!("{subject} to be empty"), || async {
            stored(&js, &subject).await == 0
        })
        .await;
    }
    second.stop().await;

    let ended = log.ended();
    let lost: Vec<_> = ids.difference(&ended).collect();
    let phantom: Vec<_> = ended.difference(&ids).collect();
    let runs = log.ends();
    let second_starts: Vec<Event> =
        log.starts().into_iter().filter(|e| e.worker == "second").collect();
    println!(
        "multi-queue-kill: {} tasks, left per queue at the kill {left:?}, {} in flight at the kill, \
         {} distinct ids ended, {} handler runs ({} duplicates), lost {}",
        ids.len(),
        in_flight.len(),
        ended.len(),
        runs,
        runs - ended.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "tasks lost: {lost:?}");
    assert!(phantom.is_empty(), "tasks never dispatched: {phantom:?}");
    assert!(!in_flight.is_empty(), "the kill should catch tasks in flight");
    // What the killed worker held came back to the new one, after the ack wait.
    for id in &in_flight {
        let again = second_starts
            .iter()
            .find(|e| &e.id == id)
            .unwrap_or_else(|| panic!("in-flight task {id} was not redelivered"));
        assert!(again.attempt >= 2, "{id}: attempt {}", again.attempt);
        let waited = Duration::from_micros(again.micros.saturating_sub(killed_at));
        assert!(
            waited >= ACK_WAIT - Duration::from_millis(500),
            "{id} came back {waited:?} after the kill, before the ack wait ({ACK_WAIT:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. A pause holds across a server restart while a worker process runs.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_across_a_server_restart_with_a_worker_process_running() {
    let mut server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let log = Log::default();
    let setup = Setup {
        queues: "mail:1",
        concurrency: 4,
        work: Duration::from_millis(5),
        ack_wait: Duration::from_secs(5),
    };
    let worker = ChildWorker::start(&server.url(), setup, &log, "worker").await;
    let info = Admin::new(js.clone()).pause("mail", None).await.unwrap();
    assert!(info.paused_until.is_some(), "{info:?}");
    let mut ids = dispatch(&client, "mail", "before", 10).await;

    server.restart().await;
    eventually(DEADLINE, "the worker process to reconnect", || {
        let events = worker.connection_events();
        let reconnected = events
            .iter()
            .rposition(|e| e.contains("disconnected"))
            .is_some_and(|gone| events[gone..].iter().any(|e| e == "connected"));
        async move { reconnected }
    })
    .await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    ids.extend(dispatch(&client, "mail", "after", 10).await);
    // The worker is back and has had time to pull: nothing may start.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(log.starts().is_empty(), "started while paused: {:?}", log.starts());
    let admin = Admin::new(js.clone());
    let info = admin.queue("mail").await.unwrap();
    assert!(info.paused_until.is_some(), "the pause survived the restart: {info:?}");
    assert_eq!(info.pending, 20, "{info:?}");

    let resumed = Instant::now();
    admin.resume("mail").await.unwrap();
    log.wait(DEADLINE, "every task to end after the resume", |events| {
        events.iter().filter(|e| !e.start).count() >= ids.len()
    })
    .await;
    println!(
        "pause-restart: 20 tasks held across the restart, all ended {:?} after the resume",
        resumed.elapsed()
    );
    worker.stop().await;
    let starts = log.starts();
    assert_eq!(log.ended(), ids.iter().cloned().collect(), "every task ran");
    assert_eq!(starts.len(), ids.len(), "each once");
    assert!(starts.iter().all(|s| s.attempt == 1), "nothing was retried: {starts:?}");
}

// ---------------------------------------------------------------------------------------
// 5. A worker serving several queues holds a rate set between its build and its run
//    (it once adopted the settings cached at build over a fresh reread).
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_multi_queue_worker_holds_a_rate_set_between_build_and_run() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let starts: Arc<Mutex<Vec<u64>>> = Arc::default();
    let handler = {
        let starts = starts.clone();
        move |_: Task| {
            starts.lock().unwrap().push(unix_micros());
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        }
    };
    let worker = Worker::builder(js.clone(), "a")
        .queue("b", 1)
        .concurrency(4)
        .handle(TASK, handler)
        .build()
        .await
        .unwrap();
    Admin::new(js.clone()).set_rate("a", None, Some(Rate::per_second(2).unwrap())).await.unwrap();
    let running = spawn(worker);
    dispatch(&client, "a", "a", 10).await;
    eventually(DEADLINE, "every task to start", || async { starts.lock().unwrap().len() == 10 })
        .await;
    running.stop().await.unwrap();
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for micros in starts.lock().unwrap().iter() {
        *per_second.entry(micros / 1_000_000).or_default() += 1;
    }
    assert!(per_second.values().all(|&n| n <= 2), "at most 2 a second: {per_second:?}");
}
