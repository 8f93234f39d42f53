//! Dispatching many tasks at once, all or none: [`Client::dispatch_batch`].

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

use super::guarded::conflict;
use super::prepare::{About, Prepared};
use super::{Client, Receipt};
use crate::batch::{self, Outgoing, MAX_BATCH};
use crate::error::{DispatchError, DispatchErrorKind};
use crate::guard::{Guard, GuardKind, OnConflict};
use crate::observe::Dispatched;
use crate::schedule::{self, DueTime};
use crate::task::Task;
use crate::track::client::TrackedDispatch;
use crate::wire;

/// Tasks to store together: every one or none ([`Client::dispatch_batch`]). They may go to
/// different queues, and be immediate or delayed.
///
/// ```no_run
/// # async fn example(client: natasks::Client) -> Result<(), natasks::DispatchError> {
/// use std::time::Duration;
/// use natasks::{Batch, Task};
///
/// let mut batch = Batch::new();
/// batch.add(Task::new("orders.charge", "order-42"), "payments");
/// batch.add(Task::new("emails.receipt", "order-42"), "emails");
/// batch.add_in(Task::new("emails.survey", "order-42"), "emails", Duration::from_secs(86_400));
/// let receipts = client.dispatch_batch(batch).await?;
/// assert_eq!(receipts.len(), 3);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
#[must_use]
pub struct Batch {
    items: Vec<Item>,
}

#[derive(Debug)]
struct Item {
    task: Task,
    queue: String,
    /// When the task is due; an error for a due time the server cannot hold.
    due: Result<Option<OffsetDateTime>, DispatchError>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `task` for `queue` (an empty name means `default`), delivered at once.
    pub fn add(&mut self, task: Task, queue: &str) -> &mut Self {
        self.items.push(Item { task, queue: queue.to_owned(), due: Ok(None) });
        self
    }

    /// Adds `task` for `queue`, delivered after `delay` (at once when zero), as
    /// [`Client::dispatch_in`] does.
    pub fn add_in(&mut self, task: Task, queue: &str, delay: Duration) -> &mut Self {
        let due = if delay.is_zero() { Ok(None) } else { schedule::due_in(delay).map(Some) };
        self.items.push(Item { task, queue: queue.to_owned(), due });
        self
    }

    /// Adds `task` for `queue`, delivered at `at` (at once when not in the future), as
    /// [`Client::dispatch_at`] does.
    pub fn add_at(&mut self, task: Task, queue: &str, at: impl DueTime) -> &mut Self {
        let due = at.into_due_time().map(|at| (at > OffsetDateTime::now_utc()).then_some(at));
        self.items.push(Item { task, queue: queue.to_owned(), due });
        self
    }

    /// How many tasks the batch holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch holds no task.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl<Q: AsRef<str>> FromIterator<(Task, Q)> for Batch {
    fn from_iter<I: IntoIterator<Item = (Task, Q)>>(iter: I) -> Self {
        let mut batch = Self::new();
        for (task, queue) in iter {
            batch.add(task, queue.as_ref());
        }
        batch
    }
}

