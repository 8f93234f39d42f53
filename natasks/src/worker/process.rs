//! One delivery: route it, run the handler with lease renewal, settle the outcome.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use async_nats::HeaderMap;
use futures_util::FutureExt;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::dead_letter;
use super::limits::Permit;
use super::pull::Leased;
use super::{DeadLetterReason, Unroutable, WorkerInner};
use crate::error::{Failure, HandlerError};
use crate::extract::{Live, ProgressReport};
use crate::handler::BoxHandler;
use crate::middleware::Next;
use crate::observe::{Finished, Outcome, Started};
use crate::task::{DecodeError, Delivery, Task};
use crate::track::worker::{Attempt, Begin, Ended, Unrecorded};
use crate::wire;

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
    /// Drop it without a dead letter (unroutable with [`Unroutable::Discard`]).
    Discard(String),
    /// Cancelled ([`Client::cancel`](crate::Client::cancel)): remove it. `announce`: the
    /// cancel happened while this attempt ran (else the canceller announced it).
    Cancelled { announce: bool },
}

/// The label observers (and so metrics) get for a task name no handler is registered for:
/// names come from the wire, and a producer putting ids into them must not grow a series
/// per name.
pub(crate) const UNROUTED_TASK: &str = "(unrouted)";

pub(super) async fn process(
    inner: Arc<WorkerInner>,
    leased: Leased,
    slot: OwnedSemaphorePermit,
    abandon: CancellationToken,
) {
    let Leased { mut message, since: leased_at } = leased;
    let (attempt, sequence) = match message.info() {
        Ok(info) => (u64::try_from(info.delivered).unwrap_or(1).max(1), info.stream_sequence),
        Err(err) => {
            tracing::warn!(queue = inner.queue.as_str(), error = %err, "delivery without JetStream metadata; handing it back");
            nak(&message, None).await;
            return;
        }
    };
    // The headers are shared with the task instead of copied; the message keeps what acks
    // need (its reply subject).
    let headers = Arc::new(message.message.headers.take().unwrap_or_default());
    let task_name = headers.get(wire::TASK_NAME).map(|v| v.as_str());
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
    let settle = async {
        let lease = Lease { since: leased_at, abandon: &abandon };
        let delivery = Received { message: &message, headers: &headers, attempt, sequence };
        let mut slot = Some(slot);
        let mut tracked = Tracked {
            attempt: inner.tracking.attempt(&headers, &inner.queue, name, attempt, sequence),
            result: None,
        };
        let decided = decide(&inner, &delivery, task_name, route, &lease, &mut tracked, &mut slot);
        match decided.await {
            Some(settle) => {
                let settle = tracked.record(settle).await;
                apply(&inner, &message, &headers, attempt, sequence, settle, &lease).await
            }
            None => {
                nak(&message, None).await;
                Outcome::HandedBack
            }
        }
    };
    // The OpenTelemetry span's context is current while the middleware and the handler run.
    #[cfg(feature = "opentelemetry")]
    let settle = {
        use opentelemetry::trace::FutureExt as _;
        match &otel {
            Some(cx) => futures_util::future::Either::Left(settle.with_context(cx.clone())),
            None => futures_util::future::Either::Right(settle),
        }
    };
    let outcome = settle.instrument(span.clone()).await;
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

/// The task's lease: when it began (delivery or last renewal), and the signal that
/// shutdown gave up waiting for the task.
pub(super) struct Lease<'a> {
    pub(super) since: tokio::time::Instant,
    pub(super) abandon: &'a CancellationToken,
}

/// The tracking of a tracked task's attempt, and the handler's result to record.
struct Tracked<'a> {
    attempt: Option<Attempt<'a>>,
    result: Option<Vec<u8>>,
}

impl Tracked<'_> {
    /// Records how the attempt ended, before the broker hears it. A result too large to
    /// store turns a success into a dead letter saying so.
    async fn record(&mut self, settle: Settle) -> Settle {
        let Some(attempt) = &mut self.attempt else { return settle };
        let ended = match &settle {
            Settle::Ack => Ended::Succeeded,
            Settle::GiveUp(error) | Settle::Discard(error) => Ended::Failed { error },
            Settle::Retry(delay, error) => Ended::Retrying { delay: *delay, error },
            Settle::DeadLetter(reason, error) => {
                Ended::DeadLettered { reason: reason.as_str(), error }
            }
            Settle::Cancelled { announce } => Ended::Cancelled { announce: *announce },
        };
        let result = if matches!(settle, Settle::Ack) { self.result.take() } else { None };
        match attempt.finish(ended, result).await {
            Ok(()) => settle,
            Err(Unrecorded::ResultTooLarge(error)) => {
                let reason = DeadLetterReason::Rejected;
                let ended = Ended::DeadLettered { reason: reason.as_str(), error: &error };
                let _ = attempt.finish(ended, None).await;
                Settle::DeadLetter(reason, error)
            }
        }
    }
}

