//! The worker side of tracking: recording each attempt of a tracked task, and hearing
//! cancellations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::events::{Event, EventKind};
use super::record::{Record, Tag};
use super::store::{is_conflict, is_too_large, Lookup, Tracker};
use super::DEFAULT_RETENTION;
use crate::extract::{Live, ProgressReport};
use crate::wire;
use crate::workflow::StepRef;

/// A worker's tracking: the bucket, its default retention, and the cancel tokens of the
/// tracked tasks it runs.
pub(crate) struct WorkerTracking {
    tracker: Tracker,
    retention: Duration,
    /// By task id: the attempt's number (unique in this worker) and its cancel token.
    running: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_attempt: AtomicU64,
}

/// How an attempt ended, as the record and the events tell it.
#[derive(Clone, Copy)]
pub(crate) enum Ended<'a> {
    Succeeded,
    Retrying {
        delay: Option<Duration>,
        error: &'a str,
    },
    Failed {
        error: &'a str,
    },
    DeadLettered {
        reason: &'a str,
        error: &'a str,
    },
    /// `announce`: whether the cancel happened in this attempt (the canceller announced
    /// the others).
    Cancelled {
        announce: bool,
    },
}

/// Why an ending could not be recorded as it is.
pub(crate) enum Unrecorded {
    /// The result is larger than the server accepts in one message: a clear failure of
    /// the task, not a silent loss of the result.
    ResultTooLarge(String),
}

impl WorkerTracking {
    pub(crate) fn new(tracker: Tracker, retention: Option<Duration>) -> Self {
        Self {
            tracker,
            retention: retention.unwrap_or(DEFAULT_RETENTION),
            running: Mutex::new(HashMap::new()),
            next_attempt: AtomicU64::new(1),
        }
    }

    /// The tracking of one attempt, if the task is tracked (its headers say so). No I/O.
    pub(crate) fn attempt<'a>(
        &'a self,
        headers: &HeaderMap,
        queue: &'a str,
        task: &'a str,
        attempt: u64,
        sequence: u64,
    ) -> Option<Attempt<'a>> {
        let retention =
            wire::header(headers, &wire::TRACK_NAME)?.as_str().trim().parse::<u64>().ok();
        let retention = retention.filter(|&s| s > 0).unwrap_or(self.retention.as_secs()).max(1);
        let id = wire::task_id(headers).map_or_else(|| format!("seq-{sequence}"), str::to_owned);
        let scheduler = headers.get(wire::NATS_SCHEDULER).map(|v| v.as_str().to_owned());
        let step = StepRef::from_headers(headers);
        Some(Attempt {
            tracking: self,
            id,
            queue,
            task,
            attempt,
            retention,
            sequence,
            scheduler,
            unique_key: headers.get(wire::UNIQUE_KEY_NAME).map(|v| v.as_str().to_owned()),
            since: OffsetDateTime::now_utc(),
            registered: 0,
            cancel: None,
            last_progress: None,
            revision: 0,
            stale: false,
            step,
            plan_kept_until: None,
        })
    }

    /// Hears cancellations for `queue` until dropped, signalling the tracked tasks this
    /// worker runs.
    pub(crate) async fn listen(self: &Arc<Self>, queue: &str) -> Option<ListenGuard> {
        let subject = wire::cancel_subject(&self.tracker.settings().subject_prefix, queue);
        let mut subscriber = match self.tracker.nats().subscribe(subject).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                tracing::warn!(error = %err, "cannot hear cancellations; running tracked tasks cannot be cancelled");
                return None;
            }
        };
        let this = self.clone();
        let handle = tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let Ok(id) = std::str::from_utf8(&message.payload) else { continue };
                let running = this.running.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((_, token)) = running.get(id) {
                    tracing::info!(id, "task cancelled");
                    token.cancel();
                }
            }
        });
        Some(ListenGuard(handle))
    }
}

/// Stops hearing cancellations when the worker's run ends.
pub(crate) struct ListenGuard(tokio::task::JoinHandle<()>);

