//! Turning a dispatch into the message to publish: validation, headers, subject.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use time::OffsetDateTime;

use super::Publisher;
use crate::batch::Outgoing;
use crate::error::{DispatchError, DispatchErrorKind};
use crate::guard::{Guard, GuardKind, Support};
use crate::middleware::Dispatch;
use crate::schedule;
use crate::track::client::TrackedDispatch;
use crate::wire;

impl Publisher {
    /// Validates the dispatch and turns it into the message to publish. Everything is
    /// prepared before the first await, so the publish future holds only what the publish
    /// needs: dispatch futures are many and small this way.
    pub(super) fn prepare(&self, mut dispatch: Dispatch) -> Result<Prepared, Rejected> {
        let (schedule, retention) = match self.check(&mut dispatch) {
            Ok(checked) => checked,
            Err(error) => {
                let queue = match wire::validate_queue(&dispatch.queue) {
                    Ok(name) if name != dispatch.queue => name.to_owned(),
                    _ => dispatch.queue,
                };
                let about = About {
                    queue,
                    task: dispatch.task.name().to_owned(),
                    delayed: dispatch.due.is_some(),
                };
                return Err(Rejected { error, about });
            }
        };
        let queue =
            if dispatch.queue.is_empty() { wire::DEFAULT_QUEUE.to_owned() } else { dispatch.queue };
        let guard = dispatch.task.take_guard();
        let (task, payload, mut headers, message_id) = dispatch.task.into_parts();
        headers.insert(wire::TASK_NAME, task.as_str());
        headers.insert(wire::QUEUE_NAME, queue.as_str());
        let id = match message_id {
            Some(id) => {
                headers.insert(wire::NATS_MSG_ID, id.as_str());
                id
            }
            None => {
                headers.insert(wire::ID_NAME, dispatch.id.as_str());
                // A tracked task's id is its message id too: a middleware that publishes a
                // dispatch twice stores it once, and its record stays one task's.
                if retention.is_some() {
                    headers.insert(wire::NATS_MSG_ID, dispatch.id.as_str());
                }
                dispatch.id
            }
        };
        if let Some(retention) = retention {
            headers.insert(wire::TRACK_NAME, retention.as_secs().to_string());
        }
        if let Some(guard) = &guard {
            guard.mark_task(&mut headers);
        }
        let prefix = &self.stream.subject_prefix;
        let target = wire::queue_subject(prefix, &queue);
        let subject = match schedule {
            None => target,
            Some(schedule) => {
                headers.insert(wire::NATS_SCHEDULE, schedule.as_str());
                headers.insert(wire::NATS_SCHEDULE_TARGET, target.as_str());
                if headers.get(wire::NATS_MSG_ID).is_some() {
                    headers.insert(wire::HEADER_MESSAGE_ID, id.as_str());
                }
                match guard.as_ref().and_then(|g| g.schedule_subject(prefix, &queue)) {
                    Some(debounced) => debounced,
                    None => wire::schedule_subject(prefix),
                }
            }
        };
        let delayed = dispatch.due.is_some();
        // A delayed task's key is held until it is due, then for the TTL.
        let delay = dispatch.due.map_or(Duration::ZERO, |due| {
            Duration::try_from(due - OffsetDateTime::now_utc()).unwrap_or_default()
        });
        let marker = guard.as_ref().and_then(|g| {
            g.marker(prefix, &queue, &id, delayed.then_some(subject.as_str()), delay)
        });
        let track = retention.map(|retention| TrackedDispatch {
            id: id.clone(),
            queue: queue.clone(),
            task: task.clone(),
            retention: TrackedDispatch::retention(retention),
            due: dispatch.due,
            schedule: dispatch.due.is_some().then(|| subject.clone()),
            unique_key: guard.as_ref().filter(|g| g.is_unique()).map(|g| g.key.clone()),
        });
        let about = About { queue, task, delayed: dispatch.due.is_some() };
        let message = Outgoing { subject, headers, payload };
        Ok(Prepared { message, marker, guard, about, id, track })
    }

