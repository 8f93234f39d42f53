//! Go and Rust on one server: tasks dispatched by one language and processed by the other,
//! one consumer shared by workers of both, delays, the stream created by either side,
//! `NoRetry`, and trace context.
//!
//! The Go side is `natasks-go` (`interop/go`), a stand-in for the Go natasks library written
//! on nats.go from that library's published documentation, because the module itself is not
//! served by the module proxy this project builds with (see the README's interoperability
//! section). It runs as a child process and prints one JSON line per event; Rust runs in the
//! test process through the library. Dead letters across languages are tested with the CLI,
//! in `cli/tests/interop_go.rs`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer};
use base64::Engine as _;
use common::*;
use futures_util::StreamExt as _;
use natasks::{Client, HandlerError, Task, Worker};
use natasks_test_support::go::{run_go, GoProcess};
use serde_json::Value;

/// Deadline for one `natasks-go` command or one awaited event.
const GO_DEADLINE: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// `natasks-go <command> --url <url> <args>` run to completion; panics unless it exits 0.
async fn go(command: &str, url: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec![command, "--url", url];
    all.extend_from_slice(args);
    run_go(&all, GO_DEADLINE).await.ok().events
}

/// A Go worker on `queue`, ready (its stream and consumer exist) when this returns.
async fn start_go_worker(url: &str, queue: &str, args: &[&str]) -> GoProcess {
    let mut all = vec!["work", "--url", url, "--queue", queue];
    all.extend_from_slice(args);
    let mut worker = GoProcess::spawn(&all).await;
    worker.wait_for("ready", GO_DEADLINE, |e| e["event"] == "ready").await;
    worker
}

fn is_processed(event: &Value) -> bool {
    event["event"] == "processed"
}

fn payload_of(event: &Value) -> Vec<u8> {
    let b64 = event["payload_b64"].as_str().expect("payload_b64");
    base64::engine::general_purpose::STANDARD.decode(b64).expect("base64 payload")
}

fn payload_text(event: &Value) -> String {
    String::from_utf8(payload_of(event)).expect("UTF-8 payload")
}

/// The first value of header `name` in a Go `processed` event.
fn go_header<'a>(event: &'a Value, name: &str) -> Option<&'a str> {
    event["headers"][name][0].as_str()
}

/// A stored message's headers, every value, sorted, without `skip`.
fn header_set(headers: &async_nats::HeaderMap, skip: &[&str]) -> BTreeMap<String, Vec<String>> {
    headers
        .iter()
        .filter(|(name, _)| !skip.contains(&name.as_ref()))
        .map(|(name, values)| {
            (name.to_string(), values.iter().map(|v| v.as_str().to_owned()).collect())
        })
        .collect()
}

async fn consumer_info(js: &jetstream::Context, name: &str) -> consumer::Info {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let mut consumer: consumer::PullConsumer =
        stream.get_consumer(name).await.expect("consumer exists");
    consumer.info().await.expect("consumer info").clone()
}

async fn stream_config(js: &jetstream::Context) -> jetstream::stream::Config {
    let mut stream = js.get_stream("NATASKS").await.expect("stream exists");
    stream.info().await.expect("stream info").config.clone()
}

// 1. Go dispatches, Rust works.

