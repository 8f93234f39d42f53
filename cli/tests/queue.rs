//! `natasks queue pause|resume|limit|rate` and the controls in `natasks queues`: the built
//! binary against a real nats-server.

use natasks::{HandlerError, Task, Worker};
use natasks_test_support::NatsServer;

mod common;
use common::natasks;

#[tokio::test]
async fn queues_are_paused_limited_and_rate_limited() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    // A worker gives the queue its consumer (the workers' limit default: 128).
    Worker::builder(js, "mail")
        .handle("send", |_: Task| async { Ok::<(), HandlerError>(()) })
        .build()
        .await
        .unwrap();

    let run = natasks(&url, &["queue", "pause", "mail"]).await.ok();
    assert_eq!(run.stdout.trim(), "queue mail paused indefinitely");
    let run = natasks(&url, &["queue", "limit", "mail", "3"]).await.ok();
    assert_eq!(run.stdout.trim(), "queue mail: at most 3 tasks in flight across every worker");
    let run = natasks(&url, &["queue", "rate", "mail", "10/s"]).await.ok();
    assert_eq!(run.stdout.trim(), "queue mail, every task: at most 10/1s");
    let run = natasks(&url, &["queue", "rate", "mail", "--task", "send", "1/5s"]).await.ok();
    assert_eq!(run.stdout.trim(), "queue mail, task send: at most 1/5s");

    let run = natasks(&url, &["queues"]).await.ok();
    let line = run.stdout.lines().find(|l| l.starts_with("mail")).expect("a row for mail");
    for cell in ["indefinitely", "3*", "10/1s, send=1/5s"] {
        assert!(line.contains(cell), "{cell:?} in {line:?}");
    }
    let run = natasks(&url, &["--json", "queues"]).await.ok();
    let row = &run.json()[0];
    assert_eq!(row["queue"], "mail");
    assert!(row["paused_until"].is_string(), "{row}");
    assert_eq!((row["limit"].as_i64(), row["limit_set"].as_bool()), (Some(3), Some(true)));
    assert_eq!(row["rates"][0]["rate"], "10/1s");

    let run = natasks(&url, &["queue", "pause", "mail", "--for", "1h"]).await.ok();
    assert!(run.stdout.starts_with("queue mail paused until "), "{run:?}");
    natasks(&url, &["queue", "resume", "mail"]).await.ok();
    natasks(&url, &["queue", "limit", "mail", "--clear"]).await.ok();
    natasks(&url, &["queue", "rate", "mail", "--clear"]).await.ok();
    natasks(&url, &["queue", "rate", "mail", "--task", "send", "--clear"]).await.ok();
    let run = natasks(&url, &["--json", "queues"]).await.ok();
    let row = &run.json()[0];
    assert!(row["paused_until"].is_null(), "{row}");
    assert_eq!((row["limit"].as_i64(), row["limit_set"].as_bool()), (Some(128), Some(false)));
    assert_eq!(row["rates"].as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    Worker::builder(js, "mail")
        .handle("send", |_: Task| async { Ok::<(), HandlerError>(()) })
        .build()
        .await
        .unwrap();
    natasks(&url, &["queue", "pause", "nobody"]).await.failed("has no worker consumer");
    natasks(&url, &["queue", "pause", "a.b"]).await.failed("queue name \"a.b\"");
    natasks(&url, &["queue", "limit", "mail", "0"]).await.failed("must be at least 1");
    natasks(&url, &["queue", "limit", "mail", "-2"]).await.failed("must be at least 1");
    natasks(&url, &["queue", "rate", "mail", "0/s"]).await.failed("at least 1");
    natasks(&url, &["queue", "rate", "mail", "5/0s"]).await.failed("at least 1 s");
    natasks(&url, &["queue", "rate", "mail", "5"]).await.failed("COUNT/PERIOD");
    natasks(&url, &["queue", "pause", "mail", "--until", "2000-01-01T00:00:00Z"])
        .await
        .failed("a time that has passed");
    natasks(&url, &["queue", "pause", "mail", "--until", "tomorrow"])
        .await
        .failed("invalid --until");
    let run = natasks(&url, &["--json", "queues"]).await.ok();
    let row = &run.json()[0];
    assert!(row["paused_until"].is_null(), "nothing changed: {row}");
    assert_eq!(row["limit_set"].as_bool(), Some(false));
}
