//! The live stream of lifecycle events: published on core NATS, one subject per queue and
//! kind, to whoever subscribes at the time.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::store::{events_subject, Tracker};
use crate::extract::ProgressReport;

/// Something that happened to a tracked task ([`Client::events`](crate::Client::events)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The task id.
    pub id: String,
    /// The queue.
    pub queue: String,
    /// The task name.
    pub task: String,
    /// The attempt (0 for `dispatched` and `cancelled` before any attempt).
    #[serde(default)]
    pub attempt: u64,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The error, on `retrying`, `failed`, `dead_lettered` (and `failed` for a dispatch the
    /// server refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The report, on `progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressReport>,
    /// When the task is due (`dispatched` of a delayed task) or redelivered (`retrying`).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_at: Option<OffsetDateTime>,
    /// Why, on `dead_lettered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The workflow the task is a step of ([`workflow`](crate::workflow)), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// Handed to the server (sent just before the task is stored, so that it precedes
    /// every other event of the task; a refused dispatch is followed by `failed`, one that
    /// timed out by nothing, as it may still be stored). A dispatch the server drops as a
    /// duplicate of its message id is announced too.
    Dispatched,
    /// An attempt started.
    Started,
    /// The handler reported progress.
    Progress,
    /// The handler succeeded.
    Succeeded,
    /// An attempt failed; the task will be retried.
    Retrying,
    /// The handler failed without retry (or the dispatch was refused).
    Failed,
    /// Moved to the dead-letter queue.
    DeadLettered,
    /// Cancelled.
    Cancelled,
}

impl EventKind {
    /// The label used in subjects and JSON: `dispatched`, `started`, `progress`,
    /// `succeeded`, `retrying`, `failed`, `dead_lettered` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dispatched => "dispatched",
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Succeeded => "succeeded",
            Self::Retrying => "retrying",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Event {
    pub(crate) fn new(kind: EventKind, id: &str, queue: &str, task: &str, attempt: u64) -> Self {
        Self {
            kind,
            id: id.to_owned(),
            queue: queue.to_owned(),
            task: task.to_owned(),
            attempt,
            at: OffsetDateTime::now_utc(),
            error: None,
            progress: None,
            next_at: None,
            reason: None,
            workflow: None,
        }
    }

    /// Publishes the event (best-effort: core NATS, to current subscribers).
    pub(crate) async fn publish(&self, tracker: &Tracker) {
        let subject = events_subject(tracker, &self.queue, self.kind.as_str());
        let payload = serde_json::to_vec(self).unwrap_or_default();
        tracker.announce(subject, payload).await;
    }
}

/// A live stream of [`Event`]s, from [`Client::events`](crate::Client::events). Ends when
/// the connection closes for good; messages that are not events are skipped.
pub struct Events {
    subscriber: async_nats::Subscriber,
}

impl Events {
    pub(crate) fn new(subscriber: async_nats::Subscriber) -> Self {
        Self { subscriber }
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            match Pin::new(&mut self.subscriber).poll_next(cx) {
                Poll::Ready(Some(message)) => {
                    if let Ok(event) = serde_json::from_slice(&message.payload) {
                        return Poll::Ready(Some(event));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
