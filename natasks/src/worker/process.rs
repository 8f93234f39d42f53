//! One delivery: route it, run the handler with lease renewal, settle the outcome.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::limits::Permit;
use super::pull::Leased;
use super::{ack, dead_letter};
use super::{DeadLetterReason, Unroutable, WorkerInner};
use crate::error::{Failure, HandlerError};
use crate::extract::{Live, ProgressReport};
use crate::handler::BoxHandler;
use crate::middleware::Next;
use crate::observe::{Finished, Outcome, Started};
use crate::task::{DecodeError, Delivery, Task};
use crate::track::worker::{Attempt, Begin, Ended, RecordedEnd, Unrecorded};
use crate::wire;
use crate::workflow::{StepEnd, StepRef};

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
            match headers.get(wire::UNIQUE_KEY_NAME).filter(|_| ends(&kind)) {
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

/// The task's lease: when it began (delivery or last renewal), and the signal that
/// shutdown gave up waiting for the task. Each renewal moves `since`, so that successive
/// waits (a pause, a rate, the handler) renew it on one schedule.
pub(super) struct Lease<'a> {
    pub(super) since: tokio::time::Instant,
    pub(super) abandon: &'a CancellationToken,
}

/// The tracking of a tracked task's attempt, and the handler's result to record.
struct Tracked<'a> {
    /// Boxed: most tasks are not tracked, and the processing future is allocated for
    /// every task.
    attempt: Option<Box<Attempt<'a>>>,
    result: Option<Vec<u8>>,
    /// The end of a workflow step recorded by an earlier delivery: nothing is recorded
    /// again, what follows is dispatched from it.
    recorded: Option<Box<RecordedEnd>>,
}

impl Tracked<'_> {
    /// Records how the attempt ended, before the broker hears it. A result too large to
    /// store turns a success into a dead letter saying so.
    async fn record(&mut self, settle: Settle) -> Settle {
        let Some(attempt) = &mut self.attempt else { return settle };
        if let (Some(end), Some(step)) = (self.recorded.take(), attempt.step()) {
            let step_end = match end.state {
                "succeeded" => StepEnd::Succeeded(end.result.as_deref()),
                state => StepEnd::Ended { state, error: end.error.as_deref() },
            };
            return Box::pin(handed_back(attempt.tracker(), step, step_end))
                .await
                .unwrap_or(settle);
        }
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
        // A workflow step needs its result after it is recorded.
        let kept = attempt.step().and(result.clone());
        let settle = match attempt.finish(ended, result).await {
            Ok(()) => settle,
            Err(Unrecorded::ResultTooLarge(error)) => {
                let reason = DeadLetterReason::Rejected;
                let ended = Ended::DeadLettered { reason: reason.as_str(), error: &error };
                let _ = attempt.finish(ended, None).await;
                Settle::DeadLetter(reason, error)
            }
        };
        match attempt.step() {
            Some(step) => Box::pin(follow(attempt.tracker(), step, settle, kept)).await,
            None => settle,
        }
    }
}

/// What follows a workflow step that ended, dispatched before the step is acknowledged
/// (see `crate::workflow`). Should that fail, the step is handed back to come here again.
async fn follow(
    tracker: &crate::track::Tracker,
    step: &StepRef,
    settle: Settle,
    result: Option<Vec<u8>>,
) -> Settle {
    let end = match &settle {
        Settle::Ack => StepEnd::Succeeded(result.as_deref()),
        Settle::GiveUp(error) | Settle::Discard(error) => {
            StepEnd::Ended { state: "failed", error: Some(error) }
        }
        Settle::DeadLetter(_, error) => {
            StepEnd::Ended { state: "dead_lettered", error: Some(error) }
        }
        Settle::Cancelled { .. } => StepEnd::Ended { state: "cancelled", error: None },
        Settle::Retry(..) => return settle,
    };
    match handed_back(tracker, step, end).await {
        Some(retry) => retry,
        None => settle,
    }
}

