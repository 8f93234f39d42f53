//! Prometheus metrics: a client and a worker report through `natasks::metrics::Metrics`,
//! a `QueueMetrics` poller reads the queue's backlog and dead letters from JetStream, and
//! `metrics-exporter-prometheus` renders everything on a `/metrics` HTTP endpoint. The
//! example processes a few tasks (one retried, one dead-lettered), scrapes its own endpoint
//! once and prints the natasks lines.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --features metrics --example prometheus`. Set `METRICS_ADDR`
//! (e.g. `127.0.0.1:9464`) and `HOLD_SECS` to keep the endpoint up for a real Prometheus.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use natasks::metrics::{Metrics, QueueMetrics};
use natasks::{Client, HandlerError, Task, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const QUEUE: &str = "example-metrics";
const TIMEOUT: Duration = Duration::from_secs(15);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    // 1. The exporter, with the Go library's histogram buckets, installed before any task
    //    moves. (With the exporter's `http-listener` feature, `PrometheusBuilder::install`
    //    serves /metrics itself; here a few lines of Tokio do it.)
    let metrics = Metrics::new();
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in metrics.histogram_buckets() {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)?;
    }
    let handle = builder.install_recorder()?;
    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&addr).await?;
    let endpoint = listener.local_addr()?;
    tokio::spawn(serve(listener, handle));
    println!("metrics at http://{endpoint}/metrics");

    // 2. The observer on the client and the worker; the queue poller next to them.
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    println!("connecting to {url}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::builder(js.clone()).observer(metrics.clone()).build().await?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let worker = Worker::builder(js.clone(), QUEUE)
        .observer(metrics.clone())
        .max_retries(1)
        .retry_backoff([Duration::from_millis(200)])
        .handle("reports.build", move |task: Task| {
            let done = done_tx.clone();
            async move {
                let attempt = task.delivery().map_or(0, |d| d.attempt);
                let _ = done.send(());
                match task.payload().as_ref() {
                    b"flaky" if attempt == 1 => Err(HandlerError::msg("database busy")),
                    b"broken" => Err(HandlerError::dead_letter(std::io::Error::other(
                        "report template missing",
                    ))),
                    _ => Ok(()),
                }
            }
        })
        .build()
        .await?;
    let poller = QueueMetrics::new(js, [QUEUE]).interval(Duration::from_millis(250)).spawn();

    for payload in ["ok", "ok", "ok", "flaky", "broken"] {
        client.dispatch(Task::new("reports.build", payload), QUEUE).await?;
    }
    println!("dispatched 5 tasks to {QUEUE:?}");

    // Six attempts: three successes, a failure and its retry, a dead letter.
    let shutdown = worker.shutdown_handle();
    let (result, done) = tokio::join!(worker.run(), async {
        let all = tokio::time::timeout(TIMEOUT, async {
            for _ in 0..6 {
                done_rx.recv().await;
            }
        })
        .await;
        // One more poll so the gauges show the drained queue.
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.shutdown();
        all.is_ok()
    });
    result?;
    if !done {
        return Err(format!("the tasks were not processed within {TIMEOUT:?}").into());
    }

    // 3. What Prometheus would scrape.
    let body = scrape(endpoint).await?;
    println!("\nGET /metrics (natasks lines for {QUEUE:?}):");
    for line in body.lines().filter(|l| {
        (l.starts_with("# TYPE natasks_") || l.contains(QUEUE)) && !l.contains("_bucket{")
    }) {
        println!("  {line}");
    }
    if let Some(secs) = std::env::var("HOLD_SECS").ok().and_then(|s| s.parse().ok()) {
        println!("\nserving http://{endpoint}/metrics for {secs} s");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    poller.stop().await;
    Ok(())
}

/// A minimal `/metrics` endpoint: every request gets the rendered exposition text.
async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        handle.run_upkeep();
        let body = handle.render();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ = socket.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        });
    }
}

async fn scrape(endpoint: std::net::SocketAddr) -> std::io::Result<String> {
    let mut socket = TcpStream::connect(endpoint).await?;
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    Ok(response.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_owned()))
}