/// A delivery as the worker read it.
struct Received<'a> {
    message: &'a Message,
    headers: &'a Arc<HeaderMap>,
    attempt: u64,
    sequence: u64,
}

/// Runs the handler if the delivery can be routed (`route`: the task name's entry in the
/// route table); `None` when shutdown abandoned it.
async fn decide(
    inner: &WorkerInner,
    delivery: &Received<'_>,
    task_name: Option<&str>,
    route: Option<(&Arc<str>, &BoxHandler)>,
    lease: &Lease<'_>,
    tracked: &mut Tracked<'_>,
    slot: &mut Option<OwnedSemaphorePermit>,
) -> Option<Settle> {
    let Received { message, headers, attempt, sequence } = *delivery;
    // A tracked task gets its channel first: a cancel is obeyed before anything else.
    let mut live = None;
    if let Some(tracking) = tracked.attempt.as_mut() {
        let (channel, reports) = Live::new(true);
        if let Begin::Cancelled { announce } = tracking.check(&channel).await {
            return Some(Settle::Cancelled { announce });
        }
        live = Some((channel, reports));
    }
    let retry = &inner.settings.retry;
    if retry.overdue(attempt) {
        return Some(Settle::DeadLetter(
            DeadLetterReason::NoOutcome,
            format!(
                "delivered {attempt} times without an outcome (worker crashed or lost its lease)"
            ),
        ));
    }
    let Some(name) = task_name else {
        return Some(unroutable(
            inner,
            attempt,
            DeadLetterReason::MissingTaskName,
            "message has no Natasks-Task header".to_owned(),
        ));
    };
    let Some((name, handler)) = route else {
        return Some(unroutable(
            inner,
            attempt,
            DeadLetterReason::UnknownTask,
            format!("no handler for task {name:?} on queue {:?}", inner.queue),
        ));
    };
    let mut task = Task::received(
        name.clone(),
        message.payload.clone(),
        headers.clone(),
        message_id(headers).map(str::to_owned),
        Delivery::new(inner.shared_queue.clone(), attempt, sequence),
    );
    // A task of a paused queue the worker already held, or one over its rate, waits here
    // (its lease renewed, its slot lent to other tasks while the waiting room has space)
    // until the pause ends or the rate's next period.
    loop {
        if inner.limits.paused() {
            let recheck = tokio::time::Instant::now() + PAUSE_RECHECK;
            wait_aside(inner, message, lease, slot, recheck).await?;
            continue;
        }
        if !inner.limits.active() {
            break;
        }
        match inner.limits.acquire(name).await {
            Permit::Go => break,
            Permit::WaitUntil(at) => wait_aside(inner, message, lease, slot, at).await?,
        }
    }
    // Progress, cancellation and the result need a channel to the handler; most tasks
    // need none.
    if live.is_none() && handler.live {
        live = Some(Live::new(false));
    }
    if let Some((channel, _)) = &live {
        task.set_live(channel.clone());
    }
    if let Some(tracking) = tracked.attempt.as_mut() {
        if let Begin::Cancelled { announce } = tracking.start(lease_end(inner)).await {
            return Some(Settle::Cancelled { announce });
        }
    }
    if let Some(propagator) = &inner.propagator {
        // A propagator is user code: a panic in it fails the attempt like a handler's.
        let extracted =
            std::panic::catch_unwind(AssertUnwindSafe(|| propagator.extract(&mut task)));
        if let Err(panic) = extracted {
            let error = format!("propagator panicked: {}", panic_message(&*panic));
            return Some(failed(inner, attempt, HandlerError::msg(error)));
        }
    }
    let run =
        AssertUnwindSafe(Next::new(inner.layers.clone(), handler.clone()).run(task)).catch_unwind();
    let period = inner.settings.progress_interval;
    let timed = async {
        match inner.settings.task_timeout {
            None => Some(run.await),
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
        }
    };
    tokio::pin!(timed);
    // Most handlers finish on their first poll; only the others need a lease timer.
    let result = match (timed.as_mut().now_or_never(), &mut live) {
        (Some(result), _) => result,
        (None, None) => renew_lease_until(message, timed, period, lease).await?,
        (None, Some((_, reports))) => {
            let attempt = tracked.attempt.as_mut();
            drive_live(inner, message, timed, lease, reports, attempt).await?
        }
    };
    if let (Some(tracking), Some((_, reports))) = (tracked.attempt.as_mut(), &live) {
        if let Some(report) = reports.borrow().clone() {
            tracking.last_report(report);
        }
    }
    if let Some((channel, _)) = &live {
        // Whatever the handler returned after the signal, the task was cancelled.
        if channel.cancel.is_cancelled() {
            return Some(Settle::Cancelled { announce: true });
        }
        tracked.result = channel.take_result();
    }
    let error = match result {
        Some(Ok(Ok(()))) => return Some(Settle::Ack),
        Some(Ok(Err(error))) => error,
        Some(Err(panic)) => {
            HandlerError::msg(format!("handler panicked: {}", panic_message(&*panic)))
        }
        None => HandlerError::msg(format!(
            "task timed out after {:?}",
            inner.settings.task_timeout.unwrap_or_default()
        )),
    };
    Some(failed(inner, attempt, error))
}

