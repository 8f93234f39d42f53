//! One delivery: route it, run the handler with lease renewal, settle the outcome.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use async_nats::HeaderMap;
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{DeadLetterReason, Unroutable, WorkerInner};
use crate::error::{Failure, HandlerError};
use crate::middleware::Next;
use crate::task::{DecodeError, Delivery, Task};
use crate::wire;

/// What happens to a delivery.
#[derive(Debug)]
enum Outcome {
    /// Done (or failed without retry): remove it.
    Ack,
    /// Redeliver, after the delay if any.
    Retry(Option<Duration>),
    /// Publish to the dead-letter queue, then remove it.
    DeadLetter(DeadLetterReason, String),
    /// Drop it without a dead letter (unroutable with [`Unroutable::Discard`]).
    Discard,
}

pub(super) async fn process(
    inner: Arc<WorkerInner>,
    message: Message,
    _slot: OwnedSemaphorePermit,
    abandon: CancellationToken,
) {
    let (attempt, sequence) = match message.info() {
        Ok(info) => (u64::try_from(info.delivered).unwrap_or(1).max(1), info.stream_sequence),
        Err(err) => {
            tracing::warn!(queue = %inner.queue, error = %err, "delivery without JetStream metadata; handing it back");
            nak(&message, None).await;
            return;
        }
    };
    let task_name = message
        .headers
        .as_ref()
        .and_then(|h| h.get(wire::HEADER_TASK))
        .map(|v| v.as_str().to_owned());
    let span = tracing::info_span!(
        "natasks.process",
        queue = %inner.queue,
        task = task_name.as_deref().unwrap_or(""),
        attempt,
        stream_sequence = sequence,
        outcome = tracing::field::Empty,
    );
    async move {
        let outcome = match decide(&inner, &message, task_name, attempt, sequence, &abandon).await {
            Some(outcome) => outcome,
            None => {
                tracing::Span::current().record("outcome", "handed-back");
                nak(&message, None).await;
                return;
            }
        };
        settle(&inner, &message, attempt, sequence, outcome).await;
    }
    .instrument(span)
    .await
}

