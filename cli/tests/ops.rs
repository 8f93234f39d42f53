//! `natasks search`, `natasks tasks`, the bulk forms of `dlq requeue|delete`, and the help
//! layout, run as the built binary against a real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use natasks::{Client, Task};
use natasks_test_support::NatsServer;
use serde_json::json;

mod common;
use common::natasks;

/// Stores `n` dead letters of `queue`, many publishes in flight: payload `{"i":<i>}`, last
/// error `timeout #<i % 10>`, header `X-Tenant: t<i % 4>`.
async fn dead_letters(js: &jetstream::Context, queue: &str, n: u64) {
    let mut acks = Vec::new();
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Natasks-Task", "emails.send");
        headers.insert("Natasks-Queue", format!("{queue}-dlq").as_str());
        headers.insert("Natasks-Original-Queue", queue);
        headers.insert("Natasks-Last-Error", format!("timeout #{}", i % 10).as_str());
        headers.insert("X-Tenant", format!("t{}", i % 4).as_str());
        let payload = json!({"i": i}).to_string();
        let subject = format!("natasks.{queue}-dlq");
        acks.push(js.publish_with_headers(subject, headers, payload.into()).await.unwrap());
        if acks.len() == 512 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

async fn stored(js: &jetstream::Context, subject: &str) -> u64 {
    let admin = natasks::admin::Admin::new(js.clone());
    let queue = subject.trim_start_matches("natasks.");
    let (base, dead) = match queue.strip_suffix("-dlq") {
        Some(base) => (base, true),
        None => (queue, false),
    };
    let info = admin.queue(base).await.unwrap();
    if dead {
        info.dead_letters
    } else {
        info.stored
    }
}

#[tokio::test]
async fn search_finds_tasks_by_filter_flags_and_shows_progress_when_large() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    dead_letters(&js, "emails", 12_000).await;
    let task = Task::json("reports.build", &json!({"user": {"id": 42}})).unwrap();
    client.dispatch(task.with_header("X-Tenant", "vip"), "reports").await.unwrap();
    let later = Task::json("reports.build", &json!({"kind": "weekly"})).unwrap();
    client.dispatch_in(later, "reports", Duration::from_secs(3600)).await.unwrap();

    let run = natasks(&url, &["search", "--field", "user.id=42", "--json"]).await.ok();
    let found = run.json();
    assert_eq!(found["tasks"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found["tasks"][0]["state"], "pending");
    assert_eq!(found["tasks"][0]["queue"], "reports");
    assert_eq!(found["scanned"], 12_002);
    assert_eq!(found["truncated"], false);
    // Over 10,000 messages to read: progress on stderr, ending at the total.
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("searched 12002/12002, 1 found"), "{run:?}");

    let table = natasks(&url, &["search", "--contains", "weekly"]).await.ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SEQ") && lines[1].contains("scheduled"), "{table}");
    assert_eq!(lines.last().unwrap().trim(), "1 found, 12002 message(s) read", "{table}");

    let args = ["search", "--queue", "emails", "--state", "dead", "--error", "TIMEOUT #7"];
    let run = natasks(
        &url,
        &[&args[..], &["--header", "X-Tenant=t3", "--limit", "1000", "--json"]].concat(),
    )
    .await;
    // i % 10 == 7 and i % 4 == 3: i = 7, 27, 47, ... one in 20.
    assert_eq!(run.ok().json()["tasks"].as_array().unwrap().len(), 600);

    let bounded =
        natasks(&url, &["search", "--name", "emails.*", "--limit", "5", "--max-scan", "100"]).await;
    let out = bounded.ok().stdout;
    assert!(out.contains("5 found"), "{out}");
    assert!(out.trim_end().ends_with("more may match (see --limit, --max-scan)"), "{out}");
    let none = natasks(&url, &["search", "--name", "nosuch", "--max-scan", "10"]).await.ok();
    assert!(none.stdout.starts_with("no matching tasks (10 message(s) read)"), "{none:?}");

    // Bad input: a clear error before anything is read.
    natasks(&url, &["search", "--field", "user..id=1"]).await.failed("JSON path \"user..id\"");
    natasks(&url, &["search", "--header", "novalue"]).await.failed("invalid --header");
    natasks(&url, &["search", "--limit", "0"]).await.failed("limit 0");
    natasks(&url, &["search", "--queue", "nosuch"]).await.failed("unknown queue \"nosuch\"");
    let run = natasks(&url, &["search", "--state", "frozen"]).await;
    assert_eq!(run.code, 2, "a usage error: {run:?}");
}

