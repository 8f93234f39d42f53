//! What operator actions leave in the records of tracked tasks, against a real server: a
//! requeued dead letter is pending again and then ends as its new run ends; a deleted task
//! and a cancelled delayed task are recorded as cancelled.

mod common;

use std::time::Duration;

use common::*;
use natasks::admin::{Admin, Selection, TaskState as AdminState};
use natasks::workflow::{Group, GroupResults};
use natasks::{
    Cancellation, Client, HandlerError, Json, Status, Task, TaskState, TrackErrorKind, Worker,
};

async fn state(client: &Client, id: &str) -> Option<TaskState> {
    match client.status(id).await.expect("status") {
        Status::Known(status) => Some(status.state),
        _ => None,
    }
}

#[tokio::test]
async fn a_requeued_dead_letter_is_pending_again_then_ends_as_its_new_run_ends() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    // The first worker fails every task for good: the task is dead-lettered.
    let failing = Worker::builder(js.clone(), "orders")
        .max_retries(0)
        .handle("charge", |_: Task| async { Err::<(), _>(HandlerError::msg("card declined")) })
        .build()
        .await
        .unwrap();
    let running = spawn(failing);
    let receipt = client.dispatch(Task::new("charge", "o-1").tracked(), "orders").await.unwrap();
    let err = client.wait::<()>(&receipt.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::DeadLettered, "{err}");
    running.stop().await.unwrap();

    let dead = admin.tasks("orders", AdminState::Dead, None, 10).await.unwrap();
    assert_eq!(dead.items.len(), 1, "{dead:?}");
    let outcome = admin.requeue("orders", &Selection::One(dead.items[0].sequence)).await.unwrap();
    assert_eq!(outcome.done, 1, "{outcome:?}");
    assert_eq!(
        state(&client, &receipt.id).await,
        Some(TaskState::Pending),
        "a requeued task waits in its queue again"
    );

    // A worker that succeeds: the record follows the new run to its end.
    let worker = Worker::builder(js, "orders")
        .handle("charge", |_: Task| async { Ok::<(), HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.wait::<()>(&receipt.id, DEADLINE).await.expect("the requeued task succeeds");
    assert_eq!(state(&client, &receipt.id).await, Some(TaskState::Succeeded));
    running.stop().await.unwrap();
}

/// A requeue that stored its copy but died before it recorded the task pending (its
/// record still says dead-lettered) is run again: the rerun finds the copy stored and
/// records it then.
#[tokio::test]
async fn a_requeue_run_again_after_its_copy_was_stored_records_the_task_pending() {
    requeue_run_again_records_the_task_pending(true).await;
}

/// As above, on a stream without requeue markers: the rerun's copy is a duplicate of the
/// first by its message id.
#[tokio::test]
async fn a_requeue_run_again_without_markers_records_the_task_pending() {
    requeue_run_again_records_the_task_pending(false).await;
}

async fn requeue_run_again_records_the_task_pending(markers: bool) {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    let failing = Worker::builder(js.clone(), "orders")
        .max_retries(0)
        .handle("charge", |_: Task| async { Err::<(), _>(HandlerError::msg("card declined")) })
        .build()
        .await
        .unwrap();
    let running = spawn(failing);
    let receipt = client.dispatch(Task::new("charge", "o-1").tracked(), "orders").await.unwrap();
    let err = client.wait::<()>(&receipt.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::DeadLettered, "{err}");
    running.stop().await.unwrap();
    let dead = admin.tasks("orders", AdminState::Dead, None, 10).await.unwrap();
    assert_eq!(dead.items.len(), 1, "{dead:?}");
    let dead = dead.items[0].sequence;

    // Deletes refused: the first run stores the copy and stops before the dead letter
    // goes. Its record is then put back as it was, as if the run had died before writing it.
    let records = js.get_key_value("NATASKS_TASKS").await.unwrap();
    let dead_lettered = records.get(&receipt.id).await.unwrap().expect("the record");
    let mut config = js.get_stream("NATASKS").await.unwrap().info().await.unwrap().config.clone();
    config.deny_delete = true;
    if !markers {
        config.subjects.retain(|s| s != "natasks.__natasks_mark.>");
    }
    js.update_stream(config).await.unwrap();
    let first = admin.requeue("orders", &Selection::One(dead)).await.unwrap();
    assert_eq!(first.failed.len(), 1, "the dead letter cannot be deleted: {first:?}");
    let marker = format!("natasks.__natasks_mark.requeue.{dead}");
    assert_eq!(stored(&js, &marker).await, u64::from(markers), "a marker only with markers");
    records.put(&receipt.id, dead_lettered).await.unwrap();
    assert!(matches!(state(&client, &receipt.id).await, Some(TaskState::DeadLettered { .. })));

    // The rerun finds the copy stored (and still cannot delete the dead letter).
    let again = admin.requeue("orders", &Selection::One(dead)).await.unwrap();
    assert_eq!(again.failed.len(), 1, "{again:?}");
    assert_eq!(stored(&js, "natasks.orders").await, 1, "one copy");
    assert_eq!(
        state(&client, &receipt.id).await,
        Some(TaskState::Pending),
        "the copy waits in its queue"
    );
}

#[tokio::test]
async fn a_deleted_pending_task_is_recorded_as_cancelled() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    let kept = client.dispatch(Task::new("render", "keep").tracked(), "reports").await.unwrap();
    let gone = client.dispatch(Task::new("render", "drop").tracked(), "reports").await.unwrap();
    let sequence = gone.sequence.expect("an immediate task has a sequence");
    let outcome =
        admin.delete("reports", AdminState::Pending, &Selection::One(sequence)).await.unwrap();
    assert_eq!(outcome.done, 1, "{outcome:?}");
    assert_eq!(state(&client, &gone.id).await, Some(TaskState::Cancelled));
    let err = client.result::<()>(&gone.id).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::Cancelled, "{err}");
    assert_eq!(state(&client, &kept.id).await, Some(TaskState::Pending), "the other is left");
}

