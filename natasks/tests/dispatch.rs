//! Dispatching: what lands in the stream, deduplication, stream set-up and bad input.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream;
use common::*;
use natasks::{Client, DispatchErrorKind, SetupErrorKind, Task, Worker};

#[tokio::test]
async fn dispatch_and_process_with_payload_and_headers() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js, "emails")
        .handle("emails.send", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let task =
        Task::new("emails.send", r#"{"to":"a@example.com"}"#).with_header("X-Request-Id", "req-42");
    client.dispatch(task, "emails").await.unwrap();

    let got = seen.recv().await;
    assert_eq!(got.name(), "emails.send");
    assert_eq!(got.payload().as_ref(), br#"{"to":"a@example.com"}"#);
    assert_eq!(got.header("X-Request-Id"), Some("req-42"));
    assert_eq!(got.header("Natasks-Queue"), Some("emails"));
    let delivery = got.delivery().expect("received tasks carry delivery details");
    assert_eq!((&*delivery.queue, delivery.attempt), ("emails", 1));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn dispatch_writes_the_go_wire_format() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let task = Task::new("reports.render", "body")
        .with_header("X-Tenant", "t1")
        .with_message_id("report-1");
    client.dispatch(task, "reports").await.unwrap();

    let raw = first_on(&js, "natasks.reports").await;
    assert_eq!(raw.payload.as_ref(), b"body");
    let h = &raw.headers;
    assert_eq!(h.get("Natasks-Task").map(|v| v.as_str()), Some("reports.render"));
    assert_eq!(h.get("Natasks-Queue").map(|v| v.as_str()), Some("reports"));
    assert_eq!(h.get("Nats-Msg-Id").map(|v| v.as_str()), Some("report-1"));
    assert_eq!(h.get("X-Tenant").map(|v| v.as_str()), Some("t1"));
}

#[tokio::test]
async fn empty_queue_name_means_default() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    client.dispatch(Task::new("t", ""), "").await.unwrap();
    assert_eq!(stored(&js, "natasks.default").await, 1);
}

#[tokio::test]
async fn same_message_id_is_stored_once() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for _ in 0..3 {
        client.dispatch(Task::new("t", "x").with_message_id("only-once"), "q").await.unwrap();
    }
    client.dispatch(Task::new("t", "x").with_message_id("another"), "q").await.unwrap();
    assert_eq!(stored(&js, "natasks.q").await, 2);
}

#[tokio::test]
async fn client_creates_the_expected_stream() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    Client::builder(js.clone()).duplicate_window(Duration::from_secs(30)).build().await.unwrap();
    let mut s = js.get_stream("NATASKS").await.unwrap();
    let config = &s.info().await.unwrap().config;
    assert_eq!(
        config.subjects,
        vec![
            "natasks.*".to_owned(),
            "natasks.__natasks_schedule.>".to_owned(),
            "natasks.__natasks_mark.>".to_owned()
        ]
    );
    assert_eq!(config.retention, stream::RetentionPolicy::WorkQueue);
    assert_eq!(config.storage, stream::StorageType::File);
    assert_eq!(config.discard, stream::DiscardPolicy::Old);
    assert_eq!(config.duplicate_window, Duration::from_secs(30));
    assert!(config.allow_message_schedules);
    assert!(config.allow_atomic_publish);
    assert!(config.allow_message_ttl);
}