/// Dispatches what follows a step that ended with `end`; the step's new settlement if
/// that failed (it is handed back to come here again).
async fn handed_back(
    tracker: &crate::track::Tracker,
    step: &StepRef,
    end: StepEnd<'_>,
) -> Option<Settle> {
    let error = crate::workflow::advance_retrying(tracker, step, end).await.err()?;
    Some(Settle::Retry(Some(crate::workflow::FOLLOW_RETRY), error))
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

/// Runs the handler if the delivery can be routed (`route`: the task name's entry in the
/// route table); `None` when shutdown abandoned it.
async fn decide(
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

/// Holds a task while its queue is paused or over its rate; `None` when the worker stops
/// or gives up on it.
async fn wait_for_limits(
    inner: &WorkerInner,
    reply: &Subject,
    name: &str,
    lease: &mut Lease<'_>,
    slot: &mut Option<OwnedSemaphorePermit>,
) -> Option<()> {
    loop {
        let at = if inner.limits.paused() {
            tokio::time::Instant::now() + PAUSE_RECHECK
        } else if !inner.limits.active() {
            return Some(());
        } else {
            match inner.limits.acquire(name).await {
                Permit::Go => return Some(()),
                Permit::WaitUntil(at) => at,
            }
        };
        wait_aside(inner, reply, lease, slot, at).await?;
    }
}

fn handler_panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    HandlerError::msg(format!("handler panicked: {}", panic_message(panic)))
}

/// Drives a handler (or a wait) that did not finish on its first poll, renewing its lease
/// every `period` from when the lease began or was last renewed (not from when the handler
/// started); `None` when shutdown abandons it.
pub(super) async fn renew_lease_until<F: Future>(
    client: &Client,
    reply: &Subject,
    mut work: Pin<&mut F>,
    period: Duration,
    lease: &mut Lease<'_>,
) -> Option<F::Output> {
    let progress = tokio::time::sleep_until(lease.since + period);
    tokio::pin!(progress);
    loop {
        tokio::select! {
            biased;
            result = work.as_mut() => return Some(result),
            () = lease.abandon.cancelled() => return None,
            () = &mut progress => {
                lease.since = tokio::time::Instant::now();
                progress.as_mut().reset(lease.since + period);
                renew(client, reply).await;
            }
        }
    }
}

/// How often a held task of a paused queue looks whether the pause ended (a resume is
/// heard at once, a pause's end by its time only when it comes).
const PAUSE_RECHECK: Duration = Duration::from_millis(200);

/// Waits until `at`, and then while the queue is paused, with the task's lease renewed.
/// Meanwhile its slot goes to other tasks if the worker's waiting room has space (at most
/// `concurrency` tasks wait without a slot), and is taken back after; `None` when the
/// worker stops or gives up on the task.
async fn wait_aside(
    inner: &WorkerInner,
    reply: &Subject,
    lease: &mut Lease<'_>,
    slot: &mut Option<OwnedSemaphorePermit>,
    at: tokio::time::Instant,
) -> Option<()> {
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
    // One wait, the slot lent and the lease renewed throughout: looking again whether a
    // pause ended neither renews the lease nor takes the slot back.
    let waited = std::pin::pin!(async {
        tokio::time::sleep_until(at).await;
        while inner.limits.paused() {
            tokio::time::sleep(PAUSE_RECHECK).await;
        }
        match lent {
            Some(semaphore) => Some(semaphore.acquire_owned().await),
            None => None,
        }
    });
    let period = inner.settings.progress_interval;
    let taken_back = tokio::select! {
        biased;
        // Stopping: the task goes back now rather than wait out the drain.
        () = inner.stopping.cancelled() => return None,
        waited = renew_lease_until(&inner.client, reply, waited, period, lease) => waited?,
    };
    if let Some(permit) = taken_back {
        *slot = Some(permit.expect("the slot semaphore is never closed"));
    }
    drop(room);
    Some(())
}

/// Like [`renew_lease_until`], for a handler with a channel: a progress report renews the
/// lease too, and a tracked task's record follows the lease and the reports.
async fn drive_live<F: Future>(
    inner: &WorkerInner,
    reply: &Subject,
    mut work: Pin<&mut F>,
    lease: &mut Lease<'_>,
    reports: &mut watch::Receiver<Option<ProgressReport>>,
    mut tracked: Option<&mut Attempt<'_>>,
) -> Option<F::Output> {
    let period = inner.settings.progress_interval;
    let renewal = tokio::time::sleep_until(lease.since + period);
    tokio::pin!(renewal);
    loop {
        let report = tokio::select! {
            biased;
            result = work.as_mut() => return Some(result),
            () = lease.abandon.cancelled() => return None,
            // The sender lives as long as the task: `changed` fails only after the handler.
            Ok(()) = reports.changed() => reports.borrow_and_update().clone(),
            () = &mut renewal => None,
        };
        lease.since = tokio::time::Instant::now();
        renewal.as_mut().reset(lease.since + period);
        renew(&inner.client, reply).await;
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

/// What became of the delivery, and the ack that tells the broker.
async fn apply(
    inner: &WorkerInner,
    delivery: &Received<'_>,
    settle: Settle,
    lease: &Lease<'_>,
) -> (Outcome, AckKind) {
    match settle {
        Settle::Ack => (Outcome::Succeeded, AckKind::Ack),
        Settle::GiveUp(_) => (Outcome::GaveUp, AckKind::Ack),
        Settle::Discard(_) => (Outcome::Discarded, AckKind::Term),
        Settle::Cancelled { .. } => (Outcome::Cancelled, AckKind::Term),
        // The server takes the delay in nanoseconds: a longer one would overflow into an
        // immediate redelivery.
        Settle::Retry(delay, _) => {
            let delay = delay.map(|d| d.min(super::MAX_WAIT));
            (Outcome::Retried(delay), AckKind::Nak(delay))
        }
        Settle::DeadLetter(reason, error) => {
            // Boxed for the same reason as the lease timer: it is rare and large.
            Box::pin(dead_letter::settle(inner, delivery, reason, &error, lease)).await
        }
    }
}

/// Whether `kind` ends the task for good (it is removed from the stream).
fn ends(kind: &AckKind) -> bool {
    matches!(kind, AckKind::Ack | AckKind::Term)
}

/// Settles a unique task that ended, then releases its key (see `crate::guard`).
async fn release_after(
    inner: &WorkerInner,
    reply: Subject,
    kind: AckKind,
    key: &str,
    headers: &HeaderMap,
    sequence: u64,
) {
    let (js, stream, queue) = (&inner.js, &inner.stream, &inner.queue);
    crate::guard::release::settle(js, stream, queue, reply, kind, key, headers, sequence).await
}

/// Settles the delivery: its one final ack (`Ack`, `Nak` or `Term`).
fn settle_with(client: &Client, reply: Subject, kind: AckKind) -> impl Future<Output = ()> + '_ {
    ack::send(client, reply, kind).map(|sent| {
        if let Err(err) = sent {
            tracing::warn!(error = %err, "could not acknowledge the task; it will be redelivered");
        }
    })
}

/// Renews the delivery's lease (an in-progress ack).
pub(super) fn renew<'a>(client: &'a Client, reply: &Subject) -> impl Future<Output = ()> + 'a {
    ack::send(client, reply.clone(), AckKind::Progress).map(|sent| {
        if let Err(err) = sent {
            tracing::warn!(error = %err, "could not renew the task's lease");
        }
    })
}

/// The id the task was dispatched with (kept in `Natasks-Message-Id` for delayed tasks).
fn message_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(wire::MESSAGE_ID_NAME)
        .or_else(|| headers.get(wire::NATS_MSG_ID_NAME))
        .map(|v| v.as_str())
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
