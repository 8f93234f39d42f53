//! Debounce (the last of a burst runs once the key is quiet) and throttle (one per window).

mod common;

use std::time::Duration;

use common::*;
use natasks::{Client, DispatchErrorKind, Status, Task, TaskState, Worker};

#[tokio::test]
async fn ten_rapid_debounced_dispatches_run_once_with_the_last_payload() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "search")
        .handle("index.rebuild", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let quiet = Duration::from_secs(1);
    let mut last = None;
    for i in 0..10 {
        let task = Task::new("index.rebuild", format!("edit {i}")).debounce("doc@example.com");
        last = Some(client.dispatch_in(task, "search", quiet).await.unwrap());
    }
    // Another key is debounced on its own.
    client
        .dispatch_in(Task::new("index.rebuild", "other").debounce("doc-2"), "search", quiet)
        .await
        .unwrap();
    let mut payloads: Vec<String> = seen
        .take(2, DEADLINE)
        .await
        .iter()
        .map(|t| String::from_utf8(t.payload().to_vec()).unwrap())
        .collect();
    payloads.sort();
    assert_eq!(payloads, ["edit 9", "other"]);
    // The replaced schedules are gone: nothing else is pending, in the stream or on its
    // way (a replaced schedule would fire within the quiet period).
    assert!(seen.recv_within(2 * quiet).await.is_none(), "a replaced schedule fired");
    assert_eq!(stream_messages(&js).await, 0);
    assert!(last.unwrap().sequence.is_some());
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_debounced_schedule_lives_on_one_subject_per_queue_and_key() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let hour = Duration::from_secs(3600);
    for i in 0..3 {
        let task = Task::new("t", i.to_string()).debounce("a b");
        client.dispatch_in(task, "q", hour).await.unwrap();
    }
    let subject = "natasks.__natasks_schedule.debounce.q.a%20b";
    assert_eq!(stored(&js, subject).await, 1);
    assert_eq!(first_on(&js, subject).await.payload.as_ref(), b"2");
}

#[tokio::test]
async fn throttle_refuses_within_the_window_then_accepts() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let window = Duration::from_secs(2);
    let throttled = |i: u32| Task::new("sms.send", i.to_string()).throttle("+15550100", window);

    let first = client.dispatch(throttled(1), "sms").await.unwrap();
    let err = client.dispatch(throttled(2), "sms").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Throttled);
    assert_eq!(err.existing_id(), Some(first.id.as_str()));
    let ends = err.retry_at().expect("a throttled dispatch says when the window ends");
    let now = time::OffsetDateTime::now_utc();
    assert!(ends > now && ends <= now + window, "{ends} {now}");
    assert_eq!(stored(&js, "natasks.sms").await, 1);

    // The throttle does not wait for the task to run: the window alone counts.
    eventually(DEADLINE, "the window ends", || async {
        client.dispatch(throttled(3), "sms").await.is_ok()
    })
    .await;
    assert!(time::OffsetDateTime::now_utc() >= ends - Duration::from_millis(1100));
    assert_eq!(stored(&js, "natasks.sms").await, 2);
}

#[tokio::test]
async fn throttle_can_coalesce_into_the_accepted_task() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let window = Duration::from_secs(60);
    let first = client
        .dispatch(Task::new("digest", "1").throttle("user-1", window).return_existing(), "mail")
        .await
        .unwrap();
    assert!(!first.duplicate);
    for i in 2..5 {
        let task = Task::new("digest", i.to_string()).throttle("user-1", window).return_existing();
        let receipt = client.dispatch(task, "mail").await.unwrap();
        assert_eq!((receipt.id.as_str(), receipt.duplicate), (first.id.as_str(), true));
    }
    assert_eq!(stored(&js, "natasks.mail").await, 1);
    assert_eq!(first_on(&js, "natasks.mail").await.payload.as_ref(), b"1");
}

#[tokio::test]
async fn cancelling_a_replaced_debounced_task_keeps_the_one_that_replaced_it() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let delay = Duration::from_secs(2);
    let first = client
        .dispatch_in(Task::new("index.rebuild", "a").debounce("k").tracked(), "search", delay)
        .await
        .unwrap();
    let second = client
        .dispatch_in(Task::new("index.rebuild", "b").debounce("k").tracked(), "search", delay)
        .await
        .unwrap();
    // The first task was already replaced: cancelling it must not remove the second.
    client.cancel(&first.id).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "search")
        .handle("index.rebuild", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let ran = seen.recv().await;
    assert_eq!(ran.payload().as_ref(), b"b");
    assert!(seen.recv_within(delay).await.is_none(), "the debounced task ran twice");
    eventually(DEADLINE, "the second task to succeed", || async {
        matches!(
            client.status(&second.id).await.unwrap(),
            Status::Known(s) if s.state == TaskState::Succeeded
        )
    })
    .await;
    let Status::Known(status) = client.status(&first.id).await.unwrap() else {
        panic!("the first task has a record");
    };
    assert!(!matches!(status.state, TaskState::Scheduled { .. }), "{status:?}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_replaced_debounced_task_is_not_reported_scheduled() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let hour = Duration::from_secs(3600);
    let first =
        client.dispatch_in(Task::new("t", "a").debounce("k").tracked(), "q", hour).await.unwrap();
    let second =
        client.dispatch_in(Task::new("t", "b").debounce("k").tracked(), "q", hour).await.unwrap();
    let state = |id: String| {
        let client = client.clone();
        async move {
            match client.status(&id).await.unwrap() {
                Status::Known(s) => s.state,
                other => panic!("{id}: {other:?}"),
            }
        }
    };
    assert!(matches!(state(second.id.clone()).await, TaskState::Scheduled { .. }));
    let replaced = state(first.id.clone()).await;
    assert!(!matches!(replaced, TaskState::Scheduled { .. }), "{replaced:?}");
}

#[tokio::test]
async fn a_debounced_task_with_a_message_id_is_refused() {
    // The server would drop every later schedule with the same message id as a duplicate
    // within its duplicate window: the first dispatch would run, not the last.
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let task = Task::new("t", "a").debounce("k").with_message_id("m");
    let err = client.dispatch_in(task, "q", Duration::from_secs(60)).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::InvalidTask, "{err}");
    assert!(err.to_string().contains("message id"), "{err}");
    assert_eq!(stream_messages(&js).await, 0);
}
