//! Error types, one per operation family.
//!
//! Every error has a `kind()` the caller can match on; `Display` says what failed and with
//! which input, and leaves the underlying cause to [`std::error::Error::source`].

use std::fmt;
use std::time::Duration;

/// A boxed error, as produced by handlers and middleware.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of [`SetupError`] occurred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetupErrorKind {
    /// A builder option is out of its accepted range.
    InvalidOption,
    /// The queue name is not usable.
    InvalidQueue,
    /// The stream exists with a layout natasks cannot use.
    IncompatibleStream,
    /// Talking to JetStream failed (stream or consumer could not be read or written).
    JetStream,
}

/// Creating a [`Client`](crate::Client) or building a [`Worker`](crate::Worker) failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SetupError {
    kind: SetupErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl SetupError {
    pub(crate) fn new(kind: SetupErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    pub(crate) fn invalid_option(setting: &str, problem: impl fmt::Display) -> Self {
        Self::new(SetupErrorKind::InvalidOption, format!("invalid `{setting}`: {problem}"))
    }

    pub(crate) fn jetstream(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            kind: SetupErrorKind::JetStream,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> SetupErrorKind {
        self.kind
    }
}

impl From<InvalidName> for SetupError {
    fn from(err: InvalidName) -> Self {
        Self::new(SetupErrorKind::InvalidQueue, err.to_string())
    }
}

/// A queue name, task name or header that cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} {problem}")]
pub struct InvalidName {
    pub(crate) what: &'static str,
    pub(crate) value: String,
    pub(crate) problem: &'static str,
}

/// What kind of [`DispatchError`] occurred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DispatchErrorKind {
    /// The task or queue is invalid (empty or wildcard task name, bad queue name, bad header).
    InvalidTask,
    /// The payload and headers exceed the server's `max_payload`.
    PayloadTooLarge,
    /// Delayed delivery was asked of a server without message schedules (nats-server < 2.12).
    SchedulesUnsupported,
    /// The due time of a delayed dispatch is after the year 2261 (UTC), later than
    /// nats-server can hold a schedule time (its nanoseconds since 1970 end in April 2262):
    /// a delay too long, or a time too far ahead.
    InvalidDueTime,
    /// The server did not confirm the task in time; it may or may not be stored. Retry with the
    /// same message id to stay free of duplicates.
    Timeout,
    /// The server refused the task (no stream, permissions, storage full, ...).
    Rejected,
    /// A dispatch middleware stopped the dispatch with an error of its own.
    Middleware,
    /// A tracked task ([`Task::tracked`](crate::Task::tracked)) cannot be recorded: the
    /// server is too old (nats-server 2.11 or newer is needed) or the record bucket cannot
    /// be opened. Nothing was stored.
    TrackingUnavailable,
    /// A task with the same unique key ([`Task::unique`](crate::Task::unique)) is pending,
    /// scheduled or running in the queue; [`DispatchError::existing_id`] names it. Nothing
    /// was stored.
    Duplicate,
    /// A task with the same throttle key ([`Task::throttle`](crate::Task::throttle)) was
    /// dispatched to the queue within the window; [`DispatchError::existing_id`] names it and
    /// [`DispatchError::retry_at`] says when the window ends. Nothing was stored.
    Throttled,
    /// A batch ([`Client::dispatch_batch`](crate::Client::dispatch_batch)) is empty, holds
    /// more messages than the server stores in one atomic batch, or holds a key or message
    /// id twice. Nothing was stored.
    InvalidBatch,
    /// The task needs a feature the stream or server lacks: atomic batches (batches, unique
    /// and throttled tasks need nats-server 2.12 or newer) or per-message TTLs (2.11). The
    /// message names the server's version. Nothing was stored.
    Unsupported,
    /// A task of the batch carries a message id the stream already stored within its
    /// duplicate window (`duplicate_window`, 2 minutes by default): typically a batch sent
    /// again after a [`Timeout`](Self::Timeout), which had in fact been stored. The server
    /// refused the whole batch; nothing new was stored.
    AlreadyStored,
}

/// Dispatching a task failed. Nothing was stored unless the kind is
/// [`DispatchErrorKind::Timeout`], where the outcome is unknown.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DispatchError {
    kind: DispatchErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
    /// The task that holds the key, for [`DispatchErrorKind::Duplicate`] and
    /// [`DispatchErrorKind::Throttled`].
    conflict: Option<Box<Conflict>>,
}

/// The task a guard refused a dispatch for.
#[derive(Debug, Clone)]
pub(crate) struct Conflict {
    pub(crate) id: String,
    pub(crate) until: Option<time::OffsetDateTime>,
}

impl DispatchError {
    pub(crate) fn new(kind: DispatchErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None, conflict: None }
    }

    pub(crate) fn with_source(
        kind: DispatchErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self { kind, message: message.into(), source: Some(source.into()), conflict: None }
    }

    /// The same error, its message preceded by `prefix` (which task of a batch).
    pub(crate) fn prefixed(mut self, prefix: &str) -> Self {
        self.message = format!("{prefix}{}", self.message);
        self
    }

    pub(crate) fn conflict(
        kind: DispatchErrorKind,
        message: impl Into<String>,
        conflict: Conflict,
    ) -> Self {
        Self { conflict: Some(Box::new(conflict)), ..Self::new(kind, message) }
    }

    /// The id of the task that holds the key, when the kind is
    /// [`DispatchErrorKind::Duplicate`] or [`DispatchErrorKind::Throttled`].
    pub fn existing_id(&self) -> Option<&str> {
        self.conflict.as_ref().map(|c| c.id.as_str())
    }

    /// When the throttle window ends (a dispatch with the key is accepted again), when the
    /// kind is [`DispatchErrorKind::Throttled`].
    pub fn retry_at(&self) -> Option<time::OffsetDateTime> {
        self.conflict.as_ref().and_then(|c| c.until)
    }

    /// An error raised by a dispatch middleware to refuse a task.
    pub fn middleware(message: impl Into<String>) -> Self {
        Self::new(DispatchErrorKind::Middleware, message)
    }

    /// What kind of error this is.
    pub fn kind(&self) -> DispatchErrorKind {
        self.kind
    }
}

