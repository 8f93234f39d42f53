//! Runs the built `natasks` binary against real nats-servers and checks its output and the
//! state it leaves in the stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::StreamMessage};
use futures_util::StreamExt as _;
use natasks::{HandlerError, Task, Worker};
use natasks_test_support::NatsServer;
use tokio::sync::mpsc;

mod common;
use common::{eventually, natasks, Run, DEADLINE};

/// Messages stored on `subject` in the natasks stream.
async fn stored(js: &jetstream::Context, subject: &str) -> u64 {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let info = stream.info_with_subjects(subject).await.expect("stream info");
    let counts: HashMap<String, usize> = info.filter_map(|r| async { r.ok() }).collect().await;
    counts.get(subject).copied().unwrap_or(0) as u64
}

/// Every message stored on `subject`, oldest first.
async fn messages_on(js: &jetstream::Context, subject: &str) -> Vec<StreamMessage> {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let mut out = Vec::new();
    let mut seq = 1;
    while let Ok(message) = stream.get_first_raw_message_by_subject(subject, seq).await {
        seq = message.sequence + 1;
        out.push(message);
    }
    out
}

fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

/// Publishes a dead letter the way a worker does, returning its sequence.
async fn dead_letter(js: &jetstream::Context, queue: &str, task: &str, payload: &str) -> u64 {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", task);
    headers.insert("Natasks-Queue", format!("{queue}-dlq").as_str());
    headers.insert("Natasks-Original-Queue", queue);
    headers.insert("Natasks-Attempts", "3");
    headers.insert("Natasks-Last-Error", "boom");
    headers.insert("Natasks-Dead-Letter-Reason", "retries-exhausted");
    headers.insert("X-Request-Id", "req-1");
    js.publish_with_headers(format!("natasks.{queue}-dlq"), headers, payload.to_owned().into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Creates the stream the way clients do.
async fn natasks_stream(js: &jetstream::Context) {
    natasks::Client::new(js.clone()).await.unwrap();
}

#[tokio::test]
async fn queues_show_dispatched_tasks() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;

    for to in ["a@example.com", "b@example.com"] {
        let payload = format!(r#"{{"to":"{to}"}}"#);
        let run =
            natasks(&url, &["dispatch", "emails", "emails.send", "--payload", &payload]).await.ok();
        let out = run.stdout.trim();
        assert!(out.starts_with("dispatched emails.send to queue emails (id "), "{out}");
    }
    natasks(
        &url,
        &[
            "dispatch",
            "reports",
            "reports.build",
            "--payload",
            "{}",
            "-H",
            "X-Request-Id=req-7",
            "--message-id",
            "report-1",
        ],
    )
    .await
    .ok();
    // The same message id again: JetStream drops it.
    natasks(&url, &["dispatch", "reports", "reports.build", "--message-id", "report-1"]).await.ok();
    assert_eq!(stored(&js, "natasks.emails").await, 2);
    assert_eq!(stored(&js, "natasks.reports").await, 1);
    let report = &messages_on(&js, "natasks.reports").await[0];
    assert_eq!(header(report, "Natasks-Task"), Some("reports.build"));
    assert_eq!(header(report, "X-Request-Id"), Some("req-7"));
    assert_eq!(report.payload.as_ref(), b"{}");

    let queues = natasks(&url, &["queues", "--json"]).await.ok().json();
    let queues = queues.as_array().unwrap();
    assert_eq!(queues.len(), 2, "{queues:?}");
    let emails = queues.iter().find(|q| q["queue"] == "emails").expect("emails listed");
    assert_eq!(emails["pending"], 2);
    assert_eq!(emails["stored"], 2);
    assert_eq!(emails["in_flight"], 0);
    assert_eq!(emails["dlq"], 0);
    assert!(emails["oldest"].is_string(), "{emails}");
    assert!(emails["consumer"].is_null());
    let reports = queues.iter().find(|q| q["queue"] == "reports").expect("reports listed");
    assert_eq!(reports["pending"], 1);

    let table = natasks(&url, &["queues"]).await.ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("QUEUE") && lines[0].contains("PENDING"), "{table}");
    let emails_row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&emails_row[..5], ["emails", "2", "0", "0", "0"], "{table}");
    assert!(lines[2].starts_with("reports"), "{table}");

    // The worker consumer's counts: one task in flight, one pending.
    let worker_js = js.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let worker = Worker::builder(worker_js, "emails")
        .concurrency(1)
        .fetch_batch(1)
        .handle("emails.send", move |_task: Task| {
            let tx = tx.clone();
            let mut release = release_rx.clone();
            async move {
                let _ = tx.send(());
                let _ = release.wait_for(|r| *r).await;
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let handle = worker.shutdown_handle();
    let join = tokio::spawn(async move { worker.run().await });
    tokio::time::timeout(DEADLINE, rx.recv()).await.expect("worker got a task");
    let start = Instant::now();
    let emails = loop {
        let queues = natasks(&url, &["queues", "--json"]).await.ok().json();
        let emails =
            queues.as_array().unwrap().iter().find(|q| q["queue"] == "emails").unwrap().clone();
        if emails["in_flight"] == 1 {
            break emails;
        }
        assert!(start.elapsed() < DEADLINE, "emails never showed 1 in flight: {emails}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(emails["consumer"], "natasks-emails");
    assert_eq!(emails["stored"], 2);
    assert!(emails["pending"].as_u64().unwrap() <= 1, "{emails}");
    release_tx.send(true).unwrap();
    eventually("emails drained", || async { stored(&js, "natasks.emails").await == 0 }).await;
    handle.shutdown();
    tokio::time::timeout(DEADLINE, join).await.unwrap().unwrap().unwrap();
    let queues = natasks(&url, &["queues", "--json"]).await.ok().json();
    let emails =
        queues.as_array().unwrap().iter().find(|q| q["queue"] == "emails").unwrap().clone();
    assert_eq!((emails["pending"].as_u64(), emails["in_flight"].as_u64()), (Some(0), Some(0)));
    assert!(emails["oldest"].is_null());
}

#[tokio::test]
async fn delayed_dispatch_is_listed_and_cancelled() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;

    let before = time::OffsetDateTime::now_utc();
    natasks(
        &url,
        &["dispatch", "reports", "reports.build", "--payload", r#"{"n":1}"#, "--in", "1h30m"],
    )
    .await
    .ok();
    natasks(&url, &["dispatch", "emails", "emails.send", "--at", "2099-01-02T03:04:05Z"])
        .await
        .ok();
    assert_eq!(stored(&js, "natasks.reports").await, 0, "a delayed task is not on its queue yet");

    let list = natasks(&url, &["schedules", "list", "--json"]).await.ok().json();
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["task"], "reports.build");
    assert_eq!(list[0]["queue"], "reports");
    let due = time::OffsetDateTime::parse(
        list[0]["due"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let delay = due - before;
    assert!(
        delay >= time::Duration::minutes(89) && delay <= time::Duration::minutes(91),
        "due {due} is not 1h30m after {before}"
    );
    assert_eq!(list[1]["queue"], "emails");
    assert_eq!(list[1]["due"], "2099-01-02T03:04:05Z");
    let only_emails =
        natasks(&url, &["schedules", "list", "--json", "--queue", "emails"]).await.ok();
    assert_eq!(only_emails.json().as_array().unwrap().len(), 1);
    let table = natasks(&url, &["schedules", "list"]).await.ok().stdout;
    assert!(table.lines().nth(1).unwrap().contains("reports.build"), "{table}");

    let id = list[0]["id"].as_str().unwrap().to_owned();
    let run = natasks(&url, &["schedules", "cancel", &id]).await.ok();
    assert_eq!(run.stdout.trim(), format!("cancelled schedule {id}"));
    let list = natasks(&url, &["schedules", "list", "--json"]).await.ok().json();
    let ids: Vec<&str> =
        list.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [list[0]["id"].as_str().unwrap()]);
    assert_ne!(ids[0], id);
    assert_eq!(stored(&js, &format!("natasks.__natasks_schedule.{id}")).await, 0);
    assert_eq!(stored(&js, "natasks.reports").await, 0, "nothing is due yet");

    let again = natasks(&url, &["schedules", "cancel", &id]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("no pending schedule"), "{again:?}");
}

/// A cancelled schedule must never fire. A second schedule on the same queue, due a second
/// later, shows the scheduler has passed the cancelled one's due time.
#[tokio::test]
async fn a_cancelled_schedule_is_never_delivered() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let dispatch = |payload: &'static str, delay: &'static str| {
        let url = url.clone();
        async move {
            let args =
                ["dispatch", "reports", "reports.build", "--payload", payload, "--in", delay];
            natasks(&url, &args).await.ok();
        }
    };
    dispatch(r#"{"n":"cancelled"}"#, "2s").await;
    dispatch(r#"{"n":"control"}"#, "3s").await;
    let list = natasks(&url, &["schedules", "list", "--json"]).await.ok().json();
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    let first = list.iter().min_by_key(|s| s["seq"].as_u64().unwrap()).unwrap();
    let id = first["id"].as_str().unwrap();
    // Succeeds only while the schedule is pending: a fired `@at` schedule is gone.
    let run = natasks(&url, &["schedules", "cancel", id]).await.ok();
    assert_eq!(run.stdout.trim(), format!("cancelled schedule {id}"));

    eventually("the control schedule fires", || async {
        stored(&js, "natasks.reports").await >= 1
    })
    .await;
    let delivered: Vec<String> = messages_on(&js, "natasks.reports")
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(delivered, [r#"{"n":"control"}"#], "the cancelled task was delivered");
    let list = natasks(&url, &["schedules", "list", "--json"]).await.ok().json();
    assert_eq!(list, serde_json::json!([]), "no schedule is left");
}

#[tokio::test]
async fn dead_letter_from_a_worker_is_listed_shown_and_requeued() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let show = std::env::var_os("NATASKS_CLI_SHOW").is_some();
    let echo = |args: &[&str], run: &Run| {
        if show {
            println!("$ natasks {}\n{}{}", args.join(" "), run.stdout, run.stderr);
        }
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let failing = Worker::builder(js.clone(), "emails")
        .ack_wait(Duration::from_secs(2))
        .max_retries(0)
        .handle("emails.send", move |task: Task| {
            let _ = tx.send(task.delivery().unwrap().attempt);
            async { Err::<(), _>(HandlerError::msg("smtp: connection refused")) }
        })
        .build()
        .await
        .unwrap();
    let handle = failing.shutdown_handle();
    let join = tokio::spawn(async move { failing.run().await });
    let args = ["dispatch", "emails", "emails.send", "--payload", r#"{"to":"a@example.com"}"#];
    echo(&args, &natasks(&url, &args).await.ok());
    assert_eq!(tokio::time::timeout(DEADLINE, rx.recv()).await.unwrap(), Some(1));
    eventually("the task is dead-lettered", || async {
        stored(&js, "natasks.emails-dlq").await == 1 && stored(&js, "natasks.emails").await == 0
    })
    .await;
    handle.shutdown();
    tokio::time::timeout(DEADLINE, join).await.unwrap().unwrap().unwrap();

    let args = ["queues"];
    let run = natasks(&url, &args).await.ok();
    echo(&args, &run);
    let row: Vec<&str> = run.stdout.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["emails", "0", "0", "0", "1"], "{run:?}");

    let list = natasks(&url, &["dlq", "list", "emails", "--json"]).await.ok().json();
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["task"], "emails.send");
    assert_eq!(list[0]["attempts"], 1);
    assert_eq!(list[0]["reason"], "retries-exhausted");
    assert_eq!(list[0]["original_queue"], "emails");
    assert!(list[0]["last_error"].as_str().unwrap().contains("smtp: connection refused"));
    let seq = list[0]["seq"].as_u64().unwrap().to_string();
    let args = ["dlq", "list", "emails"];
    let table = natasks(&url, &args).await.ok();
    echo(&args, &table);
    assert!(table.stdout.lines().nth(1).unwrap().starts_with(&format!("{seq} ")), "{table:?}");
    assert!(table.stdout.contains("smtp: connection refused"), "{table:?}");
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 1, "listing consumed nothing");

    let args = ["dlq", "show", "emails", &seq];
    let shown = natasks(&url, &args).await.ok();
    echo(&args, &shown);
    for expected in [
        "Natasks-Task: emails.send",
        "Natasks-Original-Queue: emails",
        "Natasks-Attempts: 1",
        "Natasks-Dead-Letter-Reason: retries-exhausted",
        "\"to\": \"a@example.com\"",
    ] {
        assert!(shown.stdout.contains(expected), "missing {expected:?} in {shown:?}");
    }
    let shown = natasks(&url, &["dlq", "show", "emails", &seq, "--json"]).await.ok().json();
    assert_eq!(shown["payload_json"]["to"], "a@example.com");
    assert_eq!(shown["headers"]["Natasks-Queue"], "emails-dlq");

    let args = ["dlq", "requeue", "emails", "--all"];
    let run = natasks(&url, &args).await.ok();
    echo(&args, &run);
    assert_eq!(run.stdout.trim(), "requeued 1 dead letter(s) from emails-dlq");
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 0);
    let back = messages_on(&js, "natasks.emails").await;
    assert_eq!(back.len(), 1);
    assert_eq!(header(&back[0], "Natasks-Queue"), Some("emails"));
    assert_eq!(header(&back[0], "Natasks-Task"), Some("emails.send"));
    for gone in [
        "Natasks-Original-Queue",
        "Natasks-Attempts",
        "Natasks-Last-Error",
        "Natasks-Dead-Letter-Reason",
    ] {
        assert_eq!(header(&back[0], gone), None, "{gone} kept");
    }
    // Stored once, guarded by the dead letter's requeue marker rather than a message id.
    assert_eq!(header(&back[0], "Nats-Msg-Id"), None);
    assert_eq!(stored(&js, &format!("natasks.__natasks_mark.requeue.{seq}")).await, 1);
    assert_eq!(back[0].payload.as_ref(), br#"{"to":"a@example.com"}"#);

    // A healthy worker now processes it, once.
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, u64)>();
    let healthy = Worker::builder(js.clone(), "emails")
        .ack_wait(Duration::from_secs(2))
        .handle("emails.send", move |task: Task| {
            let _ = tx.send((
                String::from_utf8_lossy(task.payload()).into_owned(),
                task.delivery().unwrap().attempt,
            ));
            async { Ok::<(), HandlerError>(()) }
        })
        .build()
        .await
        .unwrap();
    let handle = healthy.shutdown_handle();
    let join = tokio::spawn(async move { healthy.run().await });
    let (payload, attempt) = tokio::time::timeout(DEADLINE, rx.recv()).await.unwrap().unwrap();
    assert_eq!((payload.as_str(), attempt), (r#"{"to":"a@example.com"}"#, 1));
    eventually("the requeued task is acked", || async { stored(&js, "natasks.emails").await == 0 })
        .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv()).await.is_err(),
        "ran twice"
    );
    handle.shutdown();
    tokio::time::timeout(DEADLINE, join).await.unwrap().unwrap().unwrap();
    let args = ["dlq", "list", "emails"];
    let run = natasks(&url, &args).await.ok();
    echo(&args, &run);
    assert_eq!(run.stdout.trim(), "no dead letters for queue emails");
}

#[tokio::test]
async fn requeue_after_a_crash_between_publish_and_delete_stores_one_copy() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    natasks_stream(&js).await;
    let first = dead_letter(&js, "emails", "emails.send", r#"{"n":1}"#).await;
    let second = dead_letter(&js, "emails", "emails.send", r#"{"n":2}"#).await;

    // An earlier run stored the copy of `first` with its requeue marker and died before
    // deleting the dead letter.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", "emails.send");
    headers.insert("Natasks-Queue", "emails");
    js.publish_with_headers("natasks.emails", headers, r#"{"n":1}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let marker = format!("natasks.__natasks_mark.requeue.{first}");
    js.publish(marker, "".into()).await.unwrap().await.unwrap();
    assert_eq!(stored(&js, "natasks.emails").await, 1);

    let run = natasks(&url, &["dlq", "requeue", "emails", &first.to_string(), "--json"])
        .await
        .ok()
        .json();
    assert_eq!(run["requeued"], 1);
    assert_eq!(run["already_requeued"], 1);
    assert_eq!(run["tasks"][0]["duplicate"], true);
    let queued = messages_on(&js, "natasks.emails").await;
    assert_eq!(queued.len(), 1, "requeue stored a second copy");
    assert_eq!(queued[0].payload.as_ref(), br#"{"n":1}"#);
    let dead = messages_on(&js, "natasks.emails-dlq").await;
    assert_eq!(
        dead.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [second],
        "only the second is left"
    );

    // Requeueing the same sequence again: it is gone, nothing is stored.
    let again = natasks(&url, &["dlq", "requeue", "emails", &first.to_string()]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains(&format!("no dead letter {first}")), "{again:?}");
    assert_eq!(again.stderr.lines().count(), 1, "{again:?}");
    assert_eq!(stored(&js, "natasks.emails").await, 1);

    let run = natasks(&url, &["dlq", "requeue", "emails", "--all"]).await.ok();
    assert_eq!(run.stdout.trim(), "requeued 1 dead letter(s) from emails-dlq");
    let payloads: Vec<Vec<u8>> =
        messages_on(&js, "natasks.emails").await.iter().map(|m| m.payload.to_vec()).collect();
    assert_eq!(payloads, [br#"{"n":1}"#.to_vec(), br#"{"n":2}"#.to_vec()]);
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 0);
}

#[tokio::test]
async fn bulk_requeue_reports_progress_and_interrupt_loses_nothing() {
    let (server, js) = bulk_dead_letters().await;
    let url = server.url();

    // Interrupt a bulk requeue as soon as it has started: every task is either still dead or
    // back, once.
    let child = requeue_all_bulk(&url);
    let pid = child.id().unwrap();
    eventually("the requeue to start", || async { stored(&js, "natasks.bulk").await >= 1 }).await;
    let kill =
        std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    assert!(kill.success());
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let back = stored(&js, "natasks.bulk").await;
    let dead = stored(&js, "natasks.bulk-dlq").await;
    assert!(
        back > 0 && dead > 0,
        "the interrupt must land mid-way: {back} back, {dead} dead\n{stdout}\n{stderr}"
    );
    // Stopped early: says so, with the count, and exits 1.
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("interrupted after requeueing {back};")), "{stderr}");
    assert_eq!(stdout.trim(), format!("requeued {back} dead letter(s) from bulk-dlq"));
    // None lost, none doubled: each task is on exactly one side.
    let payloads = |subject: &'static str| {
        let js = js.clone();
        async move {
            messages_on(&js, subject)
                .await
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .collect::<Vec<_>>()
        }
    };
    let mut everywhere = payloads("natasks.bulk").await;
    everywhere.extend(payloads("natasks.bulk-dlq").await);
    everywhere.sort();
    let mut all: Vec<String> = (0..N).map(|i| format!(r#"{{"i":{i}}}"#)).collect();
    all.sort();
    assert_eq!(everywhere, all, "a task was lost or doubled: {back} back, {dead} dead");

    // The re-run finishes the job, with progress lines on (non-terminal) stderr.
    let run = natasks(&url, &["dlq", "requeue", "bulk", "--all"]).await.ok();
    assert_eq!(run.stdout.trim(), format!("requeued {dead} dead letter(s) from bulk-dlq"));
    assert_eq!(
        run.stderr.lines().last(),
        Some(format!("requeued {dead}/{dead}").as_str()),
        "{run:?}"
    );
    assert_eq!(stored(&js, "natasks.bulk").await, N);
    assert_eq!(stored(&js, "natasks.bulk-dlq").await, 0);
    let mut back = payloads("natasks.bulk").await;
    back.sort();
    assert_eq!(back, all, "a task was doubled or lost");
}

/// Dead letters in the interrupt tests: enough that a requeue is far from done when the
/// interrupt lands.
const N: u64 = 300;

/// A server whose queue `bulk` has [`N`] dead letters, payloads `{"i":0}`, `{"i":1}`, ...
async fn bulk_dead_letters() -> (NatsServer, async_nats::jetstream::Context) {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    natasks_stream(&js).await;
    for i in 0..N {
        dead_letter(&js, "bulk", "bulk.job", &format!(r#"{{"i":{i}}}"#)).await;
    }
    (server, js)
}

/// `natasks dlq requeue bulk --all` against `url`, its output piped.
fn requeue_all_bulk(url: &str) -> tokio::process::Child {
    common::spawn(url, &["dlq", "requeue", "bulk", "--all"])
}

/// Sends `signal` (`-INT`, `-STOP`, ...) to process `pid`.
fn send(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
    assert!(status.unwrap().success(), "kill {signal} {pid}");
}

#[tokio::test]
async fn a_second_interrupt_stops_a_stuck_bulk_requeue_at_once_and_loses_nothing() {
    let (server, js) = bulk_dead_letters().await;
    let url = server.url();
    let mut child = requeue_all_bulk(&url);
    let pid = child.id().unwrap();
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut stderr = tokio::io::BufReader::new(stderr).lines();
        let mut all = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            let _ = lines_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    eventually("the requeue to start", || async { stored(&js, "natasks.bulk").await >= 1 }).await;

    // The server stops answering: the task in hand cannot finish, so the first Ctrl-C alone
    // would wait for it.
    let server_pid = server.pid().expect("server runs");
    send("-STOP", server_pid);
    send("-INT", pid);
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.recv().await {
            if line.contains("Ctrl-C again to stop now") {
                return;
            }
        }
        panic!("natasks ended without offering a second Ctrl-C");
    })
    .await
    .expect("the first Ctrl-C is acknowledged within the deadline");
    let second = Instant::now();
    send("-INT", pid);
    let status = tokio::time::timeout(Duration::from_secs(3), child.wait()).await;
    send("-CONT", server_pid);
    let status = status.expect("the second Ctrl-C stops natasks at once").unwrap();
    let stderr = tokio::time::timeout(DEADLINE, reader).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.trim_end().ends_with("stopped; run the command again to continue"), "{stderr}");
    assert!(second.elapsed() < Duration::from_secs(3));

    // Nothing lost, nothing stored twice on one side; only the task in hand (its copy stored,
    // its dead letter not yet deleted) may be on both, and a rerun settles it.
    let payloads = |subject: &'static str| {
        let js = js.clone();
        async move {
            let mut payloads: Vec<String> = messages_on(&js, subject)
                .await
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .collect();
            payloads.sort();
            payloads
        }
    };
    let all: Vec<String> = {
        let mut all: Vec<String> = (0..N).map(|i| format!(r#"{{"i":{i}}}"#)).collect();
        all.sort();
        all
    };
    let back = payloads("natasks.bulk").await;
    let dead = payloads("natasks.bulk-dlq").await;
    let mut everywhere = back.clone();
    everywhere.extend(dead.iter().cloned());
    everywhere.sort();
    everywhere.dedup();
    assert_eq!(everywhere, all, "a task was lost");
    let mut unique = back.clone();
    unique.dedup();
    assert_eq!(unique, back, "the queue holds a task twice");
    let on_both = back.iter().filter(|p| dead.binary_search(p).is_ok()).count();
    assert!(on_both <= 1, "{on_both} tasks on both sides");
    assert!(!back.is_empty() && !dead.is_empty(), "stopped mid-way: {back:?} {dead:?}");

    let run = natasks(&url, &["dlq", "requeue", "bulk", "--all"]).await.ok();
    assert!(run.stdout.starts_with("requeued "), "{run:?}");
    assert_eq!(payloads("natasks.bulk").await, all, "a task was doubled or lost");
    assert_eq!(stored(&js, "natasks.bulk-dlq").await, 0);
}

#[tokio::test]
async fn dlq_purge_empties_the_dead_letter_queue_only() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    natasks_stream(&js).await;
    for i in 0..3 {
        dead_letter(&js, "emails", "emails.send", &format!("{i}")).await;
    }
    natasks(&url, &["dispatch", "emails", "emails.send"]).await.ok();

    let list = natasks(&url, &["dlq", "list", "emails", "--limit", "2"]).await.ok().stdout;
    assert_eq!(list.lines().count(), 4, "header, 2 rows and the rest: {list}");
    assert!(list.trim_end().ends_with("... 1 more (see --limit)"), "{list}");

    let run = natasks(&url, &["dlq", "purge", "emails"]).await.ok();
    assert_eq!(run.stdout.trim(), "purged 3 dead letter(s) from emails-dlq");
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 0);
    assert_eq!(stored(&js, "natasks.emails").await, 1, "the queue itself is untouched");
    let list = natasks(&url, &["dlq", "list", "emails", "--json"]).await.ok().json();
    assert_eq!(list, serde_json::json!([]));
}

#[tokio::test]
async fn dlq_list_counts_the_rest_without_reading_delayed_tasks() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    natasks_stream(&js).await;
    for i in 0..3 {
        dead_letter(&js, "emails", "emails.send", &format!("{i}")).await;
    }
    let client = natasks::Client::new(js.clone()).await.unwrap();
    for i in 0..5 {
        let task = Task::new("emails.remind", format!("{i}"));
        client.dispatch_in(task, "emails", Duration::from_secs(3600)).await.unwrap();
    }
    let mut requests = natasks_test_support::api::ApiRequests::watch(&url).await;
    let list = natasks(&url, &["dlq", "list", "emails", "--limit", "2"]).await.ok().stdout;
    assert!(list.trim_end().ends_with("... 1 more (see --limit)"), "{list}");
    let requests = requests.take().await;
    let schedule_reads: Vec<_> =
        requests.iter().filter(|r| r.body.contains("__natasks_schedule")).collect();
    assert!(schedule_reads.is_empty(), "a dead-letter count reads no schedule: {schedule_reads:?}");
}

#[tokio::test]
async fn errors_exit_1_with_one_line() {
    // Unreachable server: a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead_url = format!("nats://127.0.0.1:{port}");
    let run = natasks(&dead_url, &["queues"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.starts_with(&format!("error: cannot connect to {dead_url}: ")), "{run:?}");
    assert!(run.stdout.is_empty());

    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;

    // No stream yet.
    let run = natasks(&url, &["dlq", "list", "emails"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("stream \"NATASKS\" not found"), "{run:?}");

    // Bad payload: refused before anything is sent.
    let run =
        natasks(&url, &["dispatch", "emails", "emails.send", "--payload", "{to: nobody}"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.starts_with("error: invalid --payload: not valid JSON"), "{run:?}");
    assert!(js.get_stream("NATASKS").await.is_err(), "nothing was created or sent");
    let run = natasks(
        &url,
        &["dispatch", "emails", "emails.send", "--payload", "{}", "--payload-file", "x"],
    )
    .await;
    assert_eq!(run.code, 2, "--payload and --payload-file conflict: {run:?}");

    let dir = tempfile::tempdir().unwrap();
    let bad_file = dir.path().join("bad.json");
    std::fs::write(&bad_file, "not json").unwrap();
    let bad_file = bad_file.to_str().unwrap();
    let run =
        natasks(&url, &["dispatch", "emails", "emails.send", "--payload-file", bad_file]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("invalid --payload-file"), "{run:?}");
    let good_file = dir.path().join("good.json");
    std::fs::write(&good_file, r#"{"to":"file@example.com"}"#).unwrap();
    let good_file = good_file.to_str().unwrap();
    natasks(&url, &["dispatch", "files", "emails.send", "--payload-file", good_file]).await.ok();
    let from_file = &messages_on(&js, "natasks.files").await[0];
    assert_eq!(from_file.payload.as_ref(), br#"{"to":"file@example.com"}"#);

    // The library's validation, reported on one line.
    let run = natasks(&url, &["dispatch", "emails", "bad task"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("task name \"bad task\""), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    let run = natasks(&url, &["dispatch", "emails", "emails.send", "--in", "5 minutes"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("invalid duration"), "{run:?}");

    // Unknown queue for dlq commands.
    natasks(&url, &["dispatch", "emails", "emails.send"]).await.ok();
    for args in [
        &["dlq", "list", "nosuch"][..],
        &["dlq", "requeue", "nosuch", "--all"],
        &["dlq", "purge", "nosuch"],
    ] {
        let run = natasks(&url, args).await;
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(run.stderr.contains("unknown queue \"nosuch\""), "{args:?}: {run:?}");
    }
    let run = natasks(&url, &["dlq", "show", "emails", "1"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no dead letter 1 on queue emails-dlq"), "{run:?}");

    // Usage errors are clap's: exit 2.
    let run = natasks(&url, &["dlq", "requeue", "emails"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = natasks(&url, &["frobnicate"]).await;
    assert_eq!(run.code, 2, "{run:?}");
}

#[tokio::test]
async fn credentials_flags_reach_the_server() {
    let server = NatsServer::builder()
        .config_file("authorization { user: ops, password: s3cret }\n")
        .start()
        .await;
    let url = server.url();

    let run = natasks(&url, &["queues"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.starts_with(&format!("error: cannot connect to {url}: ")), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains("authorization violation"), "{run:?}");
    let run = natasks(&url, &["--user", "ops", "--password", "wrong", "queues"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("authorization violation"), "refused for another reason: {run:?}");

    let auth = ["--user", "ops", "--password", "s3cret"];
    let dispatch = [&auth[..], &["dispatch", "emails", "emails.send", "--json"]].concat();
    let run = natasks(&url, &dispatch).await.ok();
    assert_eq!(run.json()["queue"], "emails");
    let queues = natasks(&url, &[&auth[..], &["queues", "--json"]].concat()).await.ok().json();
    assert_eq!(queues[0]["queue"], "emails");
    assert_eq!(queues[0]["pending"], 1);

    let token_server =
        NatsServer::builder().config_file("authorization { token: t0ken }\n").start().await;
    let url = token_server.url();
    natasks(&url, &["--token", "t0ken", "dispatch", "emails", "emails.send"]).await.ok();
    let run = natasks(&url, &["--token", "nope", "queues"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("authorization violation"), "refused for another reason: {run:?}");
}
