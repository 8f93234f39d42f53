//! The processing side: [`Worker`] pulls tasks from one queue and runs their handlers.
//!
//! Outcomes map to the broker: success acks; a failure negatively acks with the backoff
//! delay; a task past its retries is published to the dead-letter queue and then acked; a
//! running handler renews its lease with in-progress acks. Retry state lives on the
//! broker, so a worker that crashes loses nothing: its tasks are redelivered after the ack
//! wait.

mod ack;
mod builder;
mod dead_letter;
mod limits;
mod multi;
mod process;
mod pull;
mod run;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use tokio_util::sync::CancellationToken;

pub use builder::{
    WorkerBuilder, DEFAULT_ACK_WAIT, DEFAULT_CONCURRENCY, DEFAULT_FETCH_BATCH,
    DEFAULT_FETCH_TIMEOUT, DEFAULT_IDLE_WAIT, DEFAULT_MAX_ACK_PENDING, MAX_FETCH_TIMEOUT, MAX_WAIT,
};

use crate::error::{RunError, RunErrorKind, SetupError};
use crate::handler::BoxHandler;
use crate::middleware::{ProcessLayer, Propagator};
use crate::observe::Observers;
use crate::stream::StreamSettings;
use builder::Settings;

/// What a worker does with a message it cannot route to a handler: one without a
/// `Natasks-Task` header, or naming a task no handler is registered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unroutable {
    /// Publish it to the dead-letter queue with a reason header (the default).
    DeadLetter,
    /// Drop it, as the Go library does.
    Discard,
    /// Hand it back to be redelivered after the delay, for rolling deploys where another
    /// worker may know the task; counts as a failed attempt towards `max_retries`.
    Retry(Duration),
}

/// Why a task was dead-lettered; the value of the `Natasks-Dead-Letter-Reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// Every allowed attempt failed.
    RetriesExhausted,
    /// The handler asked for it ([`HandlerError::dead_letter`](crate::HandlerError::dead_letter)).
    Rejected,
    /// The payload did not decode as the handler's type.
    UndecodablePayload,
    /// The message has no `Natasks-Task` header.
    MissingTaskName,
    /// No handler is registered for the task name.
    UnknownTask,
    /// The task was delivered more often than allowed without any outcome (workers crashed
    /// on it or lost its lease).
    NoOutcome,
}

impl DeadLetterReason {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetriesExhausted => "retries-exhausted",
            Self::Rejected => "rejected",
            Self::UndecodablePayload => "undecodable-payload",
            Self::MissingTaskName => "missing-task-name",
            Self::UnknownTask => "unknown-task",
            Self::NoOutcome => "no-outcome",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Consumes one queue and runs the registered handlers.
///
/// ```no_run
/// # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
/// use natasks::{Task, Worker, HandlerError};
///
/// async fn send_email(task: Task) -> Result<(), HandlerError> {
///     println!("sending {:?}", task.payload());
///     Ok(())
/// }
///
/// let worker = Worker::builder(js, "emails")
///     .concurrency(8)
///     .max_retries(3)
///     .handle("emails.send", send_email)
///     .build()
///     .await?;
/// worker.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
pub struct Worker {
    inner: Arc<WorkerInner>,
    consumer: consumer::PullConsumer,
    shutdown: CancellationToken,
    /// Set while a run (including its shutdown) is under way; cleared by the run itself, so
    /// it stays set while a run whose caller went away is still shutting down.
    running: Arc<AtomicBool>,
    /// Every queue (the first one included) of a worker serving several.
    lanes: Option<Arc<multi::Lanes>>,
}

/// Triggers a graceful shutdown of a [`Worker`] from elsewhere.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Asks the worker to stop pulling, finish running handlers (up to the drain timeout)
    /// and hand unfinished tasks back. `run_until` returns once that is done.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

pub(crate) struct WorkerInner {
    pub(crate) js: jetstream::Context,
    /// The context's client, where acks are published.
    pub(crate) client: async_nats::Client,
    pub(crate) stream: StreamSettings,
    pub(crate) queue: String,
    /// The queue name, shared with every received task's delivery details.
    pub(crate) shared_queue: Arc<str>,
    pub(crate) subject: String,
    pub(crate) dlq_subject: String,
    pub(crate) settings: Settings,
    /// Handlers by task name; the names are shared with the tasks received.
    pub(crate) routes: HashMap<Arc<str>, BoxHandler>,
    pub(crate) layers: Arc<[ProcessLayer]>,
    pub(crate) propagator: Option<Arc<dyn Propagator>>,
    pub(crate) observers: Observers,
    /// Status, results and cancellation of tracked tasks.
    pub(crate) tracking: Arc<crate::track::worker::WorkerTracking>,
    /// The queue's rate limits and pause, as the worker last read them.
    pub(crate) limits: Arc<limits::Limits>,
    /// Tasks that wait (a rate, a pause) without holding a slot: at most `concurrency`.
    pub(crate) waiting_room: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the worker begins to stop: tasks waiting for a rate or a pause are
    /// handed back at once instead of waiting out the drain.
    pub(crate) stopping: CancellationToken,
}

impl Worker {
    /// A builder for a worker consuming `queue` (an empty name means `default`).
    pub fn builder(js: jetstream::Context, queue: &str) -> WorkerBuilder {
        WorkerBuilder::new(js, queue)
    }

    fn new(inner: WorkerInner, consumer: consumer::PullConsumer) -> Self {
        Self {
            shutdown: inner.stopping.clone(),
            inner: Arc::new(inner),
            consumer,
            running: Arc::new(AtomicBool::new(false)),
            lanes: None,
        }
    }

