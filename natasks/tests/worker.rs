//! Processing: retries, timeouts, panics, backoff, dead letters, unroutable messages, the
//! consumer a worker creates, queue isolation and builder validation.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use async_nats::jetstream::message::StreamMessage;
use async_nats::HeaderMap;
use common::*;
use futures_util::StreamExt;
use natasks::{
    Client, HandlerError, Json, SetupErrorKind, Task, Unroutable, Worker, WorkerBuilder,
};

/// The value of header `name` on a raw stored message.
fn header(message: &StreamMessage, name: &str) -> Option<String> {
    message.headers.get(name).map(|v| v.as_str().to_owned())
}

/// How many values header `name` has.
fn header_count(headers: &HeaderMap, name: &str) -> usize {
    headers.get_all(name).count()
}

/// The delivery attempt of a received task.
fn attempt(task: &Task) -> u64 {
    task.delivery().expect("received tasks carry delivery details").attempt
}

/// Waits until `subject` holds no message.
/// Asserts a dead letter's reason, attempt count and (part of) its last error.
fn assert_dead_letter(dead: &StreamMessage, reason: &str, attempts: &str, error_part: &str) {
    assert_eq!(header(dead, "Natasks-Dead-Letter-Reason").as_deref(), Some(reason));
    assert_eq!(header(dead, "Natasks-Attempts").as_deref(), Some(attempts));
    let last_error = header(dead, "Natasks-Last-Error").unwrap_or_default();
    assert!(last_error.contains(error_part), "last error {last_error:?} lacks {error_part:?}");
}

async fn wait_empty(js: &async_nats::jetstream::Context, subject: &str) {
    let what = format!("{subject} to be empty");
    eventually(DEADLINE, &what, || async { stored(js, subject).await == 0 }).await;
}

/// Waits until `subject` holds exactly `n` messages.
async fn wait_stored(js: &async_nats::jetstream::Context, subject: &str, n: u64) {
    let what = format!("{n} messages on {subject}");
    eventually(DEADLINE, &what, || async { stored(js, subject).await == n }).await;
}

/// A handler that reports every task and fails with "boom" on attempts below `succeed_on`.
fn failing_until(
    tx: tokio::sync::mpsc::UnboundedSender<Task>,
    succeed_on: u64,
) -> impl Fn(Task) -> std::future::Ready<Result<(), HandlerError>> + Clone + Send + Sync + 'static {
    move |task: Task| {
        let n = attempt(&task);
        let _ = tx.send(task);
        std::future::ready(if n < succeed_on { Err(HandlerError::msg("boom")) } else { Ok(()) })
    }
}

