//! Storing a task together with its guard marker, in one atomic batch, and what a
//! dispatch does when the key is held.

use time::OffsetDateTime;

use super::prepare::About;
use super::{Publisher, Receipt};
use crate::batch::{self, BatchPublishError, Outgoing};
use crate::error::{BoxError, Conflict, DispatchError, DispatchErrorKind};
use crate::guard::lock::{self, Held};
use crate::guard::{Guard, OnConflict};
use crate::wire;

/// How often a dispatch retries when the key changes hands under it (released, expired,
/// taken over by another dispatcher) between its attempt and its read of the marker.
const ATTEMPTS: usize = 5;

impl Publisher {
    /// Stores `marker` and then `message` in one atomic batch: both or neither. When the
    /// marker's subject is not empty, the server refuses the batch; the marker there says
    /// which task holds the key. A unique task's lock whose task is gone (a worker died
    /// between the task's ack and the lock's release) is taken over: the batch is sent
    /// again expecting that lock as the subject's last message, so of several dispatchers
    /// that all found it stale, one wins.
    pub(super) async fn store_guarded(
        &self,
        mut marker: Outgoing,
        message: Outgoing,
        guard: &Guard,
        about: &About,
        id: String,
    ) -> Result<Receipt, DispatchError> {
        let what = || format!("task {:?} for queue {:?}", about.task, about.queue);
        let queue_subject = wire::queue_subject(&self.stream.subject_prefix, &about.queue);
        for _ in 0..ATTEMPTS {
            let batch = vec![marker.clone(), message.clone()];
            match batch::publish_atomic(&self.js, batch).await {
                Ok(ack) => {
                    tracing::Span::current().record("stream_sequence", ack.last);
                    return Ok(Receipt { id, sequence: Some(ack.last), duplicate: false });
                }
                Err(err) if err.code() == Some(batch::WRONG_LAST_SEQUENCE) => {
                    tracing::trace!(error = %err, "a key is held or changed hands");
                }
                Err(err) => return Err(self.batch_error(what(), err)),
            };
            if let Some(held) = self.recheck(&mut marker, guard, about, &queue_subject).await? {
                return conflict(guard, about, held);
            }
        }
        Err(DispatchError::new(
            DispatchErrorKind::Rejected,
            format!("{} kept changing hands while it was dispatched; try again", describe(guard)),
        ))
    }

    /// After a batch holding `marker` was refused because a marker's subject was not as
    /// expected: the marker that holds the key, if its task is alive (or it is a throttle
    /// window). Otherwise `marker` is made to expect what is there now (released or
    /// expired: an empty subject; the lock of a unique task that is gone: that lock, which
    /// the new one replaces), and the batch may be sent again.
    pub(super) async fn recheck(
        &self,
        marker: &mut Outgoing,
        guard: &Guard,
        about: &About,
        queue_subject: &str,
    ) -> Result<Option<Held>, DispatchError> {
        let held = lock::read(&self.js, &self.stream.name, &marker.subject)
            .await
            .map_err(|err| self.lock_error(about, guard, err))?;
        let expect = match held {
            None => 0,
            Some(held) if guard.is_unique() => {
                let alive = lock::task_alive(&self.js, &self.stream.name, queue_subject, &held)
                    .await
                    .map_err(|err| self.lock_error(about, guard, err))?;
                if alive {
                    return Ok(Some(held));
                }
                tracing::debug!(key = %guard.key, stale = %held.body.id, "taking over the lock of a task that is gone");
                held.sequence
            }
            Some(held) => return Ok(Some(held)),
        };
        if expect != 0 {
            // The new lock replaces the stale one on its subject (the stream allows
            // rollups with message schedules).
            marker.headers.insert(wire::NATS_ROLLUP, "sub");
        }
        let expect = expect.to_string();
        marker.headers.insert(wire::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expect.as_str());
        Ok(None)
    }

    fn lock_error(&self, about: &About, guard: &Guard, err: BoxError) -> DispatchError {
        DispatchError::with_source(
            DispatchErrorKind::Rejected,
            format!(
                "task {:?} for queue {:?}: {} is held, and reading who holds it failed",
                about.task,
                about.queue,
                describe(guard)
            ),
            err,
        )
    }

    /// A batch refused for any reason but a guard's condition.
    /// `what` names what was dispatched (`task "x" for queue "q"`).
    pub(crate) fn batch_error(&self, what: String, err: BatchPublishError) -> DispatchError {
        let version = self.js.client().server_info().version;
        let (kind, problem) = match &err {
            BatchPublishError::Empty | BatchPublishError::TooLarge(_) => {
                (DispatchErrorKind::InvalidBatch, "is not a valid batch".to_owned())
            }
            BatchPublishError::MessageTooLarge { size, max_payload, .. } => (
                DispatchErrorKind::PayloadTooLarge,
                format!(
                    "is larger than the server's max_payload ({size} bytes with its headers, \
                     at most {max_payload}); nothing was sent"
                ),
            ),
            BatchPublishError::Timeout(_) => (
                DispatchErrorKind::Timeout,
                "was not confirmed in time: it may still be stored".to_owned(),
            ),
            BatchPublishError::Refused { code: batch::ATOMIC_DISABLED, .. } => (
                DispatchErrorKind::Unsupported,
                format!(
                    "needs atomic batches, which the stream does not allow (nats-server 2.12 or \
                     newer; the connected server is {version})"
                ),
            ),
            BatchPublishError::Refused { code: batch::WRONG_LAST_SEQUENCE, .. } => (
                DispatchErrorKind::Duplicate,
                "was refused: a unique or throttle key it holds is held by another task".to_owned(),
            ),
            BatchPublishError::Refused { code: batch::DUPLICATE_MESSAGE_ID, .. } => (
                DispatchErrorKind::AlreadyStored,
                "was refused: a task of it carries a message id the stream already stored (was \
                 it sent before?)"
                    .to_owned(),
            ),
            _ => (DispatchErrorKind::Rejected, "was refused".to_owned()),
        };
        DispatchError::with_source(kind, format!("{what} {problem}"), err)
    }
}

/// `unique key "k"` or `throttle key "k"`.
fn describe(guard: &Guard) -> String {
    let word = if guard.is_unique() { "unique" } else { "throttle" };
    format!("{word} key {:?}", guard.key)
}

/// The answer to a dispatch whose key `held` holds: the holder's receipt, or an error
/// naming it.
pub(super) fn conflict(guard: &Guard, about: &About, held: Held) -> Result<Receipt, DispatchError> {
    let sequence = held.task_sequence();
    let Held { body, stored_at, .. } = held;
    if guard.on_conflict == OnConflict::ReturnExisting {
        return Ok(Receipt { id: body.id, sequence: Some(sequence), duplicate: true });
    }
    let About { queue, task, .. } = about;
    let key = describe(guard);
    match guard.window() {
        None => Err(DispatchError::conflict(
            DispatchErrorKind::Duplicate,
            format!(
                "task {task:?} for queue {queue:?}: {key} is held by task {:?}, which is \
                 pending, scheduled or running",
                body.id
            ),
            Conflict { id: body.id, until: None },
        )),
        Some(window) => {
            let until = stored_at + window;
            let rfc3339 = until
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| until.to_string());
            Err(DispatchError::conflict(
                DispatchErrorKind::Throttled,
                format!(
                    "task {task:?} for queue {queue:?}: {key} was used by task {:?} within \
                     the window, which ends at {rfc3339}",
                    body.id
                ),
                Conflict { id: body.id, until: Some(until.max(OffsetDateTime::now_utc())) },
            ))
        }
    }
}
