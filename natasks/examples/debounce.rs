//! Debounce and throttle. Ten rapid edits of a document, each dispatched with a 1 s quiet
//! period under the document's key: one task runs, with the last edit. Then three SMS to one
//! number throttled to one per 10 s: the first is accepted, the second refused (saying when
//! the window ends), the third coalesced into the first.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`), nats-server 2.12 or
//! newer: `cargo run -p natasks --example debounce`.

use std::time::{Duration, Instant};

use natasks::{Client, HandlerError, Task, Worker};
use tokio::sync::mpsc;

const QUEUE: &str = "example-debounce";
const TIMEOUT: Duration = Duration::from_secs(15);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    let run = nuid::next().to_string();

    let (ran_tx, mut ran_rx) = mpsc::unbounded_channel();
    let worker = Worker::builder(js, QUEUE)
        .handle("index.rebuild", move |task: Task| {
            let ran_tx = ran_tx.clone();
            async move {
                let _ = ran_tx.send(String::from_utf8_lossy(task.payload()).into_owned());
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await?;
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });

    let started = Instant::now();
    let quiet = Duration::from_secs(1);
    for edit in 1..=10 {
        let task =
            Task::new("index.rebuild", format!("edit {edit}")).debounce(format!("doc-{run}"));
        client.dispatch_in(task, QUEUE, quiet).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "dispatched 10 edits in {:?}, each restarting the 1 s quiet period",
        started.elapsed()
    );
    let ran = tokio::time::timeout(TIMEOUT, ran_rx.recv()).await?.unwrap_or_default();
    println!("ran once, {:?} after the first edit, with {ran:?}", started.elapsed());
    if let Ok(Some(more)) = tokio::time::timeout(2 * quiet, ran_rx.recv()).await {
        return Err(format!("a replaced edit ran too: {more}").into());
    }

    let window = Duration::from_secs(10);
    let number = format!("+1555{run}");
    let sms = |text: &str| Task::new("sms.send", text.to_owned()).throttle(&number, window);
    let first = client.dispatch(sms("hello"), "example-sms").await?;
    println!("sms 1 accepted as task {}", first.id);
    match client.dispatch(sms("hello again"), "example-sms").await {
        Err(err) => println!("sms 2 refused: {err}"),
        Ok(receipt) => return Err(format!("sms 2 was accepted: {receipt:?}").into()),
    }
    let coalesced = client.dispatch(sms("hello, third").return_existing(), "example-sms").await?;
    println!("sms 3 coalesced into task {} (duplicate: {})", coalesced.id, coalesced.duplicate);

    shutdown.shutdown();
    running.await??;
    Ok(())
}
