//! Task lifecycle across processes: the dispatcher, the waiter and the worker are separate
//! OS processes on one real server, as they are in a deployment, so that nothing in these
//! scenarios can lean on state shared inside a process.
//!
//! The child processes are this test binary itself: the ignored tests
//! `track_worker_process`, `track_dispatcher_process` and `track_waiter_process` are the
//! child programs. Each needs `NATASKS_TRACK_URL` (and the other variables below) and
//! fails without it; a scenario starts them with `--exact --ignored` and reads the lines
//! they print after `@track-proc: ` on stdout. They are ignored so that a plain run does
//! not count them as tests.

mod common;

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use futures_util::StreamExt as _;
use natasks::{
    Attempt, CancelOutcome, Cancellation, Client, HandlerError, Json, Status, Task, TaskId,
    TaskState, TaskStatus, TrackErrorKind, Worker,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The server every child connects to.
const URL_ENV: &str = "NATASKS_TRACK_URL";
/// The queue the children work on.
const QUEUE_ENV: &str = "NATASKS_TRACK_QUEUE";
/// What the child is told: the worker's label, the dispatcher's tasks (`1,2;3`: one task
/// per `;`, adding the numbers), or the waiter's task ids (`a,b`).
const ARG_ENV: &str = "NATASKS_TRACK_ARG";
/// Starts every line a child prints for its parent.
const MARKER: &str = "@track-proc: ";
/// Ack wait of the child workers: the lease after which a task of a dead worker comes back.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// Longest life of a child, should its parent never stop it.
const LIFETIME: Duration = Duration::from_secs(60);

/// A handler's result: what it computed, and which attempt in which process computed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Outcome {
    total: u64,
    attempt: u64,
    worker: String,
}

/// The subject a parent publishes on to let a held task finish.
fn release_subject(id: &str) -> String {
    format!("trackproc.release.{id}")
}

// ---------------------------------------------------------------------------------------
// The child programs
// ---------------------------------------------------------------------------------------

/// What the parent told a child process.
fn child_env() -> (String, String, String) {
    let url = std::env::var(URL_ENV)
        .unwrap_or_else(|_| panic!("{URL_ENV} is not set: this is a child process"));
    let queue = std::env::var(QUEUE_ENV).expect("queue variable set with the URL");
    let arg = std::env::var(ARG_ENV).unwrap_or_default();
    (url, queue, arg)
}

/// One line on stdout for the parent, flushed at once.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER}{line}").expect("write to stdout");
    out.flush().expect("flush stdout");
}

/// The worker program: `add` sums its payload; `hold` runs until the parent releases it or
/// cancels it. Both return an [`Outcome`] naming the attempt and this worker's label.
/// Prints `ready`, then `started <id> <attempt>` and `signalled <id>` lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker program of track_process scenarios, started by them as a child"]
async fn track_worker_process() {
    let (url, queue, label) = child_env();
    let nats = async_nats::connect(&url).await.expect("child worker connects");
    let worker_label = label.clone();
    let add = move |Json(numbers): Json<Vec<u64>>, Attempt(attempt): Attempt| {
        let worker = worker_label.clone();
        async move { Ok::<_, HandlerError>(Outcome { total: numbers.iter().sum(), attempt, worker }) }
    };
    let releases = nats.clone();
    let hold = move |TaskId(id): TaskId, Attempt(attempt): Attempt, cancel: Cancellation| {
        let (nats, worker) = (releases.clone(), label.clone());
        async move {
            let mut release = nats.subscribe(release_subject(&id)).await?;
            // The server knows the subscription before the parent hears `started`.
            nats.flush().await?;
            emit(&format!("started {id} {attempt}"));
            tokio::select! {
                () = cancel.cancelled() => emit(&format!("signalled {id}")),
                _ = release.next() => {}
                () = tokio::time::sleep(LIFETIME) => return Err(HandlerError::msg("never released")),
            }
            Ok(Outcome { total: 0, attempt, worker })
        }
    };
    let worker = Worker::builder(jetstream::new(nats), &queue)
        .ack_wait(ACK_WAIT)
        .concurrency(2)
        .handle("add", add)
        .handle("hold", hold)
        .build()
        .await
        .expect("child worker builds");
    emit("ready");
    worker.run_until(tokio::time::sleep(LIFETIME)).await.expect("child worker runs");
}

/// The dispatcher program: dispatches one tracked `add` task per `;`-separated list of
/// numbers, printing `dispatched <id>` for each, then exits.
#[tokio::test]
#[ignore = "the dispatcher program of track_process scenarios, started by them as a child"]
async fn track_dispatcher_process() {
    let (url, queue, tasks) = child_env();
    let nats = async_nats::connect(&url).await.expect("child dispatcher connects");
    let client = Client::new(jetstream::new(nats)).await.expect("client");
    for numbers in tasks.split(';') {
        let numbers: Vec<u64> = numbers.split(',').map(|n| n.parse().expect("number")).collect();
        let task = Task::json("add", &numbers).expect("encode").tracked();
        let receipt = client.dispatch(task, &queue).await.expect("dispatch");
        emit(&format!("dispatched {}", receipt.id));
    }
}