/// Runs the handler if the delivery can be routed; `None` when shutdown abandoned it.
async fn decide(
    inner: &WorkerInner,
    message: &Message,
    task_name: Option<String>,
    attempt: u64,
    sequence: u64,
    abandon: &CancellationToken,
) -> Option<Outcome> {
    let retry = &inner.settings.retry;
    if retry.overdue(attempt) {
        return Some(Outcome::DeadLetter(
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
    let Some(handler) = inner.routes.get(&name) else {
        return Some(unroutable(
            inner,
            attempt,
            DeadLetterReason::UnknownTask,
            format!("no handler for task {name:?} on queue {:?}", inner.queue),
        ));
    };
    let headers = message.headers.clone().unwrap_or_default();
    let message_id = headers
        .get(wire::HEADER_MESSAGE_ID)
        .or_else(|| headers.get(wire::NATS_MSG_ID))
        .map(|v| v.as_str().to_owned());
    let mut task = Task::received(
        name,
        message.payload.clone(),
        headers,
        message_id,
        Delivery::new(inner.queue.clone(), attempt, sequence),
    );
    if let Some(propagator) = &inner.propagator {
        propagator.extract(&mut task);
    }
    let run =
        AssertUnwindSafe(Next::new(inner.layers.clone(), handler.clone()).run(task)).catch_unwind();
    let timed = async {
        match inner.settings.task_timeout {
            None => Some(run.await),
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
        }
    };
    tokio::pin!(timed);
    let period = inner.settings.progress_interval;
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let result = loop {
        tokio::select! {
            biased;
            result = &mut timed => break result,
            () = abandon.cancelled() => return None,
            _ = progress.tick() => {
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %err, "could not renew the task's lease");
                }
            }
        }
    };
    let error = match result {
        Some(Ok(Ok(()))) => return Some(Outcome::Ack),
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

fn failed(inner: &WorkerInner, attempt: u64, error: HandlerError) -> Outcome {
    let retry = &inner.settings.retry;
    let text = error.to_string();
    match error.failure() {
        Failure::NoRetry => {
            tracing::info!(error = %text, "task failed; not retried");
            Outcome::Ack
        }
        Failure::DeadLetter if error.source().is::<DecodeError>() => {
            Outcome::DeadLetter(DeadLetterReason::UndecodablePayload, text)
        }
        Failure::DeadLetter => Outcome::DeadLetter(DeadLetterReason::Rejected, text),
        Failure::Retry(_) if retry.exhausted(attempt) => {
            Outcome::DeadLetter(DeadLetterReason::RetriesExhausted, text)
        }
        Failure::Retry(after) => {
            let delay = after.or_else(|| retry.delay(attempt));
            tracing::warn!(error = %text, retry_in = ?delay, "task failed; will retry");
            Outcome::Retry(delay)
        }
        // `Failure` is non-exhaustive only for callers; every variant is handled above.
        #[allow(unreachable_patterns)]
        _ => Outcome::Retry(None),
    }
}

fn unroutable(
    inner: &WorkerInner,
    attempt: u64,
    reason: DeadLetterReason,
    error: String,
) -> Outcome {
    match inner.settings.unroutable {
        Unroutable::DeadLetter => Outcome::DeadLetter(reason, error),
        Unroutable::Discard => {
            tracing::warn!(%error, "unroutable task discarded");
            Outcome::Discard
        }
        Unroutable::Retry(_) if inner.settings.retry.exhausted(attempt) => {
            Outcome::DeadLetter(reason, error)
        }
        Unroutable::Retry(delay) => {
            tracing::warn!(%error, retry_in = ?delay, "unroutable task handed back for another worker");
            Outcome::Retry(Some(delay))
        }
    }
}

async fn settle(
    inner: &WorkerInner,
    message: &Message,
    attempt: u64,
    sequence: u64,
    outcome: Outcome,
) {
    let span = tracing::Span::current();
    match outcome {
        Outcome::Ack => {
            span.record("outcome", "acked");
            ack(message, AckKind::Ack).await;
        }
        Outcome::Discard => {
            span.record("outcome", "discarded");
            ack(message, AckKind::Term).await;
        }
        Outcome::Retry(delay) => {
            span.record("outcome", "retry");
            nak(message, delay).await;
        }
        Outcome::DeadLetter(reason, error) => {
            match publish_dead_letter(inner, message, attempt, sequence, reason, &error).await {
                Ok(()) => {
                    span.record("outcome", "dead-lettered");
                    tracing::warn!(%reason, %error, dlq = %inner.settings.dlq_queue, "task dead-lettered");
                    ack(message, AckKind::Ack).await;
                }
                Err(err) => {
                    span.record("outcome", "retry");
                    tracing::error!(error = %err, "could not publish the dead letter; the task will be redelivered");
                    nak(message, Some(inner.settings.idle_wait.max(Duration::from_secs(1)))).await;
                }
            }
        }
    }
}

async fn publish_dead_letter(
    inner: &WorkerInner,
    message: &Message,
    attempt: u64,
    sequence: u64,
    reason: DeadLetterReason,
    error: &str,
) -> Result<(), async_nats::Error> {
    let mut headers = HeaderMap::new();
    if let Some(original) = &message.headers {
        for (name, values) in original.iter() {
            // Server-managed headers (message id, schedule, rollup) must not follow the task.
            let name_str: &str = name.as_ref();
            if name_str.starts_with("Nats-") {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.as_str());
            }
        }
        if let Some(id) = original.get(wire::NATS_MSG_ID) {
            headers.insert(wire::HEADER_MESSAGE_ID, id.as_str());
        }
    }
    headers.insert(wire::HEADER_QUEUE, inner.settings.dlq_queue.as_str());
    headers.insert(wire::HEADER_ORIGINAL_QUEUE, inner.queue.as_str());
    headers.insert(wire::HEADER_ATTEMPTS, attempt.to_string().as_str());
    headers.insert(wire::HEADER_LAST_ERROR, wire::header_safe(error, 2048).as_str());
    headers.insert(wire::HEADER_DEAD_LETTER_REASON, reason.as_str());
    // A worker that dies between this publish and the ack redelivers the task; the id makes
    // the second dead letter a duplicate the stream drops.
    let id = format!("natasks-dlq-{}-{sequence}", inner.stream.name);
    headers.insert(wire::NATS_MSG_ID, id.as_str());
    inner
        .js
        .publish_with_headers(inner.dlq_subject.clone(), headers, message.payload.clone())
        .await?
        .await?;
    Ok(())
}

async fn ack(message: &Message, kind: AckKind) {
    if let Err(err) = message.ack_with(kind).await {
        tracing::warn!(error = %err, "could not acknowledge the task; it will be redelivered");
    }
}

async fn nak(message: &Message, delay: Option<Duration>) {
    ack(message, AckKind::Nak(delay)).await;
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}