#[tokio::test]
async fn go_dispatch_reaches_a_rust_worker_with_the_same_bytes_and_headers() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    // Every byte value, then some JSON: the payload is raw bytes on both sides.
    let payload: Vec<u8> = (0..=255u8).chain(*b"{\"user_id\":42}").collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.bin");
    std::fs::File::create(&file).unwrap().write_all(&payload).unwrap();
    let file = file.to_str().unwrap();

    let go_args = [
        "--queue",
        "interop",
        "--task",
        "emails.send",
        "--payload-file",
        file,
        "--header",
        "X-Request-Id=req-42",
        "--header",
        "X-Multi=a",
        "--header",
        "X-Multi=b",
        "--msg-id",
        "go-1",
    ];
    let sent = go("dispatch", &url, &go_args).await;
    assert_eq!(sent[0]["seq"], 1, "{sent:?}");
    // The same task from Rust, stored next to it.
    let client = Client::new(js.clone()).await.unwrap();
    let mut task = Task::new("emails.send", payload.clone()).with_message_id("rust-1");
    task.set_header("X-Request-Id", "req-42");
    task.add_header("X-Multi", "a").add_header("X-Multi", "b");
    client.dispatch(task, "interop").await.unwrap();

    // On the wire: same subject, payload and headers (the message ids differ by design).
    let stream = js.get_stream("NATASKS").await.unwrap();
    let from_go = stream.get_raw_message(1).await.unwrap();
    let from_rust = stream.get_raw_message(2).await.unwrap();
    assert_eq!(from_go.subject, from_rust.subject);
    assert_eq!(from_go.subject.as_str(), "natasks.interop");
    assert_eq!(from_go.payload, from_rust.payload);
    assert_eq!(from_go.payload.as_ref(), payload.as_slice());
    assert_eq!(
        header_set(&from_go.headers, &["Nats-Msg-Id"]),
        header_set(&from_rust.headers, &["Nats-Msg-Id"]),
        "Go and Rust write the same headers"
    );
    assert_eq!(from_go.headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("go-1"));

    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "interop")
        .handle("emails.send", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let tasks = seen.take(2, DEADLINE).await;
    running.stop().await.unwrap();
    let got = tasks.iter().find(|t| t.message_id() == Some("go-1")).expect("Go's task");
    assert_eq!(got.name(), "emails.send");
    assert_eq!(got.payload().as_ref(), payload.as_slice());
    assert_eq!(got.header("X-Request-Id"), Some("req-42"));
    let multi: Vec<&str> = got.headers().get_all("X-Multi").map(|v| v.as_str()).collect();
    assert_eq!(multi, ["a", "b"]);
    assert_eq!(got.header("Natasks-Queue"), Some("interop"));
    assert_eq!(got.delivery().map(|d| d.attempt), Some(1));
}

#[tokio::test]
async fn a_message_id_deduplicates_across_languages() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();

    // Go first, then Rust with the same id: the server keeps Go's.
    let args = ["--queue", "dedup", "--task", "t", "--payload", "from go", "--msg-id", "shared-1"];
    let first = go("dispatch", &url, &args).await;
    assert_eq!(first[0]["duplicate"], false);
    client
        .dispatch(Task::new("t", "from rust").with_message_id("shared-1"), "dedup")
        .await
        .unwrap();
    // Rust first, then Go: the server tells Go it was a duplicate.
    client
        .dispatch(Task::new("t", "from rust").with_message_id("shared-2"), "dedup")
        .await
        .unwrap();
    let args = ["--queue", "dedup", "--task", "t", "--payload", "from go", "--msg-id", "shared-2"];
    let second = go("dispatch", &url, &args).await;
    assert_eq!(second[0]["duplicate"], true, "{second:?}");
    assert_eq!(stream_messages(&js).await, 2, "one task per message id");

    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "dedup")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let mut got: Vec<(String, String)> = seen
        .take(2, DEADLINE)
        .await
        .iter()
        .map(|t| {
            let payload = String::from_utf8(t.payload().to_vec()).unwrap();
            (t.message_id().unwrap().to_owned(), payload)
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [("shared-1".into(), "from go".into()), ("shared-2".into(), "from rust".into())]
    );
    eventually(DEADLINE, "both tasks acknowledged", || async { stream_messages(&js).await == 0 })
        .await;
    let info = consumer_info(&js, "natasks-dedup").await;
    assert_eq!(info.delivered.consumer_sequence, 2, "nothing else was delivered");
    running.stop().await.unwrap();
}

// 2. Rust dispatches, Go works.

