//! Periodic tasks fired by the broker: a task dispatched into a queue on a cron schedule or
//! at a fixed interval, by the server itself (nats-server 2.14+), with no scheduler
//! process of natasks' own.
//!
//! A periodic schedule is one JetStream message schedule (ADR-51) on the subject
//! `<prefix>.__natasks_schedule.periodic.<id>`, holding the task and its target queue.
//! The server fires it: each tick it stores a copy of the task in the queue, where workers
//! process it like any other task. Because a schedule is one message on one subject,
//! declaring the same id from every instance of a service at start-up leaves one schedule,
//! and each tick produces one task, however many instances declared it.
//!
//! * [`Client::schedule`] declares or replaces a schedule by id. The same definition
//!   again (schedule, time zone, queue, task name, payload, every header value) changes
//!   nothing and keeps the next fire time. A different one replaces it: a cron schedule
//!   then fires at its next matching time, and an interval **restarts its countdown from
//!   the replacement** (replacing `@every 1h` fifty minutes in fires an hour later, not
//!   ten minutes later).
//! * [`Client::unschedule`] removes it; [`Client::schedules`] and
//!   [`Client::scheduled`] read them. [`Schedules`] reads and removes them without a
//!   client, leaving the stream's configuration alone.
//! * A handler tells a periodic task by [`Task::periodic`], which names the schedule and
//!   the tick, so that it can make its side effects once per tick.
//!
//! What the server does, and so what natasks promises:
//!
//! * A tick fires once, also on a cluster when the stream leader changes (the schedule is
//!   part of the replicated stream).
//! * Ticks missed while the server was down are not made up one by one. The server writes
//!   each schedule's state (its next fire time) when it stops cleanly and every couple of
//!   minutes while it runs. On restart, a schedule whose written state is behind fires
//!   **once** at once, then carries on (an interval then counts from the restart); one
//!   without written state resumes at its next tick. After a crash (`SIGKILL`, power
//!   loss) the written state may predate ticks that already fired, so that catch-up tick
//!   may repeat a tick that was already dispatched. For a cron schedule it has the same
//!   [`Tick::at`] as the tick it repeats, so keying side effects on `(schedule, at)`
//!   catches it; for an interval it can be dated the restart instead, so that key does
//!   not catch it reliably (deduplicate on your own state, or make the work idempotent).
//! * With a [`time_zone`](Every::time_zone), the server's cron follows the local clock:
//!   when the clock goes back, a time in the repeated hour fires **twice**; when it goes
//!   forward, a time in the skipped hour does **not fire** that day. Run daily jobs in
//!   UTC, or at a local time outside 01:00 to 03:00, the hours most zones change in.
//! * Each tick is a new task, whether or not the previous one has been processed: a
//!   schedule that fires faster than its tasks are processed builds a backlog. Skipping a
//!   tick while the previous tick's task is pending would need a check when the server
//!   fires the schedule, which message schedules do not offer (it needs unique tasks).
//! * A tick carries the server's `Nats-Scheduler` and `Nats-Schedule-Next` headers. natasks
//!   leaves them behind when a handler dispatches the task again; a program that
//!   re-publishes a tick with all its headers (a Go handler copying `msg.Header`) is
//!   refused by the server (error 10212, "message schedules invalid scheduler"): it must
//!   drop the `Nats-*` headers.

mod admin;
mod cron;
mod every;
mod store;

use bytes::Bytes;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use admin::Schedules;
pub use every::{Every, MAX_INTERVAL, MIN_INTERVAL};

use crate::client::Client;
use crate::error::ScheduleError;
use crate::task::Task;
use crate::wire;

/// What [`Client::schedule`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Declared {
    /// There was no schedule with this id; it now exists.
    Created,
    /// A schedule with this id but another definition was replaced.
    Replaced,
    /// The same schedule was already declared: nothing was published, and the next fire
    /// time is unchanged.
    Unchanged,
}

/// A periodic schedule as stored on the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Scheduled {
    /// The schedule id.
    pub id: String,
    /// When it fires.
    pub every: Every,
    /// The queue its tasks go to.
    pub queue: String,
    /// The task every tick dispatches: name, payload and headers (without the ones natasks
    /// and the server write). Read through the server's message-get API, which keeps only
    /// the last value of a repeated header and trims the spaces around a value: where the
    /// declared task had those, this one differs (the stored schedule, and the ticks it
    /// stores, keep every value as declared).
    pub task: Task,
    /// When the schedule was last declared (stored).
    pub declared: OffsetDateTime,
    /// When it fires next, where natasks can tell without the server: for an interval,
    /// counted from the declaration (a server restart moves it), for a cron schedule in
    /// UTC; `None` for a cron schedule in another time zone (natasks ships no time zone
    /// rules).
    pub next: Option<OffsetDateTime>,
}

