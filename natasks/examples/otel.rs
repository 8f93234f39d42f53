//! OpenTelemetry tracing: a request span dispatches a task; the worker's processing span
//! joins the same trace through the W3C `traceparent` header, even though client and
//! worker use separate connections (as two services would). The first attempt fails and
//! is retried, so the trace shows an error span and a successful one. At the end the
//! example prints the finished spans as a tree.
//!
//! The spans go to the SDK's in-memory exporter so the example needs no collector; a
//! service would install an OTLP exporter instead (crate `opentelemetry-otlp`):
//! `SdkTracerProvider::builder().with_batch_exporter(otlp_exporter).build()`.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --features opentelemetry --example otel`.

use std::time::Duration;

use natasks::otel::opentelemetry::trace::{SpanId, TracerProvider as _};
use natasks::otel::{tracing_opentelemetry, OtelPropagator};
use natasks::{Client, HandlerError, Task, Worker};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_subscriber::prelude::*;

const QUEUE: &str = "example-otel";
const TIMEOUT: Duration = Duration::from_secs(15);

/// Fails the first attempt, succeeds on the retry.
async fn send_receipt(task: Task, done: mpsc::UnboundedSender<()>) -> Result<(), HandlerError> {
    let attempt = task.delivery().map_or(0, |d| d.attempt);
    // The processing span's context is current: spans started here join the trace.
    let _send = tracing::info_span!("smtp.send", attempt).entered();
    tracing::info!(attempt, traceparent = task.header("traceparent"), "sending receipt");
    if attempt == 1 {
        return Err(HandlerError::retry_after("mail server busy", Duration::from_millis(200)));
    }
    let _ = done.send(());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. An OpenTelemetry tracer provider, installed globally: natasks starts its spans
    //    with it. A tracing subscriber whose OpenTelemetry layer carries the application's
    //    own spans (the checkout span below) and leaves natasks' tracing spans to the
    //    console, which shows errors only unless RUST_LOG says otherwise.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    natasks::otel::opentelemetry::global::set_tracer_provider(provider.clone());
    let console = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::registry()
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("natasks-example"))
                .with_filter(tracing_subscriber::EnvFilter::new("info,natasks=off")),
        )
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(console))
        .init();

    // 2. The same propagator on the client and on the worker.
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    println!("connecting to {url}");
    let client = Client::builder(async_nats::jetstream::new(async_nats::connect(&url).await?))
        .propagator(OtelPropagator::new())
        .build()
        .await?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let worker =
        Worker::builder(async_nats::jetstream::new(async_nats::connect(&url).await?), QUEUE)
            .propagator(OtelPropagator::new())
            .handle("receipts.send", move |task: Task| send_receipt(task, done_tx.clone()))
            .build()
            .await?;

    // 3. Dispatch inside a request span: the dispatch span is its child, the processing
    //    spans are children of the dispatch span.
    let request = tracing::info_span!("checkout", order = 1042);
    client
        .dispatch(Task::new("receipts.send", r#"{"order":1042}"#), QUEUE)
        .instrument(request)
        .await?;
    println!("dispatched receipts.send to {QUEUE:?}");

    let shutdown = worker.shutdown_handle();
    let (result, done) = tokio::join!(worker.run(), async {
        let done = tokio::time::timeout(TIMEOUT, done_rx.recv()).await.ok().flatten();
        shutdown.shutdown();
        done.is_some()
    });
    result?;
    if !done {
        return Err(format!("the task was not processed within {TIMEOUT:?}").into());
    }
    provider.force_flush()?;
    print_tree(&exporter.get_finished_spans()?);
    provider.shutdown()?;
    Ok(())
}

/// Prints the spans of the checkout trace, children indented under their parents.
fn print_tree(spans: &[SpanData]) {
    let Some(root) = spans.iter().find(|s| s.name == "checkout") else {
        println!("no checkout span exported");
        return;
    };
    let trace = root.span_context.trace_id();
    println!("\ntrace {trace}:");
    let mut ours: Vec<&SpanData> =
        spans.iter().filter(|s| s.span_context.trace_id() == trace).collect();
    ours.sort_by_key(|s| s.start_time);
    print_children(&ours, SpanId::INVALID, 0);
}

fn print_children(spans: &[&SpanData], parent: SpanId, depth: usize) {
    for span in spans.iter().filter(|s| s.parent_span_id == parent) {
        let attr = |key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map_or(String::new(), |kv| format!(" {key}={}", kv.value))
        };
        println!(
            "{}{} [{:?}] span {}{}{}{}{} status={:?}",
            "  ".repeat(depth + 1),
            span.name,
            span.span_kind,
            span.span_context.span_id(),
            attr("messaging.operation"),
            attr("messaging.destination.name"),
            attr("attempt"),
            attr("outcome"),
            span.status,
        );
        print_children(spans, span.span_context.span_id(), depth + 1);
    }
}
