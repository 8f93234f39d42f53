//! Worker lifecycle: shutdown, draining, lease renewal, concurrency and connection loss.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use common::*;
use natasks::{Client, HandlerError, RunErrorKind, Task, Worker};
use tokio::sync::{oneshot, watch, Notify};

/// How long a stopped worker may take to return from `run` when nothing is running: it
/// keeps its inbox until its open pull request has expired (`fetch_timeout`), so that no
/// task reaches an inbox nobody reads.
const PROMPT: Duration = Duration::from_secs(natasks::DEFAULT_FETCH_TIMEOUT.as_secs() + 2);

/// Consumer info of the queue's durable consumer.
async fn consumer_info(js: &jetstream::Context, queue: &str) -> jetstream::consumer::Info {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let mut consumer: jetstream::consumer::Consumer<pull::Config> =
        stream.get_consumer(&format!("natasks-{queue}")).await.expect("consumer exists");
    consumer.info().await.expect("consumer info").clone()
}

/// Waits until the stream holds no message (every task was acknowledged).
async fn wait_stream_empty(js: &jetstream::Context) {
    eventually(DEADLINE, "the stream to be empty", || async { stream_messages(js).await == 0 })
        .await;
}

/// A handler reporting the task payload (as text) and its attempt.
fn id_reporter(
    tx: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
) -> impl Fn(Task) -> std::future::Ready<Result<(), Infallible>> + Clone + Send + Sync + 'static {
    move |task: Task| {
        let attempt = task.delivery().map_or(0, |d| d.attempt);
        let _ = tx.send((String::from_utf8_lossy(task.payload()).into_owned(), attempt));
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn run_until_returns_when_the_signal_completes() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        worker
            .run_until(async {
                let _ = stopped.await;
            })
            .await
    });

    client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    seen.recv().await;
    assert!(!join.is_finished(), "run must keep going until the signal");

    let start = Instant::now();
    stop.send(()).unwrap();
    let result = tokio::time::timeout(PROMPT, join)
        .await
        .expect("run_until did not return promptly after the signal")
        .expect("worker task panicked");
    result.expect("a signalled shutdown is not an error");
    println!("run_until returned {:?} after the signal", start.elapsed());
}

#[tokio::test]
async fn shutdown_handle_stops_run() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let handle = worker.shutdown_handle();
    let join = tokio::spawn(async move { worker.run().await });

    client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    seen.recv().await;
    assert!(!join.is_finished(), "run must keep going until shutdown");

    handle.shutdown();
    tokio::time::timeout(PROMPT, join)
        .await
        .expect("run did not return promptly after shutdown()")
        .expect("worker task panicked")
        .expect("shutdown is not an error");
}

#[tokio::test]
async fn graceful_shutdown_waits_for_the_running_handler() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut started = Seen::new();
    let finished = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (tx, finished, calls) = (started.tx.clone(), finished.clone(), calls.clone());
        move |_task: Task| {
            let (tx, finished, calls) = (tx.clone(), finished.clone(), calls.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(());
                tokio::time::sleep(Duration::from_millis(1500)).await;
                finished.store(true, Ordering::SeqCst);
                Ok::<(), Infallible>(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "q")
        .ack_wait(Duration::from_secs(2))
        .handle("slow", handler)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("slow", "x"), "q").await.unwrap();
    started.recv().await;

    let start = Instant::now();
    running.stop().await.expect("graceful shutdown is not an error");
    assert!(finished.load(Ordering::SeqCst), "run returned before the handler finished");
    println!("run returned {:?} after shutdown", start.elapsed());

    wait_stream_empty(&js).await;
    let info = consumer_info(&js, "q").await;
    assert_eq!(info.num_ack_pending, 0, "the task must be acknowledged");
    assert_eq!(info.num_redelivered, 0, "the task must not be redelivered");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn drain_timeout_hands_unfinished_work_back_promptly() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut started = Seen::new();
    let blocking = {
        let tx = started.tx.clone();
        move |_task: Task| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<(), Infallible>(())
            }
        }
    };
    let a = Worker::builder(js.clone(), "q")
        .ack_wait(Duration::from_secs(30))
        .drain_timeout(Duration::from_millis(300))
        .handle("t", blocking)
        .build()
        .await
        .unwrap();
    let a = spawn(a);
    client.dispatch(Task::new("t", "handed-back"), "q").await.unwrap();
    started.recv().await;

    let mut seen_b = Seen::new();
    let b = Worker::builder(js.clone(), "q")
        .ack_wait(Duration::from_secs(30))
        .handle("t", id_reporter(seen_b.tx.clone()))
        .build()
        .await
        .unwrap();
    let b = spawn(b);

    let start = Instant::now();
    tokio::time::timeout(PROMPT, a.stop())
        .await
        .expect("worker A must stop about the drain timeout, not the handler's 60 s")
        .expect("shutdown is not an error");
    let (payload, attempt) = seen_b
        .recv_within(PROMPT)
        .await
        .expect("worker B must receive the abandoned task well before the 30 s ack wait");
    println!("B received the abandoned task {:?} after A's shutdown", start.elapsed());
    assert_eq!(payload, "handed-back");
    assert_eq!(attempt, 2);
    b.stop().await.unwrap();
    wait_stream_empty(&js).await;
}

