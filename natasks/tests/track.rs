//! Task lifecycle in one process: receipts, results, status, progress, cancellation,
//! events, expiry and bad input, against a real server.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use natasks::{
    Attempt, CancelOutcome, Cancellation, Client, EventKind, HandlerError, Json, Progress, Status,
    Task, TaskId, TaskState, TrackErrorKind, Worker,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sum {
    total: u64,
}

async fn add(Json(numbers): Json<Vec<u64>>) -> Result<Sum, HandlerError> {
    Ok(Sum { total: numbers.iter().sum() })
}

/// The state of a known task.
async fn state(client: &Client, id: &str) -> Option<TaskState> {
    match client.status(id).await.expect("status") {
        Status::Known(status) => Some(status.state),
        _ => None,
    }
}

#[tokio::test]
async fn receipt_carries_id_sequence_and_duplicate() {
    let server = NatsServer::start().await;
    let client = Client::new(server.jetstream().await).await.unwrap();
    let first = client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    let second = client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    assert_ne!(first.id, second.id, "each task gets its own id");
    assert!(!first.id.is_empty());
    assert_eq!(second.sequence, first.sequence.map(|s| s + 1));
    let given = client.dispatch(Task::new("t", "x").with_message_id("m-1"), "q").await.unwrap();
    assert_eq!(given.id, "m-1", "a message id is the task id");
    assert!(!given.duplicate);
    let again = client.dispatch(Task::new("t", "x").with_message_id("m-1"), "q").await.unwrap();
    assert!(again.duplicate, "same message id within the window");
    assert_eq!(again.sequence, given.sequence);
}