#[tokio::test]
async fn rust_dispatch_dispatch_in_and_dispatch_at_reach_a_go_worker() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut worker = start_go_worker(&url, "from-rust", &["--handle", "t=ok"]).await;

    let start = now_ms();
    let task = |payload: &str| {
        let mut task = Task::new("t", payload.to_owned())
            .with_header("X-Request-Id", "req-7")
            .with_message_id(format!("id-{payload}"));
        task.add_header("X-Multi", "a").add_header("X-Multi", "b");
        task
    };
    client.dispatch(task("now"), "from-rust").await.unwrap();
    client.dispatch_in(task("in"), "from-rust", Duration::from_millis(1000)).await.unwrap();
    let at = SystemTime::now() + Duration::from_millis(1500);
    client.dispatch_at(task("at"), "from-rust", at).await.unwrap();
    let events = worker.take(3, GO_DEADLINE, is_processed).await;
    worker.stop(GO_DEADLINE).await;

    let mut by_payload = BTreeMap::new();
    for event in &events {
        assert_eq!(event["task"], "t");
        assert_eq!(event["attempt"], 1);
        assert_eq!(event["outcome"], "succeeded");
        assert_eq!(go_header(event, "X-Request-Id"), Some("req-7"));
        assert_eq!(event["headers"]["X-Multi"], serde_json::json!(["a", "b"]));
        assert_eq!(go_header(event, "Natasks-Task"), Some("t"));
        assert_eq!(go_header(event, "Natasks-Queue"), Some("from-rust"));
        by_payload.insert(payload_text(event), event.clone());
    }
    let received = |p: &str| by_payload[p]["received_ms"].as_i64().unwrap() - start;
    assert_eq!(go_header(&by_payload["now"], "Nats-Msg-Id"), Some("id-now"));
    assert!(received("now") < 1000, "immediate task after {} ms", received("now"));
    assert!(received("in") >= 1000, "dispatch_in task early, after {} ms", received("in"));
    assert!(received("at") >= 1500, "dispatch_at task early, after {} ms", received("at"));
    assert!(received("at") < 6000, "dispatch_at task late, after {} ms", received("at"));
    // A delayed task reaches Go through the schedule: the server strips Nats-Msg-Id from
    // what a schedule produces, natasks keeps the id in Natasks-Message-Id.
    assert_eq!(go_header(&by_payload["in"], "Natasks-Message-Id"), Some("id-in"));
    assert!(go_header(&by_payload["in"], "Nats-Scheduler")
        .is_some_and(|s| s.starts_with("natasks.__natasks_schedule.")));
}

/// Unique, batched and debounced tasks stay on `natasks.<queue>`: a Go worker processes
/// them. Go does not release a unique key; the next Rust dispatch with the key finds the
/// task gone and takes the key over.
#[tokio::test]
async fn unique_batched_and_debounced_tasks_reach_a_go_worker() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut worker = start_go_worker(&url, "guarded", &["--handle", "t=ok"]).await;
    let hour = Duration::from_secs(3600);

    client
        .dispatch(Task::new("t", "unique").unique("ann@example.com", hour), "guarded")
        .await
        .unwrap();
    let batch: natasks::Batch =
        ["b1", "b2"].into_iter().map(|p| (Task::new("t", p), "guarded")).collect();
    client.dispatch_batch(batch).await.unwrap();
    for edit in ["d1", "d2", "d3"] {
        let task = Task::new("t", edit).debounce("doc");
        client.dispatch_in(task, "guarded", Duration::from_millis(500)).await.unwrap();
    }
    let events = worker.take(4, GO_DEADLINE, is_processed).await;
    let mut payloads: Vec<String> = events.iter().map(payload_text).collect();
    payloads.sort();
    assert_eq!(payloads, ["b1", "b2", "d3", "unique"]);
    let unique = events.iter().find(|e| payload_text(e) == "unique").unwrap();
    assert_eq!(go_header(unique, "Natasks-Unique-Key"), Some("ann@example.com"));

    eventually(GO_DEADLINE, "the key is free again", || async {
        let task = Task::new("t", "again").unique("ann@example.com", hour);
        client.dispatch(task, "guarded").await.is_ok()
    })
    .await;
    worker.take(1, GO_DEADLINE, is_processed).await;
    worker.stop(GO_DEADLINE).await;
}

/// Periodic tasks are fired by the server as ordinary tasks on `natasks.<queue>`: a Go
/// worker processes them like any other.
#[tokio::test]
async fn periodic_ticks_reach_a_go_worker() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut worker = start_go_worker(&url, "ticks", &["--handle", "tick=ok"]).await;
    let every = natasks::Every::interval(Duration::from_secs(1));
    let task = Task::new("tick", "payload").with_header("X-Source", "cron");
    client.schedule("go-ticks", every, task, "ticks").await.unwrap();
    let events = worker.take(2, GO_DEADLINE, is_processed).await;
    client.unschedule("go-ticks").await.unwrap();
    worker.stop(GO_DEADLINE).await;
    for event in &events {
        assert_eq!(event["task"], "tick");
        assert_eq!(event["attempt"], 1);
        assert_eq!(event["outcome"], "succeeded");
        assert_eq!(payload_text(event), "payload");
        assert_eq!(go_header(event, "X-Source"), Some("cron"));
        assert_eq!(go_header(event, "Natasks-Queue"), Some("ticks"));
    }
    assert_eq!(stored(&js, "natasks.ticks").await, 0, "every tick was acknowledged");
}

