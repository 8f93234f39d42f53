//! Requeue, delete and purge: one task, a selection, or every task matching a filter.
//!
//! Requeue is safe to interrupt and to run again: each dead letter is deleted only once the
//! server confirmed its copy, and a run that dies between the two steps and is run again
//! does not store a second copy. Where the stream allows atomic batches (nats-server 2.12+,
//! a stream natasks set up), the copy is stored in one batch with a marker
//! `<prefix>.__natasks_mark.requeue.<dead letter's sequence>` that the server accepts only on
//! an empty subject; a rerun that the marker refuses deletes the dead letter and stores
//! nothing. The marker expires after [`REQUEUE_MARK_TTL`], longer than any interrupted run
//! is expected to wait for its rerun. On an older stream the copy carries the message id
//! `natasks-requeue-<stream>-<dead letter's sequence>` only, which protects a rerun within
//! the stream's duplicate window (two minutes by default); a rerun after the window, or
//! after the server lost its duplicate state, stores a second copy.

use std::ops::ControlFlow;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{DeleteMessageError, DeleteMessageErrorKind, Stream};
use async_nats::HeaderMap;

use super::queues::Reading;
use super::search::Filter;
use super::tasks::{reading_delivered, Place};
use super::{read, Admin, AdminError, AdminErrorKind, TaskState};
use crate::batch::{self, Outgoing};
use crate::guard::release::Stored;
use crate::track::Tracker;
use crate::wire;
use crate::wire::task_id;

/// How long the marker of a requeued dead letter lives (a day): a rerun of an interrupted
/// requeue within it stores no second copy.
pub const REQUEUE_MARK_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How many matching tasks a bulk operation reads ahead before acting on them.
const CHUNK: usize = 256;

/// Headers that describe a failure; removed from a requeued task.
const FAILURE_HEADERS: [&str; 4] = [
    wire::HEADER_ORIGINAL_QUEUE,
    wire::HEADER_ATTEMPTS,
    wire::HEADER_LAST_ERROR,
    wire::HEADER_DEAD_LETTER_REASON,
];

/// Which tasks a bulk operation acts on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Selection {
    /// The task with this stream sequence.
    One(u64),
    /// The tasks with these stream sequences, in this order.
    Many(Vec<u64>),
    /// Every task matching the filter (`Filter::default()`: every task).
    Matching(Filter),
}

/// What a bulk operation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BulkOutcome {
    /// Tasks requeued or deleted.
    pub done: u64,
    /// Of `done`, requeued tasks whose copy an earlier, interrupted run had stored: the
    /// server saw the copy as a duplicate and stored it once.
    pub duplicates: u64,
    /// Selected tasks that went away before they were acted on (done, requeued or deleted
    /// by someone else meanwhile).
    pub skipped: u64,
    /// Tasks that could not be acted on, by sequence, with the reason. A task named in the
    /// selection that is not there is one; a broker failure is one and ends the operation.
    pub failed: Vec<(u64, String)>,
    /// The caller stopped the operation before the end (see
    /// [`Admin::requeue_with`]); running it again carries on.
    pub stopped: bool,
}

/// One task a bulk operation acted on, as its progress callback sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BulkStep {
    /// The task's stream sequence (for requeue: the dead letter's).
    pub sequence: u64,
    /// For requeue, the queue it went back to; for delete, its queue.
    pub queue: String,
    /// A requeue found the copy stored by an earlier, interrupted run.
    pub duplicate: bool,
    /// Tasks acted on so far, this one included.
    pub done: u64,
    /// Tasks selected, or for a filter the tasks it reads (an upper bound).
    pub total: u64,
}

/// Selected tasks, read in chunks.
struct Selected<'a> {
    admin: &'a Admin,
    stream: &'a Stream,
    queue: &'a str,
    state: TaskState,
    delivered: u64,
    selection: &'a Selection,
    /// Next index into a list, or next sequence to read for a filter.
    cursor: u64,
    total: u64,
    /// For a filter: the stream's last sequence when the operation began. Tasks stored
    /// later are not selected: a requeued copy that fails again and is dead-lettered anew
    /// would otherwise be requeued again, without end.
    last: u64,
}

/// A selected task, or the reason a named one is not there.
type Picked = Result<StreamMessage, (u64, String)>;

