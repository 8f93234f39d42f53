//! OpenTelemetry spans and trace propagation (cargo feature `opentelemetry`).
//!
//! With [`OtelPropagator`] set on the client and on the worker, natasks creates
//! OpenTelemetry spans itself, through the OpenTelemetry API and the **global tracer
//! provider** (`opentelemetry::global::set_tracer_provider`), as the Go library's
//! OpenTelemetry middleware does:
//!
//! * every dispatch gets a `natasks.dispatch` span (kind producer), a child of the current
//!   OpenTelemetry context (the caller's span); its context goes into the task's headers
//!   as W3C trace context (`traceparent`, `tracestate`), the headers the Go middleware
//!   writes and reads through otel's global `TextMapPropagator`, so traces join across Go
//!   and Rust services;
//! * every processing attempt gets a `natasks.process` span (kind consumer), a child of
//!   the context found in the headers (a new trace when there is none), in whatever
//!   process or service the worker runs. Its context is the current OpenTelemetry context
//!   while the middleware and the handler run (`opentelemetry::Context::current()`), so
//!   spans the handler starts, with the OpenTelemetry API or through a
//!   `tracing-opentelemetry` layer, are its children.
//!
//! The spans carry the messaging attributes the Go middleware sets
//! (`messaging.system = "nats"`, `messaging.operation = "publish" | "process"`,
//! `messaging.destination.name = <queue>`, `natasks.task = <task name>`), natasks' own
//! (`message_id`, `attempt`, `stream_sequence`, `outcome`, `delayed`), and
//! status error when a dispatch fails or an attempt does not succeed (retried, given up,
//! dead-lettered or discarded); failures, retries and dead letters are span events.
//!
//! The `tracing` spans of the same names (see [`crate::observe`]) stay, for logs; they are
//! not the OpenTelemetry spans. Attributes are set only on spans that are recording, so a
//! task whose trace is not sampled costs a sampling decision and a span id on each side,
//! and the `traceparent` header; with [`OtelPropagator::sampled_only`] it costs the
//! dispatch side's sampling decision and nothing else.
//!
//! ```no_run
//! # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
//! use natasks::otel::OtelPropagator;
//! use natasks::{Client, Worker};
//!
//! // Once, at startup (crate opentelemetry_sdk, any exporter):
//! // let provider = SdkTracerProvider::builder()
//! //     .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.1))))
//! //     .with_batch_exporter(exporter)
//! //     .build();
//! // natasks::otel::opentelemetry::global::set_tracer_provider(provider.clone());
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
//! * Without a global tracer provider natasks records nothing, but still propagates: the
//!   headers carry the caller's context and the handler runs in the context from the
//!   headers.
//! * With a `tracing-opentelemetry` layer for the application's own spans, the dispatch
//!   span is a child of the `tracing` span that dispatches (through the layer's context
//!   activation, on by default; otherwise through the current `tracing` span). Keep
//!   natasks out of that layer (a filter such as `info,natasks=off` on it): otherwise the
//!   `tracing` spans `natasks.dispatch` and `natasks.process` become OpenTelemetry spans
//!   as well, nested under the native ones, and cost as much as before.
//! * Overhead, measured with no-op handlers at ~50,000 tasks/s on 2 cores shared with the
//!   server (the benchmark's `e2e_c64_observed*` workloads; see the README): a task whose
//!   trace is recorded costs about 7 µs more CPU, an unsampled one well under 1 µs plus
//!   carrying `traceparent`, which alone costs raw async-nats 6–12% of its throughput (one
//!   more header to write, store, deliver and parse). Sample with
//!   `Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))` (the worker follows
//!   the dispatcher's decision, which travels in `traceparent`), and for queues of many
//!   short tasks consider [`OtelPropagator::sampled_only`], which leaves the header off
//!   unsampled tasks.
//! * The `opentelemetry` version of the application must be the one natasks uses
//!   (re-exported here as [`opentelemetry`]), or the global provider and the context are
//!   not shared.
//! * Headers are written in lower case (`traceparent`); reading also accepts any other
//!   case (`Traceparent`, as a Go `http.Header` carrier would write it).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr as _;
use std::sync::{Arc, OnceLock};

use async_nats::header::HeaderName;
use async_nats::HeaderMap;
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _,
    TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, StringValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::middleware::Propagator;
use crate::observe::Outcome;
use crate::task::Task;

pub use opentelemetry;
pub use tracing_opentelemetry;

