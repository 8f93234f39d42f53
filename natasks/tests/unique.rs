//! Unique tasks: one task per key and queue while it is pending, scheduled or running.

mod common;

use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use natasks::{Client, DispatchErrorKind, HandlerError, Task, Worker};

const HOUR: Duration = Duration::from_secs(3600);

/// The subject of the lock of `key` (already encoded) in `queue`.
fn lock(queue: &str, encoded_key: &str) -> String {
    format!("natasks.__natasks_mark.unique.{queue}.{encoded_key}")
}

#[tokio::test]
async fn fifty_dispatchers_racing_on_one_key_store_one_task() {
    let server = NatsServer::start().await;
    // Five connections, ten dispatchers each: the server decides, not one client.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::new(server.jetstream().await).await.unwrap());
    }
    let dispatches = (0..50).map(|i| {
        let client = clients[i % clients.len()].clone();
        async move {
            let task = Task::new("reports.render", i.to_string()).unique("report-7", HOUR);
            client.dispatch(task, "reports").await
        }
    });
    let results = join_all(dispatches).await;

    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "exactly one dispatch wins: {results:?}");
    let winner = &won[0].id;
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.kind(), DispatchErrorKind::Duplicate, "{err}");
        assert_eq!(err.existing_id(), Some(winner.as_str()), "{err}");
    }
    let js = server.jetstream().await;
    assert_eq!(stored(&js, "natasks.reports").await, 1);
    assert_eq!(stored(&js, &lock("reports", "report-7")).await, 1);
}

#[tokio::test]
async fn a_held_key_names_its_task_or_returns_its_receipt_and_is_go_compatible() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();

    let key = "ann@example.com welcome";
    let first = client
        .dispatch(Task::new("emails.welcome", "1").unique(key, HOUR), "emails")
        .await
        .unwrap();
    assert!(!first.duplicate);

    let err = client
        .dispatch(Task::new("emails.welcome", "2").unique(key, HOUR), "emails")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate);
    assert_eq!(err.existing_id(), Some(first.id.as_str()));
    assert!(err.to_string().contains(&first.id), "{err}");

    let existing = client
        .dispatch(Task::new("emails.welcome", "3").unique(key, HOUR).return_existing(), "emails")
        .await
        .unwrap();
    assert_eq!(existing.id, first.id);
    assert_eq!(existing.sequence, first.sequence);
    assert!(existing.duplicate);

    // Another queue has its own keys.
    client.dispatch(Task::new("emails.welcome", "4").unique(key, HOUR), "other").await.unwrap();

    // The task stays on `natasks.<queue>` (Go workers process it) and carries its key; the
    // lock lives under an encoded key no worker consumes.
    assert_eq!(stored(&js, "natasks.emails").await, 1);
    let task = first_on(&js, "natasks.emails").await;
    assert_eq!(task.headers.get("Natasks-Unique-Key").map(|v| v.as_str()), Some(key));
    assert_eq!(task.payload.as_ref(), b"1");
    assert_eq!(stored(&js, &lock("emails", "ann%40example%2Ecom%20welcome")).await, 1);
}