    /// The queue this worker consumes (the first, for a worker serving several).
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// Every queue this worker serves, with its weight (1 for a worker of one queue).
    pub fn queues(&self) -> Vec<(&str, u32)> {
        match &self.lanes {
            None => vec![(self.inner.queue.as_str(), 1)],
            Some(lanes) => lanes.lanes.iter().map(|l| (l.inner.queue.as_str(), l.weight)).collect(),
        }
    }

    /// The durable consumer name.
    pub fn consumer_name(&self) -> &str {
        &self.inner.settings.consumer
    }

    /// Whether the NATS connection is currently up.
    pub fn is_ready(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A handle that triggers a graceful shutdown, for use from another task.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Runs until the shutdown handle is triggered.
    pub async fn run(&self) -> Result<(), RunError> {
        self.run_until(std::future::pending()).await
    }

    /// Processes tasks until `signal` completes or the shutdown handle is triggered, then
    /// shuts down gracefully: stops asking for tasks, runs what the requests already sent
    /// still bring (waiting at most `fetch_timeout` for them to end) and what it prefetched,
    /// lets running handlers finish (all within the drain timeout) and hands every
    /// unfinished task back for prompt redelivery. Tasks it never received stayed on the
    /// server, so a graceful stop costs no task an attempt unless the drain times out.
    ///
    /// Connection loss pauses the worker; after NATS reconnects it re-creates the stream and
    /// consumer if needed and resumes. Returns an error only when the connection is closed
    /// for good. A worker that has stopped stays stopped.
    ///
    /// Cancel-safe: dropping the returned future (a timeout, a `select!`) shuts the worker
    /// down gracefully in the background, as the signal would; a later call waits for
    /// nothing and returns `Ok` once that shutdown has finished (until then it reports
    /// [`RunErrorKind::AlreadyRunning`]).
    pub async fn run_until(&self, signal: impl Future<Output = ()>) -> Result<(), RunError> {
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(RunError::new(
                RunErrorKind::AlreadyRunning,
                format!("worker for queue {:?} is already running", self.inner.queue),
            ));
        }
        let running = RunningFlag(self.running.clone());
        let mut run = match &self.lanes {
            None => {
                let run =
                    run::run(self.inner.clone(), self.consumer.clone(), self.shutdown.clone());
                tokio::spawn(async move {
                    let _running = running;
                    run.await
                })
            }
            Some(lanes) => {
                let run = multi::run(lanes.clone(), self.shutdown.clone());
                tokio::spawn(async move {
                    let _running = running;
                    run.await
                })
            }
        };
        // Dropped with this future unless disarmed: the run then shuts down on its own.
        let stop_if_dropped = self.shutdown.clone().drop_guard();
        let joined = tokio::select! {
            joined = &mut run => joined,
            () = signal => {
                self.shutdown.cancel();
                run.await
            }
        };
        stop_if_dropped.disarm();
        match joined {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(err) => Err(RunError::new(
                RunErrorKind::RuntimeShutdown,
                format!("worker for queue {:?} stopped with the runtime: {err}", self.inner.queue),
            )),
        }
    }
}

/// Clears the running flag when a run ends, however it ends.
struct RunningFlag(Arc<AtomicBool>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl WorkerInner {
    fn consumer_config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.settings.consumer.clone()),
            description: Some("natasks worker".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.settings.ack_wait,
            filter_subject: self.subject.clone(),
            max_ack_pending: self.settings.max_ack_pending,
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        }
    }

    /// Creates (or adopts) the stream and the durable consumer. What operators set on an
    /// existing consumer stays: its pause, its metadata (rate limits), and the queue's limit
    /// (`max_ack_pending` set with `Admin::set_limit`) unless this worker sets one.
    pub(crate) async fn ensure(&self) -> Result<consumer::PullConsumer, SetupError> {
        let stream = self.stream.ensure(&self.js).await?.stream;
        let mut config = self.consumer_config();
        // Creating is enough when the consumer is missing or already as this worker wants
        // it; only a consumer that differs (other worker settings, or an operator's pause,
        // limit or rates) is read and merged, which needs CONSUMER.INFO permission.
        use async_nats::jetstream::stream::ConsumerCreateStrictErrorKind;
        match stream.create_consumer_strict(config.clone()).await {
            Ok(consumer) => return Ok(consumer),
            Err(err) if err.kind() == ConsumerCreateStrictErrorKind::AlreadyExists => {}
            Err(err) => {
                let message = format!(
                    "create consumer {:?} on {:?} (another consumer with an overlapping filter \
                     on a work-queue stream is refused)",
                    self.settings.consumer, self.subject
                );
                return Err(SetupError::jetstream(message, err));
            }
        }
        match stream.get_consumer::<consumer::pull::Config>(&self.settings.consumer).await {
            Ok(existing) => {
                let current = &existing.cached_info().config;
                config.pause_until = current.pause_until;
                config.metadata = current.metadata.clone();
                let operator_limit = current.metadata.contains_key(crate::admin::LIMIT_KEY);
                if operator_limit && !self.settings.max_ack_pending_explicit {
                    config.max_ack_pending = current.max_ack_pending;
                }
            }
            Err(err) => tracing::warn!(
                consumer = %self.settings.consumer,
                error = %err,
                "cannot read the existing consumer (no CONSUMER.INFO permission?); updating it \
                 with this worker's settings, which drops a limit or rates an operator set"
            ),
        }
        stream.create_consumer(config).await.map_err(|err| {
            let message = format!(
                "create consumer {:?} on {:?} (another consumer with an overlapping filter \
                 on a work-queue stream is refused)",
                self.settings.consumer, self.subject
            );
            SetupError::jetstream(message, err)
        })
    }
}
