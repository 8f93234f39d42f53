//! Settling the outcome: what became of the delivery, and the final ack.

use std::future::Future;

use async_nats::jetstream::AckKind;
use async_nats::{Client, HeaderMap, Subject};
use futures_util::FutureExt;

use super::{Lease, Received, Settle};
use crate::observe::Outcome;
use crate::worker::{ack, dead_letter, WorkerInner, MAX_WAIT};

/// What became of the delivery, and the ack that tells the broker.
pub(super) async fn apply(
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
            let delay = delay.map(|d| d.min(MAX_WAIT));
            (Outcome::Retried(delay), AckKind::Nak(delay))
        }
        Settle::DeadLetter(reason, error) => {
            // Boxed for the same reason as the lease timer: it is rare and large.
            Box::pin(dead_letter::settle(inner, delivery, reason, &error, lease)).await
        }
    }
}

/// Whether `kind` ends the task for good (it is removed from the stream).
pub(super) fn ends(kind: &AckKind) -> bool {
    matches!(kind, AckKind::Ack | AckKind::Term)
}

/// Settles a unique task that ended, then releases its key (see `crate::guard`).
pub(super) async fn release_after(
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
pub(super) fn settle_with(
    client: &Client,
    reply: Subject,
    kind: AckKind,
) -> impl Future<Output = ()> + '_ {
    ack::send(client, reply, kind).map(|sent| {
        if let Err(err) = sent {
            tracing::warn!(error = %err, "could not acknowledge the task; it will be redelivered");
        }
    })
}