impl Drop for ListenGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One attempt of a tracked task.
///
/// Its writes are conditional on the record's revision it last read or wrote, so that it
/// never overwrites what someone else wrote meanwhile without looking: a cancel (which it
/// then obeys), or the record of a newer attempt after this one lost its lease (it then
/// writes nothing more).
pub(crate) struct Attempt<'a> {
    tracking: &'a WorkerTracking,
    id: String,
    queue: &'a str,
    task: &'a str,
    attempt: u64,
    retention: u64,
    /// The stored message this attempt runs, and the schedule that produced it, if any:
    /// what ties a record to this task rather than to an earlier one with the same id.
    sequence: u64,
    scheduler: Option<String>,
    unique_key: Option<String>,
    since: OffsetDateTime,
    /// This attempt's number in `running` (0: not registered).
    registered: u64,
    cancel: Option<CancellationToken>,
    last_progress: Option<ProgressReport>,
    /// The record's revision as this attempt last read or wrote it (0: none).
    revision: u64,
    /// A newer attempt owns the record: this one writes nothing more.
    stale: bool,
    /// The workflow step the task is, if any.
    step: Option<StepRef>,
    /// Until when the step's workflow plan needs no keeping (`None`: look at the next
    /// renewal): renewals before then do not read the plan.
    plan_kept_until: Option<std::time::Instant>,
}

/// Whether a tracked attempt may run.
pub(crate) enum Begin {
    Run,
    /// Cancelled before it started: remove it without running. `announce`: nobody
    /// announced the cancel yet.
    Cancelled {
        announce: bool,
    },
    /// A workflow step whose end is already recorded (its follower could not be
    /// dispatched then): it is not run again; what follows it is dispatched from the record.
    Ended(Box<RecordedEnd>),
}

/// How a step ended, as its record says.
pub(crate) struct RecordedEnd {
    /// The final state's label (`succeeded`, `failed`, `dead_lettered`).
    pub(crate) state: &'static str,
    pub(crate) error: Option<String>,
    /// The result (JSON), on success.
    pub(crate) result: Option<Vec<u8>>,
}

/// The longest error text and progress detail a record keeps: a record must fit in one
/// message whatever the handler reports.
pub(crate) const MAX_ERROR: usize = 4096;
const MAX_DETAIL: usize = 16 * 1024;

