//! Delayed tasks: one dispatched with `dispatch_in` (2 s), one with `dispatch_at`
//! (now + 3 s). Prints when each is processed and how late it was against its due time.
//!
//! Needs nats-server 2.12 or newer (message schedules). Run with a server at `NATS_URL`
//! (default `nats://127.0.0.1:4222`): `cargo run -p natasks --example delayed`.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use natasks::{Client, HandlerError, Json, Task, Worker};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const QUEUE: &str = "example-delayed";
const TASKS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(20);

static START: OnceLock<(Instant, SystemTime)> = OnceLock::new();

/// Prints a line prefixed with the time since start.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("[{:>7.3}s] {}", START.get().map_or(0.0, |s| s.0.elapsed().as_secs_f64()), format!($($arg)*))
    };
}

#[derive(Serialize, Deserialize)]
struct Reminder {
    label: String,
    /// When the task is due, in milliseconds since the Unix epoch.
    due_unix_ms: u64,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Seconds from the start of the example to `unix_ms`.
fn since_start(unix_ms: u64) -> f64 {
    let start = unix_ms_at_start();
    (unix_ms as f64 - start as f64) / 1000.0
}

fn unix_ms_at_start() -> u64 {
    START.get().map_or(0, |s| unix_ms(s.1))
}

async fn remind(Json(reminder): Json<Reminder>, task: Task) -> Result<(), HandlerError> {
    let late_ms = unix_ms(SystemTime::now()) as i64 - reminder.due_unix_ms as i64;
    say!(
        "processed {:?} (due +{:.3}s, {late_ms} ms late, attempt {})",
        reminder.label,
        since_start(reminder.due_unix_ms),
        task.delivery().map_or(0, |d| d.attempt)
    );
    if let Some(tx) = task.extensions().get::<mpsc::UnboundedSender<()>>() {
        let _ = tx.send(());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    START.get_or_init(|| (Instant::now(), SystemTime::now()));
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    say!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    let run_id = nuid::next().to_string();

    // A process middleware hands this run's tasks a sender to report back on; tasks left
    // over from an interrupted earlier run are processed but not counted.
    let (processed_tx, mut processed_rx) = mpsc::unbounded_channel::<()>();
    let ours = run_id.clone();
    let worker = Worker::builder(js, QUEUE)
        .middleware(move |mut task: Task, next: natasks::Next| {
            if task.header("X-Run-Id") == Some(ours.as_str()) {
                task.extensions_mut().insert(processed_tx.clone());
            }
            next.run(task)
        })
        .handle("reminder", remind)
        .build()
        .await?;

    let in_two = Duration::from_secs(2);
    let reminder = Reminder {
        label: "dispatch_in(2 s)".into(),
        due_unix_ms: unix_ms(SystemTime::now() + in_two),
    };
    let task = Task::json("reminder", &reminder)?.with_header("X-Run-Id", &run_id);
    client.dispatch_in(task, QUEUE, in_two).await?;
    say!("dispatched {:?}: due +{:.3}s", reminder.label, since_start(reminder.due_unix_ms));

    let at = SystemTime::now() + Duration::from_secs(3);
    let reminder = Reminder { label: "dispatch_at(now + 3 s)".into(), due_unix_ms: unix_ms(at) };
    let task = Task::json("reminder", &reminder)?.with_header("X-Run-Id", &run_id);
    client.dispatch_at(task, QUEUE, at).await?;
    say!("dispatched {:?}: due +{:.3}s", reminder.label, since_start(reminder.due_unix_ms));

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
        return Err(format!(
            "only {processed} of {TASKS} delayed tasks arrived within {TIMEOUT:?}"
        )
        .into());
    }
    say!("both delayed tasks processed; worker stopped");
    Ok(())
}

/// Library logs go to stderr, filtered by `RUST_LOG` (default: errors only).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