/// The W3C trace context header holding the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C trace context header holding vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// [`TRACEPARENT`] as a header name, built once.
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);

/// Room for the attributes of a span: those it starts with and the one or two set later
/// (`message_id`, `stream_sequence` or `outcome`).
const ATTRIBUTES: usize = 8;

/// The instrumentation scope of natasks' spans.
const SCOPE: &str = "natasks";

/// Creates natasks' OpenTelemetry spans and propagates their context through task
/// headers. Set it on the client and on the worker
/// ([`ClientBuilder::propagator`](crate::ClientBuilder::propagator),
/// [`WorkerBuilder::propagator`](crate::WorkerBuilder::propagator)).
///
/// [`OtelPropagator::new`] uses W3C trace context; [`OtelPropagator::global`] uses the
/// propagator installed with `opentelemetry::global::set_text_map_propagator`, as the Go
/// middleware does; [`OtelPropagator::with`] takes any `TextMapPropagator` (for example a
/// composite of trace context and baggage). Spans come from the global tracer provider, as
/// installed when the first span is started.
///
/// By default every task carries its trace context, sampled or not, as W3C trace context
/// asks: the worker then follows the dispatcher's sampling decision. At high task rates
/// that header is the largest cost of tracing (see the [module docs](self)); with
/// [`sampled_only`](OtelPropagator::sampled_only) only sampled tasks carry it.
pub struct OtelPropagator {
    kind: Kind,
    sampled_only: bool,
    tracer: OnceLock<BoxedTracer>,
}

enum Kind {
    TraceContext(TraceContextPropagator),
    Global,
    Custom(Box<dyn TextMapPropagator + Send + Sync>),
}

impl OtelPropagator {
    /// W3C trace context (`traceparent`, `tracestate`).
    pub fn new() -> Self {
        Self::of(Kind::TraceContext(TraceContextPropagator::new()))
    }

    /// The global propagator at the time of each dispatch and delivery
    /// (`opentelemetry::global::get_text_map_propagator`). Propagates nothing until the
    /// application installs one.
    pub fn global() -> Self {
        Self::of(Kind::Global)
    }

    /// A propagator of your choice.
    pub fn with(propagator: impl TextMapPropagator + Send + Sync + 'static) -> Self {
        Self::of(Kind::Custom(Box::new(propagator)))
    }

    /// Writes trace context only for sampled dispatches, and reads a task without one as
    /// not sampled.
    ///
    /// A task whose dispatch was not sampled then carries no header at all, saving the
    /// cost of carrying one (about 70 bytes to write, store, deliver and parse per task).
    /// The worker follows the dispatcher's decision itself: a task without trace context,
    /// or with one that is not sampled, gets no `natasks.process` span, and its attempt
    /// runs under a remote parent marked not sampled, so that with the usual `ParentBased`
    /// sampler the handler's spans are not recorded either, and what the handler calls
    /// downstream is told the trace is not sampled. Sampled tasks are traced as usual.
    ///
    /// The price: a worker with this setting does not trace tasks dispatched without trace
    /// context (from a service without OpenTelemetry, or the `natasks` CLI), and a worker
    /// without it (a Go worker, say) starts a trace of its own for each task dispatched
    /// unsampled here, sampled by its own root sampler. Set it on the clients and the
    /// workers of a queue together.
    #[must_use]
    pub fn sampled_only(mut self) -> Self {
        self.sampled_only = true;
        self
    }

    fn of(kind: Kind) -> Self {
        Self { kind, sampled_only: false, tracer: OnceLock::new() }
    }

    fn with_propagator<T>(&self, mut f: impl FnMut(&dyn TextMapPropagator) -> T) -> T {
        match &self.kind {
            Kind::TraceContext(p) => f(p),
            Kind::Custom(p) => f(p.as_ref()),
            Kind::Global => opentelemetry::global::get_text_map_propagator(|p| f(p)),
        }
    }

    fn tracer(&self) -> &BoxedTracer {
        self.tracer.get_or_init(|| {
            opentelemetry::global::tracer_with_scope(
                InstrumentationScope::builder(SCOPE)
                    .with_version(env!("CARGO_PKG_VERSION"))
                    .build(),
            )
        })
    }