/// A group member deleted while it waits in its queue still counts as ended, as when it
/// is cancelled: the callback runs once the other member ends.
#[tokio::test]
async fn a_deleted_pending_workflow_step_still_lets_the_callback_run() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    let group = Group::new("delete-one")
        .add(Task::json("square", &2u64).unwrap(), "steps")
        .add(Task::json("square", &3u64).unwrap(), "steps")
        .then(Task::new("collect", ""), "steps");
    let receipt = client.dispatch_workflow(group).await.unwrap();
    // The first member is the one whose payload is 2.
    let pending = admin.tasks("steps", AdminState::Pending, None, 10).await.unwrap();
    let mut first = None;
    for task in &pending.items {
        if admin.task(task.sequence).await.unwrap().payload.as_ref() == b"2" {
            first = Some(task.sequence);
        }
    }
    let first = first.unwrap_or_else(|| panic!("the first member waits: {pending:?}"));
    let outcome = admin.delete("steps", AdminState::Pending, &Selection::One(first)).await.unwrap();
    assert_eq!(outcome.done, 1, "{outcome:?}");

    let square = |Json(n): Json<u64>| async move { Ok::<_, HandlerError>(n * n) };
    let collect = |Json(results): Json<GroupResults>| async move {
        let states: Vec<String> = results.members.iter().map(|m| m.state.clone()).collect();
        Ok::<_, HandlerError>(states)
    };
    let worker = Worker::builder(js.clone(), "steps")
        .handle("square", square)
        .handle("collect", collect)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let states: Vec<String> =
        client.wait(receipt.steps.last().unwrap(), DEADLINE).await.expect("the callback ran");
    assert_eq!(states, ["cancelled", "succeeded"]);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_delayed_task_is_recorded_as_cancelled() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    let task = Task::new("remind", "u-7").tracked();
    let receipt = client.dispatch_in(task, "emails", Duration::from_secs(3600)).await.unwrap();
    assert!(matches!(state(&client, &receipt.id).await, Some(TaskState::Scheduled { .. })));
    let schedules = admin.schedules(Some("emails")).await.unwrap();
    assert_eq!(schedules.len(), 1, "{schedules:?}");
    admin.cancel_schedule(&schedules[0].id).await.unwrap();
    assert_eq!(state(&client, &receipt.id).await, Some(TaskState::Cancelled));
}

#[tokio::test]
async fn deleting_a_running_task_signals_its_handler_and_records_it_cancelled() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    let mut started = Seen::new();
    let tx = started.tx.clone();
    let worker = Worker::builder(js, "reports")
        .handle("render", move |cancel: Cancellation| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                // Runs until cancelled (or the test's deadline).
                let _ = tokio::time::timeout(DEADLINE, cancel.cancelled()).await;
                Err::<(), _>(HandlerError::msg("stopped"))
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let receipt = client.dispatch(Task::new("render", "x").tracked(), "reports").await.unwrap();
    started.take(1, DEADLINE).await;
    let sequence = receipt.sequence.unwrap();
    let outcome =
        admin.delete("reports", AdminState::InFlight, &Selection::One(sequence)).await.unwrap();
    assert_eq!(outcome.done, 1, "{outcome:?}");
    let err = client.wait::<()>(&receipt.id, DEADLINE).await.unwrap_err();
    assert_eq!(err.kind(), TrackErrorKind::Cancelled, "{err}");
    running.stop().await.unwrap();
}