/// Runs one unique task through a worker whose handler ends it as `handler` says, and
/// checks that its key is free afterwards.
async fn released_after(handler: fn() -> Result<(), HandlerError>) {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "jobs")
        .max_retries(0)
        .handle("job", move |task: Task| {
            let _ = tx.send(task);
            std::future::ready(handler())
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("job", "1").unique("k", HOUR), "jobs").await.unwrap();
    let got = seen.recv().await;
    assert_eq!(got.unique_key(), Some("k"));
    eventually(DEADLINE, "the lock is released", || async {
        stored(&js, &lock("jobs", "k")).await == 0
    })
    .await;
    client.dispatch(Task::new("job", "2").unique("k", HOUR), "jobs").await.unwrap();
    assert_eq!(seen.recv().await.payload().as_ref(), b"2");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn the_key_is_released_when_the_task_succeeds() {
    released_after(|| Ok(())).await;
}

#[tokio::test]
async fn the_key_is_released_when_the_task_fails_without_retry() {
    released_after(|| Err(natasks::no_retry("not today"))).await;
}

#[tokio::test]
async fn the_key_is_released_when_the_task_is_dead_lettered() {
    released_after(|| Err(HandlerError::dead_letter("broken"))).await;
}

#[tokio::test]
async fn the_key_is_held_while_the_task_retries() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "jobs")
        .retry_backoff([Duration::from_millis(100)])
        .handle("job", move |task: Task| {
            let attempt = task.delivery().map(|d| d.attempt).unwrap_or_default();
            let _ = tx.send(attempt);
            std::future::ready(if attempt < 3 { Err(HandlerError::msg("again")) } else { Ok(()) })
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let first = client.dispatch(Task::new("job", "1").unique("k", HOUR), "jobs").await.unwrap();
    assert_eq!(seen.recv().await, 1);
    assert_eq!(seen.recv().await, 2);
    let err = client.dispatch(Task::new("job", "2").unique("k", HOUR), "jobs").await.unwrap_err();
    assert_eq!(err.existing_id(), Some(first.id.as_str()), "a retrying task holds its key");
    assert_eq!(seen.recv().await, 3);
    eventually(DEADLINE, "the key is free once the task succeeded", || async {
        client.dispatch(Task::new("job", "3").unique("k", HOUR), "jobs").await.is_ok()
    })
    .await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn the_key_is_released_when_the_task_is_cancelled() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for delayed in [false, true] {
        let task = Task::new("job", "1").unique("k", HOUR).tracked();
        let receipt = if delayed {
            client.dispatch_in(task, "jobs", HOUR).await.unwrap()
        } else {
            client.dispatch(task, "jobs").await.unwrap()
        };
        client.cancel(&receipt.id).await.unwrap();
        let again = client.dispatch(Task::new("job", "2").unique("k", HOUR), "jobs").await;
        let again = again.unwrap_or_else(|err| panic!("delayed {delayed}: {err}"));
        assert_ne!(again.id, receipt.id);
        // Clean up for the next round: the immediate task is consumed by nobody; cancel it.
        client.cancel(&again.id).await.ok();
        js.get_stream("NATASKS").await.unwrap().purge().filter("natasks.jobs").await.unwrap();
    }
}

#[tokio::test]
async fn the_ttl_frees_a_key_whose_task_nobody_ends() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let ttl = Duration::from_secs(1);
    client.dispatch(Task::new("job", "1").unique("k", ttl), "jobs").await.unwrap();
    let err = client.dispatch(Task::new("job", "2").unique("k", ttl), "jobs").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate);
    eventually(DEADLINE, "the lock expires", || async {
        client.dispatch(Task::new("job", "3").unique("k", ttl), "jobs").await.is_ok()
    })
    .await;
    assert_eq!(stored(&js, "natasks.jobs").await, 2);
}

#[tokio::test]
async fn bad_keys_and_ttls_are_refused_and_publish_nothing() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let cases = [
        (Task::new("job", "1").unique("", HOUR), "is empty"),
        (Task::new("job", "1").unique("k".repeat(1025), HOUR), "longer than 1024"),
        (Task::new("job", "1").unique("a\r\nb", HOUR), "CR or LF"),
        (Task::new("job", "1").unique("k", Duration::from_millis(500)), "outside 1 s"),
        (Task::new("job", "1").throttle("k", Duration::ZERO), "outside 1 s"),
        (Task::new("job", "1").debounce("k"), "needs a delay"),
    ];
    for (task, says) in cases {
        let err = client.dispatch(task, "jobs").await.unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::InvalidTask, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    assert_eq!(stream_messages(&js).await, 0);
    // Valid user strings are keys, however the subject space would choke on them.
    for key in ["ann@example.com", "a b.c*d>e", "Größe ✓", &"é".repeat(500)] {
        client.dispatch(Task::new("job", "1").unique(key, HOUR), "jobs").await.unwrap();
    }
    assert_eq!(stored(&js, "natasks.jobs").await, 4);
}

#[tokio::test]
async fn an_old_server_gets_an_error_naming_its_version() {
    let binary =
        old_server_binary().expect("nats-server 2.11 is installed by scripts/install-nats-server");
    let server = NatsServer::builder().binary(binary).start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let err = client.dispatch(Task::new("job", "1").unique("k", HOUR), "jobs").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Unsupported);
    assert!(err.to_string().contains("2.11"), "{err}");
    assert_eq!(stream_messages(&js).await, 0);
}

#[tokio::test]
async fn more_unique_dispatches_at_once_than_the_server_has_batch_slots_all_succeed() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    // The server runs at most 50 atomic batches at once per stream.
    let dispatches = (0..200).map(|i| {
        let client = client.clone();
        async move {
            let task = Task::new("job", i.to_string()).unique(format!("key-{i}"), HOUR);
            client.dispatch(task, "jobs").await
        }
    });
    for result in join_all(dispatches).await {
        result.unwrap();
    }
    assert_eq!(stored(&js, "natasks.jobs").await, 200);
}