/// The tick a periodic task belongs to (see [`Task::periodic`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tick {
    /// The id of the schedule that fired.
    pub schedule: String,
    /// The tick's time: when the server was to fire it. Derived from the next tick's time,
    /// which the server writes on the task: an interval before it, or the cron's previous
    /// time (computed in the UTC offset of the next tick, so across a clock change of the
    /// schedule's time zone it is off by the change). The same for every delivery of the
    /// task and different for every tick, so it keys side effects to make once per tick.
    /// After a server restart, the single catch-up tick is dated the latest missed time
    /// (cron) or the restart (interval).
    pub at: OffsetDateTime,
    /// When the schedule fires next, as the server wrote it on the task.
    pub next: OffsetDateTime,
}

impl Client {
    /// Declares the periodic schedule `id`: from now on the server dispatches `task` to
    /// `queue` at every tick of `every`, with no process of natasks' running.
    ///
    /// Every instance of a service may declare the same schedules at start-up: the same
    /// definition (schedule, time zone, queue, task name, payload, every header value in
    /// order) declared again changes nothing ([`Declared::Unchanged`]: the next fire time
    /// is kept), and however many declare it, each tick dispatches one task. A different
    /// definition replaces the schedule ([`Declared::Replaced`]): a cron schedule fires at
    /// its next matching time, an interval restarts its countdown from the replacement.
    ///
    /// `id` is 1 to 128 ASCII letters, digits, `-` and `_`. The task goes into the
    /// schedule as given: dispatch middleware and the propagator do not run (each tick is
    /// dispatched by the server, not by this client), and it may carry no message id and
    /// no `Nats-*` header. A task a handler received may be given: as with dispatch, it
    /// leaves behind the id and the `Nats-*` headers it arrived with. Everything is checked
    /// before anything is published.
    ///
    /// Needs nats-server 2.14 or newer: against an older server this fails with
    /// [`ScheduleErrorKind::Unsupported`](crate::ScheduleErrorKind::Unsupported), naming
    /// its version.
    ///
    /// ```no_run
    /// # async fn f(client: natasks::Client) -> Result<(), natasks::ScheduleError> {
    /// use natasks::{Every, Task};
    ///
    /// let every = Every::cron("0 30 2 * * *")?.time_zone("Europe/Berlin");
    /// client.schedule("nightly-report", every, Task::new("reports.nightly", "{}"), "reports").await?;
    /// # Ok(()) }
    /// ```
    pub async fn schedule(
        &self,
        id: &str,
        every: Every,
        task: Task,
        queue: &str,
    ) -> Result<Declared, ScheduleError> {
        let (js, stream) = self.stream();
        store::declare(js, stream, id, &every, task, queue).await
    }

    /// Removes the periodic schedule `id`; `false` if there was none. Tasks it already
    /// dispatched stay in their queue.
    pub async fn unschedule(&self, id: &str) -> Result<bool, ScheduleError> {
        let (js, stream) = self.stream();
        store::remove(js, stream, id).await
    }

    /// Every periodic schedule, by id.
    pub async fn schedules(&self) -> Result<Vec<Scheduled>, ScheduleError> {
        let (js, stream) = self.stream();
        store::list(js, stream).await
    }

    /// The periodic schedule `id`, if there is one.
    pub async fn scheduled(&self, id: &str) -> Result<Option<Scheduled>, ScheduleError> {
        let (js, stream) = self.stream();
        store::get(js, stream, id).await
    }
}

impl Task {
    /// On a task a periodic schedule dispatched: the schedule and the tick it belongs to.
    /// `None` for any other task, and for a periodic task dispatched again (that is a new
    /// task).
    pub fn periodic(&self) -> Option<Tick> {
        let schedule = self.header(wire::HEADER_PERIODIC)?;
        let expression = self.header(wire::HEADER_PERIODIC_SCHEDULE)?;
        let next = self.header(wire::NATS_SCHEDULE_NEXT)?;
        let next = OffsetDateTime::parse(next, &Rfc3339).ok()?;
        let at = Every::from_headers(expression, None).tick_before(next)?;
        Some(Tick { schedule: schedule.to_owned(), at, next })
    }
}

/// The task a stored schedule dispatches, without the headers natasks and the server write.
fn stored_task(name: &str, payload: Bytes, headers: &async_nats::HeaderMap) -> Task {
    let mut task = Task::new(name, payload);
    for (key, values) in headers.iter() {
        let key: &str = key.as_ref();
        if store::is_schedule_header(key) {
            continue;
        }
        for value in values {
            task.add_header(key, value.as_str());
        }
    }
    task
}