/// Without prefetch (the default), a worker holds only the tasks it runs: with one slot, the
/// other 19 stay on the server while it works, and after a graceful stop another worker
/// takes them at once, each on its first delivery.
#[tokio::test]
async fn unstarted_tasks_stay_on_the_server_across_a_graceful_stop() {
    const TASKS: usize = 20;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for i in 0..TASKS {
        client.dispatch(Task::new("t", format!("task-{i}")), "q").await.unwrap();
    }

    let mut started = Seen::new();
    let mut done_a = Seen::new();
    let slow = {
        let (started, done) = (started.tx.clone(), done_a.tx.clone());
        move |task: Task| {
            let (started, done) = (started.clone(), done.clone());
            async move {
                let id = String::from_utf8_lossy(task.payload()).into_owned();
                let _ = started.send(id.clone());
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = done.send(id);
                Ok::<(), Infallible>(())
            }
        }
    };
    let a = Worker::builder(js.clone(), "q")
        .concurrency(1)
        .ack_wait(Duration::from_secs(30))
        .handle("t", slow)
        .build()
        .await
        .unwrap();
    let a = spawn(a);
    started.recv().await;
    let info = consumer_info(&js, "q").await;
    assert_eq!(
        (info.num_ack_pending, info.num_pending),
        (1, TASKS as u64 - 1),
        "A holds only the task it runs"
    );

    let mut seen_b = Seen::new();
    let b = Worker::builder(js.clone(), "q")
        .concurrency(4)
        .ack_wait(Duration::from_secs(30))
        .handle("t", id_reporter(seen_b.tx.clone()))
        .build()
        .await
        .unwrap();
    let b = spawn(b);

    let start = Instant::now();
    a.stop().await.expect("shutdown is not an error");
    let mut processed = std::collections::HashMap::new();
    while let Some(id) = done_a.recv_within(Duration::ZERO).await {
        processed.insert(id, 1);
    }
    let a_count = processed.len();
    assert!(a_count >= 1, "A's running handler should have finished during the drain");
    let deadline = start + PROMPT;
    while processed.len() < TASKS {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen_b.recv_within(left).await {
            Some((id, attempt)) => {
                assert!(processed.insert(id.clone(), attempt).is_none(), "{id} ran twice");
            }
            None => panic!(
                "only {} of {TASKS} tasks processed within {PROMPT:?} of A's shutdown",
                processed.len()
            ),
        }
    }
    println!("A processed {a_count}; B got the rest {:?} after A's shutdown", start.elapsed());
    for i in 0..TASKS {
        let attempt = processed.get(&format!("task-{i}"));
        assert_eq!(attempt, Some(&1), "task-{i}: a graceful stop must cost no attempt");
    }
    b.stop().await.unwrap();
    wait_stream_empty(&js).await;
}