#[tokio::test]
async fn a_key_with_leading_or_trailing_whitespace_is_refused_before_anything_is_stored() {
    // Received header values are trimmed by the client library: a worker would read a key
    // other than the one the lock was taken for, and never release it.
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for key in ["k ", " k", "k\t", "k\u{a0}", "\u{2003}k"] {
        let err = client
            .dispatch(Task::new("reports.render", "x").unique(key, HOUR), "reports")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::InvalidTask, "{key:?}: {err}");
        assert!(err.to_string().contains("whitespace"), "{err}");
    }
    assert_eq!(stream_messages(&js).await, 0);
    // Whitespace inside a key is fine, and the worker releases it.
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "reports")
        .handle("reports.render", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("reports.render", "y").unique("a b", HOUR), "reports").await.unwrap();
    seen.recv().await;
    eventually(DEADLINE, "the lock to be released", || async {
        stored(&js, &lock("reports", "a%20b")).await == 0
    })
    .await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_delayed_unique_task_holds_its_key_past_the_ttl_until_it_is_due() {
    // The TTL bounds how long the task may take once due; counted from the dispatch, a
    // delay longer than it freed the key while the first task was still scheduled.
    let server = NatsServer::start().await;
    let client = Client::new(server.jetstream().await).await.unwrap();
    let ttl = Duration::from_secs(2);
    let first = client
        .dispatch_in(Task::new("t", "1").unique("k", ttl), "q", Duration::from_secs(6))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = client
        .dispatch(Task::new("t", "2").unique("k", ttl), "q")
        .await
        .expect_err("the key is held while the first task is scheduled");
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate, "{err}");
    assert_eq!(err.existing_id(), Some(first.id.as_str()));
}

#[tokio::test]
async fn a_delayed_unique_task_that_is_gone_frees_its_key_for_the_next_dispatch() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let stream = js.get_stream("NATASKS").await.unwrap();

    // Fired, then processed by a worker that does not release the lock (a Go worker, or
    // one killed between its ack and the release).
    let first = client
        .dispatch_in(Task::new("t", "1").unique("k", HOUR), "q", Duration::from_secs(1))
        .await
        .unwrap();
    let produced = first_on(&js, "natasks.q").await;
    let err = client.dispatch(Task::new("t", "2").unique("k", HOUR), "q").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate, "pending after it fired: {err}");
    assert_eq!(err.existing_id(), Some(first.id.as_str()));
    stream.delete_message(produced.sequence).await.unwrap();
    client.dispatch(Task::new("t", "3").unique("k", HOUR), "q").await.unwrap();

    // Its schedule cancelled by purging it, as `natasks schedules cancel` does.
    client.dispatch_in(Task::new("t", "4").unique("j", HOUR), "q", HOUR).await.unwrap();
    let err = client.dispatch(Task::new("t", "5").unique("j", HOUR), "q").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate, "scheduled: {err}");
    stream.purge().filter("natasks.__natasks_schedule.>").await.unwrap();
    client.dispatch(Task::new("t", "6").unique("j", HOUR), "q").await.unwrap();
}

#[tokio::test]
async fn a_task_reusing_an_id_does_not_release_another_tasks_lock() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    // An earlier task with the same id and key, stored without a lock (brought back from
    // the dead-letter queue, or published by another program), comes first.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", "t");
    headers.insert("Natasks-Queue", "q");
    headers.insert("Natasks-Id", "order-1");
    headers.insert("Natasks-Unique-Key", "k");
    js.publish_with_headers("natasks.q", headers, "copy".into()).await.unwrap().await.unwrap();
    let task = Task::new("t", "task").with_message_id("order-1").unique("k", HOUR);
    client.dispatch(task, "q").await.unwrap();

    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let worker = Worker::builder(js.clone(), "q")
        .concurrency(1)
        .handle("t", move |task: Task| {
            let tx = tx.clone();
            let mut release_rx = release_rx.clone();
            async move {
                let payload = String::from_utf8(task.payload().to_vec()).unwrap();
                let _ = tx.send(payload.clone());
                if payload == "task" {
                    let _ = release_rx.wait_for(|go| *go).await;
                }
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    assert_eq!(seen.recv().await, "copy");
    assert_eq!(seen.recv().await, "task");
    // The copy has been settled (the worker runs one task at a time): the lock of the
    // task still running must be there.
    assert_eq!(stored(&js, &lock("q", "k")).await, 1, "the copy released the task's lock");
    let err = client.dispatch(Task::new("t", "again").unique("k", HOUR), "q").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate, "{err}");
    release_tx.send(true).unwrap();
    eventually(DEADLINE, "the lock to be released", || async {
        stored(&js, &lock("q", "k")).await == 0
    })
    .await;
    running.stop().await.unwrap();
}
