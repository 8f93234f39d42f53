//! A group workflow: ten members run in parallel (two fail, one succeeds only on its
//! second attempt), then the callback runs once with every member's outcome.
//!
//! Needs nats-server 2.12 or newer (atomic batches). Run with a server at `NATS_URL`
//! (default `nats://127.0.0.1:4222`): `cargo run -p natasks --example group`.

use std::time::Duration;

use natasks::workflow::{Group, GroupResults};
use natasks::{no_retry, Attempt, Client, HandlerError, Json, Task, Worker};

const QUEUE: &str = "example-group";
const TIMEOUT: Duration = Duration::from_secs(20);

async fn square(Json(n): Json<u64>, Attempt(attempt): Attempt) -> Result<u64, HandlerError> {
    if n == 4 && attempt == 1 {
        return Err(HandlerError::msg("4 fails its first attempt"));
    }
    if n % 7 == 0 || n == 9 {
        return Err(no_retry(format!("{n} is not welcome")));
    }
    Ok(n * n)
}

async fn summarize(Json(results): Json<GroupResults>) -> Result<u64, HandlerError> {
    println!("  [callback] {} members of {:?}:", results.members.len(), results.name);
    let mut total = 0;
    for member in &results.members {
        match (&member.result, &member.error) {
            (Some(result), _) => {
                total += result.as_u64().unwrap_or(0);
                println!("    #{:<2} {} = {result}", member.index, member.state);
            }
            (None, error) => println!(
                "    #{:<2} {}: {}",
                member.index,
                member.state,
                error.as_deref().unwrap_or("")
            ),
        }
    }
    println!("  [callback] total of the squares that succeeded: {total}");
    Ok(total)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    println!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    let worker = Worker::builder(js, QUEUE)
        .retry_backoff([Duration::from_millis(200)])
        .handle("square", square)
        .handle("summarize", summarize)
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });

    let mut group = Group::new("squares");
    for n in 1..=10u64 {
        group = group.add(Task::json("square", &n)?, QUEUE);
    }
    // The callback's payload is the members' outcomes: its own must be empty.
    let receipt = client.dispatch_workflow(group.then(Task::new("summarize", ""), QUEUE)).await?;
    println!(
        "workflow {} dispatched: {} members and a callback",
        receipt.id,
        receipt.steps.len() - 1
    );
    let total: u64 = client.wait(receipt.steps.last().unwrap(), TIMEOUT).await?;
    let status = client.workflow_status(&receipt.id).await?;
    println!("workflow {}: {} (callback returned {total})", receipt.id, status.state.as_str());
    shutdown.shutdown();
    running.await??;
    Ok(())
}