#[tokio::test]
async fn client_adopts_a_stream_made_by_the_go_library() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    // What the Go library creates: one subject, schedules on.
    js.create_stream(stream::Config {
        name: "NATASKS".into(),
        subjects: vec!["natasks.*".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        allow_message_schedules: true,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("natasks.q", "already here".into()).await.unwrap().await.unwrap();
    let client = Client::new(js.clone()).await.unwrap();
    client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    let mut s = js.get_stream("NATASKS").await.unwrap();
    let info = s.info().await.unwrap();
    assert!(info.config.subjects.contains(&"natasks.__natasks_schedule.>".to_owned()));
    // Unique tasks, throttles and batches need the markers and atomic batches too.
    assert!(info.config.subjects.contains(&"natasks.__natasks_mark.>".to_owned()));
    assert!(info.config.allow_atomic_publish && info.config.allow_message_ttl);
    assert_eq!(info.state.messages, 2, "the existing message is kept");
}

#[tokio::test]
async fn incompatible_stream_is_refused_with_a_clear_error() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    js.create_stream(stream::Config {
        name: "NATASKS".into(),
        subjects: vec!["other.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let err = Client::new(js).await.err().expect("a stream without natasks.* is refused");
    assert_eq!(err.kind(), SetupErrorKind::IncompatibleStream);
    assert!(err.to_string().contains("natasks.*"), "{err}");
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_published() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let max = js.client().server_info().max_payload;
    let cases: Vec<(Task, &str, DispatchErrorKind, &str)> = vec![
        (Task::new("", "x"), "q", DispatchErrorKind::InvalidTask, "task name \"\" is empty"),
        (Task::new("emails.*", "x"), "q", DispatchErrorKind::InvalidTask, "wildcards"),
        (Task::new("a b", "x"), "q", DispatchErrorKind::InvalidTask, "whitespace"),
        (Task::new("t", "x"), "a.b", DispatchErrorKind::InvalidTask, "queue name \"a.b\""),
        (Task::new("t", "x"), "a*", DispatchErrorKind::InvalidTask, "wildcards"),
        (Task::new("t", "x"), ">", DispatchErrorKind::InvalidTask, "wildcards"),
        (Task::new("t", "x"), "a b", DispatchErrorKind::InvalidTask, "whitespace"),
        (Task::new("t", "x"), "__natasks_schedule", DispatchErrorKind::InvalidTask, "reserved"),
        (
            Task::new("t", "x").with_header("X-Evil", "a\r\nInjected: yes"),
            "q",
            DispatchErrorKind::InvalidTask,
            "CR or LF",
        ),
        (
            Task::new("t", vec![b'x'; max + 1]),
            "q",
            DispatchErrorKind::PayloadTooLarge,
            "max_payload",
        ),
    ];
    for (task, queue, kind, text) in cases {
        let err = client.dispatch(task, queue).await.expect_err("bad input must fail");
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(text), "error {err:?} should mention {text:?}");
    }
    let err =
        client.dispatch_in(Task::new("", "x"), "q", Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::InvalidTask);
    assert_eq!(stream_messages(&js).await, 0, "nothing may be published on bad input");
    client.dispatch(Task::new("t", "fine"), "q").await.expect("valid input still works");
    assert_eq!(stream_messages(&js).await, 1);
}

#[tokio::test]
async fn invalid_client_options_name_the_setting() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let cases = [
        (Client::builder(js.clone()).stream_name("a.b"), "stream_name"),
        (Client::builder(js.clone()).subject_prefix("x.*"), "subject_prefix"),
        (Client::builder(js.clone()).subject_prefix(""), "subject_prefix"),
        (Client::builder(js.clone()).replicas(0), "replicas"),
        (Client::builder(js.clone()).duplicate_window(Duration::ZERO), "duplicate_window"),
    ];
    for (builder, setting) in cases {
        let err = builder.build().await.err().expect("invalid option");
        assert_eq!(err.kind(), SetupErrorKind::InvalidOption);
        assert!(err.to_string().contains(&format!("`{setting}`")), "{err}");
    }
}

#[tokio::test]
async fn custom_stream_and_prefix_are_used() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::builder(js.clone())
        .stream_name("JOBS")
        .subject_prefix("jobs")
        .build()
        .await
        .unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .stream_name("JOBS")
        .subject_prefix("jobs")
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    assert_eq!(worker.consumer_name(), "natasks-q");
    let running = spawn(worker);
    client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    assert_eq!(seen.recv().await.name(), "t");
    let s = js.get_stream("JOBS").await.unwrap();
    assert!(s.cached_info().config.subjects.contains(&"jobs.*".to_owned()));
    running.stop().await.unwrap();
}
