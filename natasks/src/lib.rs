//! natasks: a task queue on NATS JetStream.
//!
//! Services hand background work to a queue with a [`Client`]; [`Worker`]s elsewhere run
//! it with retries, delays and a dead-letter queue. Everything lives in one JetStream
//! stream, so the queue inherits JetStream's durability and clustering.
//!
//! # The model
//!
//! * A **task** ([`Task`]) is a name, a payload and headers. The name picks the handler.
//! * A **queue** is a subject `natasks.<queue>` in the work-queue stream `NATASKS`. Each
//!   queue has one durable consumer, `natasks-<queue>`, shared by every worker of the queue.
//! * A **worker** pulls from one queue and runs the handler registered for each task name,
//!   with up to `concurrency` tasks at once.
//! * **Delayed tasks** are JetStream message schedules (nats-server 2.12+): the server
//!   publishes the task into its queue when it is due.
//! * **Periodic tasks** are recurring message schedules (nats-server 2.14+): on a cron
//!   schedule or at an interval, the server itself dispatches a task into its queue, once
//!   per tick however many instances declared the schedule ([`Client::schedule`]).
//! * The **dead-letter queue** of `q` is the queue `q-dlq`, holding tasks that failed every
//!   attempt, with headers saying why.
//! * A **handler** is a plain `async fn` whose arguments are extractors ([`Json`],
//!   [`TaskId`], [`Attempt`], [`Progress`], [`Cancellation`], [`Extension`], your own
//!   [`FromTask`] types, and last, optionally, the [`Task`]), returning `Result<T, E>`
//!   where `T` is the task's result.
//! * A **unique** task ([`Task::unique`]) is refused while a task with its key is pending,
//!   scheduled or running in its queue; **debounced** tasks ([`Task::debounce`]) replace the
//!   pending one with their key; **throttled** ones ([`Task::throttle`]) are accepted once per
//!   window; a **batch** ([`Client::dispatch_batch`]) stores many tasks all or none. The
//!   server enforces each (JetStream atomic batches, nats-server 2.12+): see [`Task::unique`].
//! * Every dispatch returns a [`Receipt`] with the task's **id**. A **tracked** task
//!   ([`Task::tracked`]) has its lifecycle recorded on the broker: its status
//!   ([`Client::status`]), its result ([`Client::result`], [`Client::wait`]), its
//!   progress, a live stream of its events ([`Client::events`]), and it can be cancelled
//!   ([`Client::cancel`]), from any process. See [`track`].
//! * **Operations** on queues ([`admin::Admin`]): the overview of every queue, tasks by
//!   state with paging, search, requeue / delete / purge, schedules, pause and resume. The
//!   `natasks` CLI is built on it; your own tools can call it too.
//!
//! # Delivery guarantees
//!
//! * `dispatch` returns `Ok` only once the server has stored the task (on every replica
//!   of a replicated stream).
//! * Every stored task is processed **at least once**: a task is removed only after its
//!   handler succeeded, it was dead-lettered (the dead letter is stored first), or the
//!   handler asked for no retry. Handlers should therefore be idempotent.
//! * Retry state lives on the broker. A worker that crashes mid-task loses nothing: the
//!   task is redelivered after the ack wait. A task that keeps crashing workers is
//!   dead-lettered once its retries are used up.
//! * A message id ([`Task::with_message_id`]) makes a repeated dispatch within the
//!   duplicate window (2 minutes by default) a no-op, so a dispatch that timed out can be
//!   retried safely.
//!
//! # Quick start
//!
//! ```no_run
#![doc = include_str!("../examples/quickstart.rs")]
//! ```
//!
//! # Wire format
//!
//! Subjects and headers match the Go library of the same name, so Go and Rust services
//! can share queues; see [`wire`] and `docs/wire-format.md`.
#![warn(missing_docs)]

pub mod admin;
mod batch;
mod client;
mod error;
mod extract;
mod guard;
mod handler;
#[cfg(feature = "metrics")]
pub mod metrics;
mod middleware;
pub mod observe;
#[cfg(feature = "opentelemetry")]
pub mod otel;
mod periodic;
mod retry;
mod schedule;
mod stream;
mod task;
pub mod track;
pub mod wire;
mod worker;
pub mod workflow;

pub use client::{Batch, Client, ClientBuilder, Receipt};
pub use error::{
    no_retry, one_line, BoxError, DispatchError, DispatchErrorKind, Failure, HandlerError,
    InvalidName, RunError, RunErrorKind, ScheduleError, ScheduleErrorKind, SetupError,
    SetupErrorKind,
};
pub use extract::{
    Attempt, Cancellation, Extension, FromTask, Json, Progress, ProgressReport, TaskId,
};
pub use guard::{OnConflict, MAX_GUARD_TTL, MAX_KEY_LEN};
pub use handler::Handler;
pub use middleware::{Dispatch, DispatchNext, Next, Propagator};
pub use observe::Observer;
pub use periodic::{Declared, Every, Scheduled, Schedules, Tick, MAX_INTERVAL, MIN_INTERVAL};
pub use schedule::DueTime;
pub use task::{DecodeError, Delivery, Extensions, Task};
pub use track::{
    CancelOutcome, Event, EventKind, Events, Status, TaskState, TaskStatus, TrackError,
    TrackErrorKind,
};
pub use worker::{
    DeadLetterReason, ShutdownHandle, Unroutable, Worker, WorkerBuilder, DEFAULT_ACK_WAIT,
    DEFAULT_CONCURRENCY, DEFAULT_FETCH_BATCH, DEFAULT_FETCH_TIMEOUT, DEFAULT_IDLE_WAIT,
    DEFAULT_MAX_ACK_PENDING, MAX_FETCH_TIMEOUT, MAX_WAIT,
};

/// The README's code blocks, compiled as doc-tests so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
