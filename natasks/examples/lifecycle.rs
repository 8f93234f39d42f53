//! Task lifecycle: a handler that reports progress, listens for cancellation and returns a
//! typed result; tracked tasks dispatched, one result awaited, the events watched, and a
//! running task cancelled.
//!
//! Needs nats-server 2.11 or newer (records expire through per-message TTLs). Run with a
//! server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --example lifecycle`. While it runs, `natasks events
//! example-lifecycle` in another terminal shows the same events.

use std::time::Duration;

use futures_util::StreamExt;
use natasks::{
    CancelOutcome, Cancellation, Client, HandlerError, Json, Progress, Status, Task, TaskId,
    TaskState, TrackErrorKind, Worker,
};
use serde::{Deserialize, Serialize};

const QUEUE: &str = "example-lifecycle";
const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Serialize, Deserialize)]
struct Render {
    pages: u32,
}

/// The handler's result: stored with the task's record, read back typed.
#[derive(Debug, Serialize, Deserialize)]
struct Rendered {
    id: String,
    pages: u32,
}

/// Renders `pages` pages, 100 ms each, reporting progress after each and stopping when the
/// task is cancelled.
async fn render(
    Json(job): Json<Render>,
    TaskId(id): TaskId,
    progress: Progress,
    cancel: Cancellation,
) -> Result<Rendered, HandlerError> {
    for page in 1..=job.pages {
        tokio::select! {
            () = cancel.cancelled() => {
                println!("  [handler] {id}: cancelled at page {page}, stopping");
                // Whatever the handler returns now, the task ends as cancelled.
                return Err(HandlerError::msg("cancelled"));
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        progress.report(
            Some(f64::from(page) / f64::from(job.pages)),
            &serde_json::json!({ "page": page }),
        );
    }
    Ok(Rendered { id, pages: job.pages })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    println!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;

    // Events are live (core NATS): subscribe before dispatching to see every one.
    let mut events = client.events(Some(QUEUE)).await?;
    let watcher = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let progress = event.progress.and_then(|p| p.fraction);
            let progress = progress.map_or(String::new(), |f| format!(" {:.0}%", f * 100.0));
            println!("  [event] {} {} attempt {}{progress}", event.id, event.kind, event.attempt);
        }
    });

    let worker = Worker::builder(js, QUEUE).concurrency(2).handle("render", render).build().await?;
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });

    let result = tokio::time::timeout(TIMEOUT, scenario(&client)).await;
    shutdown.shutdown();
    running.await??;
    // Lets the last events print before the watcher stops.
    tokio::time::sleep(Duration::from_millis(100)).await;
    watcher.abort();
    match result {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("the example did not finish within {TIMEOUT:?}").into()),
    }
}

async fn scenario(client: &Client) -> Result<(), Box<dyn std::error::Error>> {
    // Two tracked tasks: a short one, and a long one that gets cancelled.
    let short =
        client.dispatch(Task::json("render", &Render { pages: 3 })?.tracked(), QUEUE).await?;
    println!("dispatched a 3-page render (id {})", short.id);
    let long_task =
        Task::json("render", &Render { pages: 100 })?.tracked_for(Duration::from_secs(600));
    let long = client.dispatch(long_task, QUEUE).await?;
    println!("dispatched a 100-page render (id {}), records kept 10 minutes", long.id);

    // Wait for the short one's typed result (woken by the change of its record).
    let rendered: Rendered = client.wait(&short.id, Duration::from_secs(10)).await?;
    println!("result of {}: {rendered:?}", short.id);

    // The long one runs and reports progress; the status shows it.
    loop {
        if let Status::Known(status) = client.status(&long.id).await? {
            let fraction = status.progress.as_ref().and_then(|p| p.fraction).unwrap_or(0.0);
            if let TaskState::Running { lease_until, .. } = status.state {
                if fraction >= 0.1 {
                    println!(
                        "status of {}: running, attempt {}, {:.0}% done, lease until {lease_until}",
                        long.id,
                        status.attempt,
                        fraction * 100.0
                    );
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Cancel it: the handler's Cancellation fires in whichever worker runs it.
    match client.cancel(&long.id).await? {
        CancelOutcome::Signalled => println!("cancel {}: signalled (it was running)", long.id),
        other => println!("cancel {}: {other:?}", long.id),
    }
    match client.wait::<Rendered>(&long.id, Duration::from_secs(10)).await {
        Err(err) if err.kind() == TrackErrorKind::Cancelled => println!("wait {}: {err}", long.id),
        other => {
            return Err(format!("expected the long task to end cancelled, got {other:?}").into())
        }
    }
    if let Status::Known(status) = client.status(&long.id).await? {
        println!("status of {}: {}", long.id, status.state);
    }
    Ok(())
}

/// Library logs go to stderr, filtered by `RUST_LOG` (default: errors only).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
