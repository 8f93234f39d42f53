//! Retries and the dead-letter queue: a handler that always fails is retried twice with
//! backoff (200 ms, then 400 ms), then dead-lettered into `<queue>-dlq`, where a second
//! worker reads it and prints the `Natasks-*` headers saying why.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --example retries_dlq`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use natasks::{HandlerError, Task, Worker};
use tokio::sync::{mpsc, watch};

const QUEUE: &str = "example-retries";
const DLQ: &str = "example-retries-dlq";
const MAX_RETRIES: i64 = 2;
const TIMEOUT: Duration = Duration::from_secs(15);

static START: OnceLock<Instant> = OnceLock::new();

/// Prints a line prefixed with the time since start.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("[{:>7.3}s] {}", START.get().map_or(0.0, |s| s.elapsed().as_secs_f64()), format!($($arg)*))
    };
}

/// Always fails, as a payment provider that is down would.
async fn charge(task: Task) -> Result<(), HandlerError> {
    let attempt = task.delivery().map_or(0, |d| d.attempt);
    let error = "payment provider unavailable (HTTP 503)";
    let next = match attempt {
        1 => "retry in 200 ms",
        2 => "retry in 400 ms",
        _ => "retries used up, dead-lettering",
    };
    say!("attempt {attempt} of {} failed: {error}; {next}", MAX_RETRIES + 1);
    Err(HandlerError::msg(error))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    START.get_or_init(Instant::now);
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    say!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = natasks::Client::new(js.clone()).await?;
    let run_id = nuid::next().to_string();

    let worker = Worker::builder(js.clone(), QUEUE)
        .max_retries(MAX_RETRIES)
        .retry_backoff([Duration::from_millis(200), Duration::from_millis(400)])
        .handle("payments.charge", charge)
        .build()
        .await?;

    // Dead letters keep the task name, so the dead-letter worker registers the same name.
    let (dead_tx, mut dead_rx) = mpsc::unbounded_channel();
    let ours = run_id.clone();
    let dlq_worker = Worker::builder(js, DLQ)
        .handle("payments.charge", move |task: Task| {
            let mine = task.header("X-Run-Id") == Some(ours.as_str());
            let dead_tx = dead_tx.clone();
            async move {
                say!(
                    "dead letter on {DLQ:?}: {}{}",
                    String::from_utf8_lossy(task.payload()),
                    if mine { "" } else { " [left over from an earlier run]" }
                );
                let mut headers: Vec<(String, String)> = task
                    .headers()
                    .iter()
                    .filter(|(name, _)| name.to_string().starts_with("Natasks-"))
                    .flat_map(|(name, values)| {
                        values.iter().map(move |v| (name.to_string(), v.as_str().to_owned()))
                    })
                    .collect();
                headers.sort();
                for (name, value) in headers {
                    say!("    {name}: {value}");
                }
                if mine {
                    let _ = dead_tx.send(());
                }
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await?;

    let task = Task::new("payments.charge", r#"{"order":1042,"amount_cents":1999}"#)
        .with_header("X-Run-Id", &run_id);
    client.dispatch(task, QUEUE).await?;
    say!("dispatched payments.charge to queue {QUEUE:?} (max_retries {MAX_RETRIES})");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let (result, dlq_result, dead) = tokio::join!(
        worker.run_until(stopped(stop_rx.clone())),
        dlq_worker.run_until(stopped(stop_rx)),
        async {
            let dead = tokio::time::timeout(TIMEOUT, dead_rx.recv()).await.ok().flatten();
            let _ = stop_tx.send(true);
            dead.is_some()
        }
    );
    result?;
    dlq_result?;
    if !dead {
        return Err(format!("no dead letter within {TIMEOUT:?}").into());
    }
    say!("done: the task was tried {} times and dead-lettered", MAX_RETRIES + 1);
    Ok(())
}

/// Library logs go to stderr, filtered by `RUST_LOG` (default: errors only).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