#[tokio::test]
async fn handler_error_is_retried_until_it_succeeds() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "retry")
        .ack_wait(Duration::from_secs(2))
        .max_retries(5)
        .handle("flaky", failing_until(seen.tx.clone(), 3))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("flaky", "x"), "retry").await.unwrap();
    let attempts: Vec<u64> = seen.take(3, DEADLINE).await.iter().map(attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);

    wait_empty(&js, "natasks.retry").await;
    assert!(seen.recv_within(Duration::from_millis(500)).await.is_none(), "called again");
    assert_eq!(stored(&js, "natasks.retry-dlq").await, 0);
    assert_eq!(stream_messages(&js).await, 0);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn task_timeout_fails_the_attempt_and_it_is_retried() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut started = Seen::new();
    let mut finished = Seen::new();
    let (started_tx, finished_tx) = (started.tx.clone(), finished.tx.clone());
    let worker = Worker::builder(js.clone(), "slow")
        .ack_wait(Duration::from_secs(10))
        .task_timeout(Duration::from_secs(1))
        .handle("slow", move |task: Task| {
            let (started_tx, finished_tx) = (started_tx.clone(), finished_tx.clone());
            async move {
                let n = attempt(&task);
                let _ = started_tx.send(n);
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                let _ = finished_tx.send(n);
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("slow", "x"), "slow").await.unwrap();
    let start = Instant::now();
    assert_eq!(started.take(2, DEADLINE).await, [1, 2]);
    // The retry came from the timeout, not from the ack wait expiring.
    assert!(start.elapsed() < Duration::from_secs(9), "retried only after {:?}", start.elapsed());
    assert_eq!(finished.recv().await, 2);
    wait_empty(&js, "natasks.slow").await;
    // The timed-out attempt was dropped: it never finishes, and nothing runs again.
    assert!(finished.recv_within(Duration::from_secs(5)).await.is_none());
    assert!(started.recv_within(Duration::from_millis(100)).await.is_none());
    assert_eq!(stored(&js, "natasks.slow-dlq").await, 0);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn panicking_handler_is_retried_and_the_worker_keeps_running() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "panics")
        .ack_wait(Duration::from_secs(10))
        .handle("fragile", move |task: Task| {
            let tx = tx.clone();
            async move {
                let n = attempt(&task);
                let _ = tx.send((task.payload().clone(), n));
                if n == 1 && task.payload().as_ref() == b"first" {
                    panic!("handler blew up");
                }
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("fragile", "first"), "panics").await.unwrap();
    let start = Instant::now();
    let got = seen.take(2, DEADLINE).await;
    assert_eq!(got[0], ("first".into(), 1));
    assert_eq!(got[1], ("first".into(), 2));
    assert!(start.elapsed() < Duration::from_secs(9), "retried only after the ack wait");
    wait_empty(&js, "natasks.panics").await;

    client.dispatch(Task::new("fragile", "second"), "panics").await.unwrap();
    assert_eq!(seen.recv().await, ("second".into(), 1));
    wait_empty(&js, "natasks.panics").await;
    assert!(!running.join.is_finished(), "the worker stopped after a panic");
    assert_eq!(stored(&js, "natasks.panics-dlq").await, 0);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn retry_backoff_delays_the_next_attempt() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "backoff")
        .ack_wait(Duration::from_secs(10))
        .retry_backoff([Duration::from_millis(800)])
        .handle("flaky", move |task: Task| {
            let at = Instant::now();
            let n = attempt(&task);
            let _ = tx.send((n, at));
            std::future::ready(if n < 2 { Err(HandlerError::msg("boom")) } else { Ok(()) })
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("flaky", "x"), "backoff").await.unwrap();
    let got = seen.take(2, DEADLINE).await;
    assert_eq!((got[0].0, got[1].0), (1, 2));
    let gap = got[1].1 - got[0].1;
    assert!(gap >= Duration::from_millis(700), "second attempt came after only {gap:?}");
    assert!(gap < Duration::from_secs(9), "second attempt came only after the ack wait: {gap:?}");
    wait_empty(&js, "natasks.backoff").await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "mail")
        .ack_wait(Duration::from_secs(2))
        .max_retries(2)
        .handle("mail.send", failing_until(seen.tx.clone(), u64::MAX))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let task = Task::new("mail.send", "payload-1").with_header("X-Tenant", "t1");
    client.dispatch(task, "mail").await.unwrap();
    let attempts: Vec<u64> = seen.take(3, DEADLINE).await.iter().map(attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);

    let dead = first_on(&js, "natasks.mail-dlq").await;
    assert_eq!(dead.payload.as_ref(), b"payload-1");
    assert_eq!(header(&dead, "X-Tenant").as_deref(), Some("t1"));
    assert_eq!(header(&dead, "Natasks-Task").as_deref(), Some("mail.send"));
    assert_eq!(header(&dead, "Natasks-Queue").as_deref(), Some("mail-dlq"));
    assert_eq!(header_count(&dead.headers, "Natasks-Queue"), 1);
    assert_eq!(header(&dead, "Natasks-Original-Queue").as_deref(), Some("mail"));
    assert_eq!(header(&dead, "Natasks-Attempts").as_deref(), Some("3"));
    let last_error = header(&dead, "Natasks-Last-Error").unwrap_or_default();
    assert!(last_error.contains("boom"), "last error: {last_error:?}");
    assert_eq!(header(&dead, "Natasks-Dead-Letter-Reason").as_deref(), Some("retries-exhausted"));

    wait_empty(&js, "natasks.mail").await;
    assert!(seen.recv_within(Duration::from_secs(1)).await.is_none(), "a fourth attempt ran");
    assert_eq!(stored(&js, "natasks.mail-dlq").await, 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn custom_dlq_suffix_names_the_dead_letter_queue() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "mail")
        .ack_wait(Duration::from_secs(2))
        .max_retries(0)
        .dlq_suffix("-dead")
        .handle("mail.send", failing_until(seen.tx.clone(), u64::MAX))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("mail.send", "p"), "mail").await.unwrap();
    assert_eq!(attempt(&seen.recv().await), 1);
    let dead = first_on(&js, "natasks.mail-dead").await;
    assert_eq!(dead.payload.as_ref(), b"p");
    assert_eq!(header(&dead, "Natasks-Queue").as_deref(), Some("mail-dead"));
    assert_eq!(header(&dead, "Natasks-Original-Queue").as_deref(), Some("mail"));
    assert_eq!(header(&dead, "Natasks-Attempts").as_deref(), Some("1"));
    assert_eq!(header(&dead, "Natasks-Dead-Letter-Reason").as_deref(), Some("retries-exhausted"));
    wait_empty(&js, "natasks.mail").await;
    assert_eq!(stored(&js, "natasks.mail-dlq").await, 0);
    assert!(seen.recv_within(Duration::from_millis(500)).await.is_none());
    running.stop().await.unwrap();
}