#[tokio::test]
async fn long_handler_keeps_its_lease_with_progress_acks() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut calls = Seen::new();
    let mut done = Seen::new();
    let handler = {
        let (calls, done) = (calls.tx.clone(), done.tx.clone());
        move |task: Task| {
            let (calls, done) = (calls.clone(), done.clone());
            async move {
                let _ = calls.send(task.delivery().map_or(0, |d| d.attempt));
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = done.send(());
                Ok::<(), Infallible>(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "q")
        .concurrency(2)
        .ack_wait(Duration::from_secs(1))
        .progress_interval(Duration::from_millis(300))
        .handle("t", handler)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("t", "long"), "q").await.unwrap();

    assert_eq!(calls.recv().await, 1);
    done.recv().await;
    assert_eq!(
        calls.recv_within(Duration::from_secs(3)).await,
        None,
        "a handler renewing its lease must not see its task redelivered"
    );
    wait_stream_empty(&js).await;
    assert_eq!(consumer_info(&js, "q").await.num_redelivered, 0);
    running.stop().await.unwrap();
}

/// The converse: the same settings, but a handler that blocks its thread starves the
/// progress timer (it runs on the same task), so the lease expires and the task is
/// redelivered. This shows it is the in-progress acks that keep the lease above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handler_without_progress_acks_loses_its_lease() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut calls = Seen::new();
    let handler = {
        let calls = calls.tx.clone();
        move |task: Task| {
            let calls = calls.clone();
            async move {
                let attempt = task.delivery().map_or(0, |d| d.attempt);
                let _ = calls.send(attempt);
                if attempt == 1 {
                    // Blocks the thread: no in-progress ack can be sent meanwhile.
                    std::thread::sleep(Duration::from_secs(3));
                }
                Ok::<(), Infallible>(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "q")
        .concurrency(2)
        .ack_wait(Duration::from_secs(1))
        .progress_interval(Duration::from_millis(300))
        .handle("t", handler)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("t", "starved"), "q").await.unwrap();
    assert_eq!(calls.recv().await, 1);
    assert_eq!(
        calls.recv().await,
        2,
        "without progress acks the task must be redelivered after the ack wait"
    );
    wait_stream_empty(&js).await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn slow_task_does_not_block_the_others() {
    const FAST: usize = 40;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let release = Arc::new(Notify::new());
    let slow_done = Arc::new(AtomicBool::new(false));
    let mut slow_started = Seen::new();
    let mut slow_finished = Seen::new();
    let slow = {
        let (release, done) = (release.clone(), slow_done.clone());
        let (started, finished) = (slow_started.tx.clone(), slow_finished.tx.clone());
        move |_task: Task| {
            let (release, done) = (release.clone(), done.clone());
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                let _ = started.send(());
                let released = tokio::time::timeout(DEADLINE * 2, release.notified()).await.is_ok();
                done.store(true, Ordering::SeqCst);
                let _ = finished.send(released);
                Ok::<(), Infallible>(())
            }
        }
    };
    let mut fast_seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .concurrency(4)
        .handle("slow", slow)
        .handle("fast", id_reporter(fast_seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("slow", "slow"), "q").await.unwrap();
    slow_started.recv().await;
    for i in 0..FAST {
        client.dispatch(Task::new("fast", format!("fast-{i}")), "q").await.unwrap();
    }
    let fast = fast_seen.take(FAST, DEADLINE).await;
    assert!(!slow_done.load(Ordering::SeqCst), "the slow task must still be running");
    let ids: std::collections::HashSet<String> = fast.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), FAST, "every fast task completed");

    release.notify_one();
    assert!(slow_finished.recv().await, "the slow task was released, not timed out");
    wait_stream_empty(&js).await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn worker_resumes_after_the_server_restarts() {
    const EACH: usize = 5;
    let mut server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let (gate, gate_rx) = watch::channel(false);
    let mut blocked = Seen::new();
    let blocker = {
        let blocked = blocked.tx.clone();
        move |_task: Task| {
            let (blocked, mut gate) = (blocked.clone(), gate_rx.clone());
            async move {
                let _ = blocked.send(());
                let _ = tokio::time::timeout(Duration::from_secs(60), gate.wait_for(|open| *open))
                    .await;
                Ok::<(), Infallible>(())
            }
        }
    };
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .concurrency(1)
        .ack_wait(Duration::from_secs(5))
        .handle("block", blocker)
        .handle("t", id_reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    // The only slot is busy, so these stay unprocessed until after the restart.
    client.dispatch(Task::new("block", ""), "q").await.unwrap();
    blocked.recv().await;
    for i in 0..EACH {
        client.dispatch(Task::new("t", format!("before-{i}")), "q").await.unwrap();
    }

    server.kill().await;
    gate.send_replace(true);
    assert!(
        seen.recv_within(Duration::from_secs(2)).await.is_none(),
        "nothing can be processed while the server is down"
    );
    assert!(!running.join.is_finished(), "a lost connection must not stop the worker");

    server.restart().await;
    let after = Client::new(server.jetstream().await).await.unwrap();
    for i in 0..EACH {
        after.dispatch(Task::new("t", format!("after-{i}")), "q").await.unwrap();
    }

    let mut ids = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids.len() < 2 * EACH {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen.recv_within(left).await {
            Some((id, _)) => {
                ids.insert(id);
            }
            None => panic!("after the restart only {ids:?} were processed within 30 s"),
        }
    }
    for i in 0..EACH {
        assert!(ids.contains(&format!("before-{i}")), "before-{i} lost");
        assert!(ids.contains(&format!("after-{i}")), "after-{i} lost");
    }
    assert!(!running.join.is_finished(), "run must not have returned");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn run_fails_when_the_connection_is_closed_for_good() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    seen.recv().await;

    js.client().drain().await.expect("drain the connection");
    let result = tokio::time::timeout(DEADLINE, running.join)
        .await
        .expect("run must return once the connection is closed for good")
        .expect("worker task panicked");
    let err = result.expect_err("a closed connection is an error");
    assert_eq!(err.kind(), RunErrorKind::ConnectionClosed, "{err}");
    assert!(err.to_string().contains("\"q\""), "the error names the queue: {err}");
}

#[tokio::test]
async fn second_concurrent_run_is_refused() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Arc::new(
        Worker::builder(js.clone(), "q")
            .handle("t", reporter(seen.tx.clone()))
            .build()
            .await
            .unwrap(),
    );
    let handle = worker.shutdown_handle();
    let first = tokio::spawn({
        let worker = worker.clone();
        async move { worker.run_until(std::future::pending()).await }
    });
    client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    seen.recv().await;

    let second = tokio::time::timeout(PROMPT, worker.run_until(std::future::pending()))
        .await
        .expect("the second run must return at once");
    let err = second.expect_err("a second concurrent run is refused");
    assert_eq!(err.kind(), RunErrorKind::AlreadyRunning, "{err}");
    assert!(!first.is_finished(), "the refused call must not stop the first run");

    // The first run still works.
    client.dispatch(Task::new("t", "y"), "q").await.unwrap();
    assert_eq!(seen.recv().await.payload().as_ref(), b"y");
    handle.shutdown();
    tokio::time::timeout(PROMPT, first)
        .await
        .expect("first run stops")
        .expect("worker task panicked")
        .unwrap();
}

/// A process usually exits right after `run` returns: the acks and hand-backs of the
/// shutdown must have reached the server by then, not sit in the client's write buffer.
#[tokio::test]
async fn shutdown_outcomes_are_sent_before_run_returns() {
    const TASKS: usize = 20;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for i in 0..TASKS {
        client.dispatch(Task::new("t", format!("task-{i}")), "q").await.unwrap();
    }

    // Worker A lives in its own runtime, dropped as soon as `run_until` returns, like a
    // process exiting after shutdown.
    let (started_tx, started_rx) = std::sync::mpsc::channel::<String>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let url = server.url();
    let a = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
            let slow = move |task: Task| {
                let started = started_tx.clone();
                async move {
                    let _ = started.send(String::from_utf8_lossy(task.payload()).into_owned());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok::<(), Infallible>(())
                }
            };
            let worker = Worker::builder(js, "q")
                .concurrency(1)
                .ack_wait(Duration::from_secs(30))
                .handle("t", slow)
                .build()
                .await
                .unwrap();
            worker
                .run_until(async {
                    let _ = stop_rx.await;
                })
                .await
        })
    });
    let first = tokio::task::spawn_blocking(move || started_rx.recv_timeout(DEADLINE))
        .await
        .unwrap()
        .expect("worker A started a task");

    let mut seen_b = Seen::new();
    let b = Worker::builder(js.clone(), "q")
        .concurrency(4)
        .ack_wait(Duration::from_secs(30))
        .handle("t", id_reporter(seen_b.tx.clone()))
        .build()
        .await
        .unwrap();
    let b = spawn(b);

    let start = Instant::now();
    stop_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || a.join())
        .await
        .unwrap()
        .expect("worker A's thread panicked")
        .expect("shutdown is not an error");
    let mut processed = std::collections::HashSet::from([first.clone()]);
    let deadline = start + PROMPT;
    while processed.len() < TASKS {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen_b.recv_within(left).await {
            Some((id, _)) => {
                assert_ne!(id, first, "A's finished task ran again: its ack never left A");
                processed.insert(id);
            }
            None => panic!(
                "only {} of {TASKS} tasks processed within {PROMPT:?} of A's shutdown: the \
                 hand-backs never reached the server",
                processed.len()
            ),
        }
    }
    b.stop().await.unwrap();
    wait_stream_empty(&js).await;
}

