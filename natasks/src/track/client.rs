//! The client side of tracking: recording a dispatch, and reading, awaiting and cancelling
//! tracked tasks.

use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use super::events::{Event, EventKind, Events};
use super::record::{Record, Tag};
use super::store::{is_conflict, Lookup, Tracker};
use super::{validate_id, Status, TaskState, TrackError, TrackErrorKind, DEFAULT_RETENTION};
use crate::client::Client;
use crate::guard::release::Stored;
use crate::wire;

/// What [`Client::cancel`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The task had not started (`was` pending, scheduled or retrying): it will not run.
    /// (A worker that was just receiving it sees the signal as it starts.)
    Cancelled {
        /// Where it was.
        was: TaskState,
    },
    /// The task was running: its handler's [`Cancellation`](crate::Cancellation) fires,
    /// and the task ends as cancelled, unless the handler finished first (the status then
    /// says how it ended).
    Signalled,
    /// It was already cancelled: nothing changed.
    AlreadyCancelled,
    /// It had already ended (succeeded, failed or dead-lettered): nothing changed.
    AlreadyFinished(TaskState),
    /// Its record expired: nothing to cancel.
    Expired,
    /// Nothing is recorded under the id: nothing to cancel.
    Unknown,
}

/// A tracked dispatch on its way: what the dispatcher records before and after the task is
/// stored.
pub(crate) struct TrackedDispatch {
    pub(crate) id: String,
    pub(crate) queue: String,
    pub(crate) task: String,
    pub(crate) retention: u64,
    pub(crate) due: Option<OffsetDateTime>,
    pub(crate) schedule: Option<String>,
    pub(crate) unique_key: Option<String>,
}

impl TrackedDispatch {
    /// The retention in seconds for `track` (zero: the default).
    pub(crate) fn retention(track: Duration) -> u64 {
        if track.is_zero() {
            DEFAULT_RETENTION.as_secs()
        } else {
            track.as_secs()
        }
    }

    /// Before the task is stored: the `dispatched` event, so that it precedes every event
    /// a worker publishes about the task.
    pub(crate) async fn announce(&self, tracker: &Tracker) {
        let mut event = Event::new(EventKind::Dispatched, &self.id, &self.queue, &self.task, 0);
        event.next_at = self.due;
        event.publish(tracker).await;
    }

