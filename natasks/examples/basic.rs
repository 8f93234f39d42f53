//! Dispatch three tasks, process them with a worker, and exit.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --example basic`. Set `RUST_LOG=natasks=debug` to see the
//! library's own logs on stderr.

use std::time::Duration;

use natasks::{Client, HandlerError, Json, Task, Worker};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const QUEUE: &str = "example-basic";
const TASKS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Serialize, Deserialize)]
struct Greeting {
    number: usize,
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    println!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    // Tells this run's tasks from any left in the queue by an interrupted earlier run.
    let run_id = nuid::next().to_string();

    let (processed_tx, mut processed_rx) = mpsc::unbounded_channel();
    let ours = run_id.clone();
    let worker = Worker::builder(js, QUEUE)
        .concurrency(2)
        .handle("greet", move |Json(greeting): Json<Greeting>, task: Task| {
            let mine = task.header("X-Run-Id") == Some(ours.as_str());
            let processed_tx = processed_tx.clone();
            async move {
                let delivery = task.delivery().expect("received tasks carry delivery details");
                println!(
                    "processed greet #{} for {} (queue {:?}, attempt {}, stream sequence {}){}",
                    greeting.number,
                    greeting.name,
                    delivery.queue,
                    delivery.attempt,
                    delivery.stream_sequence,
                    if mine { "" } else { " [left over from an earlier run]" }
                );
                if mine {
                    let _ = processed_tx.send(greeting.number);
                }
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await?;

    for (number, name) in ["Ada", "Grace", "Linus"].into_iter().enumerate() {
        let greeting = Greeting { number: number + 1, name: name.into() };
        let task = Task::json("greet", &greeting)?.with_header("X-Run-Id", &run_id);
        client.dispatch(task, QUEUE).await?;
        println!("dispatched greet #{} for {name} to queue {QUEUE:?}", number + 1);
    }

    // Run the worker until this run's tasks were processed (or the timeout passed).
    let (done_tx, done_rx) = oneshot::channel();
    let (result, processed) = tokio::join!(
        worker.run_until(async {
            let _ = done_rx.await;
        }),
        async {
            let mut processed = 0;
            let _ = tokio::time::timeout(TIMEOUT, async {
                while processed < TASKS && processed_rx.recv().await.is_some() {
                    processed += 1;
                }
            })
            .await;
            let _ = done_tx.send(());
            processed
        }
    );
    result?;
    if processed < TASKS {
        return Err(
            format!("only {processed} of {TASKS} tasks processed within {TIMEOUT:?}").into()
        );
    }
    println!("all {TASKS} tasks processed; worker stopped");
    Ok(())
}

/// Library logs go to stderr, filtered by `RUST_LOG` (default: errors only).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
