//! Tracking under races and odd input: message ids used again, cancels racing with
//! renewals and unroutable retries, records that would not fit, dead-letter workers, a
//! bucket made elsewhere, and extreme durations. Each of these once lost a task, ran a
//! cancelled one, or left a record wrong.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use natasks::{
    CancelOutcome, Client, HandlerError, Progress, Status, Task, TaskState, TrackErrorKind,
    Unroutable, Worker,
};

async fn state(client: &Client, id: &str) -> Option<TaskState> {
    match client.status(id).await.expect("status") {
        Status::Known(status) => Some(status.state),
        _ => None,
    }
}

/// A message id reused after the duplicate window, while an earlier task's cancelled
/// record is retained: the new task is removed without running.
#[tokio::test]
async fn reused_message_id_after_cancel_runs() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client =
        Client::builder(js.clone()).duplicate_window(Duration::from_secs(1)).build().await.unwrap();
    let first = Task::new("job", "1").with_message_id("order-42").tracked();
    client.dispatch(first, "jobs").await.unwrap();
    assert!(matches!(client.cancel("order-42").await.unwrap(), CancelOutcome::Cancelled { .. }));
    // The duplicate window (1 s) has to pass: time itself is the condition here.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = Task::new("job", "2").with_message_id("order-42").tracked();
    let receipt = client.dispatch(second, "jobs").await.unwrap();
    assert!(!receipt.duplicate, "outside the window: a new task");
    assert_eq!(state(&client, "order-42").await, Some(TaskState::Pending), "the new task's record");
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let worker = Worker::builder(js.clone(), "jobs")
        .handle("job", move |_: Task| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(2u32)
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    eventually(DEADLINE, "the second task runs and succeeds", || async {
        runs.load(Ordering::SeqCst) == 1
            && matches!(state(&client, "order-42").await, Some(TaskState::Succeeded))
    })
    .await;
    running.stop().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the second task runs once");
    assert_eq!(stream_messages(&js).await, 0, "nothing left on the stream");
}

/// Same, with a succeeded first task: waiting on the new task must not return the earlier
/// one's result.
#[tokio::test]
async fn reused_message_id_waits_for_the_new_result() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client =
        Client::builder(js.clone()).duplicate_window(Duration::from_secs(1)).build().await.unwrap();
    let worker = Worker::builder(js.clone(), "jobs")
        .handle("job", |task: Task| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, HandlerError>(String::from_utf8_lossy(task.payload()).into_owned())
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client
        .dispatch(Task::new("job", "first").with_message_id("m").tracked(), "jobs")
        .await
        .unwrap();
    assert_eq!(client.wait::<String>("m", DEADLINE).await.unwrap(), "first");
    running.stop().await.unwrap();
    // The duplicate window (1 s) has to pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r =
        client.dispatch(Task::new("job", "second").with_message_id("m").tracked(), "jobs").await;
    assert!(!r.unwrap().duplicate);
    assert_eq!(state(&client, "m").await, Some(TaskState::Pending), "the new task's record");
    let err = client.wait::<String>("m", Duration::from_millis(500)).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::TimedOut, "not the earlier task's result: {err}");
    let running = spawn(
        Worker::builder(js.clone(), "jobs")
            .handle("job", |task: Task| async move {
                Ok::<_, HandlerError>(String::from_utf8_lossy(task.payload()).into_owned())
            })
            .build()
            .await
            .unwrap(),
    );
    assert_eq!(client.wait::<String>("m", DEADLINE).await.unwrap(), "second");
    running.stop().await.unwrap();
}

