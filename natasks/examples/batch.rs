//! Atomic batch dispatch: an order's three tasks, across two queues and one delayed, stored
//! together; then a batch with an invalid task, refused whole before anything is published.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`), nats-server 2.12 or
//! newer: `cargo run -p natasks --example batch`.

use std::time::Duration;

use natasks::{Batch, Client, Task};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;

    let mut batch = Batch::new();
    batch.add(Task::new("orders.charge", "order-42"), "example-batch-payments");
    batch.add(Task::new("emails.receipt", "order-42"), "example-batch-emails");
    batch.add_in(
        Task::new("emails.survey", "order-42"),
        "example-batch-emails",
        Duration::from_secs(3600),
    );
    for receipt in client.dispatch_batch(batch).await? {
        println!("stored task {} at stream sequence {:?}", receipt.id, receipt.sequence);
    }

    let mut bad = Batch::new();
    bad.add(Task::new("orders.charge", "order-43"), "example-batch-payments");
    bad.add(Task::new("not a valid name", "order-43"), "example-batch-emails");
    match client.dispatch_batch(bad).await {
        Err(err) => println!("refused whole ({:?}): {err}", err.kind()),
        Ok(_) => return Err("an invalid batch was stored".into()),
    }
    Ok(())
}
