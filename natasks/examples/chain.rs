//! A chain workflow: download, resize, publish, each step taking the previous step's
//! result; then a second chain whose middle step fails, stopping it there.
//!
//! Needs nats-server 2.12 or newer (atomic batches). Run with a server at `NATS_URL`
//! (default `nats://127.0.0.1:4222`): `cargo run -p natasks --example chain`. Then
//! `natasks workflow status <id>` shows the steps of either workflow.

use std::time::Duration;

use natasks::workflow::{Chain, WorkflowState};
use natasks::{no_retry, Client, HandlerError, Json, Task, Worker};
use serde::{Deserialize, Serialize};

const QUEUE: &str = "example-chain";
const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize, Deserialize)]
struct Image {
    url: String,
    bytes: u64,
}

async fn download(Json(url): Json<String>) -> Result<Image, HandlerError> {
    println!("  [download] {url}");
    Ok(Image { bytes: 40_000 + url.len() as u64, url })
}

async fn resize(Json(image): Json<Image>) -> Result<Image, HandlerError> {
    println!("  [resize] {} ({} bytes)", image.url, image.bytes);
    if image.url.ends_with(".gif") {
        return Err(no_retry("animated images cannot be resized"));
    }
    Ok(Image { bytes: image.bytes / 4, ..image })
}

async fn publish(Json(image): Json<Image>) -> Result<String, HandlerError> {
    println!("  [publish] {} ({} bytes)", image.url, image.bytes);
    Ok(format!("https://cdn.example.com/{}", image.url.rsplit('/').next().unwrap_or("")))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    println!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    let worker = Worker::builder(js, QUEUE)
        .handle("download", download)
        .handle("resize", resize)
        .handle("publish", publish)
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });

    for image in ["https://example.com/cat.png", "https://example.com/dance.gif"] {
        let chain = Chain::new("thumbnail")
            .then(Task::json("download", &image)?, QUEUE)
            // Empty payloads: each step takes the previous step's result.
            .then(Task::new("resize", ""), QUEUE)
            .then(Task::new("publish", ""), QUEUE);
        let receipt = client.dispatch_workflow(chain).await?;
        println!("workflow {} for {image}", receipt.id);
        let status = tokio::time::timeout(TIMEOUT, async {
            loop {
                let status = client.workflow_status(&receipt.id).await?;
                if status.state != WorkflowState::Running {
                    return Ok::<_, natasks::workflow::WorkflowError>(status);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await??;
        match &status.state {
            WorkflowState::Succeeded => {
                let link: String = client.result(receipt.steps.last().unwrap()).await?;
                println!("  -> succeeded: {link}");
            }
            WorkflowState::Failed { step, error, .. } => {
                println!("  -> failed at step {step}: {}", error.as_deref().unwrap_or("?"));
            }
            other => println!("  -> {other:?}"),
        }
        for step in &status.steps {
            println!("     step {} {:<9} {}", step.index, step.task, step.state.as_str());
        }
    }
    shutdown.shutdown();
    running.await??;
    Ok(())
}