#[tokio::test]
async fn no_retry_errors_are_acked_and_not_dead_lettered() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "nr")
        .ack_wait(Duration::from_secs(1))
        .handle("give-up", move |task: Task| {
            let _ = tx.send(attempt(&task));
            std::future::ready(Err::<(), _>(natasks::no_retry("permanent")))
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("give-up", "x"), "nr").await.unwrap();
    assert_eq!(seen.recv().await, 1);
    // Longer than the ack wait: an unsettled task would have come back.
    assert!(seen.recv_within(Duration::from_millis(1500)).await.is_none(), "redelivered");
    wait_empty(&js, "natasks.nr").await;
    assert_eq!(stored(&js, "natasks.nr-dlq").await, 0);
    assert_eq!(stream_messages(&js).await, 0);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn dead_letter_error_is_dead_lettered_at_once() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "rej")
        .ack_wait(Duration::from_secs(2))
        .max_retries(5)
        .handle("bad", move |task: Task| {
            let _ = tx.send(attempt(&task));
            std::future::ready(Err::<(), _>(HandlerError::dead_letter("malformed order")))
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("bad", "x"), "rej").await.unwrap();
    assert_eq!(seen.recv().await, 1);
    let dead = first_on(&js, "natasks.rej-dlq").await;
    assert_dead_letter(&dead, "rejected", "1", "malformed order");
    wait_empty(&js, "natasks.rej").await;
    assert!(seen.recv_within(Duration::from_millis(500)).await.is_none(), "retried");
    running.stop().await.unwrap();
}

#[derive(Debug, serde::Deserialize)]
struct Email {
    to: String,
}

