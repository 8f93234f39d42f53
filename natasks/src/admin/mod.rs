//! Operations on queues, for operators and their tools (the `natasks` CLI is built on it):
//! an overview of every queue ([`Admin::queues`]); tasks by state with paging
//! ([`Admin::tasks`], [`Admin::task`]); search by name, header, payload or last error
//! ([`Admin::search`]); requeue, delete and purge of one task, a selection or every task
//! matching a filter ([`Admin::requeue`], [`Admin::delete`], [`Admin::purge`]); delayed and
//! periodic schedules ([`Admin::schedules`], [`Admin::cancel_schedule`]); and queue control
//! (pause and resume, the queue's limit of tasks in flight, rate limits).
//!
//! Reading consumes nothing: tasks are read from the stream (see [`Admin::search`] for the
//! cost). A task is named by its stream sequence.
//!
//! Queue control lives on the broker, on the queue's durable consumer, so it holds for every
//! worker of the queue (Go workers included), survives restarts of workers and servers, and
//! needs no process of its own:
//!
//! * **pause** is JetStream's consumer pause (nats-server 2.11+): the server delivers
//!   nothing while it lasts; running tasks finish; nothing is redelivered or retried.
//! * the **limit** is the consumer's `max_ack_pending`: at most that many tasks in flight
//!   across every worker.
//! * **rates** are kept in the consumer's metadata; natasks workers count starts in a
//!   JetStream counter (nats-server 2.12+) per period and hold a task (its lease renewed)
//!   until the next period when the count is reached.
//!
//! ```no_run
//! # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
//! use natasks::admin::{Admin, Rate};
//!
//! let admin = Admin::new(js);
//! admin.pause("emails", None).await?;
//! admin.set_limit("reports", Some(4)).await?;
//! admin.set_rate("emails", None, Some("10/s".parse::<Rate>()?)).await?;
//! for queue in admin.queues().await? {
//!     println!("{}: {} pending, paused: {}", queue.name, queue.pending, queue.paused_until.is_some());
//! }
//! admin.resume("emails").await?;
//! # Ok(()) }
//! ```

mod bulk;
pub(crate) mod queues;
mod rate;
mod read;
mod schedules;
mod search;
mod tasks;

use std::fmt;

use async_nats::jetstream;

pub use bulk::{requeue_id, BulkOutcome, BulkStep, Selection};
pub use queues::{QueueInfo, RateLimit};
pub use rate::{InvalidRate, Rate, MAX_RATE_PERIOD};
pub use schedules::{ScheduleInfo, ScheduleKind};
pub use search::{Filter, SearchOptions, SearchProgress, SearchResult};
pub use tasks::{Page, TaskDetail, TaskState, TaskSummary, MAX_LIMIT};

use crate::stream::StreamSettings;
use crate::wire;

/// Consumer metadata key marking the queue's limit (`max_ack_pending`) as set by an
/// operator: workers keep it instead of their default.
pub const LIMIT_KEY: &str = "natasks.limit";
/// Consumer metadata key of the queue's rate; `natasks.rate.<task>` is the rate of one task
/// name.
pub const RATE_KEY: &str = "natasks.rate";

/// Operations on the queues of one stream. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    js: jetstream::Context,
    stream: StreamSettings,
    consumer_prefix: String,
    dlq_suffix: String,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin").field("stream", &self.stream.name).finish_non_exhaustive()
    }
}

impl Admin {
    /// Operations on the default layout (stream `NATASKS`, subjects `natasks.<queue>`,
    /// consumers `natasks-<queue>`, dead letters in `<queue>-dlq`).
    pub fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            stream: StreamSettings::default(),
            consumer_prefix: wire::DEFAULT_CONSUMER_PREFIX.to_owned(),
            dlq_suffix: wire::DEFAULT_DLQ_SUFFIX.to_owned(),
        }
    }

    /// The stream holding the queues. Default: `NATASKS`.
    #[must_use]
    pub fn stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream.name = name.into();
        self
    }

    /// The subject prefix. Default: `natasks`.
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream.subject_prefix = prefix.into();
        self
    }

    /// The prefix of the workers' durable consumers. Default: `natasks`.
    #[must_use]
    pub fn consumer_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.consumer_prefix = prefix.into();
        self
    }

    /// The suffix of dead-letter queues. Default: `-dlq`.
    #[must_use]
    pub fn dlq_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dlq_suffix = suffix.into();
        self
    }
}

/// An operation on queues failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    kind: AdminErrorKind,
    message: String,
    #[source]
    source: Option<crate::BoxError>,
}

/// What went wrong in an [`Admin`] operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminErrorKind {
    /// A queue name, limit, rate or time that cannot be used. Nothing was changed.
    InvalidInput,
    /// The queue is unknown: queue control needs a worker consumer (start a worker first);
    /// reading a queue's tasks needs tasks, dead letters or a consumer. Nothing was changed.
    UnknownQueue,
    /// No task with this sequence, or no schedule with this id (done, requeued, deleted or
    /// cancelled meanwhile?). Nothing was changed.
    NotFound,
    /// The stream does not exist (nothing dispatched yet, or another `stream_name`).
    UnknownStream,
    /// The server is too old for the operation (pause: 2.11+, rates: 2.12+).
    Unsupported,
    /// The server could not be reached or refused the request.
    Broker,
}

impl AdminError {
    pub(crate) fn new(kind: AdminErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    pub(crate) fn broker(
        what: impl fmt::Display,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind: AdminErrorKind::Broker,
            message: format!("{what}: {source}"),
            source: Some(Box::new(source)),
        }
    }

    pub(crate) fn broker_boxed(what: impl fmt::Display, source: crate::BoxError) -> Self {
        Self {
            kind: AdminErrorKind::Broker,
            message: format!("{what}: {source}"),
            source: Some(source),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> AdminErrorKind {
        self.kind
    }
}