/// A task must not sit in the worker behind slow handlers until its ack wait runs out and it
/// is delivered a second time (the worker asks for no more tasks than it has free slots:
/// `correctness::worker_holds_no_more_tasks_than_free_slots` checks that directly).
#[tokio::test]
async fn slow_handlers_do_not_strand_buffered_tasks_past_the_ack_wait() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "slow")
        .concurrency(2)
        .ack_wait(Duration::from_secs(1))
        .handle("slow", move |task: Task| {
            let tx = tx.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1300)).await;
                let attempt = task.delivery().map(|d| d.attempt).unwrap_or_default();
                let _ = tx.send((String::from_utf8_lossy(task.payload()).into_owned(), attempt));
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    for i in 0..8 {
        client.dispatch(Task::new("slow", i.to_string()), "slow").await.unwrap();
    }
    let running = spawn(worker);
    let mut done = seen.take(8, Duration::from_secs(30)).await;
    // Anything delivered twice shows up as an extra report or an attempt above 1.
    assert!(seen.recv_within(Duration::from_millis(1500)).await.is_none(), "a task ran twice");
    running.stop().await.unwrap();
    done.sort();
    let expected: Vec<(String, u64)> = (0..8).map(|i| (i.to_string(), 1)).collect();
    assert_eq!(done, expected, "every task once, on its first delivery");
}