#[tokio::test]
async fn two_hundred_pending_rust_delayed_tasks_reach_a_go_worker_on_time() {
    const TASKS: i64 = 200;
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut worker =
        start_go_worker(&url, "many", &["--handle", "t=ok", "--concurrency", "16"]).await;

    // Due between 2 and 3 seconds from now, 5 ms apart.
    let first_due = now_ms() + 2000;
    let dispatches = (0..TASKS).map(|i| {
        let due = first_due + i * 5;
        let task = Task::new("t", i.to_string()).with_header("X-Due-Ms", due.to_string());
        let at = UNIX_EPOCH + Duration::from_millis(due as u64);
        let client = client.clone();
        async move { client.dispatch_at(task, "many", at).await }
    });
    for result in futures_util::future::join_all(dispatches).await {
        result.unwrap();
    }
    assert!(now_ms() < first_due, "dispatching took too long to test pending schedules");
    assert_eq!(stream_messages(&js).await, TASKS as u64, "all {TASKS} pending at once");

    let events = worker.take(TASKS as usize, GO_DEADLINE, is_processed).await;
    worker.stop(GO_DEADLINE).await;
    let mut seen = HashSet::new();
    let mut latest = 0;
    for event in &events {
        let due: i64 = go_header(event, "X-Due-Ms").unwrap().parse().unwrap();
        let lateness = event["received_ms"].as_i64().unwrap() - due;
        assert!(lateness >= -20, "task {} arrived {} ms early", payload_text(event), -lateness);
        latest = latest.max(lateness);
        assert!(seen.insert(payload_text(event)), "task {} twice", payload_text(event));
    }
    assert_eq!(seen.len(), TASKS as usize);
    assert!(latest < 3000, "a task arrived {latest} ms after it was due");
    println!("{TASKS} delayed tasks, latest {latest} ms after its due time");
    assert_eq!(stream_messages(&js).await, 0, "no schedule left behind");
}

// 3. Go delays reach Rust; Go's one schedule subject keeps only the latest.

#[tokio::test]
async fn go_dispatch_in_reaches_rust_and_only_the_latest_pending_go_delay_survives() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    go("ensure", &url, &[]).await;
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "delays")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    // One Go delayed task reaches the Rust worker.
    go(
        "dispatch",
        &url,
        &["--queue", "delays", "--task", "t", "--payload", "go-alone", "--in", "1s"],
    )
    .await;
    let got = seen.recv().await;
    assert_eq!(got.payload().as_ref(), b"go-alone");
    assert_eq!(got.header("Natasks-Queue"), Some("delays"));
    assert_eq!(got.header("Nats-Scheduler"), Some("natasks._schedule"));
    eventually(DEADLINE, "stream empty", || async { stream_messages(&js).await == 0 }).await;

    // Three Go delayed tasks and three Rust ones pending at once.
    let client = Client::new(js.clone()).await.unwrap();
    for name in ["go-a", "go-b", "go-c"] {
        let args = ["--queue", "delays", "--task", "t", "--payload", name, "--in", "2s"];
        go("dispatch", &url, &args).await;
    }
    for name in ["rust-a", "rust-b", "rust-c"] {
        client.dispatch_in(Task::new("t", name), "delays", Duration::from_secs(2)).await.unwrap();
    }
    assert_eq!(stored(&js, "natasks._schedule").await, 1, "Go's subject holds one schedule");
    assert_eq!(stream_messages(&js).await, 4, "Go's latest and Rust's three");

    let mut got: Vec<String> = seen
        .take(4, DEADLINE)
        .await
        .iter()
        .map(|t| String::from_utf8(t.payload().to_vec()).unwrap())
        .collect();
    got.sort();
    assert_eq!(got, ["go-c", "rust-a", "rust-b", "rust-c"], "go-a and go-b were replaced");
    // Nothing more can come: no schedule is left, and the worker saw exactly five tasks.
    eventually(DEADLINE, "stream empty", || async { stream_messages(&js).await == 0 }).await;
    assert_eq!(consumer_info(&js, "natasks-delays").await.delivered.consumer_sequence, 5);
    running.stop().await.unwrap();
}

