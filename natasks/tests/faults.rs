//! Fault injection: real processes, really killed. Every scenario dispatches tasks with
//! unique ids and ends by checking that every dispatch that returned `Ok` was processed at
//! least once, reporting duplicates.
//!
//! The worker process of the first scenario is this test binary itself: the ignored test
//! `fault_worker_process` is the worker program (it needs `NATASKS_FAULT_WORKER_URL`, and
//! fails without it), and the scenario starts it as a child process with `--ignored` and
//! kills it with SIGKILL. It is ignored so that a plain run does not count it as a test.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use natasks::{Client, DispatchErrorKind, Task, Worker};
use natasks_test_support::NatsCluster;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

/// Name of every task dispatched by these scenarios.
const TASK: &str = "fault.task";
/// Ack wait of every worker that may lose tasks: the lease after which they come back.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// The child worker process connects here when this variable is set.
const WORKER_URL_ENV: &str = "NATASKS_FAULT_WORKER_URL";
/// The queue the child worker process consumes.
const WORKER_QUEUE_ENV: &str = "NATASKS_FAULT_WORKER_QUEUE";
/// Starts every line the child worker process prints for its parent.
const MARKER: &str = "@fault-worker: ";
/// Longest life of a child worker process, should its parent never kill it.
const WORKER_LIFETIME: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Accounting
// ---------------------------------------------------------------------------------------

/// What happened to every task id in a scenario.
#[derive(Default)]
struct Ledger {
    /// Ids a dispatch was attempted for.
    attempted: BTreeSet<String>,
    /// Ids whose dispatch returned `Ok`.
    dispatched: BTreeSet<String>,
    /// Handler runs per id.
    processed: HashMap<String, usize>,
    /// Stream sequences each id was delivered from: more than one means it was stored twice.
    sequences: HashMap<String, BTreeSet<u64>>,
    /// Handler runs per worker label.
    by_worker: BTreeMap<String, usize>,
    /// Failed dispatch attempts: id, kind, message.
    errors: Vec<(String, DispatchErrorKind, String)>,
}

type Shared = Arc<Mutex<Ledger>>;

impl Ledger {
    fn shared() -> Shared {
        Arc::new(Mutex::new(Ledger::default()))
    }

    fn record_processed(&mut self, id: &str, sequence: u64, worker: &str) {
        *self.processed.entry(id.to_owned()).or_default() += 1;
        self.sequences.entry(id.to_owned()).or_default().insert(sequence);
        *self.by_worker.entry(worker.to_owned()).or_default() += 1;
    }

    /// Ids dispatched with `Ok` and never processed.
    fn lost(&self) -> Vec<&String> {
        self.dispatched.iter().filter(|id| !self.processed.contains_key(*id)).collect()
    }

    /// Extra handler runs (at-least-once redeliveries).
    fn duplicates(&self) -> usize {
        self.processed.values().map(|n| n - 1).sum()
    }

    /// Extra stored copies of a task (a retried dispatch that was not deduplicated).
    fn stored_duplicates(&self) -> usize {
        self.sequences.values().map(|s| s.len() - 1).sum()
    }

    fn all_processed(&self) -> bool {
        self.lost().is_empty()
    }

    /// Prints the scenario line and asserts that nothing was lost and nothing was
    /// processed that no dispatch was attempted for.
    fn assert_nothing_lost(&self, scenario: &str) {
        let lost = self.lost();
        println!(
            "scenario={scenario} attempted={} dispatched={} processed={} lost={} duplicates={} \
             stored_duplicates={} dispatch_errors={} by_worker={:?}",
            self.attempted.len(),
            self.dispatched.len(),
            self.processed.len(),
            lost.len(),
            self.duplicates(),
            self.stored_duplicates(),
            self.errors.len(),
            self.by_worker,
        );
        assert!(lost.is_empty(), "{scenario}: {} tasks lost: {lost:?}", lost.len());
        let phantom: Vec<_> =
            self.processed.keys().filter(|id| !self.attempted.contains(*id)).collect();
        assert!(phantom.is_empty(), "{scenario}: processed tasks never dispatched: {phantom:?}");
    }
}

/// Waits until every id dispatched with `Ok` was processed, or panics after `limit`.
async fn wait_all_processed(ledger: &Shared, limit: Duration, scenario: &str) {
    if let Err(unprocessed) = try_wait_all_processed(ledger, limit).await {
        panic!("{scenario}: {unprocessed}");
    }
}