/// A progress detail near max_payload: every later record write fails; the status stays
/// `running` and the task is dead-lettered as if its (tiny) result were too large.
#[tokio::test]
async fn huge_progress_detail_is_left_out_of_the_record() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js.clone(), "jobs")
        .handle("job", |progress: Progress| async move {
            progress.report(None, &"x".repeat(1_100_000));
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, HandlerError>(1u8)
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap();
    let res = client.wait::<u8>(&receipt.id, Duration::from_secs(5)).await;
    running.stop().await.unwrap();
    assert_eq!(res.map_err(|e| (e.kind(), e.to_string())).unwrap(), 1);
    assert!(matches!(state(&client, &receipt.id).await, Some(TaskState::Succeeded)));
}

/// A huge handler error: the retrying/failed record cannot be written.
#[tokio::test]
async fn huge_error_is_cut_to_fit_the_record() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js.clone(), "jobs")
        .handle(
            "job",
            |_: Task| async move { Err::<(), _>(natasks::no_retry("e".repeat(1_100_000))) },
        )
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap();
    let res = client.wait::<()>(&receipt.id, Duration::from_secs(5)).await;
    let kind = res.as_ref().err().map(|e| e.kind());
    running.stop().await.unwrap();
    assert_eq!(kind, Some(TrackErrorKind::Failed), "{res:?}");
    assert!(matches!(state(&client, &receipt.id).await, Some(TaskState::Failed)));
}

/// retry_after(Duration::MAX) on a tracked task panics in the worker (OffsetDateTime
/// overflow): the task is neither acked nor nacked and runs again after every ack wait.
#[tokio::test]
async fn retry_after_the_longest_delay_runs_once() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let worker = Worker::builder(js.clone(), "jobs")
        .ack_wait(Duration::from_secs(1))
        .handle("job", move |_: Task| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(HandlerError::retry_after("later", Duration::MAX))
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap();
    eventually(DEADLINE, "the retry recorded", || async {
        matches!(state(&client, &receipt.id).await, Some(TaskState::Retrying { .. }))
    })
    .await;
    // What must not happen is a redelivery after the ack wait (1 s): give it three.
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn waiting_without_a_bound_does_not_panic() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let receipt = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap();
    let c = client.clone();
    let id = receipt.id.clone();
    let h = tokio::spawn(async move {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), c.wait::<()>(&id, Duration::MAX)).await;
    });
    let r = h.await;
    assert!(r.is_ok(), "wait(Duration::MAX) panicked: {r:?}");
}

/// Unroutable::Retry on a cancelled task rewrites the record, and a worker that knows the
/// task then runs it.
#[tokio::test]
async fn unroutable_retry_does_not_revive_a_cancelled_task() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let old = Worker::builder(js.clone(), "jobs")
        .on_unroutable(Unroutable::Retry(Duration::from_millis(300)))
        .handle("other", |_: Task| async { Ok::<(), HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let old = spawn(old);
    let receipt = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap();
    eventually(DEADLINE, "retrying", || async {
        matches!(state(&client, &receipt.id).await, Some(TaskState::Retrying { .. }))
    })
    .await;
    client.cancel(&receipt.id).await.unwrap();
    // The old worker keeps seeing the task every 300 ms until the cancel has removed it;
    // what must not happen is a retry record written over `cancelled`.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(state(&client, &receipt.id).await, Some(TaskState::Cancelled));
    old.stop().await.unwrap();
    let runs = runs_after_a_sentinel(&client, &js).await;
    assert_eq!(runs, 0, "a cancelled task ran");
    assert_eq!(state(&client, &receipt.id).await, Some(TaskState::Cancelled));
}

/// A worker on the dead-letter queue rewrites the original task's record.
#[tokio::test]
async fn a_dead_letter_worker_keeps_the_dead_lettered_record() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js.clone(), "jobs")
        .handle("job", |_: Task| async { Err::<(), _>(HandlerError::dead_letter("bad")) })
        .build()
        .await
        .unwrap();
    let w = spawn(worker);
    let receipt = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap();
    let err = client.wait::<()>(&receipt.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::DeadLettered);
    let dlq = Worker::builder(js.clone(), "jobs-dlq")
        .handle("job", |_: Task| async { Ok::<_, HandlerError>("inspected") })
        .build()
        .await
        .unwrap();
    let d = spawn(dlq);
    eventually(DEADLINE, "the dead letter processed", || async {
        stored(&js, "natasks.jobs-dlq").await == 0
    })
    .await;
    let st = state(&client, &receipt.id).await;
    d.stop().await.unwrap();
    w.stop().await.unwrap();
    assert!(matches!(st, Some(TaskState::DeadLettered { .. })));
}

