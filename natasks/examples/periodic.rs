//! Periodic tasks fired by the server: declares a schedule every 2 seconds (as every
//! instance of a service would at start-up, twice here to show that the second changes
//! nothing), processes three ticks, printing the tick each belongs to, then removes the
//! schedule. Also declares and lists a nightly cron schedule in a time zone.
//!
//! Needs nats-server 2.14 or newer (recurring message schedules). Run with a server at
//! `NATS_URL` (default `nats://127.0.0.1:4222`): `cargo run -p natasks --example periodic`.

use std::time::{Duration, Instant};

use natasks::{Client, Every, HandlerError, Task, Worker};
use tokio::sync::{mpsc, oneshot};

const QUEUE: &str = "example-periodic";
const TICKS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(20);

async fn pulse(task: Task) -> Result<(), HandlerError> {
    if let Some(tick) = task.periodic() {
        // The tick identifies this run: a handler keys its side effects to it, so that a
        // redelivered task does not do them twice.
        println!("{} fired for the tick at {} (next at {})", tick.schedule, tick.at, tick.next);
    }
    if let Some(tx) = task.extensions().get::<mpsc::UnboundedSender<()>>() {
        let _ = tx.send(());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;

    // Every instance may declare its schedules at start-up: the same definition again
    // changes nothing, and each tick still dispatches one task.
    for _ in 0..2 {
        let task = Task::new("example.pulse", "{}");
        let declared = client
            .schedule("example-pulse", Every::interval(Duration::from_secs(2)), task, QUEUE)
            .await?;
        println!("declared example-pulse: {declared:?}");
    }
    let nightly = Every::cron("0 30 2 * * *")?.time_zone("Europe/Berlin");
    client.schedule("example-nightly", nightly, Task::new("example.nightly", "{}"), QUEUE).await?;
    for scheduled in client.schedules().await? {
        let next = scheduled.next.map_or("unknown to natasks".to_owned(), |n| n.to_string());
        println!(
            "schedule {}: {} to {} (next: {next})",
            scheduled.id, scheduled.every, scheduled.queue
        );
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let worker = Worker::builder(js, QUEUE)
        .middleware(move |mut task: Task, next: natasks::Next| {
            task.extensions_mut().insert(tx.clone());
            next.run(task)
        })
        .handle("example.pulse", pulse)
        .handle("example.nightly", pulse)
        .build()
        .await?;
    let start = Instant::now();
    let (done_tx, done_rx) = oneshot::channel();
    let (result, seen) = tokio::join!(
        worker.run_until(async {
            let _ = done_rx.await;
        }),
        async {
            let mut seen = 0;
            let _ = tokio::time::timeout(TIMEOUT, async {
                while seen < TICKS && rx.recv().await.is_some() {
                    seen += 1;
                }
            })
            .await;
            let _ = done_tx.send(());
            seen
        }
    );
    result?;
    client.unschedule("example-pulse").await?;
    client.unschedule("example-nightly").await?;
    if seen < TICKS {
        return Err(format!("only {seen} of {TICKS} ticks arrived within {TIMEOUT:?}").into());
    }
    println!("processed {TICKS} ticks in {:.1?}; schedules removed", start.elapsed());
    Ok(())
}