    /// Records that step `self` of workflow `workflow` can never be stored (its message
    /// does not fit the server): failed, with `error`, so that its status and its
    /// workflow's say why; and announces it.
    pub(crate) async fn never_stored(&self, tracker: &Tracker, workflow: &str, error: &str) {
        let mut record = Record::new(Tag::Failed, &self.queue, &self.task, 0, self.retention);
        record.error = Some(crate::track::worker::clip(error, crate::track::worker::MAX_ERROR));
        let written = match tracker.store().await {
            Ok(store) => store.put(&self.id, &record, Some(0)).await.map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = written {
            tracing::warn!(id = %self.id, error = %err, "could not record the refused task");
        }
        let mut event = Event::new(EventKind::Failed, &self.id, &self.queue, &self.task, 0);
        event.error = record.error;
        event.workflow = Some(workflow.to_owned());
        event.publish(tracker).await;
    }

    /// After the server stored it: the `pending` (or `scheduled`) record, unless a worker
    /// already recorded more. The record of an earlier task with the same id (a message id
    /// used again after the duplicate window) is replaced once that task has ended. A
    /// failure is logged: the task is stored, and a dispatch error would make the caller
    /// store it again.
    pub(crate) async fn stored(&self, tracker: &Tracker, sequence: u64, duplicate: bool) {
        if duplicate {
            return;
        }
        let tag = if self.due.is_some() { Tag::Scheduled } else { Tag::Pending };
        let mut record = Record::new(tag, &self.queue, &self.task, 0, self.retention);
        record.due = self.due;
        record.schedule = self.schedule.clone();
        record.unique_key = self.unique_key.clone();
        record.sequence = self.due.is_none().then_some(sequence);
        let store = match tracker.store().await {
            Ok(store) => store,
            Err(err) => {
                tracing::warn!(id = %self.id, error = %err, "could not record the dispatched task");
                return;
            }
        };
        let mut expect = 0;
        for _ in 0..5 {
            match store.put(&self.id, &record, Some(expect)).await {
                Ok(_) => return,
                Err(err) if is_conflict(&err) => {}
                Err(err) => {
                    tracing::warn!(id = %self.id, error = %err, "could not record the dispatched task");
                    return;
                }
            }
            expect = match store.get(&self.id).await {
                // An earlier task's record: replaced once that task has ended.
                Ok(Lookup::Found { record: found, revision })
                    if found.is_final()
                        && found.sequence != record.sequence
                        && (found.schedule.is_none() || found.schedule != record.schedule) =>
                {
                    revision
                }
                Ok(Lookup::Expired { revision } | Lookup::Unknown { revision }) => revision,
                // A worker got there first (or a task with this id is still under way).
                Ok(Lookup::Found { .. }) => return,
                Err(err) => {
                    tracing::warn!(id = %self.id, error = %err, "could not record the dispatched task");
                    return;
                }
            };
        }
    }

    /// The server refused the task: `failed`, after the `dispatched` already sent.
    pub(crate) async fn refused(&self, tracker: &Tracker, error: &crate::DispatchError) {
        // A dispatch that timed out may have been stored, and may still run.
        if error.kind() == crate::DispatchErrorKind::Timeout {
            return;
        }
        let mut event = Event::new(EventKind::Failed, &self.id, &self.queue, &self.task, 0);
        event.error = Some(error.to_string());
        event.publish(tracker).await;
    }
}

impl Client {
    /// What is recorded of tracked task `id` ([`Task::tracked`](crate::Task::tracked)).
    ///
    /// Exact: the states `pending`/`scheduled` (recorded by the dispatcher once the task is
    /// stored) and every attempt's start and outcome (recorded by the worker before it
    /// tells the broker). Best-effort: progress (the latest report), and the lease end of a
    /// running task, which is renewed in the record as the worker renews it.
    pub async fn status(&self, id: &str) -> Result<Status, TrackError> {
        validate_id(id)?;
        let store = self.tracker().store().await?;
        Ok(match store.get(id).await? {
            Lookup::Found { record, .. } => Status::Known(record.status(id)),
            Lookup::Expired { .. } => Status::Expired,
            Lookup::Unknown { .. } => Status::Unknown,
        })
    }

    /// The result of tracked task `id`, decoded as `T`: what its handler returned. An
    /// error if the task has not succeeded (yet); its [`kind`](TrackError::kind) says
    /// where the task is, with the last error of a failed or dead-lettered task.
    pub async fn result<T: DeserializeOwned>(&self, id: &str) -> Result<T, TrackError> {
        validate_id(id)?;
        let store = self.tracker().store().await?;
        match store.get(id).await? {
            Lookup::Found { record, .. } => finished(id, &record),
            Lookup::Expired { .. } => Err(expired(id)),
            Lookup::Unknown { .. } => Err(unknown(id)),
        }
    }

    /// Waits until tracked task `id` has ended, at most `timeout`, and returns its result
    /// as [`result`](Self::result) would. Wakes on the change of its record (a watch, not
    /// polling). A task that is not recorded yet is waited for too (it may be on its way).
    pub async fn wait<T: DeserializeOwned>(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<T, TrackError> {
        validate_id(id)?;
        // A timeout too long to add is no deadline at all.
        let deadline = tokio::time::Instant::now().checked_add(timeout).unwrap_or_else(|| {
            tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)
        });
        let store = self.tracker().store().await?;
        let mut watch = store.watch(id).await?;
        let mut last = None;
        loop {
            let entry = match tokio::time::timeout_at(deadline, watch.next()).await {
                Err(_) => {
                    let seen = last.map_or("nothing is recorded under it".to_owned(), |s| {
                        format!("it is {s}")
                    });
                    return Err(TrackError::new(
                        TrackErrorKind::TimedOut,
                        format!("task {id:?} did not end within {timeout:?}: {seen}"),
                    ));
                }
                Ok(None) => {
                    return Err(TrackError::new(
                        TrackErrorKind::Broker,
                        format!("the watch of task {id:?} ended (connection closed)"),
                    ))
                }
                Ok(Some(Err(err))) => {
                    return Err(TrackError::broker(format!("watch the record of task {id:?}"), err))
                }
                Ok(Some(Ok(entry))) => entry,
            };
            match super::store::lookup(id, entry.operation, &entry.value, entry.revision)? {
                Lookup::Found { record, .. } if record.is_final() => return finished(id, &record),
                Lookup::Found { record, .. } => last = Some(record.status(id).state),
                Lookup::Expired { .. } => return Err(expired(id)),
                Lookup::Unknown { .. } => {}
            }
        }
    }