/// The waiter program: waits for the typed result of each task id, all at once, printing
/// `waiting`, then `result <id> <total> <attempt> <worker>` or `error <id> <kind>` each.
#[tokio::test]
#[ignore = "the waiter program of track_process scenarios, started by them as a child"]
async fn track_waiter_process() {
    let (url, _queue, ids) = child_env();
    let nats = async_nats::connect(&url).await.expect("child waiter connects");
    let client = Client::new(jetstream::new(nats)).await.expect("client");
    emit("waiting");
    let waits = ids.split(',').map(|id| {
        let client = client.clone();
        async move {
            match client.wait::<Outcome>(id, DEADLINE + Duration::from_secs(10)).await {
                Ok(o) => emit(&format!("result {id} {} {} {}", o.total, o.attempt, o.worker)),
                Err(err) => emit(&format!("error {id} {:?}", err.kind())),
            }
        }
    });
    futures_util::future::join_all(waits).await;
}

// ---------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------

/// A child process and the marker lines it printed.
struct Proc {
    name: &'static str,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line read so far.
    log: Vec<String>,
}

impl Proc {
    /// Starts this test binary as the child program `role`.
    fn spawn(role: &'static str, url: &str, queue: &str, arg: &str) -> Proc {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut child = Command::new(exe)
            .args([role, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(URL_ENV, url)
            .env(QUEUE_ENV, queue)
            .env(ARG_ENV, arg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("start {role}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                // The test harness may print on the same line before the marker.
                if let Some(at) = line.find(MARKER) {
                    let _ = tx.send(line[at + MARKER.len()..].to_owned());
                }
            }
        });
        Proc { name: role, child, lines, log: Vec::new() }
    }

    /// Starts a worker process labelled `label` and waits until it is ready.
    async fn worker(url: &str, queue: &str, label: &str) -> Proc {
        let mut worker = Proc::spawn("track_worker_process", url, queue, label);
        worker.expect(&["ready"]).await;
        worker
    }

    /// The words of the next line starting with `prefix`, within [`DEADLINE`]; other lines
    /// are only logged.
    async fn expect(&mut self, prefix: &[&str]) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    panic!("{} exited before printing {prefix:?}: {:?}", self.name, self.log)
                }
                Err(_) => panic!(
                    "{} printed no {prefix:?} within {DEADLINE:?}: {:?}",
                    self.name, self.log
                ),
            };
            self.log.push(line.clone());
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            if words.len() >= prefix.len() && words.iter().zip(prefix).all(|(w, p)| w == p) {
                return words;
            }
        }
    }

    /// Every line printed so far.
    fn printed(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// Waits (with a deadline) for the child to exit by itself, successfully.
    async fn exits_ok(&mut self) {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit in time", self.name))
            .expect("wait for the child");
        let printed = self.printed().to_vec();
        assert!(status.success(), "{} exited with {status:?}: {printed:?}", self.name);
    }

    /// SIGKILL, and check it died of it.
    async fn kill(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not die", self.name))
            .expect("wait for the killed child");
        assert_eq!(
            status.signal(),
            Some(9),
            "{} exited with {status:?}, not by SIGKILL",
            self.name
        );
    }
}

/// The recorded status of a task that must be recorded.
async fn status(client: &Client, id: &str) -> TaskStatus {
    match client.status(id).await.expect("status") {
        Status::Known(status) => status,
        other => panic!("task {id} is not recorded: {other:?}"),
    }
}

