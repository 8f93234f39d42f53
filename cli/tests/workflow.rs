//! `natasks workflow status`: the built binary against a real nats-server, on a chain
//! that a worker of the library in the test process runs and stops at its failing step.

use std::time::Duration;

use natasks::workflow::{Chain, WorkflowState};
use natasks::{no_retry, Client, HandlerError, Json, Task, Worker};
use natasks_test_support::NatsServer;

mod common;
use common::{natasks, DEADLINE};

#[tokio::test]
async fn workflow_status_shows_each_step_and_where_it_failed() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js, "cliwf")
        .handle("add", |Json(numbers): Json<Vec<u64>>| async move {
            Ok::<_, HandlerError>(numbers.iter().sum::<u64>())
        })
        .handle("refuse", |Json(_): Json<u64>| async move {
            Err::<(), _>(no_retry("seven is not welcome"))
        })
        .build()
        .await
        .unwrap();
    let handle = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });

    let chain = Chain::new("cli-chain")
        .then(Task::json("add", &[3u64, 4]).unwrap(), "cliwf")
        .then(Task::new("refuse", ""), "cliwf")
        .then(Task::new("add", ""), "cliwf");
    let receipt = client.dispatch_workflow(chain).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while client.workflow_status(&receipt.id).await.unwrap().state == WorkflowState::Running {
        assert!(tokio::time::Instant::now() < deadline, "the chain did not stop in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let json = natasks(&url, &["workflow", "status", &receipt.id, "--json"]).await.ok().json();
    assert_eq!(json["kind"], "chain", "{json}");
    assert_eq!(json["name"], "cli-chain");
    assert_eq!(json["state"], "failed");
    assert_eq!(json["failed"]["step"], 1);
    assert_eq!(json["failed"]["error"], "seven is not welcome");
    let states: Vec<&str> =
        json["steps"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded", "failed", "waiting"]);
    assert_eq!(json["steps"][0]["id"], receipt.steps[0].as_str());

    let human = natasks(&url, &["workflow", "status", &receipt.id]).await.ok().stdout;
    assert!(
        human.lines().next().unwrap().ends_with("failed at step 1 (failed: seven is not welcome)"),
        "{human}"
    );
    assert!(human.lines().any(|l| l.starts_with("STEP")), "{human}");
    assert!(human.lines().any(|l| l.starts_with("2 ") && l.contains("waiting")), "{human}");

    natasks(&url, &["workflow", "status", "no-such-workflow"])
        .await
        .failed("nothing is recorded for workflow \"no-such-workflow\"");
    natasks(&url, &["workflow", "status", ""]).await.failed("invalid workflow id");

    handle.shutdown();
    tokio::time::timeout(DEADLINE, running).await.unwrap().unwrap().unwrap();
}