#[tokio::test]
async fn handler_sees_the_id_of_its_receipt() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js, "q")
        .handle("t", move |TaskId(id): TaskId, Attempt(attempt): Attempt| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((id, attempt));
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    let delayed = client.dispatch_in(Task::new("t", "y"), "q", Duration::from_millis(200)).await;
    let delayed = delayed.unwrap();
    let mut got = seen.take(2, DEADLINE).await;
    got.sort();
    let mut want = vec![(receipt.id, 1), (delayed.id, 1)];
    want.sort();
    assert_eq!(got, want);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn result_is_stored_and_awaited() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let receipt =
        client.dispatch(Task::json("add", &[1u64, 2, 3]).unwrap().tracked(), "math").await.unwrap();
    assert!(matches!(state(&client, &receipt.id).await, Some(TaskState::Pending)));
    let err = client.result::<Sum>(&receipt.id).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::NotFinished, "{err}");

    // The waiter starts before the worker.
    let waiter = {
        let client = client.clone();
        let id = receipt.id.clone();
        tokio::spawn(async move { client.wait::<Sum>(&id, DEADLINE).await })
    };
    let worker = Worker::builder(js, "math").handle("add", add).build().await.unwrap();
    let running = spawn(worker);
    let sum = waiter.await.unwrap().expect("wait returns the result");
    assert_eq!(sum, Sum { total: 6 });
    assert_eq!(client.result::<Sum>(&receipt.id).await.unwrap(), Sum { total: 6 });
    assert!(matches!(state(&client, &receipt.id).await, Some(TaskState::Succeeded)));
    // Waiting on a finished task returns at once.
    assert_eq!(client.wait::<Sum>(&receipt.id, Duration::from_secs(2)).await.unwrap().total, 6);

    // A type the result does not decode as: a clear error naming the type.
    let err = client.result::<Vec<String>>(&receipt.id).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::Undecodable);
    assert!(err.to_string().contains("Vec<alloc::string::String>"), "{err}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn untracked_tasks_record_nothing() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js.clone(), "math").handle("add", add).build().await.unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::json("add", &[1u64]).unwrap(), "math").await.unwrap();
    eventually(DEADLINE, "the task to be processed", || async { stream_messages(&js).await == 0 })
        .await;
    assert_eq!(client.status(&receipt.id).await.unwrap(), Status::Unknown);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn status_follows_retries_to_the_dead_letter() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut events = client.events(Some("jobs")).await.unwrap();
    let worker = Worker::builder(js, "jobs")
        .max_retries(2)
        .retry_backoff([Duration::from_millis(300)])
        .handle("flaky", |Attempt(n): Attempt| async move {
            Err::<(), _>(HandlerError::msg(format!("boom {n}")))
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("flaky", "x").tracked(), "jobs").await.unwrap();
    let err = client.wait::<()>(&receipt.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::DeadLettered, "{err}");
    assert_eq!(err.last_error(), Some("boom 3"));
    assert!(err.to_string().contains("retries-exhausted"), "{err}");
    let Status::Known(status) = client.status(&receipt.id).await.unwrap() else {
        panic!("the task is recorded")
    };
    assert_eq!(status.attempt, 3);
    assert_eq!(status.state, TaskState::DeadLettered { reason: "retries-exhausted".into() });

    // Events in order: dispatched, then started/retrying twice, started, dead_lettered.
    let mut kinds = Vec::new();
    while kinds.last() != Some(&EventKind::DeadLettered) {
        let event = tokio::time::timeout(DEADLINE, events.next()).await.unwrap().unwrap();
        assert_eq!(event.id, receipt.id);
        kinds.push(event.kind);
    }
    use EventKind::*;
    assert_eq!(
        kinds,
        [Dispatched, Started, Retrying, Started, Retrying, Started, DeadLettered],
        "events in order"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn failing_without_retry_is_reported_with_its_error() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js, "jobs")
        .handle("refuse", |_: Task| async { Err::<(), _>(natasks::no_retry("not today")) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("refuse", "x").tracked(), "jobs").await.unwrap();
    let err = client.wait::<()>(&receipt.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::Failed, "{err}");
    assert_eq!(err.last_error(), Some("not today"));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn progress_shows_while_the_task_runs() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let worker = Worker::builder(js, "jobs")
        .handle("long", move |progress: Progress| {
            let mut go = go_rx.clone();
            async move {
                progress.report(Some(0.5), &serde_json::json!({"rows": 50}));
                let _ = go.wait_for(|go| *go).await;
                Ok::<_, HandlerError>("done")
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("long", "x").tracked(), "jobs").await.unwrap();
    eventually(DEADLINE, "progress to show in the status", || async {
        match client.status(&receipt.id).await.unwrap() {
            Status::Known(s) => {
                matches!(s.state, TaskState::Running { .. })
                    && s.progress.as_ref().and_then(|p| p.fraction) == Some(0.5)
                    && s.progress.as_ref().and_then(|p| p.detail.clone())
                        == Some(serde_json::json!({"rows": 50}))
            }
            _ => false,
        }
    })
    .await;
    go_tx.send(true).unwrap();
    assert_eq!(client.wait::<String>(&receipt.id, DEADLINE).await.unwrap(), "done");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_pending_delayed_and_running_tasks() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();

    // Pending and delayed, before any worker runs.
    let pending = client.dispatch(Task::new("job", "pending").tracked(), "jobs").await.unwrap();
    let delayed = client
        .dispatch_in(Task::new("job", "delayed").tracked(), "jobs", Duration::from_secs(2))
        .await
        .unwrap();
    let other = client.dispatch(Task::new("job", "other").tracked(), "jobs").await.unwrap();
    let outcome = client.cancel(&pending.id).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Cancelled { was: TaskState::Pending });
    let outcome = client.cancel(&delayed.id).await.unwrap();
    assert!(matches!(outcome, CancelOutcome::Cancelled { was: TaskState::Scheduled { .. } }));
    assert_eq!(client.cancel(&pending.id).await.unwrap(), CancelOutcome::AlreadyCancelled);

    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "jobs")
        .handle("job", move |cancel: Cancellation, task: Task| {
            let tx = tx.clone();
            async move {
                let what = String::from_utf8_lossy(task.payload()).into_owned();
                let _ = tx.send(format!("started {what}"));
                if what == "running" {
                    tokio::time::timeout(DEADLINE, cancel.cancelled()).await.expect("signal");
                    let _ = tx.send("signalled".to_owned());
                }
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    assert_eq!(seen.recv().await, "started other");
    assert_eq!(client.wait::<()>(&other.id, DEADLINE).await.map_err(|e| e.kind()), Ok(()));

    let long = client.dispatch(Task::new("job", "running").tracked(), "jobs").await.unwrap();
    assert_eq!(seen.recv().await, "started running");
    eventually(DEADLINE, "the task to be recorded running", || async {
        matches!(state(&client, &long.id).await, Some(TaskState::Running { .. }))
    })
    .await;
    assert_eq!(client.cancel(&long.id).await.unwrap(), CancelOutcome::Signalled);
    assert_eq!(seen.recv_within(Duration::from_secs(1)).await.as_deref(), Some("signalled"));
    let err = client.wait::<()>(&long.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::Cancelled, "{err}");

    // The delayed task's due time passes: it never runs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(seen.recv_within(Duration::from_millis(200)).await, None, "nothing else ran");
    for id in [&pending.id, &delayed.id, &long.id] {
        assert_eq!(state(&client, id).await, Some(TaskState::Cancelled), "{id}");
    }
    assert_eq!(stream_messages(&js).await, 0, "cancelled tasks leave nothing behind");
    let finished = client.cancel(&other.id).await.unwrap();
    assert_eq!(finished, CancelOutcome::AlreadyFinished(TaskState::Succeeded));
    assert_eq!(client.cancel("never-dispatched").await.unwrap(), CancelOutcome::Unknown);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn records_expire_after_their_retention() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js, "math").handle("add", add).build().await.unwrap();
    let running = spawn(worker);
    let task = Task::json("add", &[2u64]).unwrap().tracked_for(Duration::from_secs(1));
    let receipt = client.dispatch(task, "math").await.unwrap();
    assert_eq!(client.wait::<Sum>(&receipt.id, DEADLINE).await.unwrap().total, 2);
    eventually(DEADLINE, "the record to expire", || async {
        client.status(&receipt.id).await.unwrap() == Status::Expired
    })
    .await;
    let err = client.wait::<Sum>(&receipt.id, Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::Expired, "{err}");
    assert_eq!(
        client.result::<Sum>(&receipt.id).await.unwrap_err().kind(),
        TrackErrorKind::Expired
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_and_publishes_nothing() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for id in ["", "a\nb", &"x".repeat(300)] {
        assert_eq!(client.status(id).await.unwrap_err().kind(), TrackErrorKind::InvalidId);
        let err = client.wait::<()>(id, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.kind(), TrackErrorKind::InvalidId, "{err}");
        assert_eq!(client.cancel(id).await.unwrap_err().kind(), TrackErrorKind::InvalidId);
    }
    let err = client.events(Some("a.b")).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::InvalidQueue, "{err}");
    for retention in [Duration::from_millis(500), Duration::from_millis(1500)] {
        let task = Task::new("t", "x").tracked_for(retention);
        let err = client.dispatch(task, "q").await.unwrap_err();
        assert_eq!(err.kind(), natasks::DispatchErrorKind::InvalidTask, "{err}");
    }
    let long_id = Task::new("t", "x").with_message_id("m".repeat(300)).tracked();
    assert!(client.dispatch(long_id, "q").await.is_err());
    assert_eq!(stream_messages(&js).await, 0, "nothing was published");
    // An id with characters a key cannot hold is still a valid id.
    let receipt = client
        .dispatch(Task::new("t", "x").with_message_id("user@example.com/1").tracked(), "q")
        .await
        .unwrap();
    assert_eq!(state(&client, &receipt.id).await, Some(TaskState::Pending));
    let err = Worker::builder(js, "q")
        .result_retention(Duration::from_millis(10))
        .handle("t", add)
        .build()
        .await
        .err()
        .expect("a retention under a second is refused");
    assert!(err.to_string().contains("result_retention"), "{err}");
}

#[tokio::test]
async fn a_result_over_max_payload_fails_the_task_clearly() {
    let server = NatsServer::builder().config_file("max_payload: 65536\n").start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js, "big")
        .handle("big", |_: Task| async { Ok::<_, HandlerError>("x".repeat(100_000)) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("big", "x").tracked(), "big").await.unwrap();
    let err = client.wait::<String>(&receipt.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::DeadLettered, "{err}");
    assert!(err.last_error().unwrap_or_default().contains("max_payload"), "{err}");
    running.stop().await.unwrap();
}
