//! OpenTelemetry: natasks starts its spans with the global tracer provider; trace context
//! travels in task headers, so the processing span is a child of the dispatch span (which
//! is a child of the caller's span, here a `tracing` span through a
//! `tracing-opentelemetry` layer), with the messaging attributes and an error status on
//! failure. Spans are checked in the SDK's in-memory exporter.
#![cfg(feature = "opentelemetry")]

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use natasks::otel::opentelemetry::trace::{SpanId, SpanKind, Status, TraceId, TracerProvider as _};
use natasks::otel::tracing_opentelemetry::{self, OpenTelemetrySpanExt as _};
use natasks::otel::OtelPropagator;
use natasks::{Client, HandlerError, Task, Worker};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::prelude::*;

use natasks::otel::opentelemetry;

/// One provider and subscriber for the whole test binary (tests run in parallel and spawn
/// tasks on other threads); tests tell their spans apart by queue. natasks' spans come from
/// the global provider; the application's `tracing` spans reach the same provider through
/// the layer, which natasks' own `tracing` spans stay out of (as recommended).
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider =
                SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            let tracer = provider.tracer("natasks-tests");
            tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(
                    tracing_subscriber::filter::filter_fn(|meta| {
                        !meta.target().starts_with("natasks::")
                    }),
                ))
                .try_init()
                .expect("no other subscriber in this test binary");
            (exporter, provider)
        })
        .0
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// Finished spans named `name` of queue `queue`: natasks' spans name it in
/// `messaging.destination.name`, the tests' own spans in `queue`.
fn spans(name: &str, queue: &str) -> Vec<SpanData> {
    let mut spans: Vec<SpanData> = exporter()
        .get_finished_spans()
        .expect("exporter readable")
        .into_iter()
        .filter(|s| {
            s.name == name
                && [attr(s, "messaging.destination.name"), attr(s, "queue")]
                    .iter()
                    .any(|q| q.as_deref() == Some(queue))
        })
        .collect();
    spans.sort_by_key(|s| s.start_time);
    spans
}

async fn wait_for_spans(name: &str, queue: &str, n: usize) -> Vec<SpanData> {
    eventually(DEADLINE, &format!("{n} finished {name} span(s) for {queue}"), || async {
        spans(name, queue).len() >= n
    })
    .await;
    spans(name, queue)
}

/// A client that propagates W3C trace context.
async fn traced_client(js: async_nats::jetstream::Context) -> Client {
    Client::builder(js).propagator(OtelPropagator::new()).build().await.unwrap()
}

fn assert_attrs(span: &SpanData, pairs: &[(&str, &str)]) {
    for (key, value) in pairs {
        assert_eq!(attr(span, key).as_deref(), Some(*value), "attribute {key} of {}", span.name);
    }
}

