//! Unique tasks: one task per key and queue while it is pending, scheduled or running.
//! Dispatches a unique task three ways (accepted, refused naming the holder, coalesced into
//! the holder's receipt), runs it, and dispatches the key again once it is released.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`), nats-server 2.12 or
//! newer: `cargo run -p natasks --example unique`.

use std::time::Duration;

use natasks::{Client, DispatchErrorKind, HandlerError, Task, Worker};
use tokio::sync::mpsc;

const QUEUE: &str = "example-unique";
const TIMEOUT: Duration = Duration::from_secs(15);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    // A key of this run: the key of an interrupted earlier run may still be held.
    let key = format!("invoice-42@example.com/{}", nuid::next());
    let ttl = Duration::from_secs(3600);

    let first = client.dispatch(Task::new("invoice.render", "v1").unique(&key, ttl), QUEUE).await?;
    println!("dispatched: task {} holds key {key:?}", first.id);

    match client.dispatch(Task::new("invoice.render", "v2").unique(&key, ttl), QUEUE).await {
        Err(err) if err.kind() == DispatchErrorKind::Duplicate => {
            println!("refused: {err} (existing id {:?})", err.existing_id().unwrap_or_default())
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    let task = Task::new("invoice.render", "v3").unique(&key, ttl).return_existing();
    let existing = client.dispatch(task, QUEUE).await?;
    println!("coalesced: receipt of task {} (duplicate: {})", existing.id, existing.duplicate);

    let (ran_tx, mut ran_rx) = mpsc::unbounded_channel();
    let worker = Worker::builder(js, QUEUE)
        .handle("invoice.render", move |task: Task| {
            let ran_tx = ran_tx.clone();
            async move {
                let payload = String::from_utf8_lossy(task.payload()).into_owned();
                println!("ran {payload} (unique key {:?})", task.unique_key().unwrap_or_default());
                let _ = ran_tx.send(payload);
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });

    tokio::time::timeout(TIMEOUT, ran_rx.recv()).await?;
    // The worker releases the key right after the task's ack; dispatch until it is free.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let again = loop {
        let task = Task::new("invoice.render", "v4").unique(&key, ttl);
        match client.dispatch(task, QUEUE).await {
            Ok(receipt) => break receipt,
            Err(err) if err.kind() == DispatchErrorKind::Duplicate => {
                if tokio::time::Instant::now() > deadline {
                    return Err("the key was never released".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => return Err(err.into()),
        }
    };
    println!("released: the key is taken again by task {}", again.id);
    tokio::time::timeout(TIMEOUT, ran_rx.recv()).await?;
    shutdown.shutdown();
    running.await??;
    Ok(())
}