#[tokio::test]
async fn dead_letters_are_requeued_and_deleted_by_filter() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    Client::new(js.clone()).await.unwrap();
    dead_letters(&js, "emails", 40).await;

    let run = natasks(&url, &["dlq", "requeue", "emails", "--header", "X-Tenant=t1"]).await.ok();
    assert_eq!(run.stdout.trim(), "requeued 10 dead letter(s) from emails-dlq");
    assert_eq!(stored(&js, "natasks.emails").await, 10);
    let run = natasks(&url, &["dlq", "delete", "emails", "--error", "timeout #0", "--json"]).await;
    let outcome = run.ok().json();
    assert_eq!(outcome["deleted"], 4, "{outcome}");
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 26);
    let first = natasks(&url, &["dlq", "list", "emails", "--limit", "1", "--json"]).await.ok();
    let seq = first.json()[0]["seq"].as_u64().unwrap().to_string();
    let run = natasks(&url, &["dlq", "delete", "emails", &seq]).await.ok();
    assert_eq!(run.stdout.trim(), "deleted 1 dead letter(s) from emails-dlq");
    natasks(&url, &["dlq", "delete", "emails", &seq])
        .await
        .failed(&format!("no dead letter {seq}"));
    let run = natasks(&url, &["dlq", "requeue", "emails", "--all"]).await.ok();
    assert_eq!(run.stdout.trim(), "requeued 25 dead letter(s) from emails-dlq");
    assert_eq!(stored(&js, "natasks.emails").await, 35);

    // Sequences and filters do not mix; nothing selected is a usage error.
    let run = natasks(&url, &["dlq", "requeue", "emails", "1", "--name", "x"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = natasks(&url, &["dlq", "delete", "emails"]).await;
    assert_eq!(run.code, 2, "{run:?}");
}

#[tokio::test]
async fn tasks_are_listed_by_state_shown_and_deleted() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for i in 0..3 {
        client
            .dispatch(Task::json("reports.build", &json!({"n": i})).unwrap(), "reports")
            .await
            .unwrap();
    }
    let later = Task::json("reports.build", &json!({"n": "later"})).unwrap();
    client.dispatch_in(later, "reports", Duration::from_secs(3600)).await.unwrap();

    let page =
        natasks(&url, &["tasks", "list", "reports", "--limit", "2", "--json"]).await.ok().json();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    let next = page["next"].as_u64().expect("a next page").to_string();
    let rest = natasks(&url, &["tasks", "list", "reports", "--after", &next, "--json"]).await;
    let rest = rest.ok().json();
    assert_eq!(rest["tasks"].as_array().unwrap().len(), 1);
    assert!(rest["next"].is_null());
    let scheduled =
        natasks(&url, &["tasks", "list", "reports", "--state", "scheduled"]).await.ok().stdout;
    assert!(scheduled.lines().nth(1).unwrap().contains("scheduled"), "{scheduled}");

    let seq = page["tasks"][0]["seq"].as_u64().unwrap().to_string();
    let shown = natasks(&url, &["tasks", "show", &seq]).await.ok().stdout;
    assert!(shown.contains("State:    pending") && shown.contains("\"n\": 0"), "{shown}");

    let run =
        natasks(&url, &["tasks", "delete", "reports", "--state", "pending", "--field", "n=1"]);
    assert_eq!(run.await.ok().stdout.trim(), "deleted 1 pending task(s) from queue reports");
    let run = natasks(&url, &["tasks", "delete", "reports", "--state", "scheduled", "--all"]);
    assert_eq!(run.await.ok().stdout.trim(), "deleted 1 scheduled task(s) from queue reports");
    let left = natasks(&url, &["schedules", "list", "--json"]).await.ok().json();
    assert_eq!(left, json!([]));
    assert_eq!(stored(&js, "natasks.reports").await, 2);
    natasks(&url, &["tasks", "show", "999"]).await.failed("no task 999");
}

#[tokio::test]
async fn help_shows_connection_flags_under_their_own_heading() {
    for args in [&["--help"][..], &["dlq", "requeue", "--help"], &["search", "--help"]] {
        let run = natasks("nats://127.0.0.1:1", args).await.ok();
        let help = run.stdout;
        let connection = help.find("\nConnection:\n").unwrap_or_else(|| panic!("{args:?}: {help}"));
        let (before, after) = help.split_at(connection);
        for flag in ["--server", "--creds", "--tlscert", "--stream", "--subject-prefix"] {
            assert!(after.contains(flag), "{args:?}: {flag} not under Connection: {help}");
            assert!(!before.contains(flag), "{args:?}: {flag} mixed into options: {help}");
        }
        assert!(help.contains("\nOutput:\n      --json"), "{args:?}: {help}");
    }
    let help = natasks("nats://127.0.0.1:1", &["search", "--help"]).await.ok().stdout;
    let filter = help.find("\nFilter:\n").expect("filter flags have a heading");
    assert!(help[filter..].contains("--field <PATH=VALUE>"), "{help}");
}