/// Drives a handler that did not finish on its first poll, renewing its lease every
/// `period` from when the lease began (not from when the handler started); `None` when
/// shutdown abandons it.
pub(super) async fn renew_lease_until<F: Future>(
    message: &Message,
    mut work: Pin<&mut F>,
    period: Duration,
    lease: &Lease<'_>,
) -> Option<F::Output> {
    let progress = tokio::time::sleep_until(lease.since + period);
    tokio::pin!(progress);
    loop {
        tokio::select! {
            biased;
            result = work.as_mut() => return Some(result),
            () = lease.abandon.cancelled() => return None,
            () = &mut progress => {
                progress.as_mut().reset(tokio::time::Instant::now() + period);
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %err, "could not renew the task's lease");
                }
            }
        }
    }
}

/// How often a held task of a paused queue looks whether the pause ended (a resume is
/// heard at once, a pause's end by its time only when it comes).
const PAUSE_RECHECK: Duration = Duration::from_millis(200);

/// Waits until `at` with the task's lease renewed. Meanwhile its slot goes to other tasks
/// if the worker's waiting room has space (at most `concurrency` tasks wait without a
/// slot), and is taken back after; `None` when shutdown abandons the task.
async fn wait_aside(
    inner: &WorkerInner,
    message: &Message,
    lease: &Lease<'_>,
    slot: &mut Option<OwnedSemaphorePermit>,
    at: tokio::time::Instant,
) -> Option<()> {
    let period = inner.settings.progress_interval;
    let room = inner.waiting_room.clone().try_acquire_owned().ok();
    let lent = match (&room, slot.take()) {
        (Some(_), Some(permit)) => {
            let semaphore = permit.semaphore().clone();
            drop(permit);
            Some(semaphore)
        }
        (_, permit) => {
            *slot = permit;
            None
        }
    };
    let wait = tokio::time::sleep_until(at);
    tokio::pin!(wait);
    tokio::select! {
        biased;
        // Stopping: the task goes back now rather than wait out the drain.
        () = inner.stopping.cancelled() => return None,
        waited = renew_lease_until(message, wait, period, lease) => waited?,
    }
    if let Some(semaphore) = lent {
        let back = semaphore.acquire_owned();
        tokio::pin!(back);
        let permit = renew_lease_until(message, back, period, lease).await?;
        *slot = Some(permit.expect("the slot semaphore is never closed"));
    }
    drop(room);
    Some(())
}

/// Like [`renew_lease_until`], for a handler with a channel: a progress report renews the
/// lease too, and a tracked task's record follows the lease and the reports.
async fn drive_live<F: Future>(
    inner: &WorkerInner,
    message: &Message,
    mut work: Pin<&mut F>,
    lease: &Lease<'_>,
    reports: &mut watch::Receiver<Option<ProgressReport>>,
    mut tracked: Option<&mut Attempt<'_>>,
) -> Option<F::Output> {
    let period = inner.settings.progress_interval;
    let renew = tokio::time::sleep_until(lease.since + period);
    tokio::pin!(renew);
    loop {
        let report = tokio::select! {
            biased;
            result = work.as_mut() => return Some(result),
            () = lease.abandon.cancelled() => return None,
            // The sender lives as long as the task: `changed` fails only after the handler.
            Ok(()) = reports.changed() => reports.borrow_and_update().clone(),
            () = &mut renew => None,
        };
        renew.as_mut().reset(tokio::time::Instant::now() + period);
        if let Err(err) = message.ack_with(AckKind::Progress).await {
            tracing::warn!(error = %err, "could not renew the task's lease");
        }
        if let Some(attempt) = tracked.as_deref_mut() {
            match report {
                Some(report) => attempt.progress(report, lease_end(inner)).await,
                None => attempt.renewed(lease_end(inner)).await,
            }
        }
    }
}

