//! `natasks task` and `natasks events`, and `dispatch --track`: the built binary against a
//! real nats-server, with a worker of the library in the test process.

use std::sync::Arc;

use async_nats::jetstream;
use natasks::track::Status;
use natasks::{HandlerError, Json, Progress, Worker};
use natasks_test_support::NatsServer;
use serde_json::{json, Value};
use tokio::sync::Notify;

mod common;
use common::{eventually, natasks, Tail, DEADLINE};

/// Messages stored in the natasks stream.
async fn stream_messages(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("NATASKS").await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// Dispatches a tracked task with the CLI and returns its id.
async fn dispatch_tracked(url: &str, queue: &str, task: &str, payload: &str) -> String {
    let run = natasks(url, &["dispatch", queue, task, "--payload", payload, "--track", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(run["tracked"], true, "{run}");
    run["id"].as_str().expect("an id").to_owned()
}

/// Waits (with the tests' deadline) until `release` is notified: a handler that has
/// reported progress holds its task running until the test has seen the report.
async fn held(release: &Notify) -> Result<(), HandlerError> {
    tokio::time::timeout(DEADLINE, release.notified())
        .await
        .map_err(|_| natasks::no_retry("the test never released the handler"))
}

/// A worker of `queue` adding the numbers of its payload: it reports `report(progress)`
/// half-way, then holds the task until `release` is notified.
async fn adder(
    js: jetstream::Context,
    queue: &str,
    release: Arc<Notify>,
    report: fn(&Progress),
) -> Worker {
    Worker::builder(js, queue)
        .handle("add", move |Json(numbers): Json<Vec<u64>>, progress: Progress| {
            let release = release.clone();
            async move {
                report(&progress);
                held(&release).await?;
                Ok::<_, HandlerError>(json!({ "total": numbers.iter().sum::<u64>() }))
            }
        })
        .build()
        .await
        .expect("worker builds")
}

/// Runs a worker until the returned handle is shut down.
fn spawn(worker: Worker) -> (natasks::ShutdownHandle, tokio::task::JoinHandle<()>) {
    let handle = worker.shutdown_handle();
    let join = tokio::spawn(async move {
        worker.run().await.expect("worker runs");
    });
    (handle, join)
}

async fn stop(worker: (natasks::ShutdownHandle, tokio::task::JoinHandle<()>)) {
    worker.0.shutdown();
    tokio::time::timeout(DEADLINE, worker.1).await.expect("worker stops").expect("no panic");
}

#[tokio::test]
async fn tracked_task_status_result_and_cancel() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;

    // Dispatched with tracking: pending until a worker takes it.
    let run = natasks(&url, &["dispatch", "math", "add", "--payload", "[1,2,3]", "--track"]).await;
    let out = run.ok().stdout;
    assert!(out.starts_with("dispatched add to queue math (id "), "{out}");
    assert!(out.trim_end().ends_with(", tracked)"), "{out}");
    let id = out.split("(id ").nth(1).unwrap().split(',').next().unwrap().to_owned();
    let status = natasks(&url, &["task", "status", &id, "--json"]).await.ok().json();
    assert_eq!(status["state"], "pending", "{status}");
    assert_eq!(status["queue"], "math");
    assert_eq!(status["task"], "add");
    assert_eq!(status["attempt"], 0);
    let human = natasks(&url, &["task", "status", &id]).await.ok().stdout;
    assert!(human.lines().any(|l| l.starts_with("state") && l.ends_with("pending")), "{human}");
    natasks(&url, &["task", "result", &id]).await.failed("is pending (use --wait DURATION");
    let not_yet = natasks(&url, &["task", "result", &id, "--json"]).await.failed("is pending");
    assert_eq!(not_yet.json()["state"], "pending");

    // A worker takes it and reports progress; the status shows it while the task runs.
    let release = Arc::new(Notify::new());
    let worker = spawn(adder(js.clone(), "math", release.clone(), |p| p.set(0.5)).await);
    let client = natasks::Client::new(js.clone()).await.unwrap();
    eventually("the running task's progress is recorded", || async {
        matches!(client.status(&id).await, Ok(Status::Known(s)) if s.progress.is_some())
    })
    .await;
    let running = natasks(&url, &["task", "status", &id, "--json"]).await.ok().json();
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["progress"], json!({ "fraction": 0.5 }));
    let human = natasks(&url, &["task", "status", &id]).await.ok().stdout;
    assert!(human.lines().any(|l| l.starts_with("progress") && l.ends_with("50%")), "{human}");

    // Released, it ends: the result is printed, the status says succeeded.
    release.notify_one();
    let result = natasks(&url, &["task", "result", &id, "--wait", "15s"]).await.ok();
    assert_eq!(result.json(), json!({ "total": 6 }));
    assert!(result.stdout.contains("\n  \"total\": 6\n"), "pretty: {result:?}");
    let compact = natasks(&url, &["task", "result", &id, "--json"]).await.ok();
    assert_eq!(compact.stdout, "{\"total\":6}\n");
    let status = natasks(&url, &["task", "status", &id, "--json"]).await.ok().json();
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["attempt"], 1);
    assert_eq!(status["progress"], json!({ "fraction": 0.5 }));
    let human = natasks(&url, &["task", "status", &id]).await.ok().stdout;
    assert!(human.lines().any(|l| l.starts_with("progress") && l.ends_with("50%")), "{human}");
    natasks(&url, &["task", "cancel", &id]).await.failed("already finished (succeeded)");
    stop(worker).await;

    // Cancelled while pending: it never runs, and leaves nothing in the stream.
    let id = dispatch_tracked(&url, "later", "add", "[1]").await;
    let run = natasks(&url, &["task", "cancel", &id]).await.ok();
    assert_eq!(run.stdout.trim(), format!("cancelled task {id} (it was pending): it will not run"));
    let again = natasks(&url, &["task", "cancel", &id, "--json"]).await.ok().json();
    assert_eq!(again, json!({ "id": id, "outcome": "already_cancelled", "was": "cancelled" }));
    let status = natasks(&url, &["task", "status", &id, "--json"]).await.ok().json();
    assert_eq!(status["state"], "cancelled");
    natasks(&url, &["task", "result", &id]).await.failed("was cancelled");
    assert_eq!(stream_messages(&js).await, 0, "the cancelled task was removed");

    // Unknown ids: status answers, result and cancel fail.
    let unknown = natasks(&url, &["task", "status", "no-such-task"]).await.ok().stdout;
    assert!(unknown.starts_with("task no-such-task: unknown"), "{unknown}");
    let unknown = natasks(&url, &["task", "status", "no-such-task", "--json"]).await.ok().json();
    assert_eq!(unknown, json!({ "id": "no-such-task", "state": "unknown" }));
    natasks(&url, &["task", "result", "no-such-task"])
        .await
        .failed("nothing is recorded for task \"no-such-task\" (never dispatched with tracking");
    natasks(&url, &["task", "cancel", "no-such-task"]).await.failed("nothing is recorded");
    natasks(&url, &["task", "result", "no-such-task", "--wait", "300ms"])
        .await
        .failed("did not end within");
}