impl<'a> Selected<'a> {
    async fn new(
        admin: &'a Admin,
        stream: &'a Stream,
        reading: &Reading,
        queue: &'a str,
        state: TaskState,
        selection: &'a Selection,
    ) -> Result<Selected<'a>, AdminError> {
        let delivered = reading_delivered(admin.consumers(stream, reading).await?, queue);
        let total = match selection {
            Selection::One(_) => 1,
            Selection::Many(seqs) => seqs.len() as u64,
            Selection::Matching(filter) => {
                filter.validate()?;
                match admin.range(queue, state, delivered, 1) {
                    // A queue's or a dead-letter queue's subject: counted in the reading.
                    Some((subject, _, _)) if reading.counts.contains_key(&subject) => {
                        reading.counts[&subject]
                    }
                    Some((subject, _, _)) if state == TaskState::Scheduled => {
                        let counts =
                            super::queues::subject_counts(&admin.js, stream, &subject).await?;
                        counts.values().sum()
                    }
                    // A subject that holds nothing.
                    _ => 0,
                }
            }
        };
        let (cursor, last) = match selection {
            Selection::Matching(_) => (1, read::last_sequence(stream)),
            _ => (0, u64::MAX),
        };
        Ok(Self { admin, stream, queue, state, delivered, selection, cursor, total, last })
    }

    /// The next chunk; empty at the end.
    async fn chunk(&mut self) -> Result<Vec<Picked>, AdminError> {
        let seqs: &[u64] = match self.selection {
            Selection::One(seq) => std::slice::from_ref(seq),
            Selection::Many(seqs) => seqs,
            Selection::Matching(filter) => return self.matching(filter).await,
        };
        let start = self.cursor as usize;
        let end = (start + CHUNK).min(seqs.len());
        self.cursor = end as u64;
        let mut out = Vec::with_capacity(end.saturating_sub(start));
        for &seq in seqs.get(start..end).unwrap_or_default() {
            let message = match read::get(&self.admin.js, self.stream, seq).await {
                Ok(message) => message,
                Err(err) if err.kind() == AdminErrorKind::InvalidInput => {
                    out.push(Err((seq, err.to_string())));
                    continue;
                }
                Err(err) => return Err(err),
            };
            let found = message.filter(|m| {
                self.admin
                    .summarize(m, |_| self.delivered)
                    .is_some_and(|s| s.queue == self.queue && s.state == self.state)
            });
            out.push(found.ok_or_else(|| (seq, self.missing(seq))));
        }
        Ok(out)
    }

    async fn matching(&mut self, filter: &Filter) -> Result<Vec<Picked>, AdminError> {
        // Workers take tasks while the operation runs: which are pending is read again for
        // every chunk, so a task a worker took meanwhile is not deleted as pending.
        if self.cursor > 1 && matches!(self.state, TaskState::Pending | TaskState::InFlight) {
            self.delivered = self.admin.delivered(self.stream, self.queue).await?;
        }
        let Some((subject, from, until)) =
            self.admin.range(self.queue, self.state, self.delivered, self.cursor)
        else {
            return Ok(Vec::new());
        };
        let until = until.map_or(self.last, |until| until.min(self.last));
        if from > until {
            return Ok(Vec::new());
        }
        let matcher = filter.matcher();
        let mut out = Vec::new();
        let mut last = None;
        read::scan(&self.admin.js, self.stream, &subject, from, Some(until), |message| {
            last = Some(message.sequence);
            let summary = self.admin.summarize(&message, |_| self.delivered);
            if summary.is_some_and(|s| s.queue == self.queue && s.state == self.state)
                && matcher.matches(&message)
            {
                out.push(Ok(message));
            }
            if out.len() == CHUNK {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await?;
        self.cursor = match last {
            Some(last) => last + 1,
            None => u64::MAX,
        };
        Ok(out)
    }

    fn missing(&self, seq: u64) -> String {
        match self.state {
            TaskState::Dead => format!(
                "no dead letter {seq} on queue {}{} (already requeued or purged?)",
                self.queue, self.admin.dlq_suffix
            ),
            state => format!("no {state} task {seq} on queue {} (done or deleted?)", self.queue),
        }
    }
}

impl Admin {
    /// Puts dead letters of `queue` back on the queue they failed on, without their failure
    /// headers; a tracked task is tracked again, its record `pending` until it runs. Safe to interrupt and to run again (see the
    /// module docs). Returns the counts; see [`requeue_with`](Self::requeue_with) to follow
    /// progress and stop early.
    pub async fn requeue(
        &self,
        queue: &str,
        selection: &Selection,
    ) -> Result<BulkOutcome, AdminError> {
        self.requeue_with(queue, selection, |_| ControlFlow::Continue(())).await
    }

    /// [`requeue`](Self::requeue), calling `step` after each dead letter moved; `step`
    /// breaks to stop there (the outcome says `stopped`).
    pub async fn requeue_with(
        &self,
        queue: &str,
        selection: &Selection,
        step: impl FnMut(&BulkStep) -> ControlFlow<()>,
    ) -> Result<BulkOutcome, AdminError> {
        self.bulk(queue, TaskState::Dead, selection, Action::Requeue, step).await
    }

    /// Deletes tasks of `queue` in `state`: pending or in-flight tasks (a worker running
    /// one finishes it, but its acknowledgement finds nothing), scheduled tasks (they never
    /// become due) or dead letters. A tracked task's record says `cancelled` (a running
    /// one's handler sees its cancellation fire, as with [`Client::cancel`](crate::Client::cancel));
    /// a workflow step deleted while it waits ends as cancelled and its workflow goes on.
    /// Returns the counts.
    pub async fn delete(
        &self,
        queue: &str,
        state: TaskState,
        selection: &Selection,
    ) -> Result<BulkOutcome, AdminError> {
        self.delete_with(queue, state, selection, |_| ControlFlow::Continue(())).await
    }

    /// [`delete`](Self::delete), calling `step` after each task deleted; `step` breaks to
    /// stop there.
    pub async fn delete_with(
        &self,
        queue: &str,
        state: TaskState,
        selection: &Selection,
        step: impl FnMut(&BulkStep) -> ControlFlow<()>,
    ) -> Result<BulkOutcome, AdminError> {
        self.bulk(queue, state, selection, Action::Delete, step).await
    }

    /// Deletes every task of `queue` in `state` and returns how many. Dead letters go in
    /// one request to the server; tasks in other states are deleted one by one (their
    /// subject holds tasks of another state too).
    pub async fn purge(&self, queue: &str, state: TaskState) -> Result<u64, AdminError> {
        let queue = super::queues::valid_queue(queue)?;
        if state != TaskState::Dead {
            let all = Selection::Matching(Filter::default());
            let outcome = self.delete(queue, state, &all).await?;
            return match outcome.failed.into_iter().next() {
                Some((_, reason)) => Err(AdminError::new(AdminErrorKind::Broker, reason)),
                None => Ok(outcome.done),
            };
        }
        let stream = self.open_stream().await?;
        let reading = self.read_queues(&stream).await?;
        self.ensure_known_queue(&stream, &reading, queue).await?;
        let dlq = format!("{queue}{}", self.dlq_suffix);
        let response = stream
            .purge()
            .filter(wire::queue_subject(&self.stream.subject_prefix, &dlq))
            .await
            .map_err(|err| AdminError::broker(format!("purge {dlq}"), err))?;
        Ok(response.purged)
    }

    async fn bulk(
        &self,
        queue: &str,
        state: TaskState,
        selection: &Selection,
        action: Action,
        mut step: impl FnMut(&BulkStep) -> ControlFlow<()>,
    ) -> Result<BulkOutcome, AdminError> {
        let queue = super::queues::valid_queue(queue)?;
        let stream = self.open_stream().await?;
        let reading = self.read_queues(&stream).await?;
        self.ensure_known_queue(&stream, &reading, queue).await?;
        let mut selected = Selected::new(self, &stream, &reading, queue, state, selection).await?;
        // Tracked tasks' records follow what is done to them (the bucket is opened only
        // when one is met).
        let tracker = Tracker::new(self.js.clone(), self.stream.clone());
        let mut outcome = BulkOutcome::default();
        loop {
            let chunk = selected.chunk().await?;
            if chunk.is_empty() {
                return Ok(outcome);
            }
            for picked in chunk {
                let message = match picked {
                    Ok(message) => message,
                    Err(failure) => {
                        outcome.failed.push(failure);
                        continue;
                    }
                };
                let seq = message.sequence;
                let done = match action {
                    Action::Requeue => self.move_back(&stream, &tracker, queue, &message).await,
                    Action::Delete => match stream.delete_message(seq).await {
                        Ok(_) => {
                            self.record_removed(&tracker, &message).await;
                            Ok(Some((queue.to_owned(), false)))
                        }
                        Err(err) if is_missing(&err) => Ok(None),
                        Err(err) => Err(format!("delete task {seq}: {err}")),
                    },
                };
                match done {
                    Ok(Some((target, duplicate))) => {
                        outcome.done += 1;
                        outcome.duplicates += u64::from(duplicate);
                        let at = BulkStep {
                            sequence: seq,
                            queue: target,
                            duplicate,
                            done: outcome.done,
                            total: selected.total,
                        };
                        if step(&at).is_break() {
                            outcome.stopped = true;
                            return Ok(outcome);
                        }
                    }
                    Ok(None) => outcome.skipped += 1,
                    Err(reason) => {
                        outcome.failed.push((seq, reason));
                        return Ok(outcome);
                    }
                }
            }
        }
    }

    /// A tracked task's message was deleted: its record says it was cancelled.
    async fn record_removed(&self, tracker: &Tracker, message: &StreamMessage) {
        // A dead letter carries its tracking aside: its record already says how it ended.
        if message.headers.get(wire::HEADER_TRACK).is_none() {
            return;
        }
        let Some(id) = task_id(&message.headers) else { return };
        let stored = match self.place(&message.subject) {
            Place::Delayed => Stored::Schedule(&message.subject),
            _ => Stored::Sequence(message.sequence),
        };
        let scheduler = message.headers.get(wire::NATS_SCHEDULER).map(|v| v.as_str());
        let step = crate::workflow::StepRef::from_headers(&message.headers);
        crate::track::client::removed(tracker, id, stored, scheduler, step.as_ref()).await;
    }

    /// Publishes the requeued copy of a dead letter, waits for the server's ack, records a
    /// tracked task as pending again, then deletes the dead letter. Returns the target
    /// queue and whether the server saw the copy as a duplicate; `None` if the dead letter
    /// was deleted meanwhile before a copy.
    async fn move_back(
        &self,
        stream: &Stream,
        tracker: &Tracker,
        queue: &str,
        message: &StreamMessage,
    ) -> Result<Option<(String, bool)>, String> {
        let seq = message.sequence;
        let target = message
            .headers
            .get(wire::HEADER_ORIGINAL_QUEUE)
            .map(|v| v.as_str())
            .filter(|q| wire::validate_queue(q).is_ok_and(|v| v == *q))
            // Never back onto a dead-letter queue: the copy would be selected again.
            .filter(|q| !q.ends_with(self.dlq_suffix.as_str()))
            .unwrap_or(queue)
            .to_owned();
        let what = || format!("requeue dead letter {seq} to queue {target}");
        // A chunk is read ahead of acting on it: the dead letter may have been requeued,
        // deleted or purged meanwhile, and a copy would bring it back. (One deleted between
        // this read and the publish still is: the window is one round trip.)
        match read::get(&self.js, stream, seq).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(err) => return Err(format!("{}: {err}", what())),
        }
        let marked = marks_requeues(stream, &self.stream.subject_prefix);
        // With a marker, no message id: within the duplicate window a rerun would fail as a
        // duplicate instead of finding the marker.
        let id = (!marked).then(|| requeue_id(&self.stream.name, seq));
        let headers = requeued_headers(message, &target, id.as_deref());
        let tracked = tracked_copy(&headers);
        let subject = wire::queue_subject(&self.stream.subject_prefix, &target);
        // The copy's sequence; `None` for a duplicate whose copy is no longer found.
        let (duplicate, copy_seq) = if marked {
            let mut mark = HeaderMap::new();
            mark.insert(wire::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            mark.insert(wire::NATS_TTL, REQUEUE_MARK_TTL.as_secs().to_string().as_str());
            let seq_token = seq.to_string();
            let marker_subject =
                wire::marker_subject(&self.stream.subject_prefix, &["requeue", seq_token.as_str()]);
            let marker = Outgoing {
                subject: marker_subject.clone(),
                headers: mark,
                payload: bytes::Bytes::new(),
            };
            let copy =
                Outgoing { subject: subject.clone(), headers, payload: message.payload.clone() };
            match batch::publish_atomic(&self.js, vec![marker, copy]).await {
                Ok(ack) => (false, Some(ack.sequence(1))),
                // The marker is there: an earlier run stored the copy, right after it.
                Err(err) if err.code() == Some(batch::WRONG_LAST_SEQUENCE) => {
                    let id = tracked.as_ref().map(|(id, _, _)| id.as_str());
                    (true, self.copy_after(stream, &marker_subject, &subject, id).await)
                }
                Err(err @ batch::BatchPublishError::Timeout(_)) => {
                    return Err(format!(
                        "{}: the server did not confirm in time (safe to run again): {err}",
                        what()
                    ))
                }
                Err(err) => return Err(format!("{}: {err}", what())),
            }
        } else {
            let publish = PublishMessage::build().payload(message.payload.clone()).headers(headers);
            let ack = match self.js.send_publish(subject, publish).await {
                Ok(ack) => ack.await,
                Err(err) => return Err(format!("{}: {err}", what())),
            };
            let ack = ack.map_err(|err| match err.kind() {
                PublishErrorKind::TimedOut => {
                    format!("{}: the server did not confirm in time (safe to run again)", what())
                }
                _ => format!("{}: {err}", what()),
            })?;
            // A duplicate's ack names the copy stored first.
            (ack.duplicate, Some(ack.sequence))
        };
        // Recorded before the dead letter goes. A run that died in between (or before it
        // recorded) and is run again finds the copy stored and records it then; a record a
        // worker wrote about the copy is left as it is.
        if let (Some((id, task, retention)), Some(copy_seq)) = (&tracked, copy_seq) {
            crate::track::client::requeued(tracker, id, &target, task, *retention, copy_seq).await;
        }
        match stream.delete_message(seq).await {
            Ok(_) => {}
            // Deleted meanwhile (by a concurrent requeue or purge): the copy is stored, done.
            Err(err) if is_missing(&err) => {}
            Err(err) => {
                return Err(format!(
                    "requeued dead letter {seq} to queue {target} but cannot delete it \
                     (running again is safe): {err}"
                ))
            }
        }
        Ok(Some((target, duplicate)))
    }

    /// The sequence of the copy an earlier requeue stored in one batch with the marker on
    /// `marker`: the message right after the marker, if it is still there on `subject`
    /// (with task id `id`, for a tracked task). `None` once a worker took it, or the marker
    /// expired.
    async fn copy_after(
        &self,
        stream: &Stream,
        marker: &str,
        subject: &str,
        id: Option<&str>,
    ) -> Option<u64> {
        let marker = stream.get_last_raw_message_by_subject(marker).await.ok()?;
        let copy = read::get(&self.js, stream, marker.sequence + 1).await.ok()??;
        (copy.subject.as_str() == subject && id.is_none_or(|id| task_id(&copy.headers) == Some(id)))
            .then_some(copy.sequence)
    }
}

#[derive(Clone, Copy)]
enum Action {
    Requeue,
    Delete,
}

/// The message id of the requeued copy of dead letter `seq` of `stream`.
pub fn requeue_id(stream: &str, seq: u64) -> String {
    format!("natasks-requeue-{stream}-{seq}")
}

/// The task to put back: the dead letter's task headers (the task's id among them), without
/// the failure headers and server headers, addressed to `target`, with message id `id`.
fn requeued_headers(message: &StreamMessage, target: &str, id: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in message.headers.iter() {
        let name: &str = name.as_ref();
        // A unique task's lock was released when it was dead-lettered: the copy comes back
        // as an ordinary task, without a key it does not hold.
        let drop = FAILURE_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
            || name.eq_ignore_ascii_case(wire::HEADER_QUEUE)
            || name.eq_ignore_ascii_case(wire::HEADER_UNIQUE_KEY)
            || name.len() >= 5 && name[..5].eq_ignore_ascii_case("Nats-");
        if drop {
            continue;
        }
        // A tracked task's dead letter carries its tracking aside; the requeued task is
        // tracked again.
        let name = if name.eq_ignore_ascii_case(wire::HEADER_DEAD_LETTER_TRACK) {
            wire::HEADER_TRACK
        } else {
            name
        };
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    headers.insert(wire::HEADER_QUEUE, target);
    if let Some(id) = id {
        headers.insert(wire::NATS_MSG_ID, id);
    }
    headers
}

/// The task id, name and retention of a requeued copy that is tracked, from its headers
/// (the ones a worker reads).
fn tracked_copy(headers: &HeaderMap) -> Option<(String, String, std::time::Duration)> {
    let retention = headers.get(wire::HEADER_TRACK)?.as_str().trim().parse().unwrap_or(0);
    let id = task_id(headers)?.to_owned();
    let task = headers.get(wire::HEADER_TASK).map_or("", |v| v.as_str()).to_owned();
    Some((id, task, std::time::Duration::from_secs(retention)))
}

/// Whether the stream stores requeue markers: atomic batches, per-message TTLs (the marker
/// expires) and the marker subjects.
fn marks_requeues(stream: &Stream, prefix: &str) -> bool {
    let config = &stream.cached_info().config;
    config.allow_atomic_publish
        && config.allow_message_ttl
        && config.subjects.contains(&wire::markers_wildcard(prefix))
}

fn is_missing(err: &DeleteMessageError) -> bool {
    matches!(err.kind(), DeleteMessageErrorKind::JetStream(e)
        if e.error_code() == async_nats::jetstream::ErrorCode::SEQUENCE_NOT_FOUND
            || e.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND)
}
