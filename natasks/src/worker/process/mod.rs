//! One delivery: route it, run the handler with lease renewal, settle the outcome.
//!
//! The entry and its settlement are here; the steps have a file each: `decide` routes the
//! delivery and runs the handler, `lease` renews the task's lease while it runs, `wait`
//! holds it aside while its queue is paused or over its rate, `settle` tells the broker the
//! outcome, `track` records a tracked attempt and `workflow` dispatches what follows a step.

mod decide;
mod lease;
mod settle;
mod track;
mod wait;
mod workflow;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ack;
use super::pull::Leased;
use super::{DeadLetterReason, WorkerInner};
use crate::observe::{Finished, Outcome, Started};
use crate::wire;
use decide::decide;
use settle::{apply, ends, release_after, settle_with};
use track::Tracked;

pub(super) use decide::{panic_message, span_event};
pub(super) use lease::{renew, renew_lease_until, Lease};

/// What happens to a delivery.
#[derive(Debug)]
enum Settle {
    /// The handler succeeded: remove it.
    Ack,
    /// The handler failed without retry (with this error): remove it.
    GiveUp(String),
    /// Redeliver, after the delay if any; the attempt failed with the error.
    Retry(Option<Duration>, String),
    /// Publish to the dead-letter queue, then remove it.
    DeadLetter(DeadLetterReason, String),
    /// Drop it without a dead letter (unroutable with [`Unroutable::Discard`](crate::worker::Unroutable::Discard)).
    Discard(String),
    /// Cancelled ([`Client::cancel`](crate::Client::cancel)): remove it. `announce`: the
    /// cancel happened while this attempt ran (else the canceller announced it).
    Cancelled { announce: bool },
}

/// The label observers (and so metrics) get for a task name no handler is registered for:
/// names come from the wire, and a producer putting ids into them must not grow a series
/// per name.
pub(crate) const UNROUTED_TASK: &str = "(unrouted)";

/// Processes one delivery: the future the worker starts for it.
///
/// The message is taken apart before the future is built, so that the future (allocated
/// and moved for every task) holds only the parts processing uses, once.
pub(super) fn process(
    inner: Arc<WorkerInner>,
    leased: Leased,
    slot: OwnedSemaphorePermit,
    abandon: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let Leased { message, since } = leased;
    let async_nats::Message { reply, payload, headers, .. } = message;
    // The headers are shared with the task instead of copied.
    let headers = Arc::new(headers.unwrap_or_default());
    process_parts(inner, reply, payload, headers, since, slot, abandon)
}

