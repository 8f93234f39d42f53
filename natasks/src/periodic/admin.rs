//! [`Schedules`]: periodic schedules read and removed without a [`Client`](crate::Client),
//! and so without setting the stream up.

use async_nats::jetstream;

use super::{store, Scheduled};
use crate::error::{ScheduleError, ScheduleErrorKind};
use crate::stream::StreamSettings;

/// The periodic schedules of a stream, listed, read and removed for an operator's tool (the
/// `natasks schedules` command uses it).
///
/// Unlike building a [`Client`](crate::Client), this changes nothing about the stream: it
/// creates no stream, adds no subject and turns on no setting. A stream another program made
/// (the Go library makes one with only `natasks.*`) keeps its configuration, where a client
/// would add the schedule subject and turn on message schedules, which cannot be turned off
/// again; and a user allowed only to read can list. Declaring a schedule needs a client.
///
/// ```no_run
/// # async fn f(js: async_nats::jetstream::Context) -> Result<(), natasks::ScheduleError> {
/// let schedules = natasks::Schedules::new(js);
/// for s in schedules.list().await? {
///     println!("{}: {} to {}", s.id, s.every, s.queue);
/// }
/// schedules.remove("pulse").await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Schedules {
    js: jetstream::Context,
    stream: StreamSettings,
}

impl Schedules {
    /// The schedules of the stream `NATASKS` with subject prefix `natasks`, the defaults of
    /// clients and workers.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js, stream: StreamSettings::default() }
    }

    /// The stream holding every queue. Default: `NATASKS`.
    #[must_use]
    pub fn stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream.name = name.into();
        self
    }

    /// The subject prefix: queue `q` is subject `<prefix>.q`. Default: `natasks`.
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream.subject_prefix = prefix.into();
        self
    }

    /// Every periodic schedule, by id; none on a stream without the schedule subject. Fails
    /// ([`ScheduleErrorKind::Rejected`]) if the stream does not exist.
    pub async fn list(&self) -> Result<Vec<Scheduled>, ScheduleError> {
        self.check()?;
        store::list(&self.js, &self.stream).await
    }

    /// The periodic schedule `id`, if there is one.
    pub async fn get(&self, id: &str) -> Result<Option<Scheduled>, ScheduleError> {
        self.check()?;
        store::get(&self.js, &self.stream, id).await
    }

    /// Removes the periodic schedule `id`; `false` if there was none. Tasks it already
    /// dispatched stay in their queue.
    pub async fn remove(&self, id: &str) -> Result<bool, ScheduleError> {
        self.check()?;
        store::remove(&self.js, &self.stream, id).await
    }

    /// The stream name and subject prefix, checked as a client checks them: a prefix with a
    /// wildcard would reach other subjects.
    fn check(&self) -> Result<(), ScheduleError> {
        self.stream
            .validate()
            .map_err(|err| ScheduleError::new(ScheduleErrorKind::Rejected, err.to_string()))
    }
}