/// When a lease taken (or renewed) now ends.
fn lease_end(inner: &WorkerInner) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + inner.settings.ack_wait
}

fn failed(inner: &WorkerInner, attempt: u64, error: HandlerError) -> Settle {
    let retry = &inner.settings.retry;
    let text = error.to_string();
    match error.failure() {
        Failure::NoRetry => {
            tracing::info!(error = %text, "task failed; not retried");
            span_event(inner, "task failed; not retried", &text);
            Settle::GiveUp(text)
        }
        Failure::DeadLetter if error.source().is::<DecodeError>() => {
            Settle::DeadLetter(DeadLetterReason::UndecodablePayload, text)
        }
        Failure::DeadLetter => Settle::DeadLetter(DeadLetterReason::Rejected, text),
        Failure::Retry(_) if retry.exhausted(attempt) => {
            Settle::DeadLetter(DeadLetterReason::RetriesExhausted, text)
        }
        Failure::Retry(after) => {
            let delay = after.or_else(|| retry.delay(attempt)).map(|d| d.min(super::MAX_WAIT));
            tracing::warn!(error = %text, retry_in = ?delay, "task failed; will retry");
            span_event(inner, "task failed; will retry", &text);
            Settle::Retry(delay, text)
        }
        // `Failure` is non-exhaustive only for callers; every variant is handled above.
        #[allow(unreachable_patterns)]
        _ => Settle::Retry(None, text),
    }
}

fn unroutable(
    inner: &WorkerInner,
    attempt: u64,
    reason: DeadLetterReason,
    error: String,
) -> Settle {
    match inner.settings.unroutable {
        Unroutable::DeadLetter => Settle::DeadLetter(reason, error),
        Unroutable::Discard => {
            tracing::warn!(%error, "unroutable task discarded");
            span_event(inner, "unroutable task discarded", &error);
            Settle::Discard(error)
        }
        Unroutable::Retry(_) if inner.settings.retry.exhausted(attempt) => {
            Settle::DeadLetter(reason, error)
        }
        Unroutable::Retry(delay) => {
            tracing::warn!(%error, retry_in = ?delay, "unroutable task handed back for another worker");
            span_event(inner, "unroutable task handed back for another worker", &error);
            Settle::Retry(Some(delay), error)
        }
    }
}

/// Records a failure on the attempt's OpenTelemetry span (current while it runs).
pub(super) fn span_event(inner: &WorkerInner, name: &'static str, error: &str) {
    #[cfg(feature = "opentelemetry")]
    if inner.propagator.as_deref().and_then(|p| p.as_otel()).is_some() {
        crate::otel::add_current_event(name, error);
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (inner, name, error);
}

/// Tells the broker what became of the delivery.
async fn apply(
    inner: &WorkerInner,
    message: &Message,
    headers: &HeaderMap,
    attempt: u64,
    sequence: u64,
    settle: Settle,
    lease: &Lease<'_>,
) -> Outcome {
    match settle {
        Settle::Ack => {
            ack(message, AckKind::Ack).await;
            Outcome::Succeeded
        }
        Settle::GiveUp(_) => {
            ack(message, AckKind::Ack).await;
            Outcome::GaveUp
        }
        Settle::Discard(_) => {
            ack(message, AckKind::Term).await;
            Outcome::Discarded
        }
        Settle::Cancelled { .. } => {
            ack(message, AckKind::Term).await;
            Outcome::Cancelled
        }
        Settle::Retry(delay, _) => {
            nak(message, delay).await;
            Outcome::Retried(delay)
        }
        Settle::DeadLetter(reason, error) => {
            dead_letter::settle(inner, message, headers, attempt, sequence, reason, &error, lease)
                .await
        }
    }
}

pub(super) async fn ack(message: &Message, kind: AckKind) {
    if let Err(err) = message.ack_with(kind).await {
        tracing::warn!(error = %err, "could not acknowledge the task; it will be redelivered");
    }
}

pub(super) async fn nak(message: &Message, delay: Option<Duration>) {
    // The server takes the delay in nanoseconds: a longer one would overflow into an
    // immediate redelivery.
    ack(message, AckKind::Nak(delay.map(|d| d.min(super::MAX_WAIT)))).await;
}

/// The id the task was dispatched with (kept in `Natasks-Message-Id` for delayed tasks).
fn message_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(wire::MESSAGE_ID_NAME)
        .or_else(|| headers.get(wire::NATS_MSG_ID))
        .map(|v| v.as_str())
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
