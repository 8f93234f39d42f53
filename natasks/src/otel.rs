//! OpenTelemetry trace propagation (cargo feature `opentelemetry`).
//!
//! natasks traces with [`tracing`]: every dispatch runs in a `natasks.dispatch` span and
//! every processing attempt in a `natasks.process` span (fields in [`crate::observe`]).
//! With a [`tracing_opentelemetry`] layer installed those spans become OpenTelemetry spans;
//! [`OtelPropagator`] joins them across processes:
//!
//! * on dispatch it writes the context of the `natasks.dispatch` span into the task's
//!   headers, as W3C trace context (`traceparent`, `tracestate`), the headers the Go
//!   library's OpenTelemetry middleware writes and reads through otel's global
//!   `TextMapPropagator`, so traces join across Go and Rust services;
//! * on processing it reads those headers and makes the `natasks.process` span a child of
//!   the dispatch span, in whatever process or service the worker runs.
//!
//! The spans carry the messaging attributes the Go middleware sets
//! (`messaging.system = "nats"`, `messaging.operation = "publish" | "process"`,
//! `messaging.destination.name = <queue>`, `natasks.task = <task name>`), have span kind
//! producer and consumer, and get status error when a dispatch fails or an attempt does
//! not succeed (retried, given up, dead-lettered or discarded); failures and retries are
//! also recorded as span events.
//!
//! ```no_run
//! # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
//! use natasks::otel::OtelPropagator;
//! use natasks::{Client, Worker};
//!
//! // Once, at startup: a tracing subscriber with the OpenTelemetry layer, e.g.
//! // tracing_subscriber::registry()
//! //     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("my-service")))
//! //     .init();
//! let client = Client::builder(js.clone()).propagator(OtelPropagator::new()).build().await?;
//! let worker = Worker::builder(js, "emails")
//!     .propagator(OtelPropagator::new())
//!     .handle("emails.send", |_task: natasks::Task| async { Ok::<_, natasks::HandlerError>(()) })
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Notes:
//!
//! * `natasks.dispatch` is a `DEBUG` span and `natasks.process` an `INFO` span. A filter
//!   that disables `DEBUG` for `natasks` drops the dispatch span; the task then carries the
//!   caller's span context and the process span becomes a child of the caller's span.
//!   Enable `natasks=debug` on the OpenTelemetry layer to see dispatches.
//! * The `opentelemetry` and `tracing-opentelemetry` versions of the application must be
//!   the ones natasks uses (re-exported here as [`opentelemetry`] and
//!   [`tracing_opentelemetry`]), or the spans will not connect.
//! * Headers are written in lower case (`traceparent`); reading also accepts any other
//!   case (`Traceparent`, as a Go `http.Header` carrier would write it).

use std::fmt;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::middleware::Propagator;
use crate::task::Task;

pub use opentelemetry;
pub use tracing_opentelemetry;

/// The W3C trace context header holding the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C trace context header holding vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Propagates OpenTelemetry context through task headers. Set it on the client and on the
/// worker ([`ClientBuilder::propagator`](crate::ClientBuilder::propagator),
/// [`WorkerBuilder::propagator`](crate::WorkerBuilder::propagator)).
///
/// [`OtelPropagator::new`] uses W3C trace context; [`OtelPropagator::global`] uses the
/// propagator installed with `opentelemetry::global::set_text_map_propagator`, as the Go
/// middleware does; [`OtelPropagator::with`] takes any `TextMapPropagator` (for example a
/// composite of trace context and baggage).
pub struct OtelPropagator {
    kind: Kind,
}

enum Kind {
    TraceContext(TraceContextPropagator),
    Global,
    Custom(Box<dyn TextMapPropagator + Send + Sync>),
}

impl OtelPropagator {
    /// W3C trace context (`traceparent`, `tracestate`).
    pub fn new() -> Self {
        Self { kind: Kind::TraceContext(TraceContextPropagator::new()) }
    }

    /// The global propagator at the time of each dispatch and delivery
    /// (`opentelemetry::global::get_text_map_propagator`). Propagates nothing until the
    /// application installs one.
    pub fn global() -> Self {
        Self { kind: Kind::Global }
    }

    /// A propagator of your choice.
    pub fn with(propagator: impl TextMapPropagator + Send + Sync + 'static) -> Self {
        Self { kind: Kind::Custom(Box::new(propagator)) }
    }

    fn with_propagator<T>(&self, mut f: impl FnMut(&dyn TextMapPropagator) -> T) -> T {
        match &self.kind {
            Kind::TraceContext(p) => f(p),
            Kind::Custom(p) => f(p.as_ref()),
            Kind::Global => opentelemetry::global::get_text_map_propagator(|p| f(p)),
        }
    }
}

impl Default for OtelPropagator {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for OtelPropagator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::TraceContext(_) => "trace-context",
            Kind::Global => "global",
            Kind::Custom(_) => "custom",
        };
        f.debug_struct("OtelPropagator").field("kind", &kind).finish()
    }
}

impl Propagator for OtelPropagator {
    /// Writes the context of the current span (the `natasks.dispatch` span) into the
    /// task's headers (or of the caller's span, when the dispatch span is filtered out).
    /// Writes nothing without a valid span context (no OpenTelemetry layer installed).
    fn inject(&self, task: &mut Task) {
        let cx = tracing::Span::current().context();
        if !cx.span().span_context().is_valid() {
            return;
        }
        self.with_propagator(|p| p.inject_context(&cx, &mut TaskInjector(task)));
    }

    /// Nothing: the context is applied to the span in
    /// [`extract_span`](Propagator::extract_span), and the handler runs inside that span,
    /// so `tracing::Span::current().context()` is the remote-parented context.
    fn extract(&self, _task: &mut Task) {}

    /// Makes the `natasks.process` span a child of the span context found in the headers.
    fn extract_span(&self, headers: &HeaderMap, span: &tracing::Span) {
        let cx = self.with_propagator(|p| p.extract(&HeaderExtractor(headers)));
        if !cx.span().span_context().is_valid() {
            return;
        }
        // Fails only when the span is disabled or no OpenTelemetry layer is installed;
        // there is nothing to join then.
        let _ = span.set_parent(cx);
    }
}

struct TaskInjector<'a>(&'a mut Task);

impl Injector for TaskInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set_header(key, value);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if let Some(value) = self.0.get(key) {
            return Some(value.as_str());
        }
        self.0.iter().find_map(|(name, values)| {
            let name: &str = name.as_ref();
            if name.eq_ignore_ascii_case(key) {
                values.first().map(|v| v.as_str())
            } else {
                None
            }
        })
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}
