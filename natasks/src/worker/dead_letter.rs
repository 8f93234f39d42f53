//! Dead letters: a copy of the task on the dead-letter queue, stored before the original is
//! acknowledged, and never given up while it can still be stored.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::AckKind;
use async_nats::HeaderMap;

use super::process::{renew, renew_lease_until, span_event, Lease, Received};
use super::{DeadLetterReason, WorkerInner};
use crate::observe::Outcome;
use crate::wire;

/// Longest `Natasks-Last-Error` value.
const LAST_ERROR_MAX: usize = 2048;

/// Stores the dead letter; the outcome, and the final ack for the caller to send (`Ack`
/// once the dead letter is stored).
///
/// Until the dead letter is stored, the worker keeps the task (renewing its lease, also
/// while a publish waits for its acknowledgement) and tries again: handing it back would
/// spend a delivery, and the redelivery could no longer tell why the task was given up. It
/// hands the task back only when shutdown abandons it, or when the dead letter cannot fit
/// the server's `max_payload` (after its last error was cut to fit).
pub(super) async fn settle(
    inner: &WorkerInner,
    delivery: &Received<'_>,
    reason: DeadLetterReason,
    error: &str,
    lease: &Lease<'_>,
) -> (Outcome, AckKind) {
    let publish = || publish(inner, delivery, reason, error);
    let stored = async {
        let mut wait = inner.settings.idle_wait.max(Duration::from_millis(100));
        loop {
            let err = match publish().await {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded => return Err(err),
                Err(err) => err,
            };
            tracing::error!(error = %err, retry_in = ?wait, "could not publish the dead letter; the worker keeps the task and tries again");
            span_event(inner, "could not publish the dead letter", &err.to_string());
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(inner.settings.progress_interval);
        }
    };
    tokio::pin!(stored);
    // The handler may have run for most of a lease: renew it before the publish, which can
    // wait for its acknowledgement longer than the ack wait.
    let (client, reply) = (&inner.client, delivery.reply);
    renew(client, reply).await;
    let mut renewing = Lease { since: tokio::time::Instant::now(), abandon: lease.abandon };
    let period = inner.settings.progress_interval;
    match renew_lease_until(client, reply, stored, period, &mut renewing).await {
        Some(Ok(())) => {
            tracing::warn!(%reason, error, dlq = %inner.settings.dlq_queue, "task dead-lettered");
            span_event(inner, "task dead-lettered", error);
            (Outcome::DeadLettered(reason), AckKind::Ack)
        }
        Some(Err(err)) => {
            let delay = Some(inner.settings.ack_wait);
            tracing::error!(error = %err, retry_in = ?delay, "the dead letter does not fit the server's max_payload; the task is handed back");
            span_event(inner, "the dead letter does not fit max_payload", &err.to_string());
            (Outcome::Retried(delay), AckKind::Nak(delay))
        }
        None => (Outcome::HandedBack, AckKind::Nak(None)),
    }
}

async fn publish(
    inner: &WorkerInner,
    delivery: &Received<'_>,
    reason: DeadLetterReason,
    error: &str,
) -> Result<(), PublishError> {
    let Received { payload, headers: original, attempt, sequence, .. } = *delivery;
    let mut headers = HeaderMap::new();
    for (name, values) in original.iter() {
        // Server-managed headers (message id, schedule, rollup) must not follow the task.
        let name_str: &str = name.as_ref();
        if name_str.starts_with("Nats-") {
            continue;
        }
        // A dead letter is not tracked; the value comes back with a requeue.
        let name = if name_str.eq_ignore_ascii_case(wire::HEADER_TRACK) {
            async_nats::header::HeaderName::from_static(wire::HEADER_DEAD_LETTER_TRACK)
        } else {
            name.clone()
        };
        for value in values {
            headers.append(name.clone(), value.as_str());
        }
    }
    // The id the task was dispatched with; a requeued task already carries it (its own
    // message id is the requeue's, which must not replace the task's).
    if original.get(wire::MESSAGE_ID_NAME).is_none() {
        if let Some(id) = original.get(wire::NATS_MSG_ID) {
            headers.insert(wire::HEADER_MESSAGE_ID, id.as_str());
        }
    }
    headers.insert(wire::HEADER_QUEUE, inner.settings.dlq_queue.as_str());
    headers.insert(wire::HEADER_ORIGINAL_QUEUE, inner.queue.as_str());
    headers.insert(wire::HEADER_ATTEMPTS, attempt.to_string().as_str());
    headers.insert(wire::HEADER_DEAD_LETTER_REASON, reason.as_str());
    // A worker that dies between this publish and the ack redelivers the task; the id makes
    // the second dead letter a duplicate the stream drops.
    let id = format!("natasks-dlq-{}-{sequence}", inner.stream.name);
    headers.insert(wire::NATS_MSG_ID, id.as_str());
    // The last error is cut to what still fits the server's max_payload: a task near the
    // limit must not become a dead letter that can never be stored.
    let max_payload = inner.client.server_info().max_payload;
    let used = payload.len() + encoded_len(&headers);
    let room = max_payload.saturating_sub(used + wire::HEADER_LAST_ERROR.len() + 4);
    headers.insert(
        wire::HEADER_LAST_ERROR,
        wire::header_safe(error, LAST_ERROR_MAX.min(room)).as_str(),
    );
    inner
        .js
        .publish_with_headers(inner.dlq_subject.clone(), headers, payload.clone())
        .await?
        .await?;
    Ok(())
}

/// Bytes the headers take on the wire (`NATS/1.0\r\n`, `Name: value\r\n` each, `\r\n`).
fn encoded_len(headers: &HeaderMap) -> usize {
    let mut lines = 0;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        lines += values.iter().map(|value| name.len() + value.as_str().len() + 4).sum::<usize>();
    }
    "NATS/1.0\r\n".len() + lines + 2
}