async fn process_parts(
    inner: Arc<WorkerInner>,
    reply: Option<Subject>,
    payload: Bytes,
    headers: Arc<HeaderMap>,
    leased_at: tokio::time::Instant,
    slot: OwnedSemaphorePermit,
    abandon: CancellationToken,
) {
    let client = &inner.client;
    let Some(reply) = reply else {
        tracing::warn!(
            queue = inner.queue.as_str(),
            "delivery without a reply subject cannot be acknowledged; dropped"
        );
        return;
    };
    let Some((attempt, sequence)) = ack::delivery_info(&reply) else {
        tracing::warn!(
            queue = inner.queue.as_str(),
            reply = reply.as_str(),
            "delivery without JetStream metadata; handing it back"
        );
        settle_with(client, reply, AckKind::Nak(None)).await;
        return;
    };
    let task_name = wire::header(&headers, &wire::TASK_NAME).map(|v| v.as_str());
    let observers = &inner.observers;
    let received = (!observers.is_empty()).then(Instant::now);
    let name = task_name.unwrap_or_default();
    // One lookup serves the label and the handler.
    let route = task_name.and_then(|name| inner.routes.get_key_value(name));
    let label = route.map_or(UNROUTED_TASK, |(name, _)| &**name);
    let message_id = message_id(&headers);
    #[cfg(feature = "opentelemetry")]
    let otel = inner.propagator.as_deref().and_then(|p| p.as_otel()).map(|otel| {
        otel.start_process(
            &headers,
            crate::otel::ProcessAttrs {
                queue: &inner.queue,
                task: name,
                attempt,
                stream_sequence: sequence,
                message_id,
            },
        )
    });
    let span = process_span(&inner.queue, name, attempt, sequence);
    #[cfg(feature = "opentelemetry")]
    if let Some(cx) = &otel {
        crate::otel::adopt(&span, cx);
    }
    if let Some(id) = message_id {
        span.record("message_id", id);
    }
    observers.started(&Started { queue: &inner.queue, task: label, attempt });
    // Built in the call that wraps it, not bound first: see `traced`.
    let outcome = traced(
        async {
            let mut lease = Lease { since: leased_at, abandon: &abandon };
            let delivery = Received {
                reply: &reply,
                payload: &payload,
                headers: &headers,
                message_id,
                attempt,
                sequence,
            };
            let mut slot = Some(slot);
            let mut tracked = Tracked {
                attempt: inner
                    .tracking
                    .attempt(&headers, &inner.queue, name, attempt, sequence)
                    .map(Box::new),
                result: None,
                recorded: None,
            };
            let decided =
                decide(&inner, &delivery, task_name, route, &mut lease, &mut tracked, &mut slot);
            let (outcome, kind) = match decided.await {
                Some(settle) => {
                    let settle = match tracked.attempt {
                        Some(_) => Box::pin(tracked.record(settle)).await,
                        None => settle,
                    };
                    apply(&inner, &delivery, settle, &lease).await
                }
                None => (Outcome::HandedBack, AckKind::Nak(None)),
            };
            // The reply subject goes with the final ack instead of being copied for it.
            match wire::header(&headers, &wire::UNIQUE_KEY_NAME).filter(|_| ends(&kind)) {
                // Boxed: rare, and the processing future of every task stays small.
                Some(key) => {
                    Box::pin(release_after(&inner, reply, kind, key.as_str(), &headers, sequence))
                        .await
                }
                None => settle_with(client, reply, kind).await,
            }
            outcome
        },
        span.clone(),
        #[cfg(feature = "opentelemetry")]
        otel.as_ref(),
    )
    .await;
    #[cfg(feature = "opentelemetry")]
    if let Some(cx) = &otel {
        crate::otel::end_process(cx, outcome);
    }
    span.record("outcome", outcome.as_str());
    if !matches!(outcome, Outcome::Succeeded | Outcome::HandedBack) {
        span.record("otel.status_code", "ERROR");
    }
    observers.finished(&Finished {
        queue: &inner.queue,
        task: label,
        attempt,
        elapsed: received.map(|at| at.elapsed()).unwrap_or_default(),
        outcome,
    });
}

/// `settle` in the attempt's span, with the OpenTelemetry span's context (if any) current
/// while the middleware and the handler run.
///
/// Built by a function so that it is awaited where it is built: each binding a future is
/// moved through in `process` would keep a copy of it in the processing future, which is
/// boxed (and so allocated and copied) for every task.
fn traced<F: Future>(
    settle: F,
    span: tracing::Span,
    #[cfg(feature = "opentelemetry")] otel: Option<&opentelemetry::Context>,
) -> impl Future<Output = F::Output> {
    #[cfg(feature = "opentelemetry")]
    let settle = {
        use opentelemetry::trace::FutureExt as _;
        match otel {
            Some(cx) => futures_util::future::Either::Left(settle.with_context(cx.clone())),
            None => futures_util::future::Either::Right(settle),
        }
    };
    settle.instrument(span)
}

fn process_span(queue: &str, task: &str, attempt: u64, sequence: u64) -> tracing::Span {
    tracing::info_span!(
        "natasks.process",
        queue,
        task,
        message_id = tracing::field::Empty,
        attempt,
        stream_sequence = sequence,
        outcome = tracing::field::Empty,
        "messaging.system" = "nats",
        "messaging.operation" = "process",
        "messaging.destination.name" = queue,
        "natasks.task" = task,
        "otel.kind" = "consumer",
        "otel.status_code" = tracing::field::Empty,
    )
}

/// A delivery as the worker read it.
pub(super) struct Received<'a> {
    /// Where its acks go.
    pub(super) reply: &'a Subject,
    pub(super) payload: &'a Bytes,
    pub(super) headers: &'a Arc<HeaderMap>,
    /// The id the task was dispatched with.
    pub(super) message_id: Option<&'a str>,
    pub(super) attempt: u64,
    pub(super) sequence: u64,
}

/// The id the task was dispatched with (kept in `Natasks-Message-Id` for delayed tasks).
fn message_id(headers: &HeaderMap) -> Option<&str> {
    wire::header(headers, &wire::MESSAGE_ID_NAME)
        .or_else(|| wire::header(headers, &wire::NATS_MSG_ID_NAME))
        .map(|v| v.as_str())
}