/// A records bucket another process made without per-message TTL: a tracked dispatch is
/// refused before anything is stored, instead of storing a task nothing records.
#[tokio::test]
async fn bucket_without_ttl_refuses_tracked_dispatch() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: "NATASKS_TASKS".into(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::new(js.clone()).await.unwrap();
    let err = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap_err();
    assert_eq!(err.kind(), natasks::DispatchErrorKind::TrackingUnavailable, "{err}");
    assert!(err.to_string().contains("per-message TTL"), "{err}");
    assert_eq!(stream_messages(&js).await, 0, "nothing stored");
}

/// A retention the server cannot hold is refused at dispatch, not stored and lost.
#[tokio::test]
async fn retention_beyond_ten_years_is_refused() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for secs in [u64::MAX, 10_000_000_000u64] {
        let task = Task::new("job", "x").tracked_for(Duration::from_secs(secs));
        let err = client.dispatch(task, "jobs").await.unwrap_err();
        assert_eq!(err.kind(), natasks::DispatchErrorKind::InvalidTask, "{err}");
    }
    assert_eq!(stream_messages(&js).await, 0);
}

/// A running task is cancelled; the worker's next lease renewal writes `running` over the
/// `cancelled` record; the worker then goes away without an outcome (here: shutdown gives
/// up on the handler; SIGKILL behaves alike) and the next worker runs the cancelled task.
#[tokio::test]
async fn a_renewal_after_a_cancel_does_not_revive_the_task() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let first = Worker::builder(js.clone(), "jobs")
        .progress_interval(Duration::from_millis(300))
        .drain_timeout(Duration::from_millis(500))
        .handle("job", |_: Task| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<(), HandlerError>(())
        })
        .build()
        .await
        .unwrap();
    let first = spawn(first);
    let receipt = client.dispatch(Task::new("job", "x").tracked(), "jobs").await.unwrap();
    eventually(DEADLINE, "running", || async {
        matches!(state(&client, &receipt.id).await, Some(TaskState::Running { .. }))
    })
    .await;
    assert_eq!(client.cancel(&receipt.id).await.unwrap(), CancelOutcome::Signalled);
    // Two lease renewals (every 300 ms) after the cancel: neither may write `running` back.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(state(&client, &receipt.id).await, Some(TaskState::Cancelled));
    first.stop().await.unwrap();
    let runs = runs_after_a_sentinel(&client, &js).await;
    assert_eq!(runs, 0, "a cancelled task ran again");
    assert_eq!(state(&client, &receipt.id).await, Some(TaskState::Cancelled));
}

/// Starts a worker of one slot on `jobs`, dispatches a sentinel task behind whatever is
/// still on the queue, and returns how many `job` tasks the worker ran by the time the
/// sentinel ran: a task still on the queue is delivered, and started, before it.
async fn runs_after_a_sentinel(client: &Client, js: &async_nats::jetstream::Context) -> u32 {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let mut sentinels = Seen::new();
    let seen = sentinels.tx.clone();
    let worker = Worker::builder(js.clone(), "jobs")
        .concurrency(1)
        .handle("job", move |_: Task| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .handle("sentinel", move |_: Task| {
            let seen = seen.clone();
            async move {
                let _ = seen.send(());
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("sentinel", ""), "jobs").await.unwrap();
    sentinels.recv().await;
    running.stop().await.unwrap();
    runs.load(Ordering::SeqCst)
}
