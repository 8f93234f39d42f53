//! Holding a task aside while its queue is paused or over its rate.

use std::time::Duration;

use async_nats::Subject;
use tokio::sync::OwnedSemaphorePermit;

use super::lease::{renew_lease_until, Lease};
use crate::worker::limits::Permit;
use crate::worker::WorkerInner;

/// Holds a task while its queue is paused or over its rate; `None` when the worker stops
/// or gives up on it.
pub(super) async fn wait_for_limits(
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