#[tokio::test]
async fn failures_are_reported_with_the_last_error() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let worker = Worker::builder(js, "jobs")
        .handle("refuse", |_: natasks::Task| async { Err::<(), _>(natasks::no_retry("not today")) })
        .build()
        .await
        .unwrap();
    let worker = spawn(worker);
    let id = dispatch_tracked(&url, "jobs", "refuse", "{}").await;
    let run = natasks(&url, &["task", "result", &id, "--wait", "15s", "--json"]).await;
    let run = run.failed("failed without retry on attempt 1: not today");
    assert_eq!(run.json()["state"], "failed");
    assert_eq!(run.json()["last_error"], "not today");
    let human = natasks(&url, &["task", "status", &id]).await.ok().stdout;
    assert!(human.lines().any(|l| l.starts_with("last error") && l.ends_with("not today")));
    stop(worker).await;
}

#[tokio::test]
async fn events_show_a_task_from_dispatch_to_success() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let mut json_tail = Tail::start(&url, &["math", "--json"]).await;
    let mut text_tail = Tail::start(&url, &[]).await;
    let release = Arc::new(Notify::new());
    let report = |p: &Progress| p.report(Some(0.5), &json!({ "rows": 1 }));
    let worker = spawn(adder(js, "math", release.clone(), report).await);
    let id = dispatch_tracked(&url, "math", "add", "[4,5]").await;

    // The handler holds the task until its progress event has been seen.
    let mut kinds = Vec::new();
    while kinds.last().map(String::as_str) != Some("succeeded") {
        let line = json_tail.next_line().await;
        let event: Value = serde_json::from_str(&line).expect("one JSON object per line");
        assert_eq!(event["id"], id.as_str(), "{event}");
        assert_eq!(event["queue"], "math");
        assert_eq!(event["task"], "add");
        if event["kind"] == "progress" {
            assert_eq!(event["progress"], json!({ "fraction": 0.5, "detail": { "rows": 1 } }));
            release.notify_one();
        }
        kinds.push(event["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(kinds, ["dispatched", "started", "progress", "succeeded"]);

    let mut lines = Vec::new();
    while !lines.last().is_some_and(|l: &String| l.contains(" succeeded ")) {
        lines.push(text_tail.next_line().await);
    }
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0].contains("  math  dispatched "), "{lines:?}");
    assert!(lines[1].contains(&format!("add  id={id}  attempt=1")), "{lines:?}");
    assert!(lines[2].contains("progress=50% {\"rows\":1}"), "{lines:?}");
    json_tail.stop().await;
    text_tail.stop().await;
    stop(worker).await;
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_published() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    natasks(&url, &["dispatch", "q", "t"]).await.ok();
    let long = "x".repeat(300);
    for command in ["status", "result", "cancel"] {
        natasks(&url, &["task", command, ""]).await.failed("invalid task id \"\": it is empty");
        natasks(&url, &["task", command, "a\u{7}b"]).await.failed("contains control characters");
        natasks(&url, &["task", command, &long]).await.failed("is longer than 256 bytes");
    }
    natasks(&url, &["task", "result", "abc", "--wait", "soon"])
        .await
        .failed("invalid --wait: invalid duration \"soon\"");
    natasks(&url, &["events", "a.b"]).await.failed("invalid queue: ");
    natasks(&url, &["dispatch", "q", "t", "--track", "--retention", "1500ms"])
        .await
        .failed("whole seconds, at least 1s");
    natasks(&url, &["dispatch", "q", "t", "--track", "--retention", "5 min"])
        .await
        .failed("invalid --retention");
    natasks(&url, &["dispatch", "q", "t", "--track", "--message-id", &long])
        .await
        .failed("--message-id: invalid task id");
    natasks(&url, &["dispatch", "a.b", "t", "--track"]).await.failed("a.b");
    let without_track = natasks(&url, &["dispatch", "q", "t", "--retention", "1h"]).await;
    assert_ne!(without_track.code, 0, "--retention needs --track: {without_track:?}");
    assert_eq!(stream_messages(&js).await, 1, "only the first, valid dispatch is stored");

    // A valid retention and an id with characters a key cannot hold are fine.
    let run = natasks(
        &url,
        &[
            "dispatch",
            "q",
            "t",
            "--track",
            "--retention",
            "1h",
            "--message-id",
            "a@b.c/1",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(run["id"], "a@b.c/1");
    let status = natasks(&url, &["task", "status", "a@b.c/1", "--json"]).await.ok().json();
    assert_eq!(status["state"], "pending");
}
