//! Tasks by state: listing with paging, and one task in full.
//!
//! Every task is a message of the stream, named by its stream sequence. Where it is tells
//! its state: on its queue's subject it is pending, or in flight once the queue's worker
//! consumer delivered it (a work-queue stream drops a task when it is acknowledged, so a
//! delivered task still stored is not acknowledged yet); on the dead-letter queue's subject
//! it is dead; a delayed task is a message schedule on a subject of its own.

use std::ops::ControlFlow;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::queues::Reading;
use super::{read, Admin, AdminError, AdminErrorKind};
use crate::wire;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TaskState {
    /// On its queue, not handed to a worker yet.
    Pending,
    /// Delivered to a worker and not acknowledged: running, or waiting for a retry.
    InFlight,
    /// A delayed task, not due yet.
    Scheduled,
    /// On the queue's dead-letter queue.
    Dead,
}

impl TaskState {
    /// Every state, in a task's order of life.
    pub const ALL: [TaskState; 4] =
        [TaskState::Pending, TaskState::InFlight, TaskState::Scheduled, TaskState::Dead];

    /// The state's name: `pending`, `in_flight`, `scheduled` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::InFlight => "in_flight",
            TaskState::Scheduled => "scheduled",
            TaskState::Dead => "dead",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = AdminError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "pending" => Ok(TaskState::Pending),
            "in_flight" | "in-flight" => Ok(TaskState::InFlight),
            "scheduled" => Ok(TaskState::Scheduled),
            "dead" => Ok(TaskState::Dead),
            _ => Err(AdminError::new(
                AdminErrorKind::InvalidInput,
                format!("unknown task state {text:?}: use pending, in_flight, scheduled or dead"),
            )),
        }
    }
}

/// One task, as lists show it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskSummary {
    /// The task's stream sequence: what [`Admin::task`], requeue and delete take.
    pub sequence: u64,
    /// The queue it belongs to (for a dead letter, the queue it failed on).
    pub queue: String,
    /// Where it is in its life.
    pub state: TaskState,
    /// The task name (empty if the message has none).
    pub name: String,
    /// The task id: its `Natasks-Id`, else the message id it was dispatched with (a
    /// workflow step's id is one); `None` for a message with neither.
    pub id: Option<String>,
    /// When the message was stored (a dead letter: when it failed).
    pub stored_at: OffsetDateTime,
    /// When a scheduled task is due.
    pub due: Option<OffsetDateTime>,
    /// A dead letter's attempts.
    pub attempts: Option<u32>,
    /// A dead letter's last error.
    pub last_error: Option<String>,
    /// Why a dead letter was given up (`retries-exhausted`, `no-retry`, ...).
    pub reason: Option<String>,
    /// The payload's size in bytes.
    pub size: usize,
}

/// One task in full: its summary, headers and payload.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskDetail {
    /// What lists show.
    pub summary: TaskSummary,
    /// Every header, sorted by name (a header with several values appears once per value).
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub payload: Bytes,
    /// The subject the message is stored on.
    pub subject: String,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Page<T> {
    /// The items, oldest first.
    pub items: Vec<T>,
    /// `Some` when more follow: pass it as `after` to read the next page.
    pub next: Option<u64>,
}

/// Where a message of the stream belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    /// A queue's subject: pending or in flight.
    Queue(String),
    /// A dead-letter queue's subject, by the queue's name.
    Dead(String),
    /// A delayed task's schedule.
    Delayed,
    /// Anything else (periodic schedule definitions, other subjects).
    Other,
}

impl Admin {
    /// Where a message on `subject` belongs.
    pub(crate) fn place(&self, subject: &str) -> Place {
        let Some(rest) = subject
            .strip_prefix(self.stream.subject_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            return Place::Other;
        };
        if let Some(id) = rest.strip_prefix(wire::SCHEDULE_TOKEN).and_then(|r| r.strip_prefix('.'))
        {
            return if id.contains('.') { Place::Other } else { Place::Delayed };
        }
        if rest.is_empty() || rest.contains('.') {
            return Place::Other;
        }
        match rest.strip_suffix(self.dlq_suffix.as_str()) {
            Some(base) if !base.is_empty() => Place::Dead(base.to_owned()),
            _ => Place::Queue(rest.to_owned()),
        }
    }

