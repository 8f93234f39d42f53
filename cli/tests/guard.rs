//! `natasks dispatch --unique/--throttle/--debounce`, `natasks batch` and the unique key in
//! `natasks task status`: the built binary against a real nats-server.

use async_nats::jetstream;
use natasks_test_support::NatsServer;

mod common;
use common::natasks;

async fn stream_messages(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("NATASKS").await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn unique_dispatch_refuses_a_held_key_and_status_shows_it() {
    let server = NatsServer::start().await;
    let url = server.url();
    let key = "ann@example.com";
    let first =
        natasks(&url, &["dispatch", "emails", "welcome", "--unique", key, "--track", "--json"])
            .await
            .ok()
            .json();
    assert_eq!(first["unique_key"], key);
    let id = first["id"].as_str().unwrap().to_owned();

    natasks(&url, &["dispatch", "emails", "welcome", "--unique", key])
        .await
        .failed(&format!("is held by task {id:?}"));
    let existing =
        natasks(&url, &["dispatch", "emails", "welcome", "--unique", key, "--return-existing"])
            .await
            .ok();
    assert!(existing.stdout.contains(&id), "{existing:?}");

    let status = natasks(&url, &["task", "status", &id]).await.ok();
    assert!(status.stdout.contains(&format!("unique key  {key}")), "{status:?}");
    let status = natasks(&url, &["task", "status", &id, "--json"]).await.ok().json();
    assert_eq!(status["unique_key"], key);
}

#[tokio::test]
async fn guard_flags_are_checked_before_anything_is_published() {
    let server = NatsServer::start().await;
    let url = server.url();
    natasks(&url, &["dispatch", "q", "t", "--debounce", "k"]).await.failed("needs --in or --at");
    natasks(&url, &["dispatch", "q", "t", "--return-existing"]).await.failed("needs --unique");
    natasks(&url, &["dispatch", "q", "t", "--unique", "k", "--unique-ttl", "500ms"])
        .await
        .failed("outside 1 s");
    natasks(&url, &["dispatch", "q", "t", "--unique", ""]).await.failed("is empty");
    natasks(&url, &["dispatch", "q", "t", "--throttle", "k", "--window", "1m"]).await.ok();
    natasks(&url, &["dispatch", "q", "t", "--throttle", "k", "--window", "1m"])
        .await
        .failed("within the window");
    natasks(&url, &["dispatch", "q", "t", "--debounce", "k", "--in", "1h"]).await.ok();
    natasks(&url, &["dispatch", "q", "t", "--debounce", "k", "--in", "1h"]).await.ok();
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    // The throttled task and its window, and one debounced schedule.
    assert_eq!(stream_messages(&js).await, 3);
}

#[tokio::test]
async fn a_batch_file_is_stored_all_or_none() {
    let server = NatsServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        concat!(
            r#"{"queue": "emails", "task": "send", "payload": {"to": "a@example.com"}}"#,
            "\n",
            r#"{"queue": "reports", "task": "render", "in": "1h", "unique": "r-1"}"#,
            "\n",
        ),
    )
    .unwrap();
    let run = natasks(&url, &["batch", good.to_str().unwrap(), "--json"]).await.ok().json();
    assert_eq!(run["dispatched"], 2);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        concat!(
            r#"{"queue": "emails", "task": "send"}"#,
            "\n",
            r#"{"queue": "emails", "task": "bad name"}"#,
            "\n",
        ),
    )
    .unwrap();
    natasks(&url, &["batch", bad.to_str().unwrap()]).await.failed("task 1 of the batch");
    let typo = dir.path().join("typo.jsonl");
    std::fs::write(&typo, r#"{"queue": "emails", "tsak": "send"}"#).unwrap();
    natasks(&url, &["batch", typo.to_str().unwrap()]).await.failed("line 1");

    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    // The good batch: a task, and a delayed unique task's schedule and lock.
    assert_eq!(stream_messages(&js).await, 3);
}

#[tokio::test]
async fn a_batch_file_sent_again_says_it_was_already_stored() {
    let server = NatsServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"queue": "payments", "task": "charge", "message_id": "order-1/charge"}"#,
            "\n",
            r#"{"queue": "emails", "task": "receipt", "message_id": "order-1/receipt"}"#,
            "\n",
        ),
    )
    .unwrap();
    natasks(&url, &["batch", file.to_str().unwrap()]).await.ok();
    let again = natasks(&url, &["batch", file.to_str().unwrap()]).await.failed("already was");
    assert!(!again.stderr.contains("(nothing was stored)"), "{again:?}");
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    assert_eq!(stream_messages(&js).await, 2);
}

#[tokio::test]
async fn a_requeued_unique_task_comes_back_as_an_ordinary_task() {
    // Its lock went with the task: the copy carries no key it could claim to hold.
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    natasks::Client::new(js.clone()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", "render");
    headers.insert("Natasks-Queue", "reports-dlq");
    headers.insert("Natasks-Original-Queue", "reports");
    headers.insert("Natasks-Dead-Letter-Reason", "retries-exhausted");
    headers.insert("Natasks-Unique-Key", "r-1");
    js.publish_with_headers("natasks.reports-dlq", headers, "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    natasks(&url, &["dlq", "requeue", "reports", "--all"]).await.ok();
    let stream = js.get_stream("NATASKS").await.unwrap();
    let task = stream.get_last_raw_message_by_subject("natasks.reports").await.unwrap();
    assert_eq!(task.headers.get("Natasks-Task").map(|v| v.as_str()), Some("render"));
    assert!(task.headers.get("Natasks-Unique-Key").is_none(), "{:?}", task.headers);
}
