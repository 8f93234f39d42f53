//! Atomic batch dispatch: every task of a batch is stored, or none.

mod common;

use std::time::Duration;

use common::*;
use natasks::{Batch, Client, DispatchErrorKind, Task, Worker};

#[tokio::test]
async fn a_batch_across_queues_with_delayed_tasks_is_stored_and_runs() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();

    let mut batch = Batch::new();
    batch.add(Task::new("orders.charge", "o-1"), "payments");
    batch.add(Task::new("emails.receipt", "o-1").with_message_id("receipt-o-1"), "emails");
    batch.add_in(Task::new("emails.survey", "o-1"), "emails", Duration::from_secs(1));
    batch.add(Task::new("emails.tracked", "o-1").tracked(), "emails");
    let receipts = client.dispatch_batch(batch).await.unwrap();

    assert_eq!(receipts.len(), 4);
    assert_eq!(receipts[1].id, "receipt-o-1");
    let sequences: Vec<u64> = receipts.iter().map(|r| r.sequence.unwrap()).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4], "a batch takes consecutive sequences");
    assert_eq!(stored(&js, "natasks.payments").await, 1);
    // Task subjects stay `<prefix>.<queue>`, so Go workers process batched tasks.
    let charge = first_on(&js, "natasks.payments").await;
    assert_eq!(charge.headers.get("Natasks-Task").map(|v| v.as_str()), Some("orders.charge"));
    assert!(charge.headers.get("Nats-Batch-Id").is_some());

    match client.status(&receipts[3].id).await.unwrap() {
        natasks::Status::Known(status) => assert_eq!(status.state, natasks::TaskState::Pending),
        other => panic!("a batched tracked task is recorded, got {other:?}"),
    }

    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "emails")
        .handle("emails.receipt", reporter(seen.tx.clone()))
        .handle("emails.survey", reporter(seen.tx.clone()))
        .handle("emails.tracked", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let mut names: Vec<String> =
        seen.take(3, DEADLINE).await.iter().map(|t| t.name().to_owned()).collect();
    names.sort();
    assert_eq!(names, ["emails.receipt", "emails.survey", "emails.tracked"]);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_the_server_refuses_stores_nothing() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();

    // A task whose message id is already stored: the server refuses the whole batch at
    // its commit.
    client.dispatch(Task::new("c", "0").with_message_id("same"), "q1").await.unwrap();
    let mut batch = Batch::new();
    batch.add(Task::new("a", "1"), "q1");
    batch.add_in(Task::new("b", "2"), "q2", Duration::from_secs(60));
    batch.add(Task::new("c", "3").with_message_id("same"), "q2");
    let err = client.dispatch_batch(batch).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::AlreadyStored, "{err}");
    assert_eq!(stream_messages(&js).await, 1, "nothing of a refused batch is stored");

    // The stream is usable afterwards.
    let receipts = client.dispatch_batch([(Task::new("a", "1"), "q1")].into_iter().collect()).await;
    assert_eq!(receipts.unwrap().len(), 1);
    assert_eq!(stream_messages(&js).await, 2);
}

#[tokio::test]
async fn bad_batches_are_refused_before_anything_is_published() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();

    let err = client.dispatch_batch(Batch::new()).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::InvalidBatch);
    assert!(err.to_string().contains("empty"), "{err}");

    let oversized: Batch = (0..1001).map(|i| (Task::new("t", i.to_string()), "q")).collect();
    let err = client.dispatch_batch(oversized).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::InvalidBatch);
    assert!(err.to_string().contains("at most 1000"), "{err}");

    let mut invalid = Batch::new();
    invalid.add(Task::new("ok", "1"), "q");
    invalid.add(Task::new("bad name", "2"), "q");
    let err = client.dispatch_batch(invalid).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::InvalidTask);
    assert!(err.to_string().contains("task 1 of the batch"), "{err}");

    let mut too_late = Batch::new();
    too_late.add(Task::new("ok", "1"), "q");
    too_late.add_in(Task::new("late", "2"), "q", Duration::from_secs(400 * 365 * 86_400));
    let err = client.dispatch_batch(too_late).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime);

    assert_eq!(stream_messages(&js).await, 0);

    // The limit itself is fine.
    let full: Batch = (0..1000).map(|i| (Task::new("t", i.to_string()), "q")).collect();
    let receipts = client.dispatch_batch(full).await.unwrap();
    assert_eq!(receipts.len(), 1000);
    assert_eq!(stored(&js, "natasks.q").await, 1000);
}

#[tokio::test]
async fn a_server_without_atomic_batches_gets_an_error_naming_its_version() {
    let binary =
        old_server_binary().expect("nats-server 2.11 is installed by scripts/install-nats-server");
    let server = NatsServer::builder().binary(binary).start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let err = client
        .dispatch_batch([(Task::new("a", "1"), "q")].into_iter().collect())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Unsupported);
    assert!(err.to_string().contains("2.11"), "{err}");
    assert_eq!(stream_messages(&js).await, 0);
}

#[tokio::test]
async fn a_held_unique_key_refuses_the_whole_batch() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let hour = Duration::from_secs(3600);
    client.dispatch(Task::new("a", "0").unique("k", hour), "q").await.unwrap();

    let mut batch = Batch::new();
    batch.add(Task::new("a", "1"), "q");
    batch.add(Task::new("a", "2").unique("other", hour), "q");
    batch.add(Task::new("a", "3").unique("k", hour), "q");
    let err = client.dispatch_batch(batch).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate, "{err}");
    // The earlier task and its lock only.
    assert_eq!(stream_messages(&js).await, 2);
}