    /// The summary of `message`, or `None` if it is no task; `delivered` is the last stream
    /// sequence the queue's worker consumer delivered (0: none).
    pub(crate) fn summarize(
        &self,
        message: &StreamMessage,
        delivered: impl Fn(&str) -> u64,
    ) -> Option<TaskSummary> {
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        let (queue, state) = match self.place(&message.subject) {
            Place::Queue(queue) => {
                let state = if message.sequence <= delivered(&queue) {
                    TaskState::InFlight
                } else {
                    TaskState::Pending
                };
                (queue, state)
            }
            Place::Dead(queue) => (queue, TaskState::Dead),
            Place::Delayed => (self.schedule_target(message)?, TaskState::Scheduled),
            Place::Other => return None,
        };
        let dead = state == TaskState::Dead;
        Some(TaskSummary {
            sequence: message.sequence,
            queue,
            state,
            name: header(wire::HEADER_TASK).unwrap_or_default(),
            id: wire::task_id(&message.headers).map(str::to_owned),
            stored_at: message.time,
            due: (state == TaskState::Scheduled).then(|| due(message)).flatten(),
            attempts: header(wire::HEADER_ATTEMPTS).filter(|_| dead).and_then(|a| a.parse().ok()),
            last_error: header(wire::HEADER_LAST_ERROR).filter(|_| dead),
            reason: header(wire::HEADER_DEAD_LETTER_REASON).filter(|_| dead),
            size: message.payload.len(),
        })
    }

    /// The queue a delayed task's schedule targets.
    pub(crate) fn schedule_target(&self, message: &StreamMessage) -> Option<String> {
        let target = message.headers.get(wire::NATS_SCHEDULE_TARGET)?.as_str();
        match self.place(target) {
            Place::Queue(queue) => Some(queue),
            _ => None,
        }
    }

    /// The last stream sequence the worker consumer of `queue` delivered; 0 without one.
    pub(crate) async fn delivered(&self, stream: &Stream, queue: &str) -> Result<u64, AdminError> {
        Ok(reading_delivered(&self.queue_consumers(stream).await?, queue))
    }

