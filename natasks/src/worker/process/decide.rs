//! Routing a delivery and running its handler: how the attempt is to be settled.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;

use super::lease::{drive_live, lease_end, renew_lease_until, Lease};
use super::track::Tracked;
use super::wait::wait_for_limits;
use super::{Received, Settle};
use crate::error::{Failure, HandlerError};
use crate::extract::Live;
use crate::handler::BoxHandler;
use crate::middleware::Next;
use crate::task::{DecodeError, Delivery, Task};
use crate::track::worker::Begin;
use crate::worker::{DeadLetterReason, Unroutable, WorkerInner, MAX_WAIT};

/// Runs the handler if the delivery can be routed (`route`: the task name's entry in the
/// route table); `None` when shutdown abandoned it.
pub(super) async fn decide(
    inner: &WorkerInner,
    delivery: &Received<'_>,
    task_name: Option<&str>,
    route: Option<(&Arc<str>, &BoxHandler)>,
    lease: &mut Lease<'_>,
    tracked: &mut Tracked<'_>,
    slot: &mut Option<OwnedSemaphorePermit>,
) -> Option<Settle> {
    let Received { reply, attempt, .. } = *delivery;
    // A tracked task gets its channel first: a cancel is obeyed before anything else.
    let mut live = None;
    if let Some(tracking) = tracked.attempt.as_mut() {
        let (channel, reports) = Live::new(true);
        // Boxed, as every tracking step: the processing future of untracked tasks stays small.
        match Box::pin(tracking.check(&channel)).await {
            Begin::Cancelled { announce } => return Some(Settle::Cancelled { announce }),
            Begin::Ended(end) => {
                let settle = match end.state {
                    "succeeded" => Settle::Ack,
                    _ => Settle::GiveUp(end.error.clone().unwrap_or_default()),
                };
                tracked.recorded = Some(end);
                return Some(settle);
            }
            Begin::Run => {}
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
    // A task of a paused queue the worker already held, or one over its rate, waits here
    // (its lease renewed, its slot lent to other tasks while the waiting room has space)
    // until the pause ends or the rate's next period. Boxed: rare, and the processing
    // future is allocated for every task.
    if inner.limits.paused() || inner.limits.active() {
        Box::pin(wait_for_limits(inner, reply, name, lease, slot)).await?;
    }
    // Progress, cancellation and the result need a channel to the handler; most tasks
    // need none.
    if live.is_none() && handler.live {
        live = Some(Live::new(false));
    }
    if let Some(tracking) = tracked.attempt.as_mut() {
        if let Begin::Cancelled { announce } = Box::pin(tracking.start(lease_end(inner))).await {
            return Some(Settle::Cancelled { announce });
        }
    }
    let channel = live.as_ref().map(|(channel, _)| channel);
    let mut run = match start_handler(inner, name, handler, delivery, channel) {
        Ok(run) => AssertUnwindSafe(run).catch_unwind(),
        Err(settle) => return Some(settle),
    };
    // Pinned where it is built, and the timeout only borrowing the handler's future: moved
    // from binding to binding, each would keep a copy in the processing future.
    let mut timed = std::pin::pin!(async {
        match inner.settings.task_timeout {
            None => Some((&mut run).await),
            Some(limit) => tokio::time::timeout(limit, &mut run).await.ok(),
        }
    });
    // Most handlers finish on their first poll; only the others need a lease timer. It is
    // boxed: held inline, the timer and its acks would make the processing future of every
    // task larger, and that future is allocated and copied for every task (the others get
    // a task of their own and an allocation anyway).
    let result = match (timed.as_mut().now_or_never(), &mut live) {
        (Some(result), _) => result,
        (None, None) => {
            let period = inner.settings.progress_interval;
            let renewing = renew_lease_until(&inner.client, reply, timed.as_mut(), period, lease);
            Box::pin(renewing).await?
        }
        (None, Some((_, reports))) => {
            let attempt = tracked.attempt.as_deref_mut();
            Box::pin(drive_live(inner, reply, timed.as_mut(), lease, reports, attempt)).await?
        }
    };
    if let Some((channel, reports)) = &live {
        if let Some(tracking) = tracked.attempt.as_mut() {
            if let Some(report) = reports.borrow().clone() {
                tracking.last_report(report);
            }
        }
        // Whatever the handler returned after the signal, the task was cancelled.
        if channel.cancel.is_cancelled() {
            return Some(Settle::Cancelled { announce: true });
        }
        tracked.result = channel.take_result();
    }
    let error = match result {
        Some(Ok(Ok(()))) => return Some(Settle::Ack),
        Some(Ok(Err(error))) => error,
        Some(Err(panic)) => handler_panicked(&*panic),
        None => HandlerError::msg(format!(
            "task timed out after {:?}",
            inner.settings.task_timeout.unwrap_or_default()
        )),
    };
    Some(failed(inner, attempt, error))
}

/// Hands the task to the middleware and the handler (after the propagator, if any, read
/// it): their future, called at once, so that what they do before their first await runs
/// here, under the same panic guard as their polls.
///
/// Not part of `decide`'s future, and returning the chain's boxed future rather than one
/// wrapping it: the task and everything the call needs would otherwise stay in the
/// processing future of every task after they moved on to the handler.
fn start_handler(
    inner: &WorkerInner,
    name: &Arc<str>,
    handler: &BoxHandler,
    delivery: &Received<'_>,
    live: Option<&Arc<Live>>,
) -> Result<BoxFuture<'static, Result<(), HandlerError>>, Settle> {
    let Received { payload, headers, message_id, attempt, sequence, .. } = *delivery;
    let mut task = Task::received(
        name.clone(),
        payload.clone(),
        headers.clone(),
        message_id.map(str::to_owned),
        Delivery::new(inner.shared_queue.clone(), attempt, sequence),
    );
    if let Some(live) = live {
        task.set_live(live.clone());
    }
    if let Some(propagator) = &inner.propagator {
        // A propagator is user code: a panic in it fails the attempt like a handler's.
        let extracted =
            std::panic::catch_unwind(AssertUnwindSafe(|| propagator.extract(&mut task)));
        if let Err(panic) = extracted {
            let error = format!("propagator panicked: {}", panic_message(&*panic));
            return Err(failed(inner, attempt, HandlerError::msg(error)));
        }
    }
    let next = Next::new(inner.layers.clone(), handler.clone());
    std::panic::catch_unwind(AssertUnwindSafe(|| next.start(task)))
        .map_err(|panic| failed(inner, attempt, handler_panicked(&*panic)))
}

fn handler_panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    HandlerError::msg(format!("handler panicked: {}", panic_message(panic)))
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
            let delay = after.or_else(|| retry.delay(attempt)).map(|d| d.min(MAX_WAIT));
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
pub(in crate::worker) fn span_event(inner: &WorkerInner, name: &'static str, error: &str) {
    #[cfg(feature = "opentelemetry")]
    if inner.propagator.as_deref().and_then(|p| p.as_otel()).is_some() {
        crate::otel::add_current_event(name, error);
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (inner, name, error);
}

pub(in crate::worker) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
