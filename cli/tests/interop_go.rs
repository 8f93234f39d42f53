//! Dead letters across languages: a task that fails in the Go worker is dead-lettered with
//! headers the `natasks` CLI shows and requeues to a Rust worker, and a Rust dead letter is
//! requeued to a queue a Go worker serves.
//!
//! The Go side is `natasks-go` (`interop/go`), the stand-in for the Go natasks library
//! written on nats.go from its published documentation (see `natasks/tests/interop_go.rs`
//! and the README's interoperability section).

use async_nats::jetstream;
use base64::Engine as _;
use futures_util::StreamExt as _;
use natasks::{Client, HandlerError, Task, Worker};
use natasks_test_support::go::GoProcess;
use natasks_test_support::NatsServer;
use serde_json::Value;
use tokio::sync::mpsc;

mod common;
use common::{eventually, natasks, DEADLINE};

/// Runs `natasks <args> --json` against `url`; returns its JSON output.
async fn natasks_json(url: &str, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    natasks(url, &args).await.ok().json()
}

async fn stored(js: &jetstream::Context, subject: &str) -> usize {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let info = stream.info_with_subjects(subject).await.expect("stream info");
    let counts: Vec<(String, usize)> = info.filter_map(|r| async { r.ok() }).collect().await;
    counts.into_iter().find(|(s, _)| s == subject).map_or(0, |(_, n)| n)
}

async fn go_worker(url: &str, queue: &str, args: &[&str]) -> GoProcess {
    let mut all = vec!["work", "--url", url, "--queue", queue];
    all.extend_from_slice(args);
    let mut worker = GoProcess::spawn(&all).await;
    worker.wait_for("ready", DEADLINE, |e| e["event"] == "ready").await;
    worker
}

fn is_processed(event: &Value) -> bool {
    event["event"] == "processed"
}

#[tokio::test]
async fn go_dead_letter_is_shown_and_requeued_by_the_cli_to_a_rust_worker() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut go = go_worker(
        &url,
        "dl-go",
        &["--handle", "t=fail", "--max-retries", "1", "--backoff", "50ms"],
    )
    .await;
    let task = Task::new("t", r#"{"to":"a@example.com"}"#).with_header("X-Request-Id", "req-9");
    client.dispatch(task, "dl-go").await.unwrap();
    let attempts = go.take(2, DEADLINE, is_processed).await;
    assert_eq!(attempts[0]["outcome"], "retried");
    assert_eq!(attempts[1]["outcome"], "dead-lettered");
    assert_eq!(attempts[1]["attempt"], 2);
    go.stop(DEADLINE).await;
    eventually("the task is dead-lettered", || async {
        stored(&js, "natasks.dl-go-dlq").await == 1 && stored(&js, "natasks.dl-go").await == 0
    })
    .await;

    let list = natasks_json(&url, &["dlq", "list", "dl-go"]).await;
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["task"], "t");
    assert_eq!(list[0]["original_queue"], "dl-go");
    assert_eq!(list[0]["attempts"], 2);
    assert_eq!(list[0]["last_error"], "go handler failed t");
    assert_eq!(list[0]["reason"], Value::Null, "the Go worker writes no reason header");
    let seq = list[0]["seq"].as_u64().unwrap().to_string();
    let shown = natasks_json(&url, &["dlq", "show", "dl-go", &seq]).await;
    assert_eq!(shown["subject"], "natasks.dl-go-dlq");
    assert_eq!(shown["payload_json"]["to"], "a@example.com");
    let headers = &shown["headers"];
    assert_eq!(headers["Natasks-Original-Queue"], "dl-go");
    assert_eq!(headers["Natasks-Attempts"], "2");
    assert_eq!(headers["Natasks-Last-Error"], "go handler failed t");
    assert_eq!(headers["Natasks-Task"], "t");
    assert_eq!(headers["X-Request-Id"], "req-9");

    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = Worker::builder(js.clone(), "dl-go")
        .handle("t", move |task: Task| {
            let _ = tx.send(task);
            async { Ok::<_, HandlerError>(()) }
        })
        .build()
        .await
        .unwrap();
    let handle = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });
    let requeued = natasks_json(&url, &["dlq", "requeue", "dl-go", "--all"]).await;
    assert_eq!(requeued["requeued"], 1, "{requeued}");
    let task = tokio::time::timeout(DEADLINE, rx.recv()).await.unwrap().unwrap();
    assert_eq!(task.name(), "t");
    assert_eq!(task.payload().as_ref(), br#"{"to":"a@example.com"}"#);
    assert_eq!(task.header("X-Request-Id"), Some("req-9"));
    assert_eq!(task.header("Natasks-Queue"), Some("dl-go"));
    assert_eq!(task.header("Natasks-Original-Queue"), None, "failure headers are dropped");
    assert_eq!(task.delivery().unwrap().attempt, 1, "a fresh task");
    handle.shutdown();
    tokio::time::timeout(DEADLINE, running).await.unwrap().unwrap().unwrap();
    assert_eq!(stored(&js, "natasks.dl-go-dlq").await, 0);
}

#[tokio::test]
async fn rust_dead_letter_is_requeued_by_the_cli_to_a_go_worker() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let failing = Worker::builder(js.clone(), "dl-rust")
        .max_retries(0)
        .handle("t", |_task: Task| async { Err::<(), _>(HandlerError::msg("rust handler failed")) })
        .build()
        .await
        .unwrap();
    let handle = failing.shutdown_handle();
    let running = tokio::spawn(async move { failing.run().await });
    let task = Task::new("t", "payload from rust").with_header("X-Request-Id", "req-10");
    client.dispatch(task, "dl-rust").await.unwrap();
    eventually("the task is dead-lettered", || async {
        stored(&js, "natasks.dl-rust-dlq").await == 1 && stored(&js, "natasks.dl-rust").await == 0
    })
    .await;
    handle.shutdown();
    tokio::time::timeout(DEADLINE, running).await.unwrap().unwrap().unwrap();

    let mut go = go_worker(&url, "dl-rust", &["--handle", "t=ok"]).await;
    let requeued = natasks_json(&url, &["dlq", "requeue", "dl-rust", "--all"]).await;
    assert_eq!(requeued["requeued"], 1, "{requeued}");
    let event = go.wait_for("the requeued task", DEADLINE, is_processed).await;
    go.stop(DEADLINE).await;
    assert_eq!(event["task"], "t");
    assert_eq!(event["outcome"], "succeeded");
    assert_eq!(event["attempt"], 1);
    let payload = base64::engine::general_purpose::STANDARD
        .decode(event["payload_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(payload, b"payload from rust");
    assert_eq!(event["headers"]["X-Request-Id"][0], "req-10");
    assert_eq!(event["headers"]["Natasks-Queue"][0], "dl-rust");
    for gone in ["Natasks-Original-Queue", "Natasks-Attempts", "Natasks-Last-Error"] {
        assert_eq!(event["headers"][gone], Value::Null, "{gone} dropped on requeue");
    }
    eventually("the requeued task is acknowledged", || async {
        stored(&js, "natasks.dl-rust").await == 0
    })
    .await;
    assert_eq!(stored(&js, "natasks.dl-rust-dlq").await, 0);
}