// 4. Go and Rust workers on one consumer.

/// Collects what natasks logs at WARN or above on this thread (the test runtime is
/// single-threaded, so the worker's tasks log here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Go log lines at WARN or above.
fn go_problems(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|line| line.contains("\"level\":\"WARN\"") || line.contains("\"level\":\"ERROR\""))
        .collect()
}

#[tokio::test]
async fn go_and_rust_workers_share_one_consumer_without_rewriting_it() {
    const EACH: usize = 1000;
    let logs = Logs::default();
    let _capture = logs.capture();
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;

    // The consumer as Go creates it, then as each worker finds it on start.
    go("ensure", &url, &["--queue", "shared"]).await;
    let before = consumer_info(&js, "natasks-shared").await;
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "shared")
        .concurrency(8)
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let after_rust = consumer_info(&js, "natasks-shared").await;
    let running = spawn(worker);
    let mut go_worker =
        start_go_worker(&url, "shared", &["--handle", "t=ok", "--concurrency", "8"]).await;
    let after_go = consumer_info(&js, "natasks-shared").await;
    assert_eq!(after_rust.config, before.config, "the Rust worker kept Go's consumer config");
    assert_eq!(after_go.config, before.config, "the Go worker kept the config");
    assert_eq!(after_go.created, before.created, "the consumer was never re-created");

    // 2,000 tasks, half from each language, while both workers run.
    let client = Client::new(js.clone()).await.unwrap();
    let go_args = [
        "dispatch",
        "--url",
        &url,
        "--queue",
        "shared",
        "--task",
        "t",
        "--payload",
        "go-{i}",
        "--count",
        "1000",
    ];
    let go_dispatch = run_go(&go_args, GO_DEADLINE);
    let rust_dispatch = futures_util::stream::iter(0..EACH)
        .map(|i| {
            let client = client.clone();
            async move { client.dispatch(Task::new("t", format!("rust-{i}")), "shared").await }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let (go_run, rust_results) = tokio::join!(go_dispatch, rust_dispatch);
    go_run.ok();
    assert!(rust_results.iter().all(Result::is_ok));

    // Every task once, by one worker or the other; the config stays put meanwhile.
    let mut by_rust = Vec::new();
    let mut by_go = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while by_rust.len() + by_go.len() < 2 * EACH {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} + {} tasks processed",
            by_rust.len(),
            by_go.len()
        );
        while let Some(task) = seen.recv_within(Duration::from_millis(50)).await {
            by_rust.push(String::from_utf8(task.payload().to_vec()).unwrap());
        }
        by_go.extend(go_worker.drain().iter().filter(|e| is_processed(e)).map(payload_text));
        assert_eq!(consumer_info(&js, "natasks-shared").await.config, before.config);
    }
    let all: HashSet<&String> = by_rust.iter().chain(&by_go).collect();
    assert_eq!(all.len(), 2 * EACH, "each task processed exactly once");
    assert!(!by_rust.is_empty() && !by_go.is_empty(), "both workers took part");
    println!("Rust processed {}, Go processed {}", by_rust.len(), by_go.len());

    running.stop().await.unwrap();
    let go_stderr = go_worker.stop(GO_DEADLINE).await;
    let end = consumer_info(&js, "natasks-shared").await;
    assert_eq!(end.config, before.config);
    assert_eq!(end.created, before.created);
    assert_eq!(end.num_ack_pending, 0);
    assert_eq!(end.num_redelivered, 0, "no task went to both workers");
    assert_eq!(go_problems(&go_stderr), Vec::<&str>::new(), "the Go worker logged problems");
    assert_eq!(logs.text(), "", "the Rust worker logged problems");
}