/// Waits until every id dispatched with `Ok` was processed; after `limit`, says which
/// were not.
async fn try_wait_all_processed(ledger: &Shared, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        {
            let ledger = ledger.lock().unwrap();
            if ledger.all_processed() {
                return Ok(());
            }
            if start.elapsed() >= limit {
                return Err(format!(
                    "{} of {} dispatched tasks still unprocessed after {limit:?}: {:?}",
                    ledger.lost().len(),
                    ledger.dispatched.len(),
                    ledger.lost().into_iter().take(20).collect::<Vec<_>>()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `count` tasks were dispatched with `Ok`.
async fn wait_dispatched(ledger: &Shared, count: usize) {
    eventually(DEADLINE, &format!("{count} successful dispatches"), || async {
        ledger.lock().unwrap().dispatched.len() >= count
    })
    .await;
}

/// Waits until `count` handler runs were recorded.
async fn wait_processed_runs(ledger: &Shared, count: usize) {
    eventually(DEADLINE, &format!("{count} handler runs"), || async {
        ledger.lock().unwrap().processed.values().sum::<usize>() >= count
    })
    .await;
}

/// Dispatches `id` (payload and message id), retrying with the same message id until the
/// dispatch returns `Ok` or `deadline` passes. Every failure is recorded.
async fn dispatch_with_retry(
    client: &Client,
    ledger: &Shared,
    queue: &str,
    id: &str,
    deadline: Instant,
) {
    ledger.lock().unwrap().attempted.insert(id.to_owned());
    loop {
        let task = Task::new(TASK, id.to_owned()).with_message_id(id);
        match client.dispatch(task, queue).await {
            Ok(_) => {
                ledger.lock().unwrap().dispatched.insert(id.to_owned());
                return;
            }
            Err(err) => {
                ledger.lock().unwrap().errors.push((id.to_owned(), err.kind(), err.to_string()));
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Dispatches `<prefix>-0` .. `<prefix>-<count-1>` one after the other, `pause` apart, in
/// the background, each retried until `limit` from now.
fn burst(
    client: Client,
    ledger: Shared,
    queue: &'static str,
    prefix: &'static str,
    count: usize,
    pause: Duration,
    limit: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deadline = Instant::now() + limit;
        for i in 0..count {
            dispatch_with_retry(&client, &ledger, queue, &format!("{prefix}-{i}"), deadline).await;
            tokio::time::sleep(pause).await;
        }
    })
}

type Reply = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;

/// A handler that takes `work` per task and records it in the ledger as `worker`.
fn recorder(
    ledger: Shared,
    worker: &'static str,
    work: Duration,
) -> impl Fn(Task) -> Reply + Clone + Send + Sync + 'static {
    move |task: Task| {
        let ledger = ledger.clone();
        Box::pin(async move {
            tokio::time::sleep(work).await;
            let id = String::from_utf8_lossy(task.payload()).into_owned();
            let sequence = task.delivery().map_or(0, |d| d.stream_sequence);
            ledger.lock().unwrap().record_processed(&id, sequence, worker);
            Ok(())
        })
    }
}

/// Waits until the queue holds no task (every one was acknowledged).
async fn wait_queue_empty(js: &jetstream::Context, subject: &str) {
    eventually(DEADLINE, &format!("{subject} to be empty"), || async {
        stored(js, subject).await == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 1. A worker process is SIGKILLed mid-burst; a new worker process finishes the work.
// ---------------------------------------------------------------------------------------

/// The child worker program, started by `worker_process_killed_mid_burst_loses_nothing`:
/// runs a worker printing `started`/`processed <id> <attempt> <sequence>` lines until it is
/// killed (or stops by itself after a minute).
#[tokio::test]
#[ignore = "the worker program of a fault scenario, started by it as a child process"]
async fn fault_worker_process() {
    let url = std::env::var(WORKER_URL_ENV)
        .unwrap_or_else(|_| panic!("{WORKER_URL_ENV} is not set: this is a child process"));
    let queue = std::env::var(WORKER_QUEUE_ENV).expect("queue variable set with the URL");
    let client = async_nats::connect(&url).await.expect("child worker connects");
    let handler = |task: Task| async move {
        let id = String::from_utf8_lossy(task.payload()).into_owned();
        let delivery = task.delivery().expect("received tasks carry delivery details");
        emit(&format!("started {id} {} {}", delivery.attempt, delivery.stream_sequence));
        tokio::time::sleep(Duration::from_millis(10)).await;
        emit(&format!("processed {id} {} {}", delivery.attempt, delivery.stream_sequence));
        Ok::<(), Infallible>(())
    };
    let worker = Worker::builder(jetstream::new(client), &queue)
        .ack_wait(ACK_WAIT)
        .concurrency(4)
        .fetch_batch(16)
        .handle(TASK, handler)
        .build()
        .await
        .expect("child worker builds");
    emit("ready");
    worker.run_until(tokio::time::sleep(WORKER_LIFETIME)).await.expect("child worker runs");
}

/// One line on stdout, flushed at once (the parent reads it while we run).
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER}{line}").expect("write to stdout");
    out.flush().expect("flush stdout");
}

/// A line printed by a child worker.
#[derive(Debug, Clone)]
struct Event {
    started: bool,
    id: String,
    attempt: u64,
    sequence: u64,
    at: Instant,
}

/// A child worker process and the events it printed.
struct ChildWorker {
    child: Child,
    events: Arc<Mutex<Vec<Event>>>,
    /// Reads the child's stdout until it closes.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl ChildWorker {
    /// Starts this test binary as a worker on `queue` and waits until it is ready.
    async fn start(url: &str, queue: &str, ledger: Shared, label: &'static str) -> ChildWorker {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut child = Command::new(exe)
            .args([
                "fault_worker_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_URL_ENV, url)
            .env(WORKER_QUEUE_ENV, queue)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the child worker process");
        let stdout = child.stdout.take().expect("piped stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sink = events.clone();
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
                    [kind @ ("started" | "processed"), id, attempt, sequence] => {
                        let event = Event {
                            started: *kind == "started",
                            id: (*id).to_owned(),
                            attempt: attempt.parse().expect("attempt"),
                            sequence: sequence.parse().expect("sequence"),
                            at: Instant::now(),
                        };
                        if !event.started {
                            ledger.lock().unwrap().record_processed(
                                &event.id,
                                event.sequence,
                                label,
                            );
                        }
                        sink.lock().unwrap().push(event);
                    }
                    _ => panic!("unexpected line from the child worker: {line}"),
                }
            }
        });
        tokio::time::timeout(DEADLINE, ready_rx)
            .await
            .expect("child worker not ready in time")
            .expect("child worker exited before it was ready");
        ChildWorker { child, events, reader: Some(reader) }
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// SIGKILL, check it died of it, and read the rest of what it printed.
    async fn kill(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("killed worker did not exit")
            .expect("wait for the killed worker");
        assert_eq!(status.signal(), Some(9), "worker exited with {status:?}, not by SIGKILL");
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(DEADLINE, reader)
                .await
                .expect("stdout of the killed worker not closed")
                .expect("stdout reader panicked");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_killed_mid_burst_loses_nothing() {
    const TASKS: usize = 300;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let ledger = Ledger::shared();

    let mut first = ChildWorker::start(&server.url(), "crash", ledger.clone(), "first").await;
    let dispatcher = burst(
        client.clone(),
        ledger.clone(),
        "crash",
        "k",
        TASKS,
        Duration::from_millis(2),
        DEADLINE,
    );
    wait_processed_runs(&ledger, 60).await;
    first.kill().await;
    let killed_at = Instant::now();
    let before = first.events();
    // Started by the killed worker and not finished: in flight at the kill.
    let finished: BTreeSet<&str> =
        before.iter().filter(|e| !e.started).map(|e| e.id.as_str()).collect();
    let in_flight: BTreeSet<String> = before
        .iter()
        .filter(|e| e.started && !finished.contains(e.id.as_str()))
        .map(|e| e.id.clone())
        .collect();
    assert!(!ledger.lock().unwrap().dispatched.is_empty());

    let second = ChildWorker::start(&server.url(), "crash", ledger.clone(), "second").await;
    tokio::time::timeout(DEADLINE, dispatcher).await.expect("dispatcher finished").unwrap();
    wait_all_processed(&ledger, DEADLINE, "worker-sigkill").await;
    wait_queue_empty(&js, "natasks.crash").await;

    // The tasks that were in flight came back to the new worker, after the ack wait.
    let after = second.events();
    for id in &in_flight {
        let redelivered = after
            .iter()
            .find(|e| !e.started && &e.id == id)
            .unwrap_or_else(|| panic!("in-flight task {id} was not redelivered"));
        assert!(redelivered.attempt >= 2, "{id}: attempt {}", redelivered.attempt);
        let waited = redelivered.at - killed_at;
        assert!(
            waited >= ACK_WAIT - Duration::from_millis(500),
            "{id} came back after {waited:?}, before the ack wait ({ACK_WAIT:?})"
        );
    }
    let ledger = ledger.lock().unwrap();
    println!(
        "worker-sigkill: {} tasks in flight at the kill, all redelivered after the ack wait",
        in_flight.len()
    );
    assert!(!in_flight.is_empty(), "the kill should have caught tasks in flight");
    assert!(ledger.errors.is_empty(), "dispatch errors: {:?}", ledger.errors);
    assert_eq!(ledger.stored_duplicates(), 0);
    ledger.assert_nothing_lost("worker-sigkill");
}

// ---------------------------------------------------------------------------------------
// 2. The server is SIGKILLed and restarted on the same store while a dispatcher and a
//    worker run.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_mid_burst_loses_nothing() {
    const TASKS: usize = 200;
    const OUTAGE: Duration = Duration::from_millis(2500);
    let mut server = NatsServer::start().await;
    let mut dispatch_js = server.jetstream().await;
    // Dispatches during the outage give up after 1 s (the default is 5 s).
    dispatch_js.set_timeout(Duration::from_secs(1));
    let client = Client::new(dispatch_js).await.unwrap();
    let ledger = Ledger::shared();
    let worker = Worker::builder(server.jetstream().await, "outage")
        .ack_wait(ACK_WAIT)
        .concurrency(4)
        .fetch_batch(8)
        .handle(TASK, recorder(ledger.clone(), "worker", Duration::from_millis(5)))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let dispatcher = burst(
        client.clone(),
        ledger.clone(),
        "outage",
        "s",
        TASKS,
        Duration::from_millis(5),
        Duration::from_secs(30),
    );
    wait_dispatched(&ledger, TASKS / 4).await;
    server.kill().await;
    eventually(DEADLINE, "the client to notice the outage", || async { !client.is_ready() }).await;
    let outage_from = ledger.lock().unwrap().dispatched.len();
    tokio::time::sleep(OUTAGE).await;
    let during_outage = ledger.lock().unwrap().dispatched.len() - outage_from;
    assert_eq!(during_outage, 0, "a dispatch returned Ok while the server was down");
    server.restart().await;

    tokio::time::timeout(Duration::from_secs(40), dispatcher)
        .await
        .expect("dispatcher finished")
        .unwrap();
    wait_all_processed(&ledger, DEADLINE, "server-restart").await;
    let js = server.jetstream().await;
    wait_queue_empty(&js, "natasks.outage").await;
    assert!(!running.join.is_finished(), "the worker must resume in-process, not stop");
    running.stop().await.unwrap();

    let ledger = ledger.lock().unwrap();
    assert_eq!(ledger.dispatched.len(), TASKS, "every dispatch succeeded once retried");
    assert!(!ledger.errors.is_empty(), "dispatches during the outage must fail");
    let mut kinds = BTreeMap::new();
    for (id, kind, message) in &ledger.errors {
        *kinds.entry(format!("{kind:?}")).or_insert(0) += 1;
        assert!(
            matches!(kind, DispatchErrorKind::Timeout | DispatchErrorKind::Rejected),
            "{id}: unexpected error kind {kind:?}: {message}"
        );
        assert!(message.contains(id) || message.contains(TASK), "{id}: vague error {message}");
    }
    let (_, _, example) = &ledger.errors[0];
    println!("server-restart: dispatch errors by kind {kinds:?}; first: {example}");
    assert_eq!(ledger.stored_duplicates(), 0, "a retried dispatch was stored twice");
    ledger.assert_nothing_lost("server-restart");
}

// ---------------------------------------------------------------------------------------
// 3. A 3-node cluster with the stream replicated 3 times: the stream leader is killed
//    mid-burst.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_leader_killed_mid_burst_loses_nothing() {
    const TASKS: usize = 200;
    let mut cluster = NatsCluster::start(3).await;
    // Create the replicated stream, then find its leader.
    let admin = cluster.jetstream().await;
    Client::builder(admin.clone()).replicas(3).build().await.unwrap();
    let leader = cluster.stream_leader(&admin, "NATASKS").await;
    let info = admin.get_stream("NATASKS").await.unwrap().cached_info().clone();
    assert_eq!(info.config.num_replicas, 3);

    // Dispatcher and worker connect to the leader first, and know every node.
    let mut urls = cluster.urls();
    urls.rotate_left(leader);
    let connect = || async {
        async_nats::ConnectOptions::new()
            .retain_servers_order()
            .connect(urls.clone())
            .await
            .expect("connect to the cluster")
    };
    let dispatch_client = connect().await;
    assert_eq!(dispatch_client.server_info().server_name, cluster.name(leader));
    let mut dispatch_js = jetstream::new(dispatch_client.clone());
    dispatch_js.set_timeout(Duration::from_secs(2));
    let client = Client::builder(dispatch_js).replicas(3).build().await.unwrap();
    let ledger = Ledger::shared();
    let worker_client = connect().await;
    let worker = Worker::builder(jetstream::new(worker_client.clone()), "ha")
        .replicas(3)
        .ack_wait(ACK_WAIT)
        .concurrency(4)
        .fetch_batch(8)
        .handle(TASK, recorder(ledger.clone(), "worker", Duration::from_millis(5)))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let dispatcher = burst(
        client.clone(),
        ledger.clone(),
        "ha",
        "c",
        TASKS,
        Duration::from_millis(5),
        Duration::from_secs(40),
    );
    wait_dispatched(&ledger, TASKS / 4).await;
    wait_processed_runs(&ledger, TASKS / 8).await;
    cluster.kill(leader).await;

    tokio::time::timeout(Duration::from_secs(45), dispatcher)
        .await
        .expect("dispatcher finished")
        .unwrap();
    wait_all_processed(&ledger, Duration::from_secs(30), "cluster-leader-kill").await;
    let new_leader = cluster.stream_leader(&admin, "NATASKS").await;
    assert_ne!(new_leader, leader, "a surviving node leads the stream");
    wait_queue_empty(&admin, "natasks.ha").await;
    assert!(!running.join.is_finished(), "the worker must carry on");
    for client in [&dispatch_client, &worker_client] {
        assert_ne!(
            client.server_info().server_name,
            cluster.name(leader),
            "still on the dead node"
        );
    }
    running.stop().await.unwrap();

    let ledger = ledger.lock().unwrap();
    assert_eq!(ledger.dispatched.len(), TASKS, "every dispatch succeeded once retried");
    let kinds: BTreeSet<String> = ledger.errors.iter().map(|(_, k, _)| format!("{k:?}")).collect();
    println!(
        "cluster-leader-kill: killed {}, new leader {}; {} dispatch errors {kinds:?}; first: {:?}",
        cluster.name(leader),
        cluster.name(new_leader),
        ledger.errors.len(),
        ledger.errors.first().map(|(_, _, message)| message)
    );
    assert_eq!(ledger.stored_duplicates(), 0, "a retried dispatch was stored twice");
    ledger.assert_nothing_lost("cluster-leader-kill");
}

// ---------------------------------------------------------------------------------------
// 4. Graceful shutdown mid-burst with a second worker on the same queue.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_mid_burst_hands_work_to_the_other_worker() {
    const TASKS: usize = 150;
    /// Far longer than the test may take: anything handed back late would show.
    const LONG_ACK_WAIT: Duration = Duration::from_secs(30);
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let ledger = Ledger::shared();
    let build = |label: &'static str, concurrency: usize, fetch_batch: usize| {
        Worker::builder(js.clone(), "drain")
            .ack_wait(LONG_ACK_WAIT)
            .concurrency(concurrency)
            .fetch_batch(fetch_batch)
            .handle(TASK, recorder(ledger.clone(), label, Duration::from_millis(20)))
            .build()
    };
    // A buffers many tasks; B keeps working after A stops.
    let a = spawn(build("a", 2, 32).await.unwrap());
    let b = spawn(build("b", 4, 4).await.unwrap());

    let dispatcher =
        burst(client, ledger.clone(), "drain", "g", TASKS, Duration::from_millis(1), DEADLINE);
    eventually(DEADLINE, "worker A to process some tasks", || async {
        ledger.lock().unwrap().by_worker.get("a").copied().unwrap_or(0) >= 10
    })
    .await;
    let stopping = Instant::now();
    a.stop().await.expect("graceful shutdown is not an error");
    let a_stopped = stopping.elapsed();
    tokio::time::timeout(DEADLINE, dispatcher).await.expect("dispatcher finished").unwrap();
    // A keeps its inbox until its open pull requests have ended, so no task reaches an
    // inbox nobody reads; the rest is handed to B at once, not after the ack wait.
    if let Err(unprocessed) = try_wait_all_processed(&ledger, Duration::from_secs(10)).await {
        let stream = js.get_stream("NATASKS").await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("natasks-drain").await.unwrap();
        let info = consumer.info().await.unwrap().clone();
        panic!(
            "graceful-shutdown: {unprocessed}; consumer: num_pending={} num_ack_pending={} \
             num_waiting={} num_redelivered={}; B is running {}",
            info.num_pending,
            info.num_ack_pending,
            info.num_waiting,
            info.num_redelivered,
            !b.join.is_finished()
        );
    }
    let took = stopping.elapsed();
    wait_queue_empty(&js, "natasks.drain").await;
    b.stop().await.unwrap();

    println!("graceful-shutdown: A stopped in {a_stopped:?}; all tasks done {took:?} after");
    assert!(took < LONG_ACK_WAIT / 2, "handed-back tasks waited for the ack wait ({took:?})");
    let ledger = ledger.lock().unwrap();
    assert!(ledger.by_worker.get("b").copied().unwrap_or(0) > 0, "B processed nothing");
    assert_eq!(ledger.duplicates(), 0, "a task was processed twice: {:?}", ledger.processed);
    assert!(ledger.errors.is_empty(), "dispatch errors: {:?}", ledger.errors);
    ledger.assert_nothing_lost("graceful-shutdown");
}

/// The core of scenario 4, made likely: tasks keep arriving at a high rate while the
/// stopping worker still has an open pull request with plenty of room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_arriving_during_shutdown_are_not_stranded() {
    const TASKS: usize = 400;
    const LONG_ACK_WAIT: Duration = Duration::from_secs(30);
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let ledger = Ledger::shared();
    let build = |label: &'static str, concurrency: usize, fetch_batch: usize, work: u64| {
        Worker::builder(js.clone(), "back")
            .ack_wait(LONG_ACK_WAIT)
            .concurrency(concurrency)
            .fetch_batch(fetch_batch)
            .handle(TASK, recorder(ledger.clone(), label, Duration::from_millis(work)))
            .build()
    };
    // A asks for up to 256 tasks at once and works slowly; B takes one at a time.
    let a = spawn(build("a", 1, 256, 50).await.unwrap());
    let b = spawn(build("b", 1, 1, 1).await.unwrap());
    let dispatchers: Vec<_> = (0..4)
        .map(|n| {
            let (client, ledger) = (client.clone(), ledger.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + DEADLINE;
                for i in (n..TASKS).step_by(4) {
                    dispatch_with_retry(&client, &ledger, "back", &format!("b-{i}"), deadline)
                        .await;
                }
            })
        })
        .collect();
    wait_dispatched(&ledger, TASKS / 4).await;
    let stopping = Instant::now();
    a.stop().await.unwrap();
    for dispatcher in dispatchers {
        tokio::time::timeout(DEADLINE, dispatcher).await.expect("dispatcher finished").unwrap();
    }
    if let Err(unprocessed) = try_wait_all_processed(&ledger, Duration::from_secs(8)).await {
        let stream = js.get_stream("NATASKS").await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("natasks-back").await.unwrap();
        let info = consumer.info().await.unwrap().clone();
        panic!(
            "{unprocessed} ({:?} after A stopped); consumer: num_pending={} \
             num_ack_pending={} num_redelivered={}: delivered to the stopped worker and \
             waiting for the {LONG_ACK_WAIT:?} ack wait",
            stopping.elapsed(),
            info.num_pending,
            info.num_ack_pending,
            info.num_redelivered,
        );
    }
    b.stop().await.unwrap();
    let ledger = ledger.lock().unwrap();
    assert_eq!(ledger.duplicates(), 0);
    ledger.assert_nothing_lost("shutdown-under-load");
}