    /// The tasks of `queue` in `state`, oldest first, at most `limit` (1 to 10,000), after
    /// the sequence `after` (`None`: from the start; a page's [`next`](Page::next) for the
    /// following page). Reads the stream without consuming anything. Fails with
    /// [`AdminErrorKind::UnknownQueue`] for a queue with no tasks, dead letters, delayed
    /// tasks or worker consumer.
    pub async fn tasks(
        &self,
        queue: &str,
        state: TaskState,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<TaskSummary>, AdminError> {
        let queue = super::queues::valid_queue(queue)?;
        valid_limit(limit)?;
        let stream = self.open_stream().await?;
        let reading = self.read_queues(&stream).await?;
        self.tasks_in(&stream, &reading, queue, state, after, limit).await
    }

    /// [`queue`](Self::queue) and a page of its [`tasks`](Self::tasks), from one reading of
    /// the stream's subjects and consumers: what a view of one queue shows.
    pub async fn queue_tasks(
        &self,
        queue: &str,
        state: TaskState,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(super::QueueInfo, Page<TaskSummary>), AdminError> {
        let queue = super::queues::valid_queue(queue)?;
        valid_limit(limit)?;
        let stream = self.open_stream().await?;
        let reading = self.read_queues(&stream).await?;
        let page = self.tasks_in(&stream, &reading, queue, state, after, limit).await?;
        let mut rows = self.overview(&stream, &reading, true, Some(queue)).await?;
        let info = rows.pop().unwrap_or_else(|| super::QueueInfo::new(queue));
        Ok((info, page))
    }

    /// [`tasks`](Self::tasks), from `reading`.
    async fn tasks_in(
        &self,
        stream: &Stream,
        reading: &Reading,
        queue: &str,
        state: TaskState,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<TaskSummary>, AdminError> {
        self.ensure_known_queue(stream, reading, queue).await?;
        let delivered = reading_delivered(self.consumers(stream, reading).await?, queue);
        let from = after.map_or(1, |after| after.saturating_add(1));
        let Some((filter, from, until)) = self.range(queue, state, delivered, from) else {
            return Ok(Page { items: Vec::new(), next: None });
        };
        let mut items = Vec::new();
        let mut more = false;
        read::scan(&self.js, stream, &filter, from, until, |message| {
            let Some(summary) = self.summarize(&message, |_| delivered) else {
                return ControlFlow::Continue(());
            };
            if summary.queue != queue || summary.state != state {
                return ControlFlow::Continue(());
            }
            if items.len() == limit {
                more = true;
                return ControlFlow::Break(());
            }
            items.push(summary);
            ControlFlow::Continue(())
        })
        .await?;
        let next = if more { items.last().map(|t| t.sequence) } else { None };
        Ok(Page { items, next })
    }

    /// The task with stream sequence `sequence`: summary, headers and payload. Fails with
    /// [`AdminErrorKind::NotFound`] when there is none (done, requeued, deleted) or the
    /// message is no task.
    pub async fn task(&self, sequence: u64) -> Result<TaskDetail, AdminError> {
        let stream = self.open_stream().await?;
        let not_found = || {
            AdminError::new(
                AdminErrorKind::NotFound,
                format!(
                    "no task {sequence} in stream {:?} (done, requeued or deleted?)",
                    self.stream.name
                ),
            )
        };
        let message = read::get(&self.js, &stream, sequence).await?.ok_or_else(not_found)?;
        let delivered = match self.place(&message.subject) {
            Place::Queue(queue) => self.delivered(&stream, &queue).await?,
            _ => 0,
        };
        let summary = self.summarize(&message, |_| delivered).ok_or_else(not_found)?;
        Ok(detail(summary, message))
    }

    /// The subject filter and sequences holding the tasks of `queue` in `state`, from
    /// sequence `from` on; `None` when there can be none.
    pub(crate) fn range(
        &self,
        queue: &str,
        state: TaskState,
        delivered: u64,
        from: u64,
    ) -> Option<(String, u64, Option<u64>)> {
        let prefix = &self.stream.subject_prefix;
        let from = from.max(1);
        Some(match state {
            TaskState::Pending => {
                (wire::queue_subject(prefix, queue), from.max(delivered + 1), None)
            }
            TaskState::InFlight if delivered == 0 || from > delivered => return None,
            TaskState::InFlight => (wire::queue_subject(prefix, queue), from, Some(delivered)),
            TaskState::Scheduled => (delayed_wildcard(prefix), from, None),
            TaskState::Dead => {
                (wire::queue_subject(prefix, &format!("{queue}{}", self.dlq_suffix)), from, None)
            }
        })
    }

    /// Fails with "unknown queue" unless `queue` or its dead-letter queue holds messages,
    /// a delayed task targets it, or it has a worker consumer.
    pub(crate) async fn ensure_known_queue(
        &self,
        stream: &Stream,
        reading: &Reading,
        queue: &str,
    ) -> Result<(), AdminError> {
        let prefix = &self.stream.subject_prefix;
        let has =
            |q: &str| reading.counts.get(&wire::queue_subject(prefix, q)).is_some_and(|n| *n > 0);
        if has(queue) || has(&format!("{queue}{}", self.dlq_suffix)) {
            return Ok(());
        }
        if self.consumers(stream, reading).await?.contains_key(queue) {
            return Ok(());
        }
        let mut targeted = false;
        read::scan(&self.js, stream, &delayed_wildcard(prefix), 1, None, |message| {
            targeted = self.schedule_target(&message).as_deref() == Some(queue);
            if targeted {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await?;
        if targeted {
            return Ok(());
        }
        Err(AdminError::new(
            AdminErrorKind::UnknownQueue,
            format!(
                "unknown queue {queue:?}: no tasks, dead letters or worker consumer in stream {:?}",
                self.stream.name
            ),
        ))
    }
}

/// The last stream sequence the worker consumer of `queue` delivered, among `consumers`; 0
/// without one.
pub(crate) fn reading_delivered(
    consumers: &std::collections::BTreeMap<String, async_nats::jetstream::consumer::Info>,
    queue: &str,
) -> u64 {
    consumers.get(queue).map_or(0, |info| info.delivered.stream_sequence)
}

/// The subject filter of every delayed task (one token after the schedule token; periodic
/// schedules have two).
pub(crate) fn delayed_wildcard(prefix: &str) -> String {
    format!("{prefix}.{}.*", wire::SCHEDULE_TOKEN)
}

/// When a delayed task is due, from its `Nats-Schedule: @at <time>` header.
pub(crate) fn due(message: &StreamMessage) -> Option<OffsetDateTime> {
    let schedule = message.headers.get(wire::NATS_SCHEDULE)?.as_str();
    OffsetDateTime::parse(schedule.strip_prefix("@at ")?.trim(), &Rfc3339).ok()
}

pub(crate) fn detail(summary: TaskSummary, message: StreamMessage) -> TaskDetail {
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_owned())))
        .collect();
    headers.sort();
    TaskDetail { summary, headers, payload: message.payload, subject: message.subject.to_string() }
}

/// The most items one page or search returns.
pub const MAX_LIMIT: usize = 10_000;

pub(crate) fn valid_limit(limit: usize) -> Result<(), AdminError> {
    if (1..=MAX_LIMIT).contains(&limit) {
        return Ok(());
    }
    Err(AdminError::new(
        AdminErrorKind::InvalidInput,
        format!("limit {limit} is outside 1..={MAX_LIMIT}"),
    ))
}
