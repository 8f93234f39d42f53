//! Delayed tasks: JetStream message schedules behind `dispatch_in` and `dispatch_at`.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::StreamExt;
use natasks::{Client, DispatchErrorKind, Task, Worker};

/// Waits until the stream holds no message (acks are asynchronous).
async fn wait_stream_empty(js: &async_nats::jetstream::Context, what: &str) {
    eventually(DEADLINE, what, || async { stream_messages(js).await == 0 }).await;
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

#[tokio::test]
async fn dispatch_in_delays_delivery_and_keeps_the_task() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("later", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let task = Task::new("later", "delayed body")
        .with_header("X-Request-Id", "req-7")
        .with_message_id("delayed-1");
    let start = Instant::now();
    client.dispatch_in(task, "q", Duration::from_millis(1500)).await.unwrap();
    assert_eq!(stored(&js, "natasks.q").await, 0, "nothing is in the queue before it is due");

    let got = seen.recv().await;
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(1400), "delivered too early, after {elapsed:?}");
    assert!(elapsed <= Duration::from_secs(6), "delivered too late, after {elapsed:?}");
    println!("delivered after {elapsed:?}");
    assert_eq!(got.name(), "later");
    assert_eq!(got.payload().as_ref(), b"delayed body");
    assert_eq!(got.header("X-Request-Id"), Some("req-7"));
    assert_eq!(got.message_id(), Some("delayed-1"));
    assert_eq!(got.delivery().map(|d| d.attempt), Some(1));
    running.stop().await.unwrap();
    wait_stream_empty(&js, "schedule and task are both gone").await;
}

#[tokio::test]
async fn due_times_not_in_the_future_are_delivered_immediately() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    client
        .dispatch_at(Task::new("t", "past"), "q", SystemTime::now() - Duration::from_secs(60))
        .await
        .unwrap();
    client.dispatch_in(Task::new("t", "zero"), "q", Duration::ZERO).await.unwrap();
    // Stored straight into the queue, not as schedules.
    assert_eq!(stored(&js, "natasks.q").await, 2);
    assert_eq!(stream_messages(&js).await, 2);

    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let got = seen.take(2, DEADLINE).await;
    let mut payloads: Vec<_> = got.iter().map(|t| t.payload().clone()).collect();
    payloads.sort();
    assert_eq!(payloads, vec!["past", "zero"]);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pending_schedules_each_fire_at_their_own_time() {
    const TASKS: u64 = 2_000;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64, u64)>();
    let handler = move |task: Task| {
        let processed = now_ms();
        let text = String::from_utf8_lossy(task.payload()).into_owned();
        let (id, due) = text.split_once(':').expect("payload is id:due");
        let _ = tx.send((id.parse().unwrap(), due.parse().unwrap(), processed));
        std::future::ready(Ok::<(), Infallible>(()))
    };
    let worker = Worker::builder(js.clone(), "q")
        .concurrency(64)
        .fetch_batch(64)
        .handle("t", handler)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    // Due times spread over 3 s, starting far enough ahead that every dispatch is a schedule.
    let base = now_ms() + 4_000;
    let dispatch_start = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..TASKS)
        .map(|i| {
            let client = client.clone();
            async move {
                let due = base + i * 3 / 2;
                let task = Task::new("t", format!("{i}:{due}"));
                client.dispatch_at(task, "q", UNIX_EPOCH + Duration::from_millis(due)).await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let dispatched_at = now_ms();
    for result in results {
        result.expect("dispatch");
    }
    println!("dispatched {TASKS} schedules in {:?}", dispatch_start.elapsed());
    assert!(
        dispatched_at < base,
        "dispatching took so long that due times passed; the test proves nothing"
    );

    let mut first_seen: HashMap<u64, (u64, u64)> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (first_seen.len() as u64) < TASKS {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((id, due, processed))) => {
                first_seen.entry(id).or_insert((due, processed));
            }
            _ => panic!("only {} of {TASKS} delayed tasks delivered", first_seen.len()),
        }
    }
    for id in 0..TASKS {
        assert!(first_seen.contains_key(&id), "task {id} never delivered");
    }
    let mut early = Vec::new();
    let mut lateness: Vec<i64> = Vec::with_capacity(TASKS as usize);
    for (id, (due, processed)) in &first_seen {
        if processed + 50 < *due {
            early.push((*id, due - processed));
        }
        lateness.push(*processed as i64 - *due as i64);
    }
    assert!(early.is_empty(), "{} tasks processed before their due time: {early:?}", early.len());
    lateness.sort_unstable();
    let pct = |p: usize| lateness[(lateness.len() * p / 100).min(lateness.len() - 1)];
    let (p50, p99, max) = (pct(50), pct(99), *lateness.last().unwrap());
    println!("lateness: p50 {p50} ms, p99 {p99} ms, max {max} ms");
    assert!(p99 < 2_000, "p99 lateness {p99} ms (p50 {p50}, max {max})");
    running.stop().await.unwrap();
    wait_stream_empty(&js, "every schedule fired and every task was acknowledged").await;
}

#[tokio::test]
async fn same_message_id_schedules_once() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for _ in 0..2 {
        let task = Task::new("t", "once").with_message_id("reminder-1");
        client.dispatch_in(task, "q", Duration::from_secs(1)).await.unwrap();
    }
    assert_eq!(stream_messages(&js).await, 1, "the second dispatch is a duplicate");

    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let got = seen.recv().await;
    assert_eq!(got.message_id(), Some("reminder-1"));
    assert!(
        seen.recv_within(Duration::from_secs(3)).await.is_none(),
        "the task must be delivered once"
    );
    running.stop().await.unwrap();
    wait_stream_empty(&js, "the task is acknowledged").await;
}

#[tokio::test]
async fn old_server_without_schedules_refuses_delayed_dispatch() {
    let binary = old_server_binary().expect(
        "the old nats-server (2.11) is not installed; run scripts/install-nats-server to install it",
    );
    let server = NatsServer::builder().binary(binary).start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.expect("the client works against 2.11");
    client.dispatch(Task::new("t", "now"), "q").await.expect("plain dispatch works");
    assert_eq!(stored(&js, "natasks.q").await, 1);

    let err = client
        .dispatch_in(Task::new("t", "later"), "q", Duration::from_secs(5))
        .await
        .expect_err("delayed dispatch needs schedules");
    assert_eq!(err.kind(), DispatchErrorKind::SchedulesUnsupported, "{err}");
    assert!(err.to_string().contains("2.11"), "the error names the server version: {err}");
    assert_eq!(stream_messages(&js).await, 1, "the failed call published nothing");
}

#[tokio::test]
async fn schedule_due_while_the_server_is_down_fires_after_restart() {
    let mut server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let delay = Duration::from_millis(1500);
    let start = Instant::now();
    client.dispatch_in(Task::new("t", "survivor"), "q", delay).await.unwrap();
    assert_eq!(stream_messages(&js).await, 1);
    assert_eq!(stored(&js, "natasks.q").await, 0, "not due yet");
    drop((client, js));

    server.kill().await;
    // The due time has to pass while the server is down.
    tokio::time::sleep((delay + Duration::from_millis(1500)).saturating_sub(start.elapsed())).await;
    server.restart().await;

    let js = server.jetstream().await;
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let got = seen.recv_within(Duration::from_secs(30)).await.expect("delivered after the restart");
    assert_eq!(got.payload().as_ref(), b"survivor");
    running.stop().await.unwrap();
}
