//! The worker's side of a unique task: its lock is released when the task ends for good.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, Subject};

use super::lock;
use crate::stream::StreamSettings;
use crate::wire;

/// How long the server has to confirm the final ack of a unique task.
const ACK_CONFIRM: Duration = Duration::from_secs(5);

/// Sends the final ack (`Ack` or `Term`) of a unique task, waits for the server to confirm
/// it, then releases the task's lock: the lock on `queue` and `key` is deleted if it names
/// this task.
///
/// Ack first, release second: a worker killed between the two leaves a lock whose task is
/// gone, which the next dispatch with the key detects and takes over atomically (see
/// [`crate::guard`]). The other order could leave the task redelivered while a new task
/// with the key is accepted. An ack the server does not confirm leaves the lock in place
/// (the task may come back); the dispatch-side check and the TTL cover it.
// The delivery's parts, as the worker holds them: a struct would only be built here.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn settle(
    js: &jetstream::Context,
    stream: &StreamSettings,
    queue: &str,
    reply: Subject,
    kind: AckKind,
    key: &str,
    headers: &HeaderMap,
    sequence: u64,
) {
    let request = async_nats::Request::new().payload(kind.into()).timeout(Some(ACK_CONFIRM));
    if let Err(err) = js.client().send_request(reply, request).await {
        tracing::warn!(error = %err, "the ack of a unique task was not confirmed; its lock stays until the task is gone");
        return;
    }
    let Some(id) = wire::task_id(headers) else {
        return;
    };
    // A task a schedule produced names it; the lock of a delayed task names its schedule.
    let stored = match headers.get(wire::NATS_SCHEDULER) {
        Some(schedule) => Stored::Schedule(schedule.as_str()),
        None => Stored::Sequence(sequence),
    };
    if let Err(err) = release(js, stream, queue, key, id, stored).await {
        tracing::warn!(error = %err, key, "could not release the lock of a unique task; the next dispatch with the key takes it over");
    }
}

/// Where the task whose lock is released was stored.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stored<'a> {
    /// An immediate task, at this stream sequence.
    Sequence(u64),
    /// A delayed task, by this schedule subject.
    Schedule(&'a str),
}

/// Deletes the lock of `key` in `queue` if it belongs to task `id` stored at `stored`:
/// the lock names the id, and was stored with that very task (an immediate task sits at
/// the sequence after its lock; a delayed one's lock names its schedule), so that another
/// task reusing the id (brought back from the dead-letter queue, or published by another
/// program) never frees it. The lock is deleted by its sequence, so a lock another task
/// took meanwhile is never touched.
pub(crate) async fn release(
    js: &jetstream::Context,
    stream: &StreamSettings,
    queue: &str,
    key: &str,
    id: &str,
    stored: Stored<'_>,
) -> Result<(), crate::error::BoxError> {
    let subject = super::marker_subject("unique", &stream.subject_prefix, queue, key);
    let Some(held) = lock::read(js, &stream.name, &subject).await? else {
        return Ok(());
    };
    let same_task = match (held.body.schedule.as_deref(), stored) {
        (None, Stored::Sequence(sequence)) => held.task_sequence() == sequence,
        (Some(schedule), Stored::Schedule(subject)) => schedule == subject,
        _ => false,
    };
    if held.body.id != id || !same_task {
        return Ok(());
    }
    lock::delete(js, &stream.name, held.sequence).await?;
    tracing::debug!(key, id, "unique task's lock released");
    Ok(())
}