    /// Starts the `natasks.dispatch` span, a child of the current context; returns the
    /// context to make current for the dispatch.
    pub(crate) fn start_dispatch(&self, queue: &str, task: &Task, delayed: bool) -> Context {
        let parent = current_context();
        let span = self.start_span("natasks.dispatch", SpanKind::Producer, &parent, || {
            let mut attributes = Vec::with_capacity(ATTRIBUTES);
            attributes.extend([
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.operation", "publish"),
                KeyValue::new("messaging.destination.name", shared(queue)),
                KeyValue::new("natasks.task", shared(task.name())),
                KeyValue::new("delayed", delayed),
            ]);
            if let Some(id) = task.dispatch_id() {
                attributes.push(KeyValue::new("message_id", id.to_owned()));
            }
            attributes
        });
        parent.with_span(span)
    }

    /// Starts the `natasks.process` span, a child of the context in `headers` (a root
    /// without one); returns the context to make current while the attempt runs.
    pub(crate) fn start_process(&self, headers: &HeaderMap, attrs: ProcessAttrs<'_>) -> Context {
        let parent = self.extract(headers);
        if self.sampled_only && !parent.span().span_context().is_sampled() {
            // The dispatcher decided: nothing of this attempt is recorded, and the handler
            // runs in a context that says so.
            return parent;
        }
        let span = self.start_span("natasks.process", SpanKind::Consumer, &parent, || {
            let mut attributes = Vec::with_capacity(ATTRIBUTES);
            attributes.extend([
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.operation", "process"),
                KeyValue::new("messaging.destination.name", shared(attrs.queue)),
                KeyValue::new("natasks.task", shared(attrs.task)),
                KeyValue::new("attempt", i64::try_from(attrs.attempt).unwrap_or(i64::MAX)),
                KeyValue::new(
                    "stream_sequence",
                    i64::try_from(attrs.stream_sequence).unwrap_or(i64::MAX),
                ),
            ]);
            if let Some(id) = attrs.message_id {
                attributes.push(KeyValue::new("message_id", id.to_owned()));
            }
            attributes
        });
        parent.with_span(span)
    }

    /// A span named `name` under `parent`, with `attributes` if it records. Under a sampled
    /// parent the span almost surely records too, so the attributes go to the builder and
    /// become the span's list as they are, allocated once; otherwise they are made only
    /// once the span turns out to record.
    fn start_span(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> BoxedSpan {
        let builder = SpanBuilder::from_name(Cow::Borrowed(name)).with_kind(kind);
        if parent.span().span_context().is_sampled() {
            return self.tracer().build_with_context(builder.with_attributes(attributes()), parent);
        }
        let mut span = self.tracer().build_with_context(builder, parent);
        if span.is_recording() {
            span.set_attributes(attributes());
        }
        span
    }
}

impl OtelPropagator {
    /// The context in `headers`: W3C trace context is read by hand in its usual form (no
    /// allocation, no formatting machinery), anything else by the propagator.
    fn extract(&self, headers: &HeaderMap) -> Context {
        // The headers come from the wire and the propagator may be the user's: a panic on
        // odd input loses the trace context, not the task.
        let extracted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.extract_headers(headers)
        }));
        let cx = extracted.unwrap_or_else(|_| {
            tracing::warn!("the trace propagator panicked on a task's headers; the task runs without its trace context");
            Context::new()
        });
        if self.sampled_only && !cx.span().span_context().is_valid() {
            // Whatever else came (baggage, say) stays.
            return cx.with_remote_span_context(unsampled());
        }
        cx
    }

    fn extract_headers(&self, headers: &HeaderMap) -> Context {
        let extractor = HeaderExtractor(headers);
        if let Kind::TraceContext(_) = self.kind {
            let Some(traceparent) = extractor.get(TRACEPARENT) else {
                return Context::new();
            };
            if let Some((trace_id, span_id, flags)) = decode_traceparent(traceparent) {
                let state = extractor
                    .get(TRACESTATE)
                    .map(|s| TraceState::from_str(s).unwrap_or_default())
                    .unwrap_or_default();
                let remote = SpanContext::new(trace_id, span_id, flags, true, state);
                return Context::new().with_remote_span_context(remote);
            }
        }
        self.with_propagator(|p| p.extract_with_context(&Context::new(), &extractor))
    }

    /// Writes the context of `cx` into the task's headers. What the propagator writes is
    /// cleared first: a task dispatched again (one a handler received, say) still carries
    /// the context it came with, which must not travel on.
    fn inject_context(&self, cx: &Context, task: &mut Task) {
        let span = cx.span();
        let span_context = span.span_context();
        let skip_span = self.sampled_only && !span_context.is_sampled();
        match &self.kind {
            Kind::TraceContext(_) => {
                task.remove_headers(&[TRACEPARENT, TRACESTATE]);
                if !span_context.is_valid() || skip_span {
                    return;
                }
                task.set_trusted_header(TRACEPARENT_NAME, encode_traceparent(span_context));
                // An empty `tracestate` is not written, as Go's propagator does not write it.
                let state = span_context.trace_state().header();
                if !state.is_empty() {
                    task.set_header(TRACESTATE, state);
                }
            }
            _ => self.with_propagator(|p| {
                let fields: Vec<&str> = p.fields().collect();
                task.remove_headers(&fields);
                if skip_span {
                    // The rest of the context (baggage, say) still travels.
                    let without_span = cx.with_remote_span_context(SpanContext::empty_context());
                    p.inject_context(&without_span, &mut TaskInjector(task));
                } else {
                    p.inject_context(cx, &mut TaskInjector(task));
                }
            }),
        }
    }
}

