//! Middleware and headers: a dispatch middleware stamps every task with an
//! `X-Request-Id` header (keeping one the caller set), a process middleware reads it into
//! the task's extensions, and the handler prints it.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --example middleware_headers`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use natasks::{Client, Dispatch, DispatchError, DispatchNext, HandlerError, Next, Task, Worker};
use tokio::sync::{mpsc, oneshot};

const QUEUE: &str = "example-middleware";
const TASKS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(15);

/// The request id, as the handler receives it.
#[derive(Debug, Clone)]
struct RequestId(String);

/// The dispatch middleware: give every task a request id.
async fn add_request_id(mut dispatch: Dispatch, next: DispatchNext) -> Result<(), DispatchError> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    match dispatch.task.header("X-Request-Id") {
        Some(id) => {
            println!("dispatch middleware: {} keeps X-Request-Id {id}", dispatch.task.name())
        }
        None => {
            let id = format!("req-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
            println!("dispatch middleware: {} gets X-Request-Id {id}", dispatch.task.name());
            dispatch.task.set_header("X-Request-Id", id);
        }
    }
    next.run(dispatch).await
}

/// The process middleware: read the header into the extensions.
async fn read_request_id(mut task: Task, next: Next) -> Result<(), HandlerError> {
    let id = task.header("X-Request-Id").unwrap_or("none").to_owned();
    println!("process middleware: {} has X-Request-Id {id}", task.name());
    task.extensions_mut().insert(RequestId(id));
    next.run(task).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    println!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::builder(js.clone()).middleware(add_request_id).build().await?;
    let run_id = nuid::next().to_string();

    let (processed_tx, mut processed_rx) = mpsc::unbounded_channel();
    let ours = run_id.clone();
    let worker = Worker::builder(js, QUEUE)
        .middleware(read_request_id)
        .handle("orders.ship", move |task: Task| {
            let mine = task.header("X-Run-Id") == Some(ours.as_str());
            let processed_tx = processed_tx.clone();
            async move {
                let request = task.extensions().get::<RequestId>().map_or("?", |r| r.0.as_str());
                println!(
                    "handler: shipping order {} for request {request}{}",
                    String::from_utf8_lossy(task.payload()),
                    if mine { "" } else { " [left over from an earlier run]" }
                );
                if mine {
                    let _ = processed_tx.send(());
                }
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await?;

    let task = Task::new("orders.ship", "A-100").with_header("X-Run-Id", &run_id);
    client.dispatch(task, QUEUE).await?;
    let task = Task::new("orders.ship", "A-101")
        .with_header("X-Run-Id", &run_id)
        .with_header("X-Request-Id", "req-from-caller");
    client.dispatch(task, QUEUE).await?;
    println!("dispatched {TASKS} tasks to queue {QUEUE:?}");

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
    println!("done");
    Ok(())
}

/// Library logs go to stderr, filtered by `RUST_LOG` (default: errors only).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