/// Waits until the task's record is `running` in attempt `attempt`; its status then.
async fn running(client: &Client, id: &str, attempt: u64) -> TaskStatus {
    let start = Instant::now();
    loop {
        let status = status(client, id).await;
        if matches!(status.state, TaskState::Running { .. }) && status.attempt == attempt {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "task {id} not running attempt {attempt}: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Dispatches a tracked `hold` task and waits until `worker` runs it.
async fn dispatch_held(client: &Client, worker: &mut Proc, queue: &str) -> String {
    let id = client.dispatch(Task::new("hold", "x").tracked(), queue).await.unwrap().id;
    worker.expect(&["started", &id, "1"]).await;
    id
}

/// Waits until the natasks stream holds nothing (no task left, none dead-lettered), or
/// panics naming what it holds. (A worker records the outcome before it acknowledges the
/// task: a task can be recorded finished a moment before it leaves the stream.)
async fn assert_stream_empty(js: &jetstream::Context) {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let start = Instant::now();
    loop {
        let subjects: std::collections::HashMap<String, usize> = stream
            .info_with_subjects(">")
            .await
            .expect("stream info")
            .filter_map(|s| async move { s.ok() })
            .collect()
            .await;
        if subjects.is_empty() {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "the stream still holds {subjects:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lets a held task of a worker process finish.
async fn release(server: &NatsServer, id: &str) {
    let nats = async_nats::connect(server.url()).await.unwrap();
    nats.publish(release_subject(id), "go".into()).await.unwrap();
    nats.flush().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 1. Dispatch in one process, wait for the typed result in a second, work in a third.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_wait_and_work_in_three_processes() {
    let server = NatsServer::start().await;
    let url = server.url();
    let client = Client::new(server.jetstream().await).await.unwrap();

    let mut dispatcher = Proc::spawn("track_dispatcher_process", &url, "math", "1,2,3;4,5;10");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(dispatcher.expect(&["dispatched"]).await[1].clone());
    }
    dispatcher.exits_ok().await;
    for id in &ids {
        assert_eq!(status(&client, id).await.state, TaskState::Pending, "{id}: no worker yet");
    }

    // The waiter waits before any worker runs: the results reach it when they are stored.
    let mut waiter = Proc::spawn("track_waiter_process", &url, "math", &ids.join(","));
    waiter.expect(&["waiting"]).await;
    let mut worker = Proc::worker(&url, "math", "w-1").await;
    let mut results = std::collections::HashMap::new();
    while results.len() < ids.len() {
        let words = waiter.expect(&["result"]).await;
        results.insert(words[1].clone(), words[2..].join(" "));
    }
    for (id, total) in ids.iter().zip([6, 9, 10]) {
        assert_eq!(results[id], format!("{total} 1 w-1"), "{id}: total, attempt, worker");
    }
    waiter.exits_ok().await;
    assert!(!waiter.printed().iter().any(|l| l.starts_with("error")), "{:?}", waiter.log);

    // A third client reads the same results.
    for id in &ids {
        let status = status(&client, id).await;
        assert_eq!((status.state, status.attempt), (TaskState::Succeeded, 1), "{id}");
    }
    let outcome = client.result::<Outcome>(&ids[0]).await.unwrap();
    assert_eq!(outcome, Outcome { total: 6, attempt: 1, worker: "w-1".into() });
    assert_stream_empty(&server.jetstream().await).await;
    worker.kill().await;
}

// ---------------------------------------------------------------------------------------
// 2. Cancelling running, pending and delayed tasks of a worker in another process.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_worker_in_another_process() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut worker = Proc::worker(&server.url(), "jobs", "w-1").await;

    // Both slots of the worker (concurrency 2) are taken: what comes next waits.
    let doomed = dispatch_held(&client, &mut worker, "jobs").await;
    let spared = dispatch_held(&client, &mut worker, "jobs").await;
    running(&client, &doomed, 1).await;
    let add = |n: u64| Task::json("add", &[n]).unwrap().tracked();
    let pending = client.dispatch(add(1), "jobs").await.unwrap().id;
    let other = client.dispatch(add(2), "jobs").await.unwrap().id;
    let delay = Duration::from_secs(2);
    let due = Instant::now() + delay;
    let delayed = client.dispatch_in(add(3), "jobs", delay).await.unwrap().id;
    assert_eq!(status(&client, &pending).await.state, TaskState::Pending);

    let outcome = client.cancel(&pending).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Cancelled { was: TaskState::Pending });
    let outcome = client.cancel(&delayed).await.unwrap();
    assert!(matches!(outcome, CancelOutcome::Cancelled { was: TaskState::Scheduled { .. } }));

    // The running one: its handler, in the worker process, sees the signal within 1 s.
    let cancelling = Instant::now();
    assert_eq!(client.cancel(&doomed).await.unwrap(), CancelOutcome::Signalled);
    worker.expect(&["signalled", &doomed]).await;
    let signal = cancelling.elapsed();
    println!("cancel-running: the handler in the worker process saw the signal {signal:?} after the cancel began");
    assert!(signal < Duration::from_secs(1), "the handler saw the cancel after {signal:?}");
    let err = client.wait::<Outcome>(&doomed, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::Cancelled, "{err}");

    // The freed slot runs the other pending task; the spared one finishes when released.
    let result = client.wait::<Outcome>(&other, DEADLINE).await.unwrap();
    assert_eq!(result, Outcome { total: 2, attempt: 1, worker: "w-1".into() });
    release(&server, &spared).await;
    assert_eq!(client.wait::<Outcome>(&spared, DEADLINE).await.unwrap().attempt, 1);

    // Past the delayed task's due time, a task dispatched now runs after anything the
    // schedule would have put into the queue.
    tokio::time::sleep_until((due + Duration::from_millis(500)).into()).await;
    let sentinel = client.dispatch(add(4), "jobs").await.unwrap().id;
    assert_eq!(client.wait::<Outcome>(&sentinel, DEADLINE).await.unwrap().total, 4);

    let printed = worker.printed().to_vec();
    for id in [&pending, &delayed] {
        assert!(!printed.iter().any(|l| l.contains(id.as_str())), "{id} ran: {printed:?}");
    }
    let starts = printed.iter().filter(|l| l.starts_with(&format!("started {doomed} "))).count();
    assert_eq!(starts, 1, "the cancelled task ran again: {printed:?}");
    for id in [&pending, &delayed, &doomed] {
        let status = status(&client, id).await;
        assert_eq!(status.state, TaskState::Cancelled, "{id}");
        assert!(status.attempt <= 1, "{id} was retried: {status:?}");
    }
    assert_stream_empty(&js).await;
    worker.kill().await;
}

// ---------------------------------------------------------------------------------------
// 3. The worker process is SIGKILLed mid-task: the task comes back to another one.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_of_a_killed_worker_is_rerun_and_recorded() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut first = Proc::worker(&server.url(), "crash", "first").await;
    let dispatched_at = Instant::now();
    let id = dispatch_held(&client, &mut first, "crash").await;
    let before = running(&client, &id, 1).await;
    first.kill().await;
    let killed_at = Instant::now();

    // Nobody renews the record: it still says running attempt 1, with a lease that runs
    // out, and a waiter sees nothing final.
    let stale = status(&client, &id).await;
    let TaskState::Running { lease_until, .. } = stale.state else {
        panic!("the killed worker's attempt is recorded running: {stale:?}")
    };
    assert_eq!(stale.attempt, before.attempt);
    assert!(lease_until <= time::OffsetDateTime::now_utc() + ACK_WAIT, "{lease_until}");
    let err = client.wait::<Outcome>(&id, Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::TimedOut, "{err}");

    // After the ack wait the server redelivers it to a new worker process: attempt 2.
    let mut second = Proc::worker(&server.url(), "crash", "second").await;
    second.expect(&["started", &id, "2"]).await;
    let (since_kill, since_dispatch) = (killed_at.elapsed(), dispatched_at.elapsed());
    println!("worker-sigkill: the task came back to the new worker {since_kill:?} after the kill");
    // Its lease began after the dispatch (and the killed worker renewed it while it lived).
    let lease = ACK_WAIT - Duration::from_millis(100);
    assert!(since_dispatch >= lease, "back {since_dispatch:?} after the dispatch");
    let retry = running(&client, &id, 2).await;
    assert_eq!(retry.id, id);

    release(&server, &id).await;
    let result = client.wait::<Outcome>(&id, DEADLINE).await.unwrap();
    assert_eq!(result, Outcome { total: 0, attempt: 2, worker: "second".into() });
    let done = status(&client, &id).await;
    assert_eq!((done.state, done.attempt), (TaskState::Succeeded, 2));
    assert_stream_empty(&js).await;
    second.kill().await;
}

// ---------------------------------------------------------------------------------------
// 4. Cancelling a task whose worker process died: the record says running, nobody runs it.
// ---------------------------------------------------------------------------------------

/// `Client::cancel` of a task recorded `running` leaves the `cancelled` event to the worker
/// running the handler; when that worker is dead, the worker that gets the task after the
/// dead one's lease removes it and announces the cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_task_whose_worker_died_is_announced() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut events = client.events(Some("orphan")).await.unwrap();
    let mut first = Proc::worker(&server.url(), "orphan", "first").await;
    let id = dispatch_held(&client, &mut first, "orphan").await;
    running(&client, &id, 1).await;
    first.kill().await;

    // The record still says running, so the cancel signals (nobody hears it).
    assert_eq!(client.cancel(&id).await.unwrap(), CancelOutcome::Signalled);
    assert_eq!(status(&client, &id).await.state, TaskState::Cancelled);
    // After the lease, the task comes back to a new worker, which removes it unrun.
    let mut second = Proc::worker(&server.url(), "orphan", "second").await;
    assert_stream_empty(&js).await;
    let printed = second.printed().to_vec();
    assert!(!printed.iter().any(|l| l.contains(id.as_str())), "{id} ran again: {printed:?}");
    assert_eq!(status(&client, &id).await.state, TaskState::Cancelled);

    // A subscriber hears how the task ended.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
        if event.id == id {
            seen.push(event.kind);
        }
        if seen.last() == Some(&natasks::EventKind::Cancelled) {
            break;
        }
    }
    assert_eq!(seen.last(), Some(&natasks::EventKind::Cancelled), "events of {id}: {seen:?}");
    second.kill().await;
}