/// A remote parent marked not sampled, for a task that came without trace context to a
/// worker that propagates sampled traces only.
fn unsampled() -> SpanContext {
    use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator};
    let ids = RandomIdGenerator::default();
    SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::default(),
        true,
        TraceState::default(),
    )
}

/// `traceparent` for a valid span context, as the W3C propagator writes it (version 00,
/// lower-case hex, only the sampled flag).
fn encode_traceparent(context: &SpanContext) -> String {
    fn push_hex(out: &mut String, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for byte in bytes {
            out.push(char::from(DIGITS[usize::from(byte >> 4)]));
            out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        }
    }
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, &context.trace_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &context.span_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &[(context.trace_flags() & TraceFlags::SAMPLED).to_u8()]);
    out
}

/// Reads `traceparent` in the form every W3C propagator writes (version 00, 55 characters,
/// lower-case hex, ids not zero). `None` for anything else, which is then left to the
/// propagator: the result is the same as its, only cheaper.
fn decode_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    fn hex(digits: &[u8]) -> Option<u128> {
        digits.iter().try_fold(0u128, |acc, &digit| {
            let nibble = match digit {
                b'0'..=b'9' => digit - b'0',
                b'a'..=b'f' => digit - b'a' + 10,
                _ => return None,
            };
            Some(acc << 4 | u128::from(nibble))
        })
    }
    let bytes = value.as_bytes();
    if bytes.len() != 55 || !bytes.starts_with(b"00-") || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let trace_id = hex(&bytes[3..35])?;
    let span_id = u64::try_from(hex(&bytes[36..52])?).ok()?;
    let flags = u8::try_from(hex(&bytes[53..55])?).ok()?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some((
        TraceId::from(trace_id),
        SpanId::from(span_id),
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
    ))
}

/// How many queue and task names a thread keeps for span attributes.
const SHARED_NAMES: usize = 32;

thread_local! {
    static NAMES: std::cell::RefCell<Vec<StringValue>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `name` as an attribute value shared by every span of this thread that names it: a
/// queue or task name is then not copied into every recorded span, nor freed by the
/// exporter's thread for each one.
fn shared(name: &str) -> StringValue {
    NAMES
        .try_with(|names| {
            let mut names = names.try_borrow_mut().ok()?;
            if let Some(found) = names.iter().find(|known| known.as_str() == name) {
                return Some(found.clone());
            }
            let value = StringValue::from(Arc::<str>::from(name));
            if names.len() == SHARED_NAMES {
                names.remove(0);
            }
            names.push(value.clone());
            Some(value)
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| StringValue::from(name.to_owned()))
}

/// What the `natasks.process` span records at its start.
pub(crate) struct ProcessAttrs<'a> {
    pub(crate) queue: &'a str,
    pub(crate) task: &'a str,
    pub(crate) attempt: u64,
    pub(crate) stream_sequence: u64,
    pub(crate) message_id: Option<&'a str>,
}

/// The parent of a dispatch span: the current OpenTelemetry context, or, when it has no
/// span (a `tracing-opentelemetry` layer without context activation), the context of the
/// current `tracing` span.
fn current_context() -> Context {
    let cx = Context::current();
    if cx.has_active_span() {
        return cx;
    }
    let from_tracing = tracing::Span::current().context();
    if from_tracing.has_active_span() {
        from_tracing
    } else {
        cx
    }
}

/// Makes natasks' `tracing` span a child of its OpenTelemetry span, should a
/// `tracing-opentelemetry` layer see it (nothing to do for a span no subscriber wants).
pub(crate) fn adopt(span: &tracing::Span, cx: &Context) {
    if !span.is_disabled() {
        // Fails only when no OpenTelemetry layer sees the span: nothing to join then.
        let _ = span.set_parent(cx.clone());
    }
}

/// Ends the dispatch span of `cx`, with status error if the dispatch failed.
pub(crate) fn end_dispatch(cx: &Context, error: Option<&crate::DispatchError>) {
    let span = cx.span();
    if let Some(error) = error {
        if span.is_recording() {
            span.add_event("dispatch failed", vec![KeyValue::new("error", error.to_string())]);
            span.set_status(Status::error(error.to_string()));
        }
    }
    span.end();
}

/// Ends the process span of `cx` with its outcome; status error unless it succeeded or was
/// handed back.
pub(crate) fn end_process(cx: &Context, outcome: Outcome) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(KeyValue::new("outcome", outcome.as_str()));
        if !matches!(outcome, Outcome::Succeeded | Outcome::HandedBack) {
            span.set_status(Status::error(outcome.as_str()));
        }
    }
    span.end();
}