/// With prefetch (`fetch_batch` above `concurrency`), a graceful stop runs the prefetched
/// tasks before it returns: none goes back to the server with an attempt spent.
#[tokio::test]
async fn a_graceful_stop_runs_prefetched_tasks() {
    const TASKS: usize = 5;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for i in 0..TASKS {
        client.dispatch(Task::new("t", format!("task-{i}")), "pre").await.unwrap();
    }
    let mut started = Seen::new();
    let mut done = Seen::new();
    let slow = {
        let (started, done) = (started.tx.clone(), done.tx.clone());
        move |task: Task| {
            let (started, done) = (started.clone(), done.clone());
            async move {
                let attempt = task.delivery().map_or(0, |d| d.attempt);
                let id = String::from_utf8_lossy(task.payload()).into_owned();
                let _ = started.send(id.clone());
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = done.send((id, attempt));
                Ok::<(), Infallible>(())
            }
        }
    };
    let a = Worker::builder(js.clone(), "pre")
        .concurrency(1)
        .fetch_batch(TASKS)
        .handle("t", slow)
        .build()
        .await
        .unwrap();
    let a = spawn(a);
    started.recv().await;
    let info = consumer_info(&js, "pre").await;
    assert_eq!(info.num_ack_pending, TASKS, "A prefetched every task");
    a.stop().await.unwrap();
    let mut ran = done.take(TASKS, Duration::ZERO).await;
    ran.sort();
    let expected: Vec<(String, u64)> = (0..TASKS).map(|i| (format!("task-{i}"), 1)).collect();
    assert_eq!(ran, expected, "A ran every prefetched task once, on its first attempt");
    wait_stream_empty(&js).await;
}