impl Attempt<'_> {
    fn record(&self, tag: Tag) -> Record {
        let mut record = Record::new(tag, self.queue, self.task, self.attempt, self.retention);
        record.since = Some(self.since);
        record.progress = self.last_progress.clone();
        record.sequence = Some(self.sequence);
        record.schedule = self.scheduler.clone();
        record.unique_key = self.unique_key.clone();
        record
    }

    /// Whether `record` is about the message this attempt runs (an earlier task with the
    /// same id is another task).
    fn is_ours(&self, record: &Record) -> bool {
        match (record.sequence, &record.schedule) {
            (Some(sequence), _) => sequence == self.sequence,
            (None, Some(schedule)) => self.scheduler.as_deref() == Some(schedule.as_str()),
            (None, None) => true,
        }
    }

    /// Before anything is decided: listens for a cancel, then reads the record; a cancel
    /// recorded after the read is heard.
    pub(crate) async fn check(&mut self, live: &Live) -> Begin {
        let number = self.tracking.next_attempt.fetch_add(1, Ordering::Relaxed);
        self.tracking
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id.clone(), (number, live.cancel.clone()));
        self.registered = number;
        self.cancel = Some(live.cancel.clone());
        match self.read().await {
            Some(record) if record.state == Tag::Cancelled && self.is_ours(&record) => {
                Begin::Cancelled { announce: !record.cancel_announced }
            }
            Some(record) if record.is_final() && self.step.is_some() && self.is_ours(&record) => {
                Begin::Ended(Box::new(RecordedEnd {
                    state: record.status(&self.id).state.as_str(),
                    error: record.error,
                    result: record.result.map(|raw| raw.get().as_bytes().to_vec()),
                }))
            }
            _ => Begin::Run,
        }
    }

    /// Reads the record, remembering its revision; `None` when there is none or it cannot
    /// be read.
    async fn read(&mut self) -> Option<Record> {
        let store = match self.tracking.tracker.store().await {
            Ok(store) => store,
            Err(err) => {
                tracing::warn!(id = %self.id, error = %err, "cannot record the task; running it untracked");
                self.stale = true;
                return None;
            }
        };
        match store.get(&self.id).await {
            Ok(Lookup::Found { record, revision }) => {
                self.revision = revision;
                Some(*record)
            }
            // An expiry marker has a revision too: the next write goes on top of it.
            Ok(Lookup::Expired { revision } | Lookup::Unknown { revision }) => {
                self.revision = revision;
                None
            }
            Err(err) => {
                tracing::warn!(id = %self.id, error = %err, "cannot read the task's record");
                None
            }
        }
    }

    /// Before the handler runs: records `running` and announces `started`. A cancel found
    /// on the way ends the attempt instead.
    pub(crate) async fn start(&mut self, lease_until: OffsetDateTime) -> Begin {
        let mut record = self.record(Tag::Running);
        record.lease_until = Some(lease_until);
        if let Written::Cancelled = self.write(&mut record, false).await {
            return Begin::Cancelled { announce: true };
        }
        if self.cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
            return Begin::Cancelled { announce: true };
        }
        self.event(EventKind::Started).publish(&self.tracking.tracker).await;
        self.keep_plan().await;
        Begin::Run
    }

    /// A workflow's plan lives as long as the records of its steps.
    async fn keep_plan(&mut self) {
        let Some(step) = &self.step else { return };
        let now = std::time::Instant::now();
        if self.plan_kept_until.is_some_and(|until| now < until) {
            return;
        }
        let kept = crate::workflow::keep_plan(&self.tracking.tracker, &step.workflow).await;
        self.plan_kept_until = kept.and_then(|kept| now.checked_add(kept));
    }

    /// The worker renewed the lease: the record shows the new end.
    pub(crate) async fn renewed(&mut self, lease_until: OffsetDateTime) {
        let mut record = self.record(Tag::Running);
        record.lease_until = Some(lease_until);
        self.write(&mut record, false).await;
        self.keep_plan().await;
    }

    /// The last progress the handler reported before it returned, kept in the final
    /// record even when it came too late to be recorded on its own.
    pub(crate) fn last_report(&mut self, report: ProgressReport) {
        self.last_progress = Some(bounded(report));
    }

    /// The handler reported progress.
    pub(crate) async fn progress(&mut self, report: ProgressReport, lease_until: OffsetDateTime) {
        let report = bounded(report);
        self.last_progress = Some(report.clone());
        let mut record = self.record(Tag::Running);
        record.lease_until = Some(lease_until);
        if let Written::Yes = self.write(&mut record, false).await {
            let mut event = self.event(EventKind::Progress);
            event.progress = Some(report);
            event.publish(&self.tracking.tracker).await;
        }
    }

    /// Records how the attempt ended and announces it, before the worker tells the broker.
    /// `result` is the handler's result on success.
    pub(crate) async fn finish(
        &mut self,
        ended: Ended<'_>,
        result: Option<Vec<u8>>,
    ) -> Result<(), Unrecorded> {
        let (tag, kind) = match ended {
            Ended::Succeeded => (Tag::Succeeded, EventKind::Succeeded),
            Ended::Retrying { .. } => (Tag::Retrying, EventKind::Retrying),
            Ended::Failed { .. } => (Tag::Failed, EventKind::Failed),
            Ended::DeadLettered { .. } => (Tag::DeadLettered, EventKind::DeadLettered),
            Ended::Cancelled { .. } => (Tag::Cancelled, EventKind::Cancelled),
        };
        let mut record = self.record(tag);
        let mut event = self.event(kind);
        match ended {
            Ended::Retrying { delay, error } => {
                record.next_at = delay
                    .and_then(|d| time::Duration::try_from(d).ok())
                    .and_then(|d| OffsetDateTime::now_utc().checked_add(d));
                record.error = Some(clip(error, MAX_ERROR));
                event.next_at = record.next_at;
                event.error = record.error.clone();
            }
            Ended::Failed { error } => {
                record.error = Some(clip(error, MAX_ERROR));
                event.error = record.error.clone();
            }
            Ended::DeadLettered { reason, error } => {
                record.error = Some(clip(error, MAX_ERROR));
                record.reason = Some(reason.to_owned());
                event.error = record.error.clone();
                event.reason = Some(reason.to_owned());
            }
            Ended::Cancelled { .. } => record.cancel_announced = true,
            Ended::Succeeded => {}
        }
        let size = result.as_ref().map(Vec::len);
        if let Some(json) = result {
            record.result =
                String::from_utf8(json).ok().and_then(|s| RawValue::from_string(s).ok());
        }
        let written = self.write(&mut record, true).await;
        if let (Written::TooLarge, Some(size)) = (&written, size) {
            return Err(Unrecorded::ResultTooLarge(format!(
                "the result ({size} bytes of JSON) is larger than the server's max_payload; it cannot be stored"
            )));
        }
        let announce = !matches!(ended, Ended::Cancelled { announce: false });
        if announce && !matches!(written, Written::Stale) {
            event.publish(&self.tracking.tracker).await;
        }
        Ok(())
    }

    fn event(&self, kind: EventKind) -> Event {
        let mut event = Event::new(kind, &self.id, self.queue, self.task, self.attempt);
        event.workflow = self.step.as_ref().map(|step| step.workflow.clone());
        event
    }

    /// The workflow step the task is, if any.
    pub(crate) fn step(&self) -> Option<&StepRef> {
        self.step.as_ref()
    }

    /// The bucket and connection, for what follows a workflow step.
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.tracking.tracker
    }

    /// Writes `record` if the record is still as this attempt last saw it. When it is not:
    /// a cancel of this task is obeyed (the handler's signal fires; `finish`, whose outcome
    /// is decided, writes over it), a newer attempt's record makes this attempt stale, and
    /// anything else (the dispatcher's first record) is written over.
    async fn write(&mut self, record: &mut Record, finishing: bool) -> Written {
        if self.stale {
            return Written::Stale;
        }
        // Once cancelled, only the outcome is recorded: a renewal or a progress report
        // must not write `running` over the cancel.
        if !finishing && self.cancel.as_ref().is_some_and(CancellationToken::is_cancelled) {
            return Written::Cancelled;
        }
        let Ok(store) = self.tracking.tracker.store().await else { return Written::Stale };
        for _ in 0..5 {
            match store.put(&self.id, record, Some(self.revision)).await {
                Ok(revision) => {
                    self.revision = revision;
                    return Written::Yes;
                }
                Err(err) if is_conflict(&err) => {}
                Err(err) if is_too_large(&err) => return Written::TooLarge,
                Err(err) => {
                    tracing::warn!(id = %self.id, error = %err, "could not record the task's state");
                    return Written::Failed;
                }
            }
            let Some(current) = self.read().await else { continue };
            if !self.is_ours(&current) {
                // An earlier task with the same id: this one takes the key over.
                continue;
            }
            if current.attempt > self.attempt {
                tracing::debug!(id = %self.id, "a newer attempt owns the task's record");
                self.stale = true;
                return Written::Stale;
            }
            if current.state == Tag::Cancelled && !finishing {
                if let Some(cancel) = &self.cancel {
                    cancel.cancel();
                }
                return Written::Cancelled;
            }
        }
        tracing::warn!(id = %self.id, "the task's record kept changing; not recorded");
        Written::Failed
    }
}

/// What became of a write.
enum Written {
    Yes,
    /// The record says the task was cancelled.
    Cancelled,
    /// A newer attempt owns the record (or the bucket cannot be used).
    Stale,
    /// The record is larger than the server accepts.
    TooLarge,
    Failed,
}

/// A progress report small enough for a record: a detail over [`MAX_DETAIL`] bytes of JSON
/// is replaced by a note saying so.
fn bounded(mut report: ProgressReport) -> ProgressReport {
    let size = report.detail.as_ref().map_or(0, |d| d.to_string().len());
    if size > MAX_DETAIL {
        report.detail = Some(serde_json::json!({
            "natasks": format!("progress detail of {size} bytes left out (at most {MAX_DETAIL})")
        }));
    }
    report
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub(crate) fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.registered == 0 {
            return;
        }
        let mut running = self.tracking.running.lock().unwrap_or_else(|p| p.into_inner());
        // Another delivery of the same task may have registered since: leave its token.
        if running.get(&self.id).is_some_and(|(number, _)| *number == self.registered) {
            running.remove(&self.id);
        }
    }
}