    /// Cancels tracked task `id`: a pending, scheduled or retrying task never runs (again);
    /// a running task's handler sees its [`Cancellation`](crate::Cancellation) fire within
    /// moments, in whichever process it runs, and the task ends as cancelled (removed: not
    /// retried, not dead-lettered). Cancelling a cancelled, finished or unknown task changes
    /// nothing and says so.
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, TrackError> {
        validate_id(id)?;
        cancel_record(self.tracker(), id, Then::RemoveWaiting, |_| true).await
    }

    /// A live stream of the lifecycle events of tracked tasks in `queue` (`None`: every
    /// queue), from now on. Events are core NATS messages: a subscriber sees those
    /// published while it listens, in order per task from one server; nothing is replayed.
    pub async fn events(&self, queue: Option<&str>) -> Result<Events, TrackError> {
        let queue = match queue {
            Some(queue) => wire::validate_queue(queue)
                .map_err(|err| TrackError::new(TrackErrorKind::InvalidQueue, err.to_string()))?,
            None => "*",
        };
        let tracker = self.tracker();
        let subject = wire::events_subject(&tracker.settings().subject_prefix, queue, "*");
        let nats = tracker.nats();
        let subscriber = nats
            .subscribe(subject)
            .await
            .map_err(|err| TrackError::broker("subscribe to events", err))?;
        // The server knows the subscription once the flush returns: what is dispatched
        // after this call returns is seen.
        nats.flush().await.map_err(|err| TrackError::broker("subscribe to events", err))?;
        Ok(Events::new(subscriber))
    }
}

/// Records tracked debounced task `id` as cancelled: a later dispatch with its key replaced
/// its schedule, so it never runs. Best effort, like every record a dispatch writes.
pub(crate) async fn replaced(tracker: &Tracker, id: &str) {
    match cancel_record(tracker, id, Then::Nothing, |_| true).await {
        Ok(outcome) => tracing::debug!(id, ?outcome, "replaced debounced task recorded"),
        Err(err) => tracing::debug!(id, error = %err, "could not record a replaced debounced task"),
    }
}

/// Records tracked task `id` as cancelled after an operator removed its message from the
/// stream (an admin delete, a cancelled schedule): the task stored at `stored`, which a
/// schedule on subject `scheduler` put there if it was delayed. A running task's handler is
/// signalled, as by [`Client::cancel`]. A task that was waiting and is workflow `step`
/// ends that step as cancelled: no worker will see it, so what follows it is dispatched
/// here. The record of another task with the same id (an earlier one, or its requeued
/// copy) is left as it is. Best effort: the message is gone whatever this does.
pub(crate) async fn removed(
    tracker: &Tracker,
    id: &str,
    stored: Stored<'_>,
    scheduler: Option<&str>,
    step: Option<&crate::workflow::StepRef>,
) {
    let ours = |record: &Record| match stored {
        Stored::Sequence(sequence) => {
            record.sequence == Some(sequence)
                // A delayed task that came due is recorded as scheduled until a worker
                // runs it.
                || record.sequence.is_none()
                    && record.state == Tag::Scheduled
                    && scheduler.is_some_and(|s| record.schedule.as_deref() == Some(s))
        }
        Stored::Schedule(subject) => {
            record.state == Tag::Scheduled && record.schedule.as_deref() == Some(subject)
        }
    };
    let then = step.map_or(Then::Nothing, Then::EndStep);
    match cancel_record(tracker, id, then, ours).await {
        Ok(outcome) => tracing::debug!(id, ?outcome, "removed task recorded"),
        Err(err) => {
            tracing::warn!(id, error = %err, "could not record a removed task as cancelled")
        }
    }
}

/// Records that the dead letter of tracked task `id` was put back on `queue` as the task
/// stored at `sequence`: `pending` again, unless a worker already recorded more of it.
pub(crate) async fn requeued(
    tracker: &Tracker,
    id: &str,
    queue: &str,
    task: &str,
    retention: Duration,
    sequence: u64,
) {
    let dispatch = TrackedDispatch {
        id: id.to_owned(),
        queue: queue.to_owned(),
        task: task.to_owned(),
        retention: TrackedDispatch::retention(retention),
        due: None,
        schedule: None,
        unique_key: None,
    };
    // The dead-lettered record is final and names another sequence: it is replaced.
    dispatch.stored(tracker, sequence, false).await;
}

/// What [`cancel_record`] does once a task's record says it was cancelled.
#[derive(Clone, Copy)]
enum Then<'a> {
    /// Nothing more: the task's message is gone already, and it is no workflow step.
    Nothing,
    /// Removes the task from its queue or its schedule (ending its workflow step).
    RemoveWaiting,
    /// The task's message is gone already: ends this workflow step, unless the task was
    /// running (its worker ends the step).
    EndStep(&'a crate::workflow::StepRef),
}

/// Records tracked task `id` as cancelled if `ours` says its record is about the task
/// meant, then does what `then` says.
async fn cancel_record(
    tracker: &Tracker,
    id: &str,
    then: Then<'_>,
    ours: impl Fn(&Record) -> bool,
) -> Result<CancelOutcome, TrackError> {
    let store = tracker.store().await?;
    // Retried when a worker changes the record between our read and our write.
    for _ in 0..10 {
        let (record, revision) = match store.get(id).await? {
            Lookup::Found { record, revision } => (record, revision),
            Lookup::Expired { .. } => return Ok(CancelOutcome::Expired),
            Lookup::Unknown { .. } => return Ok(CancelOutcome::Unknown),
        };
        if !ours(&record) {
            return Ok(CancelOutcome::Unknown);
        }
        if record.state == Tag::Cancelled {
            return Ok(CancelOutcome::AlreadyCancelled);
        }
        let was = record.status(id).state;
        if record.is_final() {
            return Ok(CancelOutcome::AlreadyFinished(was));
        }
        let mut cancelled = record.clone();
        cancelled.state = Tag::Cancelled;
        cancelled.at = OffsetDateTime::now_utc();
        cancelled.lease_until = None;
        cancelled.next_at = None;
        // A running task's worker announces the end; the others are announced here.
        cancelled.cancel_announced = record.state != Tag::Running;
        match store.put(id, &cancelled, Some(revision)).await {
            Ok(_) => {}
            Err(err) if is_conflict(&err) => continue,
            Err(err) => {
                return Err(TrackError::broker(format!("record the cancel of task {id:?}"), err))
            }
        }
        // The workflow the task is a step of, found on the way.
        let mut workflow = None;
        match then {
            Then::Nothing => {}
            Then::RemoveWaiting => remove_waiting(tracker, id, &record, &mut workflow).await,
            Then::EndStep(_) if record.state == Tag::Running => {}
            Then::EndStep(step) => {
                workflow = Some(step.workflow.clone());
                let end = crate::workflow::StepEnd::Ended { state: "cancelled", error: None };
                if let Err(err) = crate::workflow::advance_retrying(tracker, step, end).await {
                    tracing::warn!(id, %err, "could not dispatch what follows a removed step");
                }
            }
        }
        // Every worker of the queue hears it; the one running the task signals it.
        let subject = wire::cancel_subject(&tracker.settings().subject_prefix, &record.queue);
        tracker.announce(subject, id.as_bytes().to_vec()).await;
        if record.state == Tag::Running {
            return Ok(CancelOutcome::Signalled);
        }
        let mut event =
            Event::new(EventKind::Cancelled, id, &record.queue, &record.task, record.attempt);
        event.workflow = workflow;
        event.publish(tracker).await;
        return Ok(CancelOutcome::Cancelled { was });
    }
    Err(TrackError::new(
        TrackErrorKind::Broker,
        format!("task {id:?} kept changing while it was being cancelled; try again"),
    ))
}

/// Removes a task that waits in its queue or as a schedule, so that it never runs. Best
/// effort: a worker that already holds it finds the record cancelled, or hears the signal.
/// `workflow` is set to the workflow the task is a step of, if it is one.
async fn remove_waiting(
    tracker: &Tracker,
    id: &str,
    record: &Record,
    workflow: &mut Option<String>,
) {
    let settings = tracker.settings();
    let stream = match tracker.js().get_stream(&settings.name).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(error = %err, "could not open the stream to remove a cancelled task");
            return;
        }
    };
    // A unique task's key is released once its message is gone.
    let mut unique_key = None;
    let mut stored = None;
    if let Some(subject) = record.schedule.as_deref().filter(|_| record.state == Tag::Scheduled) {
        // The schedule on the subject may be another task's: a debounced task's subject
        // is shared by its key, and a later dispatch replaced it. Only this task's own
        // schedule is removed, by its sequence.
        let Ok(schedule) = stream.get_last_raw_message_by_subject(subject).await else {
            return;
        };
        let owner = wire::task_id(&schedule.headers);
        if owner.is_some_and(|owner| owner != id) {
            return;
        }
        unique_key = header(&schedule.headers, wire::HEADER_UNIQUE_KEY);
        stored = Some(Stored::Schedule(subject));
        if let Err(err) = stream.delete_message(schedule.sequence).await {
            tracing::debug!(error = %err, "could not remove a cancelled task's schedule");
            return;
        }
    }
    if let Some(sequence) = record.sequence.filter(|_| record.state == Tag::Pending) {
        if let Ok(task) = stream.get_raw_message(sequence).await {
            unique_key = header(&task.headers, wire::HEADER_UNIQUE_KEY);
            stored = Some(Stored::Sequence(sequence));
            // No worker will see this step end: what follows it is dispatched here, before
            // the task is removed (should this fail, the worker that gets the task finds
            // it cancelled and does it).
            if let Some(step) = crate::workflow::StepRef::from_headers(&task.headers) {
                *workflow = Some(step.workflow.clone());
                let end = crate::workflow::StepEnd::Ended { state: "cancelled", error: None };
                if let Err(err) = crate::workflow::advance_retrying(tracker, &step, end).await {
                    tracing::warn!(%err, "a cancelled step is left to a worker to end");
                    return;
                }
            }
        }
        if let Err(err) = stream.delete_message(sequence).await {
            tracing::debug!(error = %err, "could not remove a cancelled task");
            return;
        }
    }
    if let (Some(key), Some(stored)) = (unique_key, stored) {
        let released =
            crate::guard::release::release(tracker.js(), settings, &record.queue, &key, id, stored)
                .await;
        if let Err(err) = released {
            tracing::debug!(error = %err, "could not release a cancelled task's unique key");
        }
    }
}

fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_owned())
}

/// The answer of `result`/`wait` for a recorded task.
fn finished<T: DeserializeOwned>(id: &str, record: &Record) -> Result<T, TrackError> {
    let status = record.status(id);
    let (kind, message) = match record.state {
        Tag::Succeeded => {
            let json = record.result.as_ref().map_or("null", |raw| raw.get());
            return serde_json::from_str(json).map_err(|err| {
                TrackError::new(
                    TrackErrorKind::Undecodable,
                    format!(
                        "the result of task {id:?} does not decode as {}: {err}",
                        std::any::type_name::<T>()
                    ),
                )
            });
        }
        Tag::Failed => (
            TrackErrorKind::Failed,
            format!(
                "task {id:?} failed without retry on attempt {}: {}",
                record.attempt,
                record.error.as_deref().unwrap_or("no error recorded")
            ),
        ),
        Tag::DeadLettered => (
            TrackErrorKind::DeadLettered,
            format!(
                "task {id:?} was dead-lettered ({}) after attempt {}: {}",
                record.reason.as_deref().unwrap_or("no reason recorded"),
                record.attempt,
                record.error.as_deref().unwrap_or("no error recorded")
            ),
        ),
        Tag::Cancelled => (TrackErrorKind::Cancelled, format!("task {id:?} was cancelled")),
        _ => (TrackErrorKind::NotFinished, format!("task {id:?} is {}", status.state)),
    };
    Err(TrackError::new(kind, message).with_status(status))
}

fn expired(id: &str) -> TrackError {
    TrackError::new(
        TrackErrorKind::Expired,
        format!("the record of task {id:?} expired (its retention ran out)"),
    )
}

fn unknown(id: &str) -> TrackError {
    TrackError::new(TrackErrorKind::Unknown, format!("nothing is recorded for task {id:?}"))
}
