//! `natasks schedules` with periodic schedules: the built binary against a real nats-server.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use natasks_test_support::NatsServer;

mod common;
use common::{natasks, DEADLINE};

/// Messages stored in the natasks stream.
async fn stream_messages(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("NATASKS").await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn periodic_schedules_are_added_listed_and_removed() {
    let server = NatsServer::start().await;
    let url = server.url();

    let nightly = [
        "schedules",
        "add",
        "nightly",
        "reports",
        "reports.nightly",
        "--cron",
        "0 30 2 * * *",
        "--time-zone",
        "Europe/Berlin",
        "--payload",
        r#"{"kind":"full"}"#,
    ];
    let run = natasks(&url, &nightly).await.ok();
    assert_eq!(
        run.stdout.trim(),
        "created periodic schedule nightly: reports.nightly to queue reports, 0 30 2 * * * (Europe/Berlin)"
    );
    let run = natasks(&url, &nightly).await.ok();
    assert!(run.stdout.starts_with("unchanged periodic schedule nightly"), "{run:?}");
    let pulse = ["schedules", "add", "pulse", "ops", "ops.ping", "--every", "1h", "--json"];
    let added = natasks(&url, &pulse).await.ok().json();
    assert_eq!(added["outcome"], "created");
    assert_eq!(added["schedule"], "@every 1h");
    natasks(&url, &["dispatch", "emails", "emails.send", "--in", "1h"]).await.ok();

    // `schedules` alone lists: delayed tasks first, then periodic schedules by id.
    let list = natasks(&url, &["schedules", "--json"]).await.ok().json();
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(list[0]["kind"], "delayed");
    assert_eq!(list[0]["queue"], "emails");
    let (first, second) = (&list[1], &list[2]);
    assert_eq!(first["kind"], "periodic");
    assert_eq!(first["id"], "nightly");
    assert_eq!(first["schedule"], "0 30 2 * * *");
    assert_eq!(first["time_zone"], "Europe/Berlin");
    assert_eq!(first["queue"], "reports");
    assert_eq!(first["task"], "reports.nightly");
    assert!(first["next"].is_null(), "no zone rules in natasks: {first}");
    assert_eq!(second["id"], "pulse");
    assert!(second["time_zone"].is_null());
    let next = time::OffsetDateTime::parse(
        second["next"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let in_ = next - time::OffsetDateTime::now_utc();
    assert!(in_ > time::Duration::minutes(58) && in_ <= time::Duration::seconds(3601), "{in_}");

    let table = natasks(&url, &["schedules", "list"]).await.ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("EVERY"), "{table}");
    assert!(lines[2].starts_with("nightly") && lines[2].contains("(Europe/Berlin)"), "{table}");
    assert!(lines[3].starts_with("pulse") && lines[3].contains("@every 1h"), "{table}");
    let reports = natasks(&url, &["schedules", "list", "--queue", "reports", "--json"]).await;
    assert_eq!(reports.ok().json().as_array().unwrap().len(), 1);

    let run = natasks(&url, &["schedules", "remove", "nightly"]).await.ok();
    assert_eq!(run.stdout.trim(), "removed periodic schedule nightly");
    natasks(&url, &["schedules", "remove", "nightly"])
        .await
        .failed("no periodic schedule \"nightly\"");
    let removed = natasks(&url, &["schedules", "remove", "pulse", "--json"]).await.ok().json();
    assert_eq!(removed, serde_json::json!({ "id": "pulse", "removed": true }));
    let list = natasks(&url, &["schedules", "--json"]).await.ok().json();
    assert_eq!(list.as_array().unwrap().len(), 1, "only the delayed task is left: {list}");
}

#[tokio::test]
async fn bad_schedules_are_refused_and_nothing_is_stored() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    natasks(&url, &["dispatch", "q", "t"]).await.ok();
    let add = |extra: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut args = vec!["schedules", "add"];
            args.extend_from_slice(extra);
            natasks(&url, &args).await
        }
    };
    add(&["s", "q", "t", "--cron", "0 61 * * * *"]).await.failed("minute field `61`");
    add(&["s", "q", "t", "--cron", "* * *"]).await.failed("has 3 fields");
    add(&["s", "q", "t", "--every", "500ms"]).await.failed("invalid interval 500ms");
    add(&["s", "q", "t", "--cron", "@daily", "--time-zone", "Mars/Base"])
        .await
        .failed("invalid time zone \"Mars/Base\"");
    add(&["a.b", "q", "t", "--every", "1m"]).await.failed("schedule id \"a.b\"");
    add(&["s", "a.b", "t", "--every", "1m"]).await.failed("queue name \"a.b\"");
    add(&["s", "q", "t", "--every", "1m", "--payload", "{not json"]).await.failed("not valid JSON");
    let both = add(&["s", "q", "t", "--every", "1m", "--cron", "@daily"]).await;
    assert_ne!(both.code, 0, "{both:?}");
    let neither = add(&["s", "q", "t"]).await;
    assert_ne!(neither.code, 0, "{neither:?}");
    assert_eq!(stream_messages(&js).await, 1, "only the dispatched task is stored");
}

#[tokio::test]
async fn a_schedule_added_by_the_cli_fires_ordinary_tasks() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let args = ["schedules", "add", "pulse", "q", "ping", "--every", "1s", "-H", "X-From=cli"];
    natasks(&url, &args).await.ok();
    let stream = js.get_stream("NATASKS").await.unwrap();
    let start = Instant::now();
    let message = loop {
        if let Ok(message) = stream.get_first_raw_message_by_subject("natasks.q", 1).await {
            break message;
        }
        assert!(start.elapsed() < DEADLINE, "no tick within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(header("Natasks-Task").as_deref(), Some("ping"));
    assert_eq!(header("Natasks-Queue").as_deref(), Some("q"));
    assert_eq!(header("X-From").as_deref(), Some("cli"));
    assert_eq!(header("Natasks-Periodic").as_deref(), Some("pulse"));
}

#[tokio::test]
async fn listing_and_removing_leave_the_stream_config_alone() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;

    // No stream: nothing to list or remove, and none is created.
    natasks(&url, &["schedules"]).await.failed("stream \"NATASKS\" not found");
    natasks(&url, &["schedules", "remove", "x"]).await.failed("stream \"NATASKS\" not found");
    assert!(js.get_stream("NATASKS").await.is_err(), "a stream was created");

    // A stream as the Go library (or an operator) makes it: the queue subjects only, no
    // schedule subject, no schedules flag (which, once on, cannot be turned off).
    js.create_stream(jetstream::stream::Config {
        name: "NATASKS".into(),
        subjects: vec!["natasks.*".into()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    let config =
        || async { js.get_stream("NATASKS").await.unwrap().info().await.unwrap().config.clone() };
    let before = config().await;
    assert!(!before.allow_message_schedules);

    let run = natasks(&url, &["schedules"]).await.ok();
    assert_eq!(run.stdout.trim(), "no periodic schedules and no pending delayed tasks");
    let list = natasks(&url, &["schedules", "list", "--json"]).await.ok().json();
    assert_eq!(list, serde_json::json!([]));
    natasks(&url, &["schedules", "remove", "x"]).await.failed("no periodic schedule \"x\"");

    let after = config().await;
    assert_eq!(after.subjects, ["natasks.*"], "a subject was added");
    assert!(!after.allow_message_schedules, "message schedules were turned on");
    let json = |config| serde_json::to_value(config).unwrap();
    assert_eq!(json(&after), json(&before), "the stream config changed");
}