impl Client {
    /// Stores every task of `batch` or none, in one JetStream atomic batch (nats-server 2.12
    /// or newer), and returns their receipts in order.
    ///
    /// A batch holds at most 1,000 messages, the server's limit per atomic batch: one per
    /// task, two for a unique or throttled task (its marker and the task). Every task is
    /// checked before anything is sent: an empty batch, one over the limit, an invalid task
    /// or a server without atomic batches fails the whole batch, naming the task, and
    /// nothing is published (there is no fallback to dispatching one by one). A unique or
    /// throttle key that is held refuses the whole batch with
    /// [`DispatchErrorKind::Duplicate`] or [`DispatchErrorKind::Throttled`], naming the
    /// holder ([`existing_id`](DispatchError::existing_id)) and the task of the batch,
    /// whatever [`return_existing`](Task::return_existing) says; the lock of a unique task
    /// that is gone is taken over, as a single dispatch does.
    ///
    /// Dispatch middleware does not run for batched tasks; the propagator and observers
    /// do. Tracked tasks are recorded as [`dispatch`](Self::dispatch) records them.
    pub async fn dispatch_batch(&self, batch: Batch) -> Result<Vec<Receipt>, DispatchError> {
        let started = std::time::Instant::now();
        let publisher = &self.inner.publisher;
        if batch.items.is_empty() {
            return Err(DispatchError::new(
                DispatchErrorKind::InvalidBatch,
                "an empty batch has nothing to dispatch",
            ));
        }
        if batch.items.len() > MAX_BATCH {
            return Err(too_large(batch.items.len()));
        }
        let mut prepared = Vec::with_capacity(batch.items.len());
        for (index, Item { task, queue, due }) in batch.items.into_iter().enumerate() {
            // The task's own error, saying which task of the batch it is.
            let what = |err: DispatchError| {
                DispatchError::new(err.kind(), format!("task {index} of the batch: {err}"))
            };
            let due = due.map_err(what)?;
            let ready = self.outgoing(task, &queue, due).map_err(what)?;
            prepared.push(ready);
        }
        check_twice(&prepared)?;
        let messages = prepared.iter().map(|p| 1 + usize::from(p.marker.is_some())).sum();
        if messages > MAX_BATCH {
            return Err(too_large(messages));
        }
        if !publisher.atomic {
            let version = publisher.js.client().server_info().version;
            let message = crate::stream::lacking_atomic("a batch needs atomic batches", &version);
            return Err(DispatchError::new(DispatchErrorKind::Unsupported, message));
        }
        let mut outgoing = Vec::with_capacity(messages);
        let mut tracked = Vec::new();
        let mut slots = Vec::with_capacity(prepared.len());
        let mut abouts = Vec::with_capacity(prepared.len());
        let mut guarded = Vec::new();
        for (index, p) in prepared.into_iter().enumerate() {
            if let Some(marker) = p.marker {
                if let Some(guard) = p.guard {
                    guarded.push(Guarded { task: index, marker: outgoing.len(), guard });
                }
                outgoing.push(marker);
            }
            slots.push((p.id, outgoing.len()));
            outgoing.push(p.message);
            if let Some(track) = p.track {
                tracked.push((track, outgoing.len() - 1));
            }
            abouts.push(p.about);
        }
        if !tracked.is_empty() {
            if let Err(err) = publisher.tracker.store().await {
                return Err(DispatchError::with_source(
                    DispatchErrorKind::TrackingUnavailable,
                    "the batch holds tracked tasks, which cannot be tracked",
                    err,
                ));
            }
            for (track, _) in &tracked {
                track.announce(&publisher.tracker).await;
            }
        }
        let stored = publish(publisher, outgoing, &abouts, &guarded).await;
        for about in &abouts {
            publisher.observers.dispatched(&Dispatched {
                queue: &about.queue,
                task: &about.task,
                delayed: about.delayed,
                elapsed: started.elapsed(),
                error: stored.as_ref().err(),
            });
        }
        match &stored {
            Ok(ack) => {
                for (track, index) in &tracked {
                    track.stored(&publisher.tracker, ack.sequence(*index), false).await;
                }
            }
            Err(err) => {
                for (track, _) in &tracked {
                    TrackedDispatch::refused(track, &publisher.tracker, err).await;
                }
            }
        }
        let ack = stored?;
        Ok(slots
            .into_iter()
            .map(|(id, index)| Receipt {
                id,
                sequence: Some(ack.sequence(index)),
                duplicate: false,
            })
            .collect())
    }
}

/// A unique or throttled task of a batch: its index, its marker's index among the
/// messages, and its guard.
struct Guarded {
    task: usize,
    marker: usize,
    guard: Box<Guard>,
}

/// How often a batch is sent again when a key it holds changes hands under it, or a stale
/// lock is taken over.
const ATTEMPTS: usize = 5;