#[tokio::test]
async fn a_held_key_in_a_batch_names_its_holder_and_a_stale_lock_is_taken_over() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let hour = Duration::from_secs(3600);
    let first = client.dispatch(Task::new("a", "0").unique("k", hour), "q").await.unwrap();

    let mut batch = Batch::new();
    batch.add(Task::new("a", "1"), "q");
    batch.add(Task::new("a", "2").unique("k", hour), "q");
    let err = client.dispatch_batch(batch).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate, "{err}");
    assert_eq!(err.existing_id(), Some(first.id.as_str()), "{err}");
    assert!(err.to_string().contains("task 1 of the batch"), "{err}");

    client.dispatch(Task::new("a", "3").throttle("t", hour), "q").await.unwrap();
    let mut batch = Batch::new();
    batch.add(Task::new("a", "4").throttle("t", hour), "q");
    let err = client.dispatch_batch(batch).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Throttled, "{err}");
    assert!(err.retry_at().is_some(), "{err}");

    // The first task is acked by a worker that does not release its lock (as a Go worker
    // does): the lock is stale, and the next batch with the key takes it over.
    let task = first_on(&js, "natasks.q").await;
    assert_eq!(task.payload.as_ref(), b"0");
    js.get_stream("NATASKS").await.unwrap().delete_message(task.sequence).await.unwrap();
    let mut batch = Batch::new();
    batch.add(Task::new("a", "5"), "q");
    batch.add(Task::new("a", "6").unique("k", hour), "q");
    let receipts = client.dispatch_batch(batch).await.expect("the stale lock is taken over");
    assert_eq!(receipts.len(), 2);
    let err = client.dispatch(Task::new("a", "7").unique("k", hour), "q").await.unwrap_err();
    assert_eq!(err.existing_id(), Some(receipts[1].id.as_str()), "{err}");
}

#[tokio::test]
async fn a_message_over_max_payload_is_refused_before_the_batch_opens() {
    // A message the client refuses to send used to fail the batch after its first message
    // had opened it on the server, where it sat for 10 s: 50 of them blocked every atomic
    // batch on the stream.
    let server = NatsServer::builder().config_file("max_payload: 8192\n").start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for _ in 0..60 {
        let mut batch = Batch::new();
        batch.add(Task::new("a", "small"), "q");
        batch.add(Task::new("a", vec![b'x'; 9 * 1024]), "q");
        let err = client.dispatch_batch(batch).await.unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::PayloadTooLarge, "{err}");
        assert!(err.to_string().contains("task 1 of the batch"), "{err}");
    }
    // No batch was left open: the next ones find a free slot at once (they waited for
    // the abandoned ones to expire, about 10 s).
    let next = async {
        for i in 0..60 {
            let mut batch = Batch::new();
            batch.add(Task::new("a", format!("{i}")), "q");
            batch.add(Task::new("a", vec![b'x'; 4 * 1024]), "q");
            client.dispatch_batch(batch).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(4), next).await.expect("batches were blocked");
    assert_eq!(stream_messages(&js).await, 120);
}

#[tokio::test]
async fn a_batch_holding_a_key_or_message_id_twice_is_refused_naming_both_tasks() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let hour = Duration::from_secs(3600);
    let twice: [(&str, [Task; 2], bool); 4] = [
        (
            "unique key",
            [Task::new("a", "1").unique("k", hour), Task::new("a", "2").unique("k", hour)],
            false,
        ),
        (
            "throttle key",
            [Task::new("a", "1").throttle("k", hour), Task::new("a", "2").throttle("k", hour)],
            false,
        ),
        (
            "debounce key",
            [Task::new("a", "1").debounce("k"), Task::new("a", "2").debounce("k")],
            true,
        ),
        (
            "message id",
            [Task::new("a", "1").with_message_id("m"), Task::new("a", "2").with_message_id("m")],
            false,
        ),
    ];
    for (what, [first, second], delayed) in twice {
        let mut batch = Batch::new();
        batch.add(Task::new("a", "0"), "q");
        let delay = if delayed { hour } else { Duration::ZERO };
        batch.add_in(first, "q", delay);
        batch.add_in(second, "q", delay);
        let err = client.dispatch_batch(batch).await.unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::InvalidBatch, "{what}: {err}");
        let text = err.to_string();
        assert!(text.contains("tasks 1 and 2") && text.contains(what), "{what}: {err}");
    }
    // The same key in two queues is two keys.
    let mut batch = Batch::new();
    batch.add(Task::new("a", "1").unique("k", hour), "q");
    batch.add(Task::new("a", "2").unique("k", hour), "other");
    client.dispatch_batch(batch).await.unwrap();
    assert_eq!(stream_messages(&js).await, 4);
}

#[tokio::test]
async fn a_batch_sent_again_with_the_same_message_ids_says_it_was_already_stored() {
    // What a caller does after a commit timeout: send the batch again, same ids.
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let batch = || {
        let mut batch = Batch::new();
        batch.add(Task::new("a", "1").with_message_id("order-1/charge"), "q");
        batch.add(Task::new("a", "2").with_message_id("order-1/receipt"), "q");
        batch
    };
    client.dispatch_batch(batch()).await.unwrap();
    let err = client.dispatch_batch(batch()).await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::AlreadyStored, "{err}");
    assert!(err.to_string().contains("already stored"), "{err}");
    assert_eq!(stream_messages(&js).await, 2);
}
