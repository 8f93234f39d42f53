//! Task lifecycle: status, results, progress, cancellation and events of tracked tasks.
//!
//! A task dispatched with [`Task::tracked`](crate::Task::tracked) is recorded in a
//! JetStream key-value bucket (`<stream>_TASKS`, one key per task id, a record per key
//! holding the latest state), and its lifecycle events are published on core NATS subjects
//! (`_natasks.<prefix>.events.<queue>.<kind>`). Untracked tasks cost nothing of this.
//!
//! * The dispatcher records `pending` (or `scheduled`) once the task is stored, unless a
//!   worker already recorded more.
//! * The worker records `running` when an attempt starts (with the lease's end, renewed
//!   as the lease is), then the attempt's outcome: `succeeded` (with the handler's
//!   result), `retrying`, `failed`, `dead_lettered` or `cancelled`; each before it tells
//!   the broker, so a task never leaves the queue with its record behind.
//! * Records expire `retention` after their last change (per-message TTL); a marker then
//!   says `expired` for [`EXPIRED_MEMORY`].

pub(crate) mod client;
mod events;
pub(crate) mod record;
mod store;
pub(crate) mod worker;

use std::fmt;
use std::time::Duration;

use time::OffsetDateTime;

pub use client::CancelOutcome;
pub use events::{Event, EventKind, Events};
pub(crate) use store::{is_conflict, is_too_large, Tracker};

use crate::extract::ProgressReport;

/// How long a record is kept after its last change unless the task says otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long the bucket remembers that a record expired (then [`Status::Expired`]), after
/// which the id is [`Status::Unknown`].
pub const EXPIRED_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// The longest retention: records are kept at most this long after their last change.
pub const MAX_RETENTION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The longest task id, in bytes.
pub const MAX_ID: usize = 256;

/// What is known of a task ([`Client::status`](crate::Client::status)).
// One is returned per status read, never stored in bulk: boxing `Known` would only make
// every caller's match noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Status {
    /// The task's latest recorded state.
    Known(TaskStatus),
    /// The task was recorded, but its record expired (its retention ran out).
    Expired,
    /// Nothing is recorded under this id: never dispatched tracked, not yet recorded, or
    /// expired so long ago that the bucket forgot.
    Unknown,
}

/// The recorded state of a tracked task.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskStatus {
    /// The task id.
    pub id: String,
    /// The queue it was dispatched to.
    pub queue: String,
    /// The task name.
    pub task: String,
    /// Where it is.
    pub state: TaskState,
    /// The attempt that recorded the state (0 before the first).
    pub attempt: u64,
    /// When the state was recorded.
    pub updated_at: OffsetDateTime,
    /// The last progress the handler reported, while it runs and after.
    pub progress: Option<ProgressReport>,
    /// The last error, from a failed attempt.
    pub last_error: Option<String>,
    /// The task's unique key, for a unique task ([`Task::unique`](crate::Task::unique)).
    pub unique_key: Option<String>,
}

/// Where a tracked task is in its lifecycle.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TaskState {
    /// Stored in its queue, waiting for a worker.
    Pending,
    /// Delayed: the server puts it into its queue at `due`.
    Scheduled {
        /// When it is due.
        due: OffsetDateTime,
    },
    /// A handler is running it.
    Running {
        /// When the attempt started.
        since: OffsetDateTime,
        /// When the worker's lease on it ends unless renewed (renewals are recorded). Past
        /// it, the worker is gone: the server redelivers the task to the next worker that
        /// asks, which records a new attempt.
        lease_until: OffsetDateTime,
    },
    /// An attempt failed; it is redelivered at `next_at` (`None`: after the ack wait).
    Retrying {
        /// When it is redelivered.
        next_at: Option<OffsetDateTime>,
    },
    /// The handler succeeded; its result is kept with the record.
    Succeeded,
    /// The handler failed and asked for no retry.
    Failed,
    /// Moved to the dead-letter queue.
    DeadLettered {
        /// Why ([`DeadLetterReason`](crate::DeadLetterReason) as text).
        reason: String,
    },
    /// Cancelled ([`Client::cancel`](crate::Client::cancel)): it will not run (again).
    Cancelled,
}

