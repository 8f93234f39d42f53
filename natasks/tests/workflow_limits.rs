//! Workflows at the edges: records and messages near the server's max_payload, cancelled
//! steps, plans that outlive retention, steps delivered again after their end was recorded.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use natasks::workflow::{Chain, Group, GroupResults, WorkflowState};
use natasks::{no_retry, Client, HandlerError, Json, Task, Worker};

const QUEUE: &str = "wfl";

async fn small_server() -> NatsServer {
    NatsServer::builder().config_file("max_payload: 65536\n").start().await
}

/// A member whose result nearly fills a message and one whose error is larger than any
/// record keeps: the group's record still takes both ends and the callback runs.
#[tokio::test]
async fn a_group_record_near_max_payload_still_takes_every_end() {
    let server = small_server().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let big = |Json(n): Json<usize>| async move { Ok::<_, HandlerError>("r".repeat(n)) };
    let fail = |Json(n): Json<usize>| async move { Err::<(), _>(no_retry("e".repeat(n))) };
    let seen = Arc::new(AtomicU64::new(0));
    let runs = seen.clone();
    let collect = move |Json(results): Json<GroupResults>| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let states: Vec<String> = results.members.iter().map(|m| m.state.clone()).collect();
            let omitted: Vec<bool> = results.members.iter().map(|m| m.result_omitted).collect();
            let error = results.members[1].error.clone().unwrap_or_default();
            Ok::<_, HandlerError>((states, omitted, error.len()))
        }
    };
    let worker = Worker::builder(js.clone(), QUEUE)
        .handle("big", big)
        .handle("fail", fail)
        .handle("collect", collect)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let group = Group::new("near-full")
        .add(Task::json("big", &60_000usize).unwrap(), QUEUE)
        .add(Task::json("fail", &10_000usize).unwrap(), QUEUE)
        .then(Task::new("collect", ""), QUEUE);
    let receipt = client.dispatch_workflow(group).await.unwrap();
    let callback = receipt.steps.last().unwrap();
    let (states, omitted, error_len): (Vec<String>, Vec<bool>, usize) =
        client.wait(callback, Duration::from_secs(10)).await.expect("the callback ran");
    assert_eq!(states, ["succeeded", "failed"]);
    assert_eq!(omitted, [true, false], "the large result is read from the member's record");
    assert!(error_len <= 4100, "the error is clipped as in the member's record: {error_len}");
    let result: String = client.result(&receipt.steps[0]).await.unwrap();
    assert_eq!(result.len(), 60_000);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    running.stop().await.unwrap();
}

/// A member cancelled while it waits in its queue still counts as ended: the callback
/// runs once, with the member cancelled.
#[tokio::test]
async fn a_cancelled_member_still_lets_the_callback_run() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let group = Group::new("cancel-one")
        .add(Task::json("square", &2u64).unwrap(), QUEUE)
        .add(Task::json("square", &3u64).unwrap(), QUEUE)
        .then(Task::new("collect", ""), QUEUE);
    let receipt = client.dispatch_workflow(group).await.unwrap();
    let cancelled = client.cancel(&receipt.steps[0]).await.unwrap();
    assert!(matches!(cancelled, natasks::CancelOutcome::Cancelled { .. }), "{cancelled:?}");

    let square = |Json(n): Json<u64>| async move { Ok::<_, HandlerError>(n * n) };
    let collect = |Json(results): Json<GroupResults>| async move {
        let states: Vec<String> = results.members.iter().map(|m| m.state.clone()).collect();
        Ok::<_, HandlerError>(states)
    };
    let worker = Worker::builder(js.clone(), QUEUE)
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