    /// Everything that can refuse a dispatch before it is published; runs the propagator.
    /// Returns the `Nats-Schedule` header value of a delayed dispatch, and the retention of
    /// a tracked one.
    #[allow(clippy::type_complexity)]
    fn check(
        &self,
        dispatch: &mut Dispatch,
    ) -> Result<(Option<String>, Option<Duration>), DispatchError> {
        wire::validate_queue(&dispatch.queue)?;
        wire::validate_task_name(dispatch.task.name())?;
        if let Some(propagator) = &self.propagator {
            propagator.inject(&mut dispatch.task);
        }
        if let Some(invalid) = dispatch.task.invalid_header() {
            return Err(invalid.clone().into());
        }
        if let Some(id) = dispatch.task.dispatch_id() {
            wire::validate_header(wire::NATS_MSG_ID, id)?;
        }
        if dispatch.due.is_some() && !self.schedules {
            return Err(DispatchError::new(
                DispatchErrorKind::SchedulesUnsupported,
                format!(
                    "delayed dispatch needs message schedules (nats-server 2.12 or newer); the connected server is {}",
                    self.js.client().server_info().version
                ),
            ));
        }
        if let Some(guard) = dispatch.task.guard() {
            let support = Support { atomic: self.atomic, ttl: self.ttl, schedules: self.schedules };
            let version = &self.js.client().server_info().version;
            guard.check(dispatch.due.is_some(), support, version)?;
            // The server drops a schedule whose message id it stored within its duplicate
            // window: a later dispatch would never replace the first.
            if guard.kind == GuardKind::Debounce && dispatch.task.message_id().is_some() {
                return Err(DispatchError::new(
                    DispatchErrorKind::InvalidTask,
                    format!(
                        "{} cannot be combined with a message id: the server would keep the \
                         first dispatch as a duplicate instead of replacing it",
                        guard.describe()
                    ),
                ));
            }
        }
        let retention = crate::track::dispatch_retention(&dispatch.task, dispatch.id())?;
        Ok((dispatch.due.map(schedule::at_expression).transpose()?, retention))
    }
}

/// A dispatch ready to publish.
pub(crate) struct Prepared {
    /// The task's message: for a delayed task, its schedule.
    pub(crate) message: Outgoing,
    /// A guard stored in the same atomic batch just before the task (a unique task's
    /// lock, a throttle window), so that both are stored or neither.
    pub(crate) marker: Option<Outgoing>,
    /// The unique, throttle or debounce key the task carries.
    pub(crate) guard: Option<Box<Guard>>,
    pub(crate) about: About,
    /// The task id.
    pub(crate) id: String,
    pub(crate) track: Option<TrackedDispatch>,
}

/// A dispatch refused before it was published.
pub(crate) struct Rejected {
    pub(crate) error: DispatchError,
    pub(crate) about: About,
}

/// What error messages and observers say about a dispatch.
pub(crate) struct About {
    pub(crate) queue: String,
    pub(crate) task: String,
    pub(crate) delayed: bool,
}

pub(super) fn publish_error(
    about: &About,
    err: async_nats::jetstream::context::PublishError,
) -> DispatchError {
    let About { queue, task, .. } = about;
    let (kind, what) = match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            (DispatchErrorKind::PayloadTooLarge, "is larger than the server's max_payload")
        }
        PublishErrorKind::TimedOut => (
            DispatchErrorKind::Timeout,
            "was not confirmed in time: it may still be stored (retry with the same message id), \
             the server may be unreachable, or this user may lack permission to publish to the \
             queue's subject (the server reports permission violations on the connection's \
             event callback)",
        ),
        PublishErrorKind::StreamNotFound => {
            (DispatchErrorKind::Rejected, "found no stream (was the stream deleted?)")
        }
        _ => (DispatchErrorKind::Rejected, "was refused"),
    };
    DispatchError::with_source(kind, format!("task {task:?} for queue {queue:?} {what}"), err)
}
