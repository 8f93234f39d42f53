//! Queue control: one worker serving three queues by weight, a queue paused and resumed,
//! a queue-wide limit and a rate limit, all kept on the broker (`natasks::admin`).
//!
//! Needs nats-server 2.12 or newer (consumer pause, counters for the rate). Run with a
//! server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --example queues`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natasks::admin::{Admin, Rate};
use natasks::{Client, Delivery, HandlerError, Task, Worker};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    let admin = Admin::new(js.clone());
    let started: Arc<Mutex<Vec<String>>> = Arc::default();

    // One worker, one handler set, one concurrency budget, three queues by weight.
    let seen = started.clone();
    let worker = Worker::builder(js.clone(), "example-critical")
        .weight(6)
        .queue("example-default", 3)
        .queue("example-low", 1)
        .concurrency(4)
        .handle("example.job", move |task: Task| {
            let queue = task.delivery().map(|d: &Delivery| d.queue.to_string()).unwrap_or_default();
            seen.lock().unwrap().push(queue);
            async { Ok::<(), HandlerError>(()) }
        })
        .build()
        .await?;

    // Pause the low queue before anything runs: the server delivers none of its tasks.
    admin.pause("example-low", None).await?;
    for queue in ["example-critical", "example-default", "example-low"] {
        for i in 0..100 {
            client.dispatch(Task::new("example.job", format!("{i}")), queue).await?;
        }
    }
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(async move { worker.run().await });
    wait_for(&started, 200).await?;
    println!("while example-low is paused: {:?}", shares(&started));

    // Resume it, with at most 2 of its tasks in flight across every worker and at most
    // 50 starts a second.
    admin.set_limit("example-low", Some(2)).await?;
    admin.set_rate("example-low", None, Some(Rate::per_second(50)?)).await?;
    let resumed = Instant::now();
    admin.resume("example-low").await?;
    wait_for(&started, 300).await?;
    println!(
        "after resuming: {:?}; example-low's 100 tasks took {:.1?} at 50/s",
        shares(&started),
        resumed.elapsed()
    );
    for queue in admin.queues().await? {
        if queue.name.starts_with("example-") {
            println!(
                "{}: pending {}, limit {:?} (set by an operator: {}), rates {:?}",
                queue.name,
                queue.pending,
                queue.limit,
                queue.limit_set,
                queue.rates.iter().map(|r| r.rate.to_string()).collect::<Vec<_>>()
            );
        }
    }
    // Leave the queue as it was.
    admin.set_limit("example-low", None).await?;
    admin.set_rate("example-low", None, None).await?;
    stop.shutdown();
    run.await??;
    Ok(())
}

async fn wait_for(
    started: &Mutex<Vec<String>>,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + TIMEOUT;
    while started.lock().unwrap().len() < n {
        if Instant::now() > deadline {
            return Err(format!("fewer than {n} tasks ran within {TIMEOUT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn shares(started: &Mutex<Vec<String>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for queue in started.lock().unwrap().iter() {
        *counts.entry(queue.clone()).or_default() += 1;
    }
    counts
}