impl TaskState {
    /// Whether the task has ended (succeeded, failed, dead-lettered or cancelled).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::DeadLettered { .. } | Self::Cancelled)
    }

    /// A short stable label: `pending`, `scheduled`, `running`, `retrying`, `succeeded`,
    /// `failed`, `dead_lettered` or `cancelled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled { .. } => "scheduled",
            Self::Running { .. } => "running",
            Self::Retrying { .. } => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DeadLettered { .. } => "dead_lettered",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lifecycle operation failed, or found the task somewhere it cannot answer from.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TrackError {
    kind: TrackErrorKind,
    message: String,
    status: Option<Box<TaskStatus>>,
    #[source]
    source: Option<crate::BoxError>,
}

/// What went wrong in a lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackErrorKind {
    /// The id cannot be a task id (empty, longer than [`MAX_ID`], or with control
    /// characters).
    InvalidId,
    /// The queue name given to [`Client::events`](crate::Client::events) is invalid.
    InvalidQueue,
    /// Nothing is recorded under the id (see [`Status::Unknown`]).
    Unknown,
    /// The task's record expired.
    Expired,
    /// The task has not finished yet (pending, scheduled, running or retrying).
    NotFinished,
    /// The handler failed without retry; the error says with what.
    Failed,
    /// The task was dead-lettered; the error says why.
    DeadLettered,
    /// The task was cancelled.
    Cancelled,
    /// The result does not decode as the requested type.
    Undecodable,
    /// [`Client::wait`](crate::Client::wait) ran out of time.
    TimedOut,
    /// The server is too old (tracking needs nats-server 2.11 or newer).
    Unsupported,
    /// The server could not be reached or refused the request.
    Broker,
}

impl TrackError {
    pub(crate) fn new(kind: TrackErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), status: None, source: None }
    }

    pub(crate) fn broker(
        what: impl fmt::Display,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind: TrackErrorKind::Broker,
            message: format!("{what}: {source}"),
            status: None,
            source: Some(Box::new(source)),
        }
    }

    fn with_status(mut self, status: TaskStatus) -> Self {
        self.status = Some(Box::new(status));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> TrackErrorKind {
        self.kind
    }

    /// The task's status, when the error is about where the task is (failed,
    /// dead-lettered, cancelled, not finished).
    pub fn status(&self) -> Option<&TaskStatus> {
        self.status.as_deref()
    }

    /// The task's last error, for a task that failed or was dead-lettered.
    pub fn last_error(&self) -> Option<&str> {
        self.status.as_deref().and_then(|s| s.last_error.as_deref())
    }
}

/// Checks a task id given to a lifecycle operation.
pub(crate) fn validate_id(id: &str) -> Result<(), TrackError> {
    let problem = if id.is_empty() {
        "is empty"
    } else if id.len() > MAX_ID {
        "is longer than 256 bytes"
    } else if id.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(TrackError::new(TrackErrorKind::InvalidId, format!("task id {id:?} {problem}")))
}

/// The retention a dispatch of `task` records with (zero: the worker's default), if it is
/// tracked: asked with [`Task::tracked`](crate::Task::tracked), or carried over by a
/// received tracked task dispatched again. Refuses a retention that is not whole seconds
/// and an id a record cannot be kept under.
pub(crate) fn dispatch_retention(
    task: &crate::Task,
    id: &str,
) -> Result<Option<Duration>, crate::DispatchError> {
    use crate::{DispatchError, DispatchErrorKind};
    let retention = match task.track() {
        Some(retention) => {
            let whole = retention.subsec_nanos() == 0;
            if !retention.is_zero()
                && (retention < Duration::from_secs(1) || !whole || retention > MAX_RETENTION)
            {
                return Err(DispatchError::new(
                    DispatchErrorKind::InvalidTask,
                    format!(
                        "task {:?}: a tracked task's retention must be whole seconds, from 1 s to 10 years (got {retention:?})",
                        task.name()
                    ),
                ));
            }
            retention
        }
        None if task.delivery().is_some() => match task.header(crate::wire::HEADER_TRACK) {
            Some(value) => Duration::from_secs(value.trim().parse().unwrap_or(0)),
            None => return Ok(None),
        },
        None => return Ok(None),
    };
    validate_id(id).map_err(|err| {
        DispatchError::new(
            DispatchErrorKind::InvalidTask,
            format!("task {:?} cannot be tracked: {err}", task.name()),
        )
    })?;
    Ok(Some(retention))
}