/// A chain whose waiting step is cancelled stops there, and its status says so.
#[tokio::test]
async fn a_cancelled_chain_step_stops_the_chain_as_cancelled() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let chain = Chain::new("cancel-first")
        .then(Task::json("square", &2u64).unwrap(), QUEUE)
        .then(Task::new("square", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    client.cancel(&receipt.steps[0]).await.unwrap();
    let status = client.workflow_status(&receipt.id).await.unwrap();
    match status.state {
        WorkflowState::Failed { step: 0, state, .. } => assert_eq!(state, "cancelled"),
        other => panic!("the chain is not shown cancelled at step 0: {other:?}"),
    }
}

/// Takes the markers' subjects out of the task stream (`Some`: puts these back): what
/// follows a step (guarded by a marker) cannot be stored meanwhile, as if the broker
/// refused it.
async fn markers(js: &async_nats::jetstream::Context, back: Option<String>) -> Option<String> {
    let mut stream = js.get_stream("NATASKS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    let taken = match back {
        Some(subject) => {
            config.subjects.push(subject);
            None
        }
        None => Some(config.subjects.pop().expect("the markers' subjects")),
    };
    js.update_stream(config).await.unwrap();
    taken
}

/// A step whose end is recorded but whose follower could not be dispatched comes back;
/// it is not run again (a second run could end otherwise), what follows is dispatched.
#[tokio::test]
async fn a_step_delivered_again_after_its_end_is_recorded_is_not_run_again() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let mut shrunk = Seen::new();
    let first = {
        let (runs, js, shrunk) = (runs.clone(), js.clone(), shrunk.tx.clone());
        move |Json(n): Json<u64>| {
            let (runs, js, shrunk) = (runs.clone(), js.clone(), shrunk.clone());
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) > 0 {
                    return Err(no_retry("a second run ends otherwise"));
                }
                shrunk.send(markers(&js, None).await.unwrap()).unwrap();
                Ok::<_, HandlerError>(n + 1)
            }
        }
    };
    let second = |Json(n): Json<u64>| async move { Ok::<_, HandlerError>(n * 10) };
    let worker = Worker::builder(js.clone(), QUEUE)
        .handle("first", first)
        .handle("second", second)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let mut acks = js.client().subscribe("$JS.ACK.>").await.unwrap();
    let chain = Chain::new("again")
        .then(Task::json("first", &1u64).unwrap(), QUEUE)
        .then(Task::new("second", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    let taken = shrunk.recv().await;
    assert!(taken.contains(".>"), "{taken}");
    // Every try of the first delivery fails: it hands the step back to come again.
    let handed_back = tokio::time::timeout(DEADLINE, async {
        while let Some(ack) = futures_util::StreamExt::next(&mut acks).await {
            if ack.payload.starts_with(b"-NAK") {
                return;
            }
        }
    });
    handed_back.await.expect("the first delivery was not handed back");
    markers(&js, Some(taken)).await;
    let last: u64 = client.wait(&receipt.steps[1], DEADLINE).await.expect("the next step ran");
    assert_eq!(last, 20);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the first step ran again");
    let status = client.workflow_status(&receipt.id).await.unwrap();
    assert_eq!(status.state, WorkflowState::Succeeded);
    running.stop().await.unwrap();
}

/// A chain that runs longer than its retention keeps its plan while it runs: each step
/// finds it and dispatches the next.
#[tokio::test]
async fn a_chain_running_longer_than_its_retention_completes() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let slow = |Json(n): Json<u64>| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok::<_, HandlerError>(n + 1)
    };
    let worker = Worker::builder(js.clone(), QUEUE).handle("slow", slow).build().await.unwrap();
    let running = spawn(worker);
    let retention = Duration::from_secs(2);
    let chain = Chain::new("long")
        .then(Task::json("slow", &0u64).unwrap().tracked_for(retention), QUEUE)
        .then(Task::new("slow", "").tracked_for(retention), QUEUE)
        .then(Task::new("slow", "").tracked_for(retention), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    let last: u64 = client.wait(&receipt.steps[2], DEADLINE).await.expect("the last step ran");
    assert_eq!(last, 3);
    running.stop().await.unwrap();
}

