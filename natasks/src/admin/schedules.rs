//! Schedules: delayed tasks not yet due and periodic schedules, listed and cancelled.
//!
//! A delayed task is a message schedule on a subject of its own,
//! `<prefix>.__natasks_schedule.<id>`; a periodic schedule lives on
//! `<prefix>.__natasks_schedule.periodic.<id>`. Neither is changed by reading.

use std::ops::ControlFlow;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use time::OffsetDateTime;

use super::tasks::{delayed_wildcard, due};
use super::{read, Admin, AdminError, AdminErrorKind};
use crate::{wire, Every, Schedules};

/// What kind of schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScheduleKind {
    /// A task dispatched with a delay or a due time, not due yet: it fires once.
    Delayed,
    /// A periodic schedule: it fires on every tick.
    Periodic,
}

/// A delayed task or a periodic schedule, as [`Admin::schedules`] lists it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ScheduleInfo {
    /// The id [`Admin::cancel_schedule`] takes.
    pub id: String,
    /// The queue its task goes to.
    pub queue: String,
    /// The task name.
    pub name: String,
    /// Delayed or periodic.
    pub kind: ScheduleKind,
    /// When it fires: `@at <time>` for a delayed task, the expression of a periodic one
    /// (`@every 5m`, a cron expression).
    pub spec: String,
    /// When it fires next (see [`Scheduled::next`](crate::Scheduled::next)).
    pub next: Option<OffsetDateTime>,
    /// The stream sequence of the schedule message.
    pub sequence: u64,
    /// When it was stored: a delayed task's dispatch, a periodic schedule's declaration.
    pub stored_at: OffsetDateTime,
    /// A periodic schedule's definition (its time zone, how it displays).
    pub every: Option<Every>,
}

impl Admin {
    /// Delayed tasks not yet due (soonest first), then periodic schedules (by id), of
    /// `queue` or of every queue.
    pub async fn schedules(&self, queue: Option<&str>) -> Result<Vec<ScheduleInfo>, AdminError> {
        let queue = queue.map(super::queues::valid_queue).transpose()?;
        let stream = self.open_stream().await?;
        let mut delayed = Vec::new();
        let filter = delayed_wildcard(&self.stream.subject_prefix);
        read::scan(&self.js, &stream, &filter, 1, None, |message| {
            let Some(target) = self.schedule_target(&message) else {
                return ControlFlow::Continue(());
            };
            if queue.is_none_or(|q| q == target) {
                let header = |name| message.headers.get(name).map(|v| v.as_str().to_owned());
                let next = due(&message);
                delayed.push(ScheduleInfo {
                    id: message.subject.rsplit('.').next().unwrap_or_default().to_owned(),
                    queue: target,
                    name: header(wire::HEADER_TASK).unwrap_or_default(),
                    kind: ScheduleKind::Delayed,
                    spec: header(wire::NATS_SCHEDULE).unwrap_or_default(),
                    next,
                    sequence: message.sequence,
                    stored_at: message.time,
                    every: None,
                });
            }
            ControlFlow::Continue(())
        })
        .await?;
        delayed.sort_by_key(|s| (s.next, s.sequence));
        let periodic = self
            .periodic()
            .list()
            .await
            .map_err(|err| AdminError::broker("read periodic schedules", err))?;
        let periodic =
            periodic.into_iter().filter(|s| queue.is_none_or(|q| s.queue == q)).map(|s| {
                ScheduleInfo {
                    id: s.id,
                    queue: s.queue,
                    name: s.task.name().to_owned(),
                    kind: ScheduleKind::Periodic,
                    spec: s.every.expression().to_owned(),
                    next: s.next,
                    sequence: 0,
                    stored_at: s.declared,
                    every: Some(s.every),
                }
            });
        delayed.extend(periodic);
        Ok(delayed)
    }

    /// Cancels the delayed task or removes the periodic schedule with this id. Fails with
    /// [`AdminErrorKind::NotFound`] when there is none (a delayed task that is due has
    /// become a pending task; a periodic schedule's dispatched tasks stay queued). A tracked
    /// delayed task's record says `cancelled`.
    pub async fn cancel_schedule(&self, id: &str) -> Result<(), AdminError> {
        if id.is_empty() || id.contains(['.', '*', '>']) || id.chars().any(char::is_whitespace) {
            return Err(AdminError::new(
                AdminErrorKind::InvalidInput,
                format!("invalid schedule id {id:?}"),
            ));
        }
        let stream = self.open_stream().await?;
        let subject = format!("{}.{}.{id}", self.stream.subject_prefix, wire::SCHEDULE_TOKEN);
        // The schedule read is removed by its sequence (with anything older on its
        // subject), not the whole subject: a debounced task dispatched again meanwhile
        // stores a newer schedule there, which is left for the next round instead of going
        // unseen, and the record marked cancelled is that of the task whose schedule went.
        // Nothing is there for a periodic schedule's id.
        for _ in 0..3 {
            let schedule = match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(schedule) => schedule,
                Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(err) => {
                    return Err(AdminError::broker(format!("read schedule {id:?}"), err));
                }
            };
            let response = stream
                .purge()
                .filter(&subject)
                .sequence(schedule.sequence + 1)
                .await
                .map_err(|err| AdminError::broker(format!("cancel schedule {id:?}"), err))?;
            if response.purged == 0 {
                // Gone meanwhile: it came due, or a newer one replaced it.
                continue;
            }
            let tracked = schedule.headers.get(wire::HEADER_TRACK).is_some();
            if let Some(task) = wire::task_id(&schedule.headers).filter(|_| tracked) {
                let tracker = crate::track::Tracker::new(self.js.clone(), self.stream.clone());
                let stored = crate::guard::release::Stored::Schedule(&subject);
                crate::track::client::removed(&tracker, task, stored, None, None).await;
            }
            return Ok(());
        }
        if wire::validate_schedule_id(id).is_ok() {
            let removed = self.periodic().remove(id).await.map_err(|err| {
                AdminError::broker(format!("remove periodic schedule {id:?}"), err)
            })?;
            if removed {
                return Ok(());
            }
        }
        Err(AdminError::new(
            AdminErrorKind::NotFound,
            format!(
                "no pending schedule {id:?}: no delayed task or periodic schedule has this id \
                 (already due, or cancelled?)"
            ),
        ))
    }

    fn periodic(&self) -> Schedules {
        Schedules::new(self.js.clone())
            .stream_name(self.stream.name.clone())
            .subject_prefix(self.stream.subject_prefix.clone())
    }
}
