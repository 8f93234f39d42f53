//! The task's lease: renewed while the handler (or a wait) runs.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};
use futures_util::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::extract::ProgressReport;
use crate::track::worker::Attempt;
use crate::worker::{ack, WorkerInner};

/// The task's lease: when it began (delivery or last renewal), and the signal that
/// shutdown gave up waiting for the task. Each renewal moves `since`, so that successive
/// waits (a pause, a rate, the handler) renew it on one schedule.
pub(in crate::worker) struct Lease<'a> {
    pub(in crate::worker) since: tokio::time::Instant,
    pub(in crate::worker) abandon: &'a CancellationToken,
}

/// Drives a handler (or a wait) that did not finish on its first poll, renewing its lease
/// every `period` from when the lease began or was last renewed (not from when the handler
/// started); `None` when shutdown abandons it.
pub(in crate::worker) async fn renew_lease_until<F: Future>(
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

/// Like [`renew_lease_until`], for a handler with a channel: a progress report renews the
/// lease too, and a tracked task's record follows the lease and the reports.
pub(super) async fn drive_live<F: Future>(
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
pub(super) fn lease_end(inner: &WorkerInner) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + inner.settings.ack_wait
}

/// Renews the delivery's lease (an in-progress ack).
pub(in crate::worker) fn renew<'a>(
    client: &'a Client,
    reply: &Subject,
) -> impl Future<Output = ()> + 'a {
    ack::send(client, reply.clone(), AckKind::Progress).map(|sent| {
        if let Err(err) = sent {
            tracing::warn!(error = %err, "could not renew the task's lease");
        }
    })
}