#[tokio::test]
async fn consumer_settings_that_differ_are_rewritten_by_whichever_worker_starts_last() {
    // Rust raises max_ack_pending to fit concurrency + fetch_batch; a Go worker writes its own
    // value. They do not fight while running: each writes the config when it (re)starts.
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let rust = || {
        Worker::builder(js.clone(), "differ")
            .concurrency(200)
            .handle("t", |_task: Task| async { Ok::<_, HandlerError>(()) })
            .build()
    };
    let first = rust().await.unwrap();
    assert_eq!(consumer_info(&js, "natasks-differ").await.config.max_ack_pending, 201);
    let go_worker = start_go_worker(&url, "differ", &["--handle", "t=ok"]).await;
    assert_eq!(consumer_info(&js, "natasks-differ").await.config.max_ack_pending, 128);
    drop(first);
    let _second = rust().await.unwrap();
    assert_eq!(consumer_info(&js, "natasks-differ").await.config.max_ack_pending, 201);
    go_worker.stop(GO_DEADLINE).await;
    // Setting the same value on both sides ends it.
    let _pinned = Worker::builder(js.clone(), "differ")
        .concurrency(200)
        .max_ack_pending(256)
        .handle("t", |_task: Task| async { Ok::<_, HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let before = consumer_info(&js, "natasks-differ").await;
    let go_worker =
        start_go_worker(&url, "differ", &["--handle", "t=ok", "--max-ack-pending", "256"]).await;
    assert_eq!(consumer_info(&js, "natasks-differ").await.config, before.config);
    go_worker.stop(GO_DEADLINE).await;
}

// 5. Either side creates the stream, the other adopts it.

#[tokio::test]
async fn rust_delays_work_on_a_stream_go_created() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    go("ensure", &url, &[]).await;
    assert_eq!(stream_config(&js).await.subjects, ["natasks.*"]);

    let client = Client::new(js.clone()).await.unwrap();
    let subjects = stream_config(&js).await.subjects;
    assert_eq!(
        subjects,
        ["natasks.*", "natasks.__natasks_schedule.>", "natasks.__natasks_mark.>"],
        "Rust adds its subjects"
    );
    let mut worker = start_go_worker(&url, "adopted", &["--handle", "t=ok"]).await;
    for i in 0..3 {
        let task = Task::new("t", format!("rust-{i}"));
        client.dispatch_in(task, "adopted", Duration::from_millis(800)).await.unwrap();
    }
    go("dispatch", &url, &["--queue", "adopted", "--task", "t", "--payload", "go-now"]).await;
    let mut got: Vec<String> =
        worker.take(4, GO_DEADLINE, is_processed).await.iter().map(payload_text).collect();
    got.sort();
    assert_eq!(got, ["go-now", "rust-0", "rust-1", "rust-2"]);
    worker.stop(GO_DEADLINE).await;
}

#[tokio::test]
async fn go_delays_work_on_a_stream_rust_created() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let created = stream_config(&js).await;
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "adopted")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    go("ensure", &url, &["--queue", "adopted"]).await;
    assert_eq!(stream_config(&js).await, created, "Go uses the stream as Rust made it");
    let args = ["--queue", "adopted", "--task", "t", "--payload", "go-later", "--in", "800ms"];
    go("dispatch", &url, &args).await;
    client
        .dispatch_in(Task::new("t", "rust-later"), "adopted", Duration::from_millis(800))
        .await
        .unwrap();
    let mut got: Vec<String> = seen
        .take(2, DEADLINE)
        .await
        .iter()
        .map(|t| String::from_utf8(t.payload().to_vec()).unwrap())
        .collect();
    got.sort();
    assert_eq!(got, ["go-later", "rust-later"]);
    running.stop().await.unwrap();
}

// 7. NoRetry.

/// What a settled task left behind: tasks and dead letters stored, and the consumer's counts.
async fn end_state(js: &jetstream::Context, queue: &str) -> (u64, u64, usize, usize, u64, u64) {
    let info = consumer_info(js, &format!("natasks-{queue}")).await;
    (
        stored(js, &format!("natasks.{queue}")).await,
        stored(js, &format!("natasks.{queue}-dlq")).await,
        info.num_ack_pending,
        info.num_redelivered,
        info.num_pending,
        info.delivered.consumer_sequence,
    )
}

