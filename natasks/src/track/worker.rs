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
use super::store::{is_too_large, Lookup, Tracker};
use super::DEFAULT_RETENTION;
use crate::extract::{Live, ProgressReport};
use crate::wire;

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
        let retention = headers.get(wire::TRACK_NAME)?.as_str().trim().parse::<u64>().ok();
        let retention = retention.filter(|&s| s > 0).unwrap_or(self.retention.as_secs()).max(1);
        let id = headers
            .get(wire::ID_NAME)
            .or_else(|| headers.get(wire::MESSAGE_ID_NAME))
            .or_else(|| headers.get(wire::NATS_MSG_ID))
            .map_or_else(|| format!("seq-{sequence}"), |v| v.as_str().to_owned());
        Some(Attempt {
            tracking: self,
            id,
            queue,
            task,
            attempt,
            retention,
            since: OffsetDateTime::now_utc(),
            registered: 0,
            last_progress: None,
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
pub(crate) struct Attempt<'a> {
    tracking: &'a WorkerTracking,
    id: String,
    queue: &'a str,
    task: &'a str,
    attempt: u64,
    retention: u64,
    since: OffsetDateTime,
    /// This attempt's number in `running` (0: not registered).
    registered: u64,
    last_progress: Option<ProgressReport>,
}

/// Whether a tracked attempt may run.
pub(crate) enum Begin {
    Run,
    /// Cancelled before it started: remove it without running.
    Cancelled,
}

impl Attempt<'_> {
    fn record(&self, tag: Tag) -> Record {
        let mut record = Record::new(tag, self.queue, self.task, self.attempt, self.retention);
        record.since = Some(self.since);
        record.progress = self.last_progress.clone();
        record
    }

    /// Before the handler runs: listens for a cancel, checks that none came yet, records
    /// `running` and announces `started`.
    pub(crate) async fn begin(&mut self, live: &Live, lease_until: OffsetDateTime) -> Begin {
        // Listening first, then reading: a cancel recorded after the read is heard.
        let number = self.tracking.next_attempt.fetch_add(1, Ordering::Relaxed);
        self.tracking
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id.clone(), (number, live.cancel.clone()));
        self.registered = number;
        let store = match self.tracking.tracker.store().await {
            Ok(store) => store,
            Err(err) => {
                tracing::warn!(id = %self.id, error = %err, "cannot record the task; running it untracked");
                return Begin::Run;
            }
        };
        match store.get(&self.id).await {
            Ok(Lookup::Found { record, .. }) if record.state == Tag::Cancelled => {
                return Begin::Cancelled
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(id = %self.id, error = %err, "cannot read the task's record")
            }
        }
        let mut record = self.record(Tag::Running);
        record.lease_until = Some(lease_until);
        self.write(&record).await;
        self.event(EventKind::Started).publish(&self.tracking.tracker).await;
        Begin::Run
    }

    /// The worker renewed the lease: the record shows the new end.
    pub(crate) async fn renewed(&mut self, lease_until: OffsetDateTime) {
        let mut record = self.record(Tag::Running);
        record.lease_until = Some(lease_until);
        self.write(&record).await;
    }

    /// The handler reported progress.
    pub(crate) async fn progress(&mut self, report: ProgressReport, lease_until: OffsetDateTime) {
        self.last_progress = Some(report.clone());
        let mut record = self.record(Tag::Running);
        record.lease_until = Some(lease_until);
        self.write(&record).await;
        let mut event = self.event(EventKind::Progress);
        event.progress = Some(report);
        event.publish(&self.tracking.tracker).await;
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
                record.next_at = delay.map(|d| OffsetDateTime::now_utc() + d);
                record.error = Some(error.to_owned());
                event.next_at = record.next_at;
                event.error = Some(error.to_owned());
            }
            Ended::Failed { error } => {
                record.error = Some(error.to_owned());
                event.error = Some(error.to_owned());
            }
            Ended::DeadLettered { reason, error } => {
                record.error = Some(error.to_owned());
                record.reason = Some(reason.to_owned());
                event.error = Some(error.to_owned());
                event.reason = Some(reason.to_owned());
            }
            Ended::Succeeded | Ended::Cancelled { .. } => {}
        }
        if let Some(json) = result {
            let size = json.len();
            record.result =
                String::from_utf8(json).ok().and_then(|s| RawValue::from_string(s).ok());
            if let Err(err) = self.try_write(&record).await {
                if is_too_large(&err) {
                    return Err(Unrecorded::ResultTooLarge(format!(
                        "the result ({size} bytes of JSON) is larger than the server's max_payload; it cannot be stored"
                    )));
                }
                tracing::warn!(id = %self.id, error = %err, "could not record the task's result");
            }
        } else {
            self.write(&record).await;
        }
        if !matches!(ended, Ended::Cancelled { announce: false }) {
            event.publish(&self.tracking.tracker).await;
        }
        Ok(())
    }

    fn event(&self, kind: EventKind) -> Event {
        Event::new(kind, &self.id, self.queue, self.task, self.attempt)
    }

    async fn write(&self, record: &Record) {
        if let Err(err) = self.try_write(record).await {
            tracing::warn!(id = %self.id, error = %err, "could not record the task's state");
        }
    }

    async fn try_write(
        &self,
        record: &Record,
    ) -> Result<(), async_nats::jetstream::context::PublishError> {
        match self.tracking.tracker.store().await {
            Ok(store) => store.put(&self.id, record, None).await.map(drop),
            // Logged when the attempt began.
            Err(_) => Ok(()),
        }
    }
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
