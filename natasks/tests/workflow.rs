//! Workflows against a real server: chains pass results along and stop at a failing
//! step, a group's callback runs once with every member's outcome, dispatch is all or
//! nothing, and bad workflows are refused with nothing published.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use futures_util::StreamExt as _;
use natasks::workflow::{
    Chain, Group, GroupResults, StepState, WorkflowErrorKind, WorkflowKind, WorkflowState,
    WorkflowStatus, MAX_STEPS,
};
use natasks::{no_retry, Attempt, Client, HandlerError, Json, Task, TaskState, Worker};

const QUEUE: &str = "wf";

async fn client(js: &jetstream::Context) -> Client {
    Client::new(js.clone()).await.expect("client")
}

/// Waits until the workflow is no longer running, and returns its status.
async fn settled(client: &Client, id: &str) -> WorkflowStatus {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = client.workflow_status(id).await.expect("workflow status");
        if status.state != WorkflowState::Running {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workflow {id} still running after {DEADLINE:?}: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker with the chain and group handlers; `runs` counts callback runs.
async fn worker(
    js: &jetstream::Context,
    callback_runs: Arc<AtomicU64>,
    fail_first: u64,
) -> Running {
    let add = |Json(numbers): Json<Vec<u64>>| async move {
        Ok::<_, HandlerError>(numbers.iter().sum::<u64>())
    };
    let double = |Json(n): Json<u64>| async move { Ok::<_, HandlerError>(n * 2) };
    let show = |Json(n): Json<u64>| async move { Ok::<_, HandlerError>(format!("total {n}")) };
    let refuse = |Json(_): Json<u64>| async move {
        Err::<u64, _>(no_retry("refused: the number is unlucky"))
    };
    let member = |Json(n): Json<u64>| async move {
        if n % 5 == 0 {
            return Err(no_retry(format!("{n} is a multiple of five")));
        }
        Ok::<_, HandlerError>(n * n)
    };
    let collect = move |Json(results): Json<GroupResults>, Attempt(attempt): Attempt| {
        let runs = callback_runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            if attempt <= fail_first {
                return Err(HandlerError::msg("callback fails on its early attempts"));
            }
            let sum: u64 = results
                .members
                .iter()
                .filter_map(|m| m.result.as_ref().and_then(|r| r.as_u64()))
                .sum();
            Ok::<_, HandlerError>((results.members.len(), sum))
        }
    };
    let worker = Worker::builder(js.clone(), QUEUE)
        .concurrency(16)
        .max_retries(5)
        .retry_backoff([Duration::from_millis(50)])
        .handle("add", add)
        .handle("double", double)
        .handle("show", show)
        .handle("refuse", refuse)
        .handle("member", member)
        .handle("collect", collect)
        .build()
        .await
        .expect("worker");
    spawn(worker)
}

#[tokio::test]
async fn chain_passes_each_result_to_the_next_step() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = client(&js).await;
    let running = worker(&js, Arc::default(), 0).await;

    let chain = Chain::new("sum-double-show")
        .then(Task::json("add", &[1u64, 2, 3]).unwrap(), QUEUE)
        .then(Task::new("double", ""), QUEUE)
        .then(Task::new("show", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.expect("dispatch");
    assert_eq!(receipt.steps.len(), 3);
    let last: String = client.wait(&receipt.steps[2], DEADLINE).await.expect("last step");
    assert_eq!(last, "total 12");
    assert_eq!(client.result::<u64>(&receipt.steps[0]).await.unwrap(), 6);

    let status = settled(&client, &receipt.id).await;
    assert_eq!(status.state, WorkflowState::Succeeded);
    assert_eq!(status.kind, WorkflowKind::Chain);
    assert_eq!(status.name, "sum-double-show");
    let states: Vec<&str> = status.steps.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, ["succeeded"; 3]);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_step_stops_the_chain_and_its_status_says_where_and_why() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = client(&js).await;
    let running = worker(&js, Arc::default(), 0).await;

    let chain = Chain::new("stops")
        .then(Task::json("add", &[4u64, 9]).unwrap(), QUEUE)
        .then(Task::new("refuse", ""), QUEUE)
        .then(Task::new("show", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.expect("dispatch");
    let status = settled(&client, &receipt.id).await;
    match &status.state {
        WorkflowState::Failed { step, state, error } => {
            assert_eq!(*step, 1);
            assert_eq!(state, "failed");
            assert!(error.as_deref().unwrap_or("").contains("unlucky"), "{error:?}");
        }
        other => panic!("expected failed at step 1, got {other:?}"),
    }
    assert_eq!(status.steps[0].state, StepState::Task(TaskState::Succeeded));
    assert_eq!(status.steps[2].state, StepState::Waiting, "the step after never dispatched");
    // Nothing is left in the queue that could run it later.
    running.stop().await.unwrap();
    assert_eq!(stored(&js, &format!("natasks.{QUEUE}")).await, 0);
}

#[tokio::test]
async fn a_group_callback_runs_once_with_every_outcome_through_its_own_retries() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = client(&js).await;
    let runs = Arc::new(AtomicU64::new(0));
    // The callback fails its first two attempts.
    let running = worker(&js, runs.clone(), 2).await;

    let mut group = Group::new("squares");
    for n in 1..=20u64 {
        group = group.add(Task::json("member", &n).unwrap(), QUEUE);
    }
    let receipt =
        client.dispatch_workflow(group.then(Task::new("collect", ""), QUEUE)).await.unwrap();
    assert_eq!(receipt.steps.len(), 21);
    let callback = receipt.steps.last().unwrap();
    let (count, sum): (usize, u64) = client.wait(callback, DEADLINE).await.expect("callback");
    assert_eq!(count, 20);
    let expected: u64 = (1..=20u64).filter(|n| n % 5 != 0).map(|n| n * n).sum();
    assert_eq!(sum, expected);
    assert_eq!(runs.load(Ordering::SeqCst), 3, "two failed attempts and one success");

    let status = settled(&client, &receipt.id).await;
    assert_eq!(status.state, WorkflowState::Succeeded);
    let failed = status.steps.iter().filter(|s| s.state.as_str() == "failed").count();
    assert_eq!(failed, 4, "the multiples of five");
    running.stop().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_member_delivered_again_long_after_does_not_run_the_callback_again() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    // A short duplicate window: the copy below comes after it, so only the marker can
    // keep the callback from being dispatched again.
    let window = Duration::from_secs(1);
    let client = Client::builder(js.clone()).duplicate_window(window).build().await.unwrap();
    let mut group = Group::new("dup");
    for n in [1u64, 2, 3] {
        group = group.add(Task::json("member", &n).unwrap(), QUEUE);
    }
    let receipt =
        client.dispatch_workflow(group.then(Task::new("collect", ""), QUEUE)).await.unwrap();
    let subject = format!("natasks.{QUEUE}");
    // The first member as stored, to deliver it again later.
    let original = first_on(&js, &subject).await;

    let runs = Arc::new(AtomicU64::new(0));
    let running = worker(&js, runs.clone(), 0).await;
    let callback = receipt.steps.last().unwrap();
    let (count, _): (usize, u64) = client.wait(callback, DEADLINE).await.expect("callback");
    assert_eq!(count, 3);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    eventually(DEADLINE, "the queue drained", || async { stored(&js, &subject).await == 0 }).await;

    // The same step again, past the duplicate window (a redelivery after a crash would
    // look the same to the worker).
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in original.headers.iter() {
        if !name.to_string().starts_with("Nats-") {
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    js.publish_with_headers(subject.clone(), headers, original.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    // A second callback would be stored before the copy is acknowledged, so the queue
    // empties only after it ran too.
    eventually(DEADLINE, "the copy ran", || async { stored(&js, &subject).await == 0 }).await;
    running.stop().await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the callback ran again");
    let status = client.workflow_status(&receipt.id).await.unwrap();
    assert_eq!(status.state, WorkflowState::Succeeded);
}

#[tokio::test]
async fn events_of_the_steps_carry_the_workflow_id() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = client(&js).await;
    let mut events = client.events(Some(QUEUE)).await.unwrap();
    let running = worker(&js, Arc::default(), 0).await;
    let chain = Chain::new("evented")
        .then(Task::json("add", &[1u64]).unwrap(), QUEUE)
        .then(Task::new("show", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    let mut succeeded = Vec::new();
    while succeeded.len() < 2 {
        let event = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("events in time")
            .expect("event stream open");
        assert_eq!(event.workflow.as_deref(), Some(receipt.id.as_str()), "{event:?}");
        if event.kind == natasks::EventKind::Succeeded {
            succeeded.push(event.id);
        }
    }
    assert_eq!(succeeded, receipt.steps);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_workflow_with_one_invalid_task_publishes_nothing() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = client(&js).await;
    let mut group = Group::new("bad-member");
    for n in 0..10u64 {
        group = group.add(Task::json("member", &n).unwrap(), QUEUE);
    }
    let group = group.add(Task::new("no spaces allowed", "1"), QUEUE);
    let err = client.dispatch_workflow(group).await.unwrap_err();
    assert_eq!(err.kind(), WorkflowErrorKind::InvalidTask);
    assert!(err.to_string().contains("m10"), "{err}");

    let chain = Chain::new("bad-later-step")
        .then(Task::json("add", &[1u64]).unwrap(), QUEUE)
        .then(Task::new("show", "").with_header("Bad:Name", "x"), QUEUE);
    let err = client.dispatch_workflow(chain).await.unwrap_err();
    assert_eq!(err.kind(), WorkflowErrorKind::InvalidTask);
    assert_eq!(stream_messages(&js).await, 0);
}

#[tokio::test]
async fn bad_workflows_are_refused_with_nothing_published() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = client(&js).await;
    let one = || Task::json("member", &1u64).unwrap();

    let cases: Vec<(&str, natasks::workflow::Workflow)> = vec![
        ("empty group", Group::new("empty").then(Task::new("collect", ""), QUEUE).into()),
        ("empty chain", Chain::new("empty").into()),
        ("too many members", {
            let mut group = Group::new("huge");
            for _ in 0..MAX_STEPS {
                group = group.add(one(), QUEUE);
            }
            group.then(Task::new("collect", ""), QUEUE).into()
        }),
        (
            "a later step with a payload",
            Chain::new("payload").then(one(), QUEUE).then(one(), QUEUE).into(),
        ),
        ("a callback with a payload", Group::new("cb").add(one(), QUEUE).then(one(), QUEUE).into()),
        (
            "two steps with one id",
            Group::new("ids")
                .add(one().with_message_id("same"), QUEUE)
                .add(one().with_message_id("same"), QUEUE)
                .into(),
        ),
    ];
    for (what, workflow) in cases {
        let err = client.dispatch_workflow(workflow).await.unwrap_err();
        assert_eq!(err.kind(), WorkflowErrorKind::InvalidWorkflow, "{what}: {err}");
    }
    assert_eq!(stream_messages(&js).await, 0);

    let err = client.workflow_status("no-such-workflow").await.unwrap_err();
    assert_eq!(err.kind(), WorkflowErrorKind::Unknown);
    let err = client.workflow_status("").await.unwrap_err();
    assert_eq!(err.kind(), WorkflowErrorKind::InvalidId);
}

#[tokio::test]
async fn a_server_without_atomic_batches_gets_an_error_naming_its_version() {
    let binary =
        old_server_binary().expect("nats-server 2.11 is installed by scripts/install-nats-server");
    let server = NatsServer::builder().binary(binary).start().await;
    let js = server.jetstream().await;
    let client = client(&js).await;
    let chain = Chain::new("old").then(Task::json("add", &[1u64]).unwrap(), QUEUE);
    let err = client.dispatch_workflow(chain).await.unwrap_err();
    assert_eq!(err.kind(), WorkflowErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("2.11"), "{err}");
    assert_eq!(stream_messages(&js).await, 0);
}