/// A step running longer than its workflow's retention keeps the plan alive through its
/// lease renewals, so the next step is still dispatched; but it keeps the plan only once
/// a third of the retention has passed, and does not read it at every renewal.
#[tokio::test]
async fn a_step_outliving_its_retention_keeps_the_plan_without_reading_it_at_every_renewal() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let slow = |Json(n): Json<u64>| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok::<_, HandlerError>(n + 1)
    };
    let quick = |Json(n): Json<u64>| async move { Ok::<_, HandlerError>(n * 10) };
    let worker = Worker::builder(js.clone(), QUEUE)
        .ack_wait(Duration::from_secs(1))
        .progress_interval(Duration::from_millis(100))
        .handle("slow", slow)
        .handle("quick", quick)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    // Every JetStream API request naming a workflow's plan (`wf.<id>`) is a read of it.
    let mut requests = js.client().subscribe("$JS.API.>").await.unwrap();
    let retention = Duration::from_secs(2);
    let chain = Chain::new("renewed")
        .then(Task::json("slow", &0u64).unwrap().tracked_for(retention), QUEUE)
        .then(Task::new("quick", "").tracked_for(retention), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    let last: u64 = client.wait(&receipt.steps[1], DEADLINE).await.expect("the next step ran");
    assert_eq!(last, 10);
    running.stop().await.unwrap();
    let mut reads = 0;
    while let Ok(Some(request)) =
        tokio::time::timeout(Duration::ZERO, futures_util::StreamExt::next(&mut requests)).await
    {
        let names_plan = |text: &[u8]| text.windows(3).any(|w| w == b"wf.");
        if names_plan(request.subject.as_bytes()) || names_plan(&request.payload) {
            reads += 1;
        }
    }
    // 30 renewals of the first step: one read as it starts and one per third of the
    // retention (about 5), and a few as the steps end and start.
    println!("plan reads during a 3 s step renewed every 100 ms: {reads}");
    assert!(reads <= 12, "the plan was read {reads} times");
}

/// A step's task dispatched again by its handler is a plain task, not a second copy of
/// the step; a task claiming a step it is not (a forged or overflowing step number) ends
/// like any task and dispatches nothing.
#[tokio::test]
async fn only_the_planned_tasks_are_steps() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let calls = Arc::new(AtomicU64::new(0));
    let again = {
        let (client, seen) = (client.clone(), seen.tx.clone());
        move |task: Task| {
            let (client, seen, calls) = (client.clone(), seen.clone(), calls.clone());
            async move {
                let workflow = task.header("Natasks-Workflow").map(str::to_owned);
                let copy = calls.fetch_add(1, Ordering::SeqCst) > 0;
                seen.send((copy, workflow)).unwrap();
                if !copy {
                    client.dispatch(task, QUEUE).await.map_err(HandlerError::msg)?;
                }
                Ok::<_, HandlerError>(())
            }
        }
    };
    let plain = |_: Task| async move { Ok::<_, HandlerError>(()) };
    let worker = Worker::builder(js.clone(), QUEUE)
        .handle("again", again)
        .handle("plain", plain)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let chain = Chain::new("copied")
        .then(Task::new("again", "0"), QUEUE)
        .then(Task::new("plain", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    let (first, copy) = (seen.recv().await, seen.recv().await);
    assert_eq!(first, (false, Some(receipt.id.clone())));
    assert_eq!(copy, (true, None), "the copy still claims to be a step");
    client.wait::<()>(&receipt.steps[1], DEADLINE).await.unwrap();

    for step in ["18446744073709551615", "0", "m0"] {
        let forged = Task::new("plain", "")
            .with_header("Natasks-Workflow", receipt.id.as_str())
            .with_header("Natasks-Workflow-Step", step)
            .tracked();
        let receipt = client.dispatch(forged, QUEUE).await.unwrap();
        let id = receipt.id.clone();
        client.wait::<()>(&id, DEADLINE).await.expect("a forged step ends like any task");
    }
    let subject = format!("natasks.{QUEUE}");
    eventually(DEADLINE, "every forged step acknowledged", || async {
        stored(&js, &subject).await == 0
    })
    .await;
    running.stop().await.unwrap();
}

/// A chain step whose next message cannot fit the server's max_payload (its headers and
/// the result it carries) ends the chain as failed at that next step, saying why, instead
/// of handing the step back forever; and it leaves no batch open on the stream, so other
/// atomic publishes (a unique task) still work.
#[tokio::test]
async fn a_next_step_over_max_payload_fails_the_chain_visibly() {
    let server = NatsServer::builder().config_file("max_payload: 8192\n").start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let big = |Json(n): Json<usize>| async move { Ok::<_, HandlerError>("r".repeat(n)) };
    let plain = |_: Task| async move { Ok::<_, HandlerError>(()) };
    let worker = Worker::builder(js.clone(), QUEUE)
        .handle("big", big)
        .handle("plain", plain)
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let chain = Chain::new("too-big")
            .then(Task::json("big", &5_000usize).unwrap(), QUEUE)
            .then(Task::new("plain", "").with_header("X-Large", "h".repeat(4_000)), QUEUE);
        ids.push(client.dispatch_workflow(chain).await.unwrap().id);
    }
    for id in &ids {
        let status = settled(&client, id, Duration::from_secs(10)).await;
        match status.state {
            WorkflowState::Failed { step: 1, error: Some(error), .. } => {
                assert!(error.contains("max_payload"), "{error}")
            }
            other => panic!("not failed at step 1 with why: {other:?}"),
        }
    }
    let unique = Task::new("plain", "").unique("only-one", Duration::from_secs(60));
    tokio::time::timeout(Duration::from_secs(5), client.dispatch(unique, QUEUE))
        .await
        .expect("a unique dispatch in time")
        .expect("a unique dispatch");
    running.stop().await.unwrap();
}