impl From<InvalidName> for DispatchError {
    fn from(err: InvalidName) -> Self {
        Self::new(DispatchErrorKind::InvalidTask, err.to_string())
    }
}

/// What kind of [`ScheduleError`] occurred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScheduleErrorKind {
    /// The schedule id is empty, too long, or holds a character other than ASCII letters,
    /// digits, `-` and `_`.
    InvalidId,
    /// The cron expression or interval is not one the server runs (wrong field count, a
    /// value out of range, an unknown name, a date that never comes, an interval below 1 s,
    /// a time zone on an interval).
    InvalidSchedule,
    /// The time zone is not a name the server can load (an IANA name such as
    /// `Europe/Berlin`, or `UTC`).
    InvalidTimeZone,
    /// The task or queue is invalid (task name, queue name, headers, a message id).
    InvalidTask,
    /// The server runs no recurring schedules: cron and intervals need nats-server 2.14 or
    /// newer.
    Unsupported,
    /// The server did not answer in time; the schedule may or may not have been changed.
    /// Declaring it again is safe.
    Timeout,
    /// The server refused the request, or reading the schedules failed.
    Rejected,
}

/// Declaring, reading or removing a periodic schedule failed. Nothing was changed unless the
/// kind is [`ScheduleErrorKind::Timeout`], where the outcome is unknown.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ScheduleError {
    kind: ScheduleErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl ScheduleError {
    pub(crate) fn new(kind: ScheduleErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    pub(crate) fn with_source(
        kind: ScheduleErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self { kind, message: message.into(), source: Some(source.into()) }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ScheduleErrorKind {
        self.kind
    }
}

impl From<InvalidName> for ScheduleError {
    fn from(err: InvalidName) -> Self {
        Self::new(ScheduleErrorKind::InvalidTask, err.to_string())
    }
}

/// What kind of [`RunError`] occurred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunErrorKind {
    /// The NATS connection was closed for good (drained, or out of reconnect attempts).
    ConnectionClosed,
    /// `run_until` was called while the worker was already running (or still shutting
    /// down after a call whose future was dropped).
    AlreadyRunning,
    /// The Tokio runtime shut down while the worker ran.
    RuntimeShutdown,
}

/// [`Worker::run_until`](crate::Worker::run_until) stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RunError {
    kind: RunErrorKind,
    message: String,
}

impl RunError {
    pub(crate) fn new(kind: RunErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> RunErrorKind {
        self.kind
    }
}

/// What the worker does with a task whose handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Retry later, following the worker's backoff (or the given delay), until retries are
    /// exhausted; then dead-letter.
    Retry(Option<Duration>),
    /// Acknowledge and drop the task: no retry, no dead letter (the Go library's `NoRetry`).
    NoRetry,
    /// Move the task to the dead-letter queue now, without further retries.
    DeadLetter,
}

/// The error a handler returns. Any `std::error::Error` converts into it with `?` and is
/// retried; [`no_retry`] and [`HandlerError::dead_letter`] choose another outcome.
///
/// `HandlerError` deliberately does not implement `std::error::Error` itself, so that every
/// error type can convert into it (as with `anyhow::Error`).
pub struct HandlerError {
    source: BoxError,
    failure: Failure,
}

impl HandlerError {
    /// A retryable failure.
    pub fn new(err: impl Into<BoxError>) -> Self {
        Self::with_failure(err.into(), Failure::Retry(None))
    }

    /// A retryable failure from a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self::new(message.to_string())
    }

    /// Fail and do not retry: the task is acknowledged and not dead-lettered.
    pub fn no_retry(err: impl Into<BoxError>) -> Self {
        Self::with_failure(err.into(), Failure::NoRetry)
    }

    /// Fail and move the task to the dead-letter queue at once.
    pub fn dead_letter(err: impl Into<BoxError>) -> Self {
        Self::with_failure(err.into(), Failure::DeadLetter)
    }

    /// Fail and retry after `delay` instead of the worker's backoff.
    pub fn retry_after(err: impl Into<BoxError>, delay: Duration) -> Self {
        Self::with_failure(err.into(), Failure::Retry(Some(delay)))
    }

    fn with_failure(source: BoxError, failure: Failure) -> Self {
        // A payload that cannot be decoded will not decode on a retry either.
        let failure = match failure {
            Failure::Retry(_) if source.is::<crate::task::DecodeError>() => Failure::DeadLetter,
            other => other,
        };
        Self { source, failure }
    }

    /// What the worker will do with the task.
    pub fn failure(&self) -> Failure {
        self.failure
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Unwraps the underlying error.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

/// An error and its [sources](std::error::Error::source) on one line, `error: cause: cause`,
/// skipping a source whose text the line already holds.
///
/// natasks errors say what failed and leave the cause to `source()`; this is how a front
/// end (a log line, a command line, a web page) shows both.
///
/// ```
/// let err = std::io::Error::new(std::io::ErrorKind::Other, "disk full");
/// assert_eq!(natasks::one_line(&err), "disk full");
/// ```
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Wraps `err` so the worker acknowledges the task without retrying or dead-lettering it.
pub fn no_retry(err: impl Into<BoxError>) -> HandlerError {
    HandlerError::no_retry(err)
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(err: E) -> Self {
        Self::new(err)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("failure", &self.failure)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}
