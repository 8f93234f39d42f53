//! Text that came from a producer or a handler (task names, headers, payloads, errors) may
//! hold terminal control sequences. The built binary, run against a real nats-server, shows
//! them escaped and never writes them raw to the operator's terminal; `--json` keeps the
//! exact text as valid JSON.

use async_nats::jetstream;
use natasks::{Task, Worker};
use natasks_test_support::NatsServer;
use serde_json::Value;

mod common;
use common::{natasks, Run, Tail, DEADLINE};

/// Clears the screen, rings the bell, and (as a C1 control) starts another sequence.
const HOSTILE: &str = "boom\u{1b}[2J\u{7}\u{9b}31m";

/// Asserts the run wrote no raw control sequence (ESC, BEL, the C1 CSI) anywhere.
#[track_caller]
fn no_raw_controls(run: &Run) {
    for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        for bad in ['\u{1b}', '\u{7}', '\u{9b}'] {
            assert!(!text.contains(bad), "raw {bad:?} in {name}: {run:?}");
        }
    }
}

/// Publishes a dead letter whose task name, last error, header and payload hold control
/// sequences, returning its sequence.
async fn hostile_dead_letter(js: &jetstream::Context) -> u64 {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", "evil\u{1b}]0;owned\u{7}");
    headers.insert("Natasks-Queue", "q-dlq");
    headers.insert("Natasks-Original-Queue", "q");
    headers.insert("Natasks-Attempts", "3");
    headers.insert("Natasks-Last-Error", HOSTILE);
    headers.insert("Natasks-Dead-Letter-Reason", "retries-exhausted");
    headers.insert("X-Note", HOSTILE);
    let payload = format!("not json {HOSTILE}\nsecond line");
    js.publish_with_headers("natasks.q-dlq", headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

#[tokio::test]
async fn control_characters_from_the_stream_are_shown_escaped() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = natasks::Client::new(js.clone()).await.unwrap();
    let seq = hostile_dead_letter(&js).await;
    // A JSON payload whose string holds the same controls, pending on another queue.
    let json_payload = serde_json::to_vec(&serde_json::json!({ "note": HOSTILE })).unwrap();
    let pending = client
        .dispatch(Task::new("fine", json_payload), "p")
        .await
        .unwrap()
        .sequence
        .expect("a task dispatched now has a sequence");

    let seq = seq.to_string();
    let pending = pending.to_string();
    for args in [
        vec!["dlq", "list", "q"],
        vec!["dlq", "show", "q", &seq],
        vec!["tasks", "show", &seq],
        vec!["tasks", "show", &pending],
        vec!["tasks", "list", "q", "--state", "dead"],
        vec!["search"],
        vec!["search", "--error", "boom"],
    ] {
        let run = natasks(&url, &args).await.ok();
        no_raw_controls(&run);
        // Shown as text escapes, or as JSON escapes in a JSON payload.
        let shown = run.stdout.contains("\\x1b") || run.stdout.contains("\\u001b");
        assert!(shown, "{args:?}: the escape is shown: {run:?}");
    }
    // The payload keeps its lines; the controls in it are shown as escapes.
    let show = natasks(&url, &["tasks", "show", &seq]).await.ok().stdout;
    assert!(show.contains("not json boom\\x1b[2J\\x07\\u{9b}31m\nsecond line"), "{show}");
    assert!(show.contains("X-Note: boom\\x1b[2J\\x07\\u{9b}31m"), "{show}");
    let show = natasks(&url, &["tasks", "show", &pending]).await.ok().stdout;
    assert!(show.contains(r#""note": "boom\u001b[2J\u0007\u009b31m""#), "{show}");

    // --json: valid JSON holding the exact text, its controls escaped by JSON itself.
    let run = natasks(&url, &["tasks", "show", &seq, "--json"]).await.ok();
    no_raw_controls(&run);
    let detail = run.json();
    assert_eq!(detail["headers"]["Natasks-Last-Error"], HOSTILE, "{detail}");
    assert!(detail["payload"].as_str().unwrap().contains(HOSTILE), "{detail}");
    let run = natasks(&url, &["dlq", "list", "q", "--json"]).await.ok();
    no_raw_controls(&run);
    assert_eq!(run.json()[0]["last_error"], HOSTILE);
    let run = natasks(&url, &["tasks", "show", &pending, "--json"]).await.ok();
    no_raw_controls(&run);
    assert_eq!(run.json()["payload_json"]["note"], HOSTILE);
}

#[tokio::test]
async fn a_tracked_task_error_with_controls_is_shown_escaped() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let mut text_tail = Tail::start(&url, &["jobs"]).await;
    let mut json_tail = Tail::start(&url, &["jobs", "--json"]).await;
    let worker = Worker::builder(js, "jobs")
        .handle("refuse", |_: Task| async { Err::<(), _>(natasks::no_retry(HOSTILE)) })
        .build()
        .await
        .unwrap();
    let handle = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });
    let args = ["dispatch", "jobs", "refuse", "--payload", "{}", "--track", "--json"];
    let id = natasks(&url, &args).await.ok().json()["id"].as_str().unwrap().to_owned();

    let run = natasks(&url, &["task", "result", &id, "--wait", "15s"]).await.failed("boom");
    no_raw_controls(&run);
    let status = natasks(&url, &["task", "status", &id]).await.ok();
    no_raw_controls(&status);
    assert!(status.stdout.contains("boom\\x1b[2J\\x07"), "{status:?}");
    let status = natasks(&url, &["task", "status", &id, "--json"]).await.ok();
    no_raw_controls(&status);
    assert_eq!(status.json()["last_error"], Value::from(HOSTILE));

    // The live tail: the failure's line shows the error escaped; its JSON holds it exactly.
    let failed = loop {
        let line = text_tail.next_line().await;
        if line.contains(" failed ") {
            break line;
        }
    };
    assert!(!failed.contains(['\u{1b}', '\u{7}', '\u{9b}']), "{failed:?}");
    assert!(failed.contains("error=boom\\x1b[2J\\x07\\u{9b}31m"), "{failed:?}");
    let failed = loop {
        let line = json_tail.next_line().await;
        let event: Value = serde_json::from_str(&line).expect("one JSON object per line");
        if event["kind"] == "failed" {
            assert!(!line.contains(['\u{1b}', '\u{7}', '\u{9b}']), "{line:?}");
            break event;
        }
    };
    assert_eq!(failed["error"], HOSTILE, "{failed}");
    text_tail.stop().await;
    json_tail.stop().await;

    handle.shutdown();
    tokio::time::timeout(DEADLINE, running).await.unwrap().unwrap().unwrap();
}