/// Records the stored message's stream sequence on the dispatch span of `cx`.
pub(crate) fn set_sequence(cx: &Context, sequence: u64) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(KeyValue::new(
            "stream_sequence",
            i64::try_from(sequence).unwrap_or(i64::MAX),
        ));
    }
}

/// Adds an event to the current span, if it is recording (failures, retries and dead
/// letters on the process span).
pub(crate) fn add_current_event(name: &'static str, error: &str) {
    Context::map_current(|cx| {
        let span = cx.span();
        if span.is_recording() {
            span.add_event(name, vec![KeyValue::new("error", error.to_owned())]);
        }
    });
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
        f.debug_struct("OtelPropagator")
            .field("kind", &kind)
            .field("sampled_only", &self.sampled_only)
            .finish()
    }
}

impl Propagator for OtelPropagator {
    /// Writes the current context (the `natasks.dispatch` span's, which is current during
    /// the dispatch) into the task's headers, replacing any the task already carried. W3C
    /// trace context is written only for a valid span context (and, with
    /// [`sampled_only`](OtelPropagator::sampled_only), a sampled one).
    fn inject(&self, task: &mut Task) {
        Context::map_current(|cx| self.inject_context(cx, task));
    }

    /// Nothing: the context from the headers is the parent of the `natasks.process` span,
    /// whose context is current while the middleware and the handler run.
    fn extract(&self, _task: &mut Task) {}

    fn as_otel(&self) -> Option<&OtelPropagator> {
        Some(self)
    }
}

struct TaskInjector<'a>(&'a mut Task);