/// Publishes the batch. Refused because a marker's subject was not as expected, every
/// guarded task's key is read: one held (by a task that is alive, or a throttle window)
/// fails the batch naming the holder; the locks of unique tasks that are gone are taken
/// over, as a single dispatch does, and the batch is sent again.
async fn publish(
    publisher: &super::Publisher,
    mut outgoing: Vec<Outgoing>,
    abouts: &[About],
    guarded: &[Guarded],
) -> Result<batch::BatchAck, DispatchError> {
    let count = abouts.len();
    let prefix = &publisher.stream.subject_prefix;
    for _ in 0..ATTEMPTS {
        match batch::publish_atomic(&publisher.js, outgoing.clone()).await {
            Ok(ack) => return Ok(ack),
            Err(err) if err.code() == Some(batch::WRONG_LAST_SEQUENCE) && !guarded.is_empty() => {
                tracing::trace!(error = %err, "a key of the batch is held or changed hands");
            }
            Err(batch::BatchPublishError::MessageTooLarge { index, size, max_payload }) => {
                // The task the message belongs to: a marker precedes its task.
                let task = guarded.iter().find(|g| g.marker == index).map_or_else(
                    || index - guarded.iter().filter(|g| g.marker < index).count(),
                    |g| g.task,
                );
                let about = &abouts[task];
                let what = format!(
                    "task {task} of the batch: task {:?} for queue {:?}",
                    about.task, about.queue
                );
                let err = batch::BatchPublishError::MessageTooLarge { index, size, max_payload };
                return Err(publisher.batch_error(what, err));
            }
            Err(err) => return Err(publisher.batch_error(format!("a batch of {count} tasks"), err)),
        }
        for Guarded { task, marker, guard } in guarded {
            let about = &abouts[*task];
            let queue_subject = wire::queue_subject(prefix, &about.queue);
            let marker = &mut outgoing[*marker];
            if let Some(held) = publisher.recheck(marker, guard, about, &queue_subject).await? {
                // A batch stores all or nothing: a held key fails it, whatever the task's
                // `return_existing`.
                let refuse = Guard { on_conflict: OnConflict::Refuse, ..(**guard).clone() };
                let err = match conflict(&refuse, about, held) {
                    Err(err) => err,
                    Ok(_) => unreachable!("a refusing guard never returns a receipt"),
                };
                return Err(err.prefixed(&format!("task {task} of the batch: ")));
            }
        }
    }
    Err(DispatchError::new(
        DispatchErrorKind::Rejected,
        format!("the keys of a batch of {count} tasks kept changing hands; try again"),
    ))
}

/// Two tasks of one batch with the same unique, throttle or debounce key in a queue, or
/// the same message id: the server would refuse the batch as a whole, with an error that
/// names neither.
fn check_twice(prepared: &[Prepared]) -> Result<(), DispatchError> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, p) in prepared.iter().enumerate() {
        let queue = &p.about.queue;
        let mut claims = Vec::new();
        if let Some(guard) = p.guard.as_deref() {
            // A marker's subject, or a debounced task's schedule subject, is the key's.
            let subject = match &p.marker {
                Some(marker) => Some(&marker.subject),
                None => (guard.kind == GuardKind::Debounce).then_some(&p.message.subject),
            };
            if let Some(subject) = subject {
                claims.push((
                    format!("s:{subject}"),
                    format!("{} in queue {queue:?}", guard.describe()),
                ));
            }
        }
        if let Some(id) = p.message.headers.get(wire::NATS_MSG_ID) {
            claims.push((format!("m:{id}"), format!("message id {:?}", id.as_str())));
        }
        for (claim, what) in claims {
            if let Some(earlier) = seen.insert(claim, index) {
                return Err(DispatchError::new(
                    DispatchErrorKind::InvalidBatch,
                    format!(
                        "tasks {earlier} and {index} of the batch have the same {what}: a batch \
                         may hold each once"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn too_large(messages: usize) -> DispatchError {
    DispatchError::new(
        DispatchErrorKind::InvalidBatch,
        format!(
            "a batch stores at most {MAX_BATCH} messages (the server's atomic batch limit; a \
             unique or throttled task takes two), this one {messages}"
        ),
    )
}