#[tokio::test]
async fn processing_span_is_a_child_of_the_dispatch_span() {
    exporter();
    let server = NatsServer::start().await;
    // Client and worker on separate connections, as in two services.
    let client = traced_client(server.jetstream().await).await;
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(server.jetstream().await, "traced")
        .propagator(OtelPropagator::new())
        .handle("emails.send", move |task: Task| {
            // The handler runs in the process span's context, which has the remote trace;
            // a tracing span it starts is a child of the process span.
            let cx = opentelemetry::Context::current();
            let process_span = cx.span().span_context().span_id();
            let trace_id = cx.span().span_context().trace_id();
            let work = tracing::info_span!("handler.work", queue = "traced");
            let work_parent = work.context().span().span_context().trace_id();
            let _ = tx.send((
                trace_id,
                process_span,
                work_parent,
                task.header("traceparent").map(str::to_owned),
                task.header("tracestate").map(str::to_owned),
            ));
            async { Ok::<_, HandlerError>(()) }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let root = tracing::info_span!("request", queue = "traced");
    client
        .dispatch(Task::new("emails.send", "hi"), "traced")
        .instrument(root.clone())
        .await
        .unwrap();
    drop(root);
    let (handler_trace, handler_span, work_trace, traceparent, tracestate) = seen.recv().await;

    let root = wait_for_spans("request", "traced", 1).await.remove(0);
    let dispatch = wait_for_spans("natasks.dispatch", "traced", 1).await.remove(0);
    let process = wait_for_spans("natasks.process", "traced", 1).await.remove(0);
    let work = wait_for_spans("handler.work", "traced", 1).await.remove(0);
    running.stop().await.unwrap();
    assert_eq!(
        spans("natasks.dispatch", "traced").len() + spans("natasks.process", "traced").len(),
        2,
        "one span each, no tracing duplicates"
    );

    let trace = root.span_context.trace_id();
    assert_ne!(trace, TraceId::INVALID);
    assert_eq!(dispatch.span_context.trace_id(), trace, "dispatch joins the caller's trace");
    assert_eq!(dispatch.parent_span_id, root.span_context.span_id(), "dispatch under the caller");
    assert_eq!(process.span_context.trace_id(), trace, "one trace from dispatch to process");
    assert_eq!(process.parent_span_id, dispatch.span_context.span_id(), "process under dispatch");
    assert!(process.parent_span_is_remote, "the parent came from the message headers");
    assert_eq!(handler_trace, trace, "the handler sees the trace");
    assert_eq!(handler_span, process.span_context.span_id(), "in the process span's context");
    assert_eq!(work_trace, trace, "a span the handler starts joins the trace");
    assert_eq!(work.parent_span_id, process.span_context.span_id(), "under the process span");
    assert_eq!(tracestate, None, "no empty tracestate header, as in Go");

    // W3C trace context in the headers, naming the dispatch span.
    let traceparent = traceparent.expect("traceparent header on the task");
    assert_eq!(
        traceparent,
        format!("00-{trace}-{}-01", dispatch.span_context.span_id()),
        "W3C traceparent of the dispatch span"
    );

    assert_eq!(dispatch.span_kind, SpanKind::Producer);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_attrs(
        &dispatch,
        &[
            ("messaging.system", "nats"),
            ("messaging.operation", "publish"),
            ("messaging.destination.name", "traced"),
            ("natasks.task", "emails.send"),
        ],
    );
    assert_attrs(
        &process,
        &[
            ("messaging.system", "nats"),
            ("messaging.operation", "process"),
            ("messaging.destination.name", "traced"),
            ("natasks.task", "emails.send"),
            ("outcome", "succeeded"),
            ("attempt", "1"),
        ],
    );
    assert!(attr(&process, "stream_sequence").is_some());
    assert!(attr(&dispatch, "stream_sequence").is_some(), "the stored message's sequence");
    assert!(!matches!(dispatch.status, Status::Error { .. }), "{:?}", dispatch.status);
    assert!(!matches!(process.status, Status::Error { .. }), "{:?}", process.status);
}

#[tokio::test]
async fn failed_attempts_have_error_status_and_stay_in_the_trace() {
    exporter();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = traced_client(js.clone()).await;
    let worker = Worker::builder(js.clone(), "failing")
        .propagator(OtelPropagator::new())
        .max_retries(1)
        .retry_backoff([Duration::from_millis(100)])
        .handle("boom", |_t: Task| async { Err::<(), _>(HandlerError::msg("exploded")) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("boom", ""), "failing").await.unwrap();
    let processes = wait_for_spans("natasks.process", "failing", 2).await;
    let dispatch = wait_for_spans("natasks.dispatch", "failing", 1).await.remove(0);
    running.stop().await.unwrap();

    assert_eq!(processes.len(), 2, "one span per attempt");
    for (process, (attempt, outcome)) in
        processes.iter().zip([("1", "retried"), ("2", "dead-lettered")])
    {
        assert_eq!(process.span_context.trace_id(), dispatch.span_context.trace_id());
        assert_eq!(process.parent_span_id, dispatch.span_context.span_id());
        assert_attrs(process, &[("attempt", attempt), ("outcome", outcome)]);
        assert!(
            matches!(process.status, Status::Error { .. }),
            "attempt {attempt}: {:?}",
            process.status
        );
    }
    let events: Vec<&str> = processes[0].events.events.iter().map(|e| e.name.as_ref()).collect();
    assert!(
        events.iter().any(|e| e.contains("will retry")),
        "retry event on attempt 1: {events:?}"
    );
    let events: Vec<&str> = processes[1].events.events.iter().map(|e| e.name.as_ref()).collect();
    assert!(events.iter().any(|e| e.contains("dead-lettered")), "dead-letter event: {events:?}");
}

#[tokio::test]
async fn failed_dispatch_has_error_status() {
    exporter();
    let server = NatsServer::start().await;
    let client = traced_client(server.jetstream().await).await;
    let err = client.dispatch(Task::new("t", ""), "bad.queue").await.unwrap_err();
    assert_eq!(err.kind(), natasks::DispatchErrorKind::InvalidTask);
    let dispatch = wait_for_spans("natasks.dispatch", "bad.queue", 1).await.remove(0);
    assert!(matches!(dispatch.status, Status::Error { .. }), "{:?}", dispatch.status);
}

/// Dispatch middleware runs in the dispatch span's context, and the headers carry that
/// context.
#[tokio::test]
async fn dispatch_middleware_runs_in_the_dispatch_span() {
    exporter();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let client = Client::builder(js.clone())
        .propagator(OtelPropagator::new())
        .middleware(move |dispatch: natasks::Dispatch, next: natasks::DispatchNext| {
            let cx = opentelemetry::Context::current();
            let _ = tx.send(cx.span().span_context().span_id());
            next.run(dispatch)
        })
        .build()
        .await
        .unwrap();
    client.dispatch(Task::new("t", ""), "layered").await.unwrap();
    let in_middleware = seen.recv().await;
    let dispatch = wait_for_spans("natasks.dispatch", "layered", 1).await.remove(0);
    assert_eq!(in_middleware, dispatch.span_context.span_id());
    assert!(attr(&dispatch, "stream_sequence").is_some(), "the stored message's sequence");
    let message = js
        .get_stream("NATASKS")
        .await
        .unwrap()
        .get_last_raw_message_by_subject("natasks.layered")
        .await
        .unwrap();
    let traceparent = message.headers.get("traceparent").map(|v| v.as_str().to_owned());
    assert_eq!(
        traceparent,
        Some(format!(
            "00-{}-{}-01",
            dispatch.span_context.trace_id(),
            dispatch.span_context.span_id()
        ))
    );
}

/// A Go service writes the headers through its own carrier; the Rust worker joins its
/// trace whatever the header's case.
#[tokio::test]
async fn joins_a_trace_started_elsewhere() {
    exporter();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    Client::new(js.clone()).await.unwrap(); // the stream
    let worker = Worker::builder(js.clone(), "remote")
        .propagator(OtelPropagator::new())
        .handle("t", |_t: Task| async { Ok::<_, HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let parent = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(natasks::wire::HEADER_TASK, "t");
    headers.insert("Traceparent", format!("00-{trace}-{parent}-01").as_str());
    js.publish_with_headers("natasks.remote", headers, "".into()).await.unwrap().await.unwrap();

    let process = wait_for_spans("natasks.process", "remote", 1).await.remove(0);
    running.stop().await.unwrap();
    assert_eq!(process.span_context.trace_id(), trace);
    assert_eq!(process.parent_span_id, parent);
    assert!(process.parent_span_is_remote);
    assert_attrs(&process, &[("outcome", "succeeded")]);
}

/// Without trace headers the processing span is a root of its own trace, not a child of
/// whatever ran before in the worker.
#[tokio::test]
async fn without_headers_processing_starts_its_own_trace() {
    exporter();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    Client::new(js.clone()).await.unwrap();
    let worker = Worker::builder(js.clone(), "untraced")
        .propagator(OtelPropagator::new())
        .handle("t", |_t: Task| async { Ok::<_, HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(natasks::wire::HEADER_TASK, "t");
    js.publish_with_headers("natasks.untraced", headers, "".into()).await.unwrap().await.unwrap();
    let process = wait_for_spans("natasks.process", "untraced", 1).await.remove(0);
    running.stop().await.unwrap();
    assert_ne!(process.span_context.trace_id(), TraceId::INVALID);
    assert_eq!(process.parent_span_id, SpanId::INVALID);
    assert_attrs(&process, &[("outcome", "succeeded")]);
}

/// With `sampled_only`, a sampled dispatch carries its context as usual; an unsampled one
/// carries no header, and the worker reads its absence as "not sampled": the attempt runs
/// in a valid context marked not sampled, and no process span is recorded for it.
#[tokio::test]
async fn sampled_only_propagates_sampled_traces_and_keeps_the_rest_unsampled() {
    use opentelemetry::trace::{FutureExt as _, SpanContext, TraceFlags, TraceState};
    exporter();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::builder(js.clone())
        .propagator(OtelPropagator::new().sampled_only())
        .build()
        .await
        .unwrap();
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let report = move |task: Task| {
        let cx = opentelemetry::Context::current();
        let context = cx.span().span_context().clone();
        let _ = tx.send((
            task.name().to_owned(),
            task.header("traceparent").map(str::to_owned),
            context,
        ));
        async { Ok::<_, HandlerError>(()) }
    };
    // One slot: the unsampled task is settled before the sampled one starts, so once the
    // sampled task's span is exported, a span of the unsampled one would have been too.
    let worker = Worker::builder(js.clone(), "lean")
        .propagator(OtelPropagator::new().sampled_only())
        .concurrency(1)
        .fetch_batch(1)
        .handle("unsampled", report.clone())
        .handle("sampled", report)
        .build()
        .await
        .unwrap();

    // Dispatched under a remote parent that was not sampled (ParentBased follows it).
    let unsampled_parent = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::default(),
        true,
        TraceState::default(),
    );
    let unsampled_cx =
        opentelemetry::Context::new().with_remote_span_context(unsampled_parent.clone());
    client.dispatch(Task::new("unsampled", "a"), "lean").with_context(unsampled_cx).await.unwrap();
    let root = tracing::info_span!("request", queue = "lean");
    client.dispatch(Task::new("sampled", "b"), "lean").instrument(root.clone()).await.unwrap();
    drop(root);
    let running = spawn(worker);

    let (name, traceparent, context) = seen.recv().await;
    assert_eq!(name, "unsampled");
    assert_eq!(traceparent, None, "an unsampled dispatch carries no trace context");
    assert!(context.is_valid(), "the attempt runs in a context that says not sampled");
    assert!(!context.is_sampled());
    assert_ne!(context.trace_id(), unsampled_parent.trace_id(), "nothing travelled");

    let (name, traceparent, context) = seen.recv().await;
    assert_eq!(name, "sampled");
    let dispatch = wait_for_spans("natasks.dispatch", "lean", 1).await.remove(0);
    assert_attrs(&dispatch, &[("natasks.task", "sampled")]);
    assert_eq!(
        traceparent.as_deref(),
        Some(
            format!(
                "00-{}-{}-01",
                dispatch.span_context.trace_id(),
                dispatch.span_context.span_id()
            )
            .as_str()
        ),
        "a sampled dispatch carries its context"
    );
    assert!(context.is_sampled());
    assert_eq!(context.trace_id(), dispatch.span_context.trace_id());

    let process = wait_for_spans("natasks.process", "lean", 1).await;
    running.stop().await.unwrap();
    assert_eq!(process.len(), 1, "no process span for the unsampled task: {process:?}");
    assert_attrs(&process[0], &[("natasks.task", "sampled")]);
    assert_eq!(process[0].parent_span_id, dispatch.span_context.span_id());
}

/// A trace propagator that panics on any input.
#[derive(Debug)]
struct PanickingPropagator;

impl opentelemetry::propagation::TextMapPropagator for PanickingPropagator {
    fn inject_context(
        &self,
        _cx: &opentelemetry::Context,
        _injector: &mut dyn opentelemetry::propagation::Injector,
    ) {
    }

    fn extract_with_context(
        &self,
        _cx: &opentelemetry::Context,
        _extractor: &dyn opentelemetry::propagation::Extractor,
    ) -> opentelemetry::Context {
        panic!("odd trace header");
    }

    fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
        opentelemetry::propagation::text_map_propagator::FieldIter::new(&[])
    }
}

/// The trace propagator reads headers from the wire, before the handler's panic guard: a
/// propagator that panics on odd input used to kill the attempt with no ack or nak, so the
/// task came back every ack wait, forever. It now runs without its trace context.
#[tokio::test]
async fn a_panicking_trace_propagator_loses_the_trace_not_the_task() {
    exporter();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "otel-panic")
        .ack_wait(Duration::from_secs(60))
        .propagator(OtelPropagator::with(PanickingPropagator))
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let worker = spawn(worker);
    client.dispatch(Task::new("t", "x"), "otel-panic").await.unwrap();
    let task = seen.recv().await;
    assert_eq!(task.delivery().map(|d| d.attempt), Some(1));
    eventually(DEADLINE, "the task acknowledged", || async {
        stored(&js, "natasks.otel-panic").await == 0
    })
    .await;
    worker.stop().await.unwrap();
}