#[tokio::test]
async fn undecodable_json_payload_is_dead_lettered_without_calling_the_handler() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "typed")
        .ack_wait(Duration::from_secs(2))
        .handle("send", move |Json(email): Json<Email>| {
            let _ = tx.send(email.to);
            std::future::ready(Ok::<(), HandlerError>(()))
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("send", "not json"), "typed").await.unwrap();
    let dead = first_on(&js, "natasks.typed-dlq").await;
    assert_eq!(dead.payload.as_ref(), b"not json");
    assert_dead_letter(&dead, "undecodable-payload", "1", "Email");
    wait_empty(&js, "natasks.typed").await;

    let task = Task::new("send", r#"{"to":"a@example.com"}"#);
    client.dispatch(task, "typed").await.unwrap();
    assert_eq!(seen.recv().await, "a@example.com", "the handler ran for the invalid payload");
    wait_empty(&js, "natasks.typed").await;
    assert_eq!(stored(&js, "natasks.typed-dlq").await, 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn decode_error_in_a_task_handler_is_dead_lettered() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "typed")
        .ack_wait(Duration::from_secs(2))
        .handle("send", move |task: Task| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(attempt(&task));
                let email: Email = task.decode()?;
                let _ = email.to;
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("send", "{"), "typed").await.unwrap();
    assert_eq!(seen.recv().await, 1);
    let dead = first_on(&js, "natasks.typed-dlq").await;
    assert_dead_letter(&dead, "undecodable-payload", "1", "Email");
    wait_empty(&js, "natasks.typed").await;
    assert!(seen.recv_within(Duration::from_millis(500)).await.is_none(), "retried");
    running.stop().await.unwrap();
}

/// Publishes a raw message on a queue subject, bypassing the client.
async fn publish_raw(js: &async_nats::jetstream::Context, subject: &str, task: Option<&str>) {
    let mut headers = HeaderMap::new();
    headers.insert("X-Raw", "1");
    if let Some(task) = task {
        headers.insert("Natasks-Task", task);
    }
    js.publish_with_headers(subject.to_owned(), headers, "raw".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
}

#[tokio::test]
async fn unroutable_messages_are_dead_lettered_by_default() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "u")
        .ack_wait(Duration::from_secs(2))
        .handle("known", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    publish_raw(&js, "natasks.u", None).await;
    let dead = first_on(&js, "natasks.u-dlq").await;
    assert_eq!(header(&dead, "Natasks-Dead-Letter-Reason").as_deref(), Some("missing-task-name"));
    assert_eq!(header(&dead, "Natasks-Original-Queue").as_deref(), Some("u"));
    assert_eq!(header(&dead, "X-Raw").as_deref(), Some("1"));
    assert_eq!(dead.payload.as_ref(), b"raw");

    publish_raw(&js, "natasks.u", Some("nobody")).await;
    wait_stored(&js, "natasks.u-dlq", 2).await;
    let stream = js.get_stream("NATASKS").await.unwrap();
    let dead = stream.get_last_raw_message_by_subject("natasks.u-dlq").await.unwrap();
    assert_eq!(header(&dead, "Natasks-Dead-Letter-Reason").as_deref(), Some("unknown-task"));
    assert_eq!(header(&dead, "Natasks-Task").as_deref(), Some("nobody"));
    assert_eq!(header(&dead, "Natasks-Attempts").as_deref(), Some("1"));
    let last_error = header(&dead, "Natasks-Last-Error").unwrap_or_default();
    assert!(last_error.contains("nobody"), "last error: {last_error:?}");

    wait_empty(&js, "natasks.u").await;
    assert!(seen.recv_within(Duration::from_millis(200)).await.is_none());
    running.stop().await.unwrap();
}

#[tokio::test]
async fn unroutable_messages_can_be_discarded() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "u")
        .ack_wait(Duration::from_secs(1))
        .on_unroutable(Unroutable::Discard)
        .handle("known", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    publish_raw(&js, "natasks.u", None).await;
    publish_raw(&js, "natasks.u", Some("nobody")).await;
    // Processed in order with one slot: once this one is seen, both before it were settled.
    client.dispatch(Task::new("known", "after"), "u").await.unwrap();
    assert_eq!(seen.recv().await.payload().as_ref(), b"after");
    wait_empty(&js, "natasks.u").await;
    assert_eq!(stored(&js, "natasks.u-dlq").await, 0);
    // Past the ack wait: nothing is redelivered.
    assert!(seen.recv_within(Duration::from_millis(1500)).await.is_none());
    assert_eq!(stream_messages(&js).await, 0);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn unroutable_retry_hands_back_then_dead_letters() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let worker = Worker::builder(js.clone(), "u")
        .ack_wait(Duration::from_secs(5))
        .max_retries(1)
        .on_unroutable(Unroutable::Retry(Duration::from_millis(300)))
        .handle("known", |_task: Task| std::future::ready(Ok::<(), HandlerError>(())))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let start = Instant::now();
    publish_raw(&js, "natasks.u", Some("nobody")).await;
    let dead = first_on(&js, "natasks.u-dlq").await;
    let elapsed = start.elapsed();
    assert_eq!(header(&dead, "Natasks-Dead-Letter-Reason").as_deref(), Some("unknown-task"));
    assert_eq!(header(&dead, "Natasks-Attempts").as_deref(), Some("2"));
    // The handed-back delivery came after the retry delay, not after the ack wait.
    assert!(elapsed < Duration::from_secs(5), "dead-lettered only after {elapsed:?}");
    wait_empty(&js, "natasks.u").await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn worker_creates_and_reuses_its_durable_consumer() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let build = || {
        Worker::builder(js.clone(), "orders")
            .ack_wait(Duration::from_secs(7))
            .max_ack_pending(50)
            .handle("orders.place", reporter(seen.tx.clone()))
            .build()
    };
    let first = build().await.unwrap();
    assert_eq!(first.consumer_name(), "natasks-orders");
    assert_eq!(first.queue(), "orders");

    let mut stream = js.get_stream("NATASKS").await.unwrap();
    let mut consumer: consumer::PullConsumer = stream.get_consumer("natasks-orders").await.unwrap();
    let config = consumer.info().await.unwrap().config.clone();
    assert_eq!(config.durable_name.as_deref(), Some("natasks-orders"));
    assert_eq!(config.filter_subject, "natasks.orders");
    assert_eq!(config.ack_policy, consumer::AckPolicy::Explicit);
    assert_eq!(config.ack_wait, Duration::from_secs(7));
    assert_eq!(config.max_ack_pending, 50);
    assert_eq!(config.description.as_deref(), Some("natasks worker"));
    drop(first);

    client.dispatch(Task::new("orders.place", "o-1"), "orders").await.unwrap();
    let second = build().await.unwrap();
    assert_eq!(second.consumer_name(), "natasks-orders");
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 1);
    let names: Vec<String> =
        stream.consumer_names().filter_map(|n| async move { n.ok() }).collect().await;
    assert_eq!(names, ["natasks-orders"]);

    let running = spawn(second);
    let got = seen.recv().await;
    assert_eq!(got.payload().as_ref(), b"o-1");
    assert_eq!(attempt(&got), 1);
    wait_empty(&js, "natasks.orders").await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn workers_only_see_their_own_queue() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen_a = Seen::new();
    let mut seen_b = Seen::new();
    let worker_a = Worker::builder(js.clone(), "a")
        .handle("job", reporter(seen_a.tx.clone()))
        .build()
        .await
        .unwrap();
    let worker_b = Worker::builder(js.clone(), "b")
        .handle("job", reporter(seen_b.tx.clone()))
        .build()
        .await
        .unwrap();
    let (running_a, running_b) = (spawn(worker_a), spawn(worker_b));

    for i in 0..3 {
        client.dispatch(Task::new("job", format!("a-{i}")), "a").await.unwrap();
        client.dispatch(Task::new("job", format!("b-{i}")), "b").await.unwrap();
    }
    for (seen, queue) in [(&mut seen_a, "a"), (&mut seen_b, "b")] {
        let mut payloads: Vec<String> = seen
            .take(3, DEADLINE)
            .await
            .iter()
            .map(|task| {
                assert_eq!(&*task.delivery().unwrap().queue, queue);
                String::from_utf8(task.payload().to_vec()).unwrap()
            })
            .collect();
        payloads.sort();
        let expected: Vec<String> = (0..3).map(|i| format!("{queue}-{i}")).collect();
        assert_eq!(payloads, expected);
    }
    wait_empty(&js, "natasks.a").await;
    wait_empty(&js, "natasks.b").await;
    assert!(seen_a.recv_within(Duration::from_millis(500)).await.is_none());
    assert!(seen_b.recv_within(Duration::from_millis(100)).await.is_none());
    running_a.stop().await.unwrap();
    running_b.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_builder_options_are_refused() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    // The stream exists, so a consumer created by mistake would be visible.
    Client::new(js.clone()).await.unwrap();
    let ok = |_task: Task| std::future::ready(Ok::<(), HandlerError>(()));
    let base = || Worker::builder(js.clone(), "q").handle("t", ok);
    let cases: Vec<(&str, WorkerBuilder)> = vec![
        ("concurrency", base().concurrency(0)),
        ("fetch_batch", base().fetch_batch(0)),
        ("fetch_timeout", base().fetch_timeout(Duration::from_millis(500))),
        ("ack_wait", base().ack_wait(Duration::ZERO)),
        (
            "progress_interval",
            base().ack_wait(Duration::from_secs(2)).progress_interval(Duration::from_secs(2)),
        ),
        (
            "progress_interval",
            base().ack_wait(Duration::from_secs(2)).progress_interval(Duration::from_secs(3)),
        ),
        ("max_ack_pending", base().concurrency(4).max_ack_pending(3)),
        ("max_retries", base().max_retries(-2)),
        ("dlq_suffix", base().dlq_suffix("")),
        ("dlq_suffix", base().dlq_suffix(".x")),
        ("durable", base().durable("a.b")),
        ("on_unroutable", base().on_unroutable(Unroutable::Retry(Duration::ZERO))),
        ("handle", base().handle("t", ok)),
        ("handle", base().handle("a b", ok)),
    ];
    for (setting, builder) in cases {
        let err = builder.build().await.err().unwrap_or_else(|| panic!("{setting}: accepted"));
        assert_eq!(err.kind(), SetupErrorKind::InvalidOption, "{setting}: {err}");
        let named = format!("`{setting}`");
        assert!(err.to_string().contains(&named), "{setting}: message {err:?} does not name it");
    }

    let err = Worker::builder(js.clone(), "a.b").handle("t", ok).build().await.err();
    let err = err.expect("queue a.b accepted");
    assert_eq!(err.kind(), SetupErrorKind::InvalidQueue, "{err}");
    assert!(err.to_string().contains("a.b"), "{err}");

    let mut stream = js.get_stream("NATASKS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0);
    // A valid build on the same queue still works.
    let worker = base().build().await.unwrap();
    assert_eq!(worker.consumer_name(), "natasks-q");
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 1);
}