/// Waits until the workflow is no longer running, and returns its status.
async fn settled(client: &Client, id: &str, limit: Duration) -> natasks::workflow::WorkflowStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = client.workflow_status(id).await.expect("workflow status");
        if status.state != WorkflowState::Running {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workflow {id} still running after {limit:?}: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events name the workflow when a step is cancelled, and a workflow whose first tasks
/// are refused announces their failure after their dispatch.
#[tokio::test]
async fn events_follow_cancelled_and_refused_steps() {
    let server = NatsServer::builder().config_file("max_payload: 8192\n").start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut events = client.events(Some(QUEUE)).await.unwrap();

    let chain = Chain::new("cancelled").then(Task::new("plain", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    assert_eq!(next(&mut events).await.kind, natasks::EventKind::Dispatched);
    client.cancel(&receipt.steps[0]).await.unwrap();
    let cancelled = next(&mut events).await;
    assert_eq!(cancelled.kind, natasks::EventKind::Cancelled);
    assert_eq!(cancelled.workflow.as_deref(), Some(receipt.id.as_str()), "{cancelled:?}");

    let group = Group::new("refused")
        .add(Task::new("plain", ""), QUEUE)
        .add(Task::new("plain", "p".repeat(9_000)), QUEUE);
    let err = client.dispatch_workflow(group).await.unwrap_err();
    assert_eq!(err.kind(), natasks::workflow::WorkflowErrorKind::TooLarge, "{err}");
    let mut kinds = Vec::new();
    for _ in 0..4 {
        let event = next(&mut events).await;
        assert!(event.workflow.is_some(), "{event:?}");
        kinds.push(event.kind);
    }
    let failed = kinds.iter().filter(|k| **k == natasks::EventKind::Failed).count();
    assert_eq!(failed, 2, "{kinds:?}");
}

async fn next(events: &mut natasks::Events) -> natasks::Event {
    use futures_util::StreamExt as _;
    tokio::time::timeout(DEADLINE, events.next()).await.expect("an event").expect("open")
}