impl Injector for TaskInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` is not written, as Go's propagator does not write it.
        if value.is_empty() && key.eq_ignore_ascii_case(TRACESTATE) {
            return;
        }
        self.0.set_header(key, value);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    /// One pass over the few headers a task has, in any case; looking `key` up in the map
    /// would first allocate a header name.
    fn get(&self, key: &str) -> Option<&str> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (key, value) in pairs {
            headers.insert(*key, *value);
        }
        headers
    }

    /// What the SDK's W3C propagator extracts from the same headers.
    fn sdk_extract(headers: &HeaderMap) -> SpanContext {
        let cx = TraceContextPropagator::new()
            .extract_with_context(&Context::new(), &HeaderExtractor(headers));
        cx.span().span_context().clone()
    }

    #[test]
    fn extract_reads_what_the_sdk_propagator_reads() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        let parent = "b7ad6b7169203331";
        let cases = [
            format!("00-{id}-{parent}-01"),
            format!("00-{id}-{parent}-00"),
            format!("00-{id}-{parent}-03"),
            format!("00-{id}-{parent}-ff"),
            format!("00-{}-{parent}-01", id.to_uppercase()),
            format!("00-{id}-{}-01", parent.to_uppercase()),
            format!("00-{}-{parent}-01", "0".repeat(32)),
            format!("00-{id}-{}-01", "0".repeat(16)),
            format!("01-{id}-{parent}-01-future"),
            format!("00-{id}-{parent}-01-extra"),
            format!(" 00-{id}-{parent}-01 "),
            format!("00-{id}-{parent}-0x"),
            format!("00-{id}-{parent}"),
            format!("ff-{id}-{parent}-01"),
            "garbage".to_owned(),
            String::new(),
        ];
        for traceparent in &cases {
            for state in [None, Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"), Some("")] {
                let mut pairs = vec![("traceparent", traceparent.as_str())];
                pairs.extend(state.map(|s| ("tracestate", s)));
                let headers = headers(&pairs);
                let ours = OtelPropagator::new().extract(&headers);
                assert_eq!(
                    ours.span().span_context(),
                    &sdk_extract(&headers),
                    "traceparent {traceparent:?}, tracestate {state:?}"
                );
            }
        }
        let none = OtelPropagator::new().extract(&HeaderMap::new());
        assert!(!none.span().span_context().is_valid());
    }

    #[test]
    fn extract_accepts_any_header_case() {
        let value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = OtelPropagator::new().extract(&headers(&[("Traceparent", value)]));
        assert_eq!(cx.span().span_context().span_id(), SpanId::from(0xb7ad6b7169203331));
        assert!(cx.span().span_context().is_sampled());
    }

    fn remote(sampled: bool) -> Context {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(0x1234),
            SpanId::from(0x5678),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn header(task: &Task, name: &str) -> Option<String> {
        task.header(name).map(str::to_owned)
    }

    /// A received task dispatched again must not carry on the context it came with.
    #[test]
    fn inject_replaces_the_context_a_task_came_with() {
        let stale = || {
            Task::new("t", "")
                .with_header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .with_header("tracestate", "old=1")
                .with_header("x-kept", "yes")
        };
        let cases = [
            (
                OtelPropagator::new(),
                remote(true),
                Some("00-00000000000000000000000000001234-0000000000005678-01"),
            ),
            (OtelPropagator::new(), Context::new(), None),
            (OtelPropagator::new().sampled_only(), remote(false), None),
        ];
        for (propagator, cx, traceparent) in cases {
            let mut task = stale();
            propagator.inject_context(&cx, &mut task);
            assert_eq!(header(&task, "traceparent").as_deref(), traceparent, "{propagator:?}");
            assert_eq!(header(&task, "tracestate"), None, "{propagator:?}");
            assert_eq!(header(&task, "x-kept").as_deref(), Some("yes"));
        }
    }

    /// With `sampled_only` an unsampled dispatch leaves out the span, not the rest of the
    /// context: baggage still travels, and the worker keeps it.
    #[test]
    fn sampled_only_still_carries_baggage() {
        use opentelemetry::baggage::BaggageExt as _;
        use opentelemetry::propagation::TextMapCompositePropagator;
        use opentelemetry_sdk::propagation::BaggagePropagator;
        let propagator = || {
            OtelPropagator::with(TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ]))
            .sampled_only()
        };
        let cx = remote(false).with_baggage([KeyValue::new("tenant", "acme")]);
        let mut task = Task::new("t", "");
        propagator().inject_context(&cx, &mut task);
        assert_eq!(header(&task, "traceparent"), None);
        assert_eq!(header(&task, "baggage").as_deref(), Some("tenant=acme"));

        let received = propagator().extract(task.headers());
        assert_eq!(
            received.baggage().get("tenant").map(|v| v.to_string()).as_deref(),
            Some("acme")
        );
        let span = received.span();
        assert!(span.span_context().is_valid() && !span.span_context().is_sampled());
    }

    #[test]
    fn inject_writes_what_the_sdk_propagator_writes() {
        let contexts = [
            SpanContext::new(
                TraceId::from(0x0af7651916cd43dd8448eb211c80319c),
                SpanId::from(0xb7ad6b7169203331),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            SpanContext::new(
                TraceId::from(1),
                SpanId::from(u64::MAX),
                TraceFlags::new(0x02),
                true,
                TraceState::from_key_value([("rojo", "00f067aa0ba902b7")]).unwrap(),
            ),
            SpanContext::empty_context(),
        ];
        for context in contexts {
            let cx = Context::new().with_remote_span_context(context.clone());
            let mut task = Task::new("t", "");
            OtelPropagator::new().inject_context(&cx, &mut task);
            let mut expected = std::collections::HashMap::new();
            TraceContextPropagator::new().inject_context(&cx, &mut expected);
            expected.retain(|_, value: &mut String| !value.is_empty());
            let ours: std::collections::HashMap<String, String> = task
                .headers()
                .iter()
                .map(|(name, values)| (name.to_string(), values[0].to_string()))
                .collect();
            assert_eq!(ours, expected, "{context:?}");
        }
    }
}