#[tokio::test]
async fn task_redelivered_without_outcome_is_dead_lettered_unrun() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "crash")
        .ack_wait(Duration::from_secs(1))
        .max_retries(1)
        .handle("poison", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    client.dispatch(Task::new("poison", "p"), "crash").await.unwrap();

    // Two workers "crash" on it: they take the delivery and never settle it.
    let stream = js.get_stream("NATASKS").await.unwrap();
    let consumer: consumer::PullConsumer = stream.get_consumer("natasks-crash").await.unwrap();
    for expected in 1..=2 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .unwrap();
        let message = tokio::time::timeout(DEADLINE, batch.next())
            .await
            .expect("no delivery in time")
            .expect("fetch ended without a message")
            .expect("fetch error");
        assert_eq!(message.info().unwrap().delivered, expected);
        // Not acked: the lease runs out after the ack wait.
    }

    let running = spawn(worker);
    let dead = first_on(&js, "natasks.crash-dlq").await;
    assert_eq!(header(&dead, "Natasks-Dead-Letter-Reason").as_deref(), Some("no-outcome"));
    assert_eq!(header(&dead, "Natasks-Attempts").as_deref(), Some("3"));
    assert_eq!(header(&dead, "Natasks-Original-Queue").as_deref(), Some("crash"));
    assert_eq!(dead.payload.as_ref(), b"p");
    wait_empty(&js, "natasks.crash").await;
    assert!(seen.recv_within(Duration::from_millis(500)).await.is_none(), "the handler ran");
    running.stop().await.unwrap();
}