#[tokio::test]
async fn no_retry_leaves_the_same_state_in_go_and_rust() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();

    let mut go_worker =
        start_go_worker(&url, "nr-go", &["--handle", "t=noretry", "--max-retries", "3"]).await;
    client.dispatch(Task::new("t", "x"), "nr-go").await.unwrap();
    let event = go_worker.wait_for("the attempt", GO_DEADLINE, is_processed).await;
    assert_eq!(event["outcome"], "no-retry");

    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "nr-rust")
        .max_retries(3)
        .handle("t", move |task: Task| {
            let _ = tx.send(task);
            async { Err::<(), _>(natasks::no_retry(std::io::Error::other("rejected"))) }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("t", "x"), "nr-rust").await.unwrap();
    seen.recv().await;

    let settled = |queue: &'static str| {
        let js = js.clone();
        async move { end_state(&js, queue).await.2 == 0 }
    };
    eventually(DEADLINE, "Go's attempt settled", || settled("nr-go")).await;
    eventually(DEADLINE, "Rust's attempt settled", || settled("nr-rust")).await;
    let go_state = end_state(&js, "nr-go").await;
    let rust_state = end_state(&js, "nr-rust").await;
    assert_eq!(go_state, (0, 0, 0, 0, 0, 1), "removed, not dead-lettered, delivered once");
    assert_eq!(rust_state, go_state);
    running.stop().await.unwrap();
    go_worker.stop(GO_DEADLINE).await;
}

// 8. Trace context.

#[cfg(feature = "opentelemetry")]
mod trace {
    use std::sync::OnceLock;

    use natasks::otel::opentelemetry;
    use natasks::otel::OtelPropagator;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

    use super::*;

    /// natasks' spans come from the global provider: one in-memory exporter per test binary.
    fn exporter() -> &'static InMemorySpanExporter {
        static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
        EXPORTER.get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider =
                SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
            opentelemetry::global::set_tracer_provider(provider);
            exporter
        })
    }

    fn span(name: &str, queue: &str) -> Option<SpanData> {
        exporter().get_finished_spans().expect("exporter readable").into_iter().find(|s| {
            s.name == name
                && s.attributes.iter().any(|kv| {
                    kv.key.as_str() == "messaging.destination.name" && kv.value.as_str() == queue
                })
        })
    }

    async fn wait_span(name: &str, queue: &str) -> SpanData {
        eventually(DEADLINE, &format!("a {name} span for {queue}"), || async {
            span(name, queue).is_some()
        })
        .await;
        span(name, queue).expect("span present")
    }

    fn hex<'a>(event: &'a Value, key: &str) -> &'a str {
        event[key].as_str().unwrap_or_else(|| panic!("no {key} in {event}"))
    }

    #[tokio::test]
    async fn trace_context_joins_go_and_rust_both_ways() {
        exporter();
        let server = NatsServer::start().await;
        let url = server.url();
        let js = server.jetstream().await;

        // Go dispatches, Rust processes.
        let worker = Worker::builder(js.clone(), "traced-rust")
            .propagator(OtelPropagator::new())
            .handle("t", |_task: Task| async { Ok::<_, HandlerError>(()) })
            .build()
            .await
            .unwrap();
        let running = spawn(worker);
        let args = ["--queue", "traced-rust", "--task", "t", "--payload", "x", "--otel"];
        let sent = go("dispatch", &url, &args).await;
        let process = wait_span("natasks.process", "traced-rust").await;
        running.stop().await.unwrap();
        let go_trace = TraceId::from_hex(hex(&sent[0], "trace_id")).unwrap();
        let go_span = SpanId::from_hex(hex(&sent[0], "span_id")).unwrap();
        assert_ne!(go_trace, TraceId::INVALID);
        assert_eq!(process.span_context.trace_id(), go_trace, "one trace from Go to Rust");
        assert_eq!(process.parent_span_id, go_span, "Rust's span under Go's dispatch span");
        assert!(process.parent_span_is_remote);

        // Rust dispatches, Go processes.
        let mut go_worker =
            start_go_worker(&url, "traced-go", &["--handle", "t=ok", "--otel"]).await;
        let client =
            Client::builder(js.clone()).propagator(OtelPropagator::new()).build().await.unwrap();
        client.dispatch(Task::new("t", "y"), "traced-go").await.unwrap();
        let event = go_worker.wait_for("the attempt", GO_DEADLINE, is_processed).await;
        go_worker.stop(GO_DEADLINE).await;
        let dispatch = wait_span("natasks.dispatch", "traced-go").await;
        assert_eq!(hex(&event, "trace_id"), dispatch.span_context.trace_id().to_string());
        assert_eq!(hex(&event, "parent_span_id"), dispatch.span_context.span_id().to_string());
        assert_eq!(event["parent_remote"], true);
        assert_eq!(
            go_header(&event, "traceparent"),
            Some(
                format!(
                    "00-{}-{}-01",
                    dispatch.span_context.trace_id(),
                    dispatch.span_context.span_id()
                )
                .as_str()
            )
        );
    }
}
