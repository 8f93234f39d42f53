//! [`WorkerBuilder`]: every worker option, its default, and validation at `build()`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use super::limits::Limits;
use super::multi::{Lane, Lanes};
use crate::error::{HandlerError, SetupError};
use crate::handler::{self, BoxHandler, Handler};
use crate::middleware::{process_layer, Next, ProcessLayer, Propagator};
use crate::observe::{Observer, Observers};
use crate::retry::RetryPolicy;
use crate::stream::StreamSettings;
use crate::task::Task;
use crate::track::worker::WorkerTracking;
use crate::track::Tracker;
use crate::wire;
use tokio_util::sync::CancellationToken;

use super::{Unroutable, Worker, WorkerInner};

/// Default number of tasks processed at once.
pub const DEFAULT_CONCURRENCY: usize = 1;
/// Default number of messages requested per pull.
pub const DEFAULT_FETCH_BATCH: usize = 1;
/// Default lifetime of a pull request.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Default pause between attempts to recover after an error.
pub const DEFAULT_IDLE_WAIT: Duration = Duration::from_millis(250);
/// Default time the server waits for an acknowledgement before redelivering.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default server-side limit of unacknowledged messages (raised to fit the concurrency).
pub const DEFAULT_MAX_ACK_PENDING: i64 = 128;
/// Longest accepted `fetch_timeout`: a pull request's lifetime, and how long an idle worker
/// may take to stop.
pub const MAX_FETCH_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest accepted `ack_wait`, `task_timeout`, `drain_timeout` and `idle_wait` (365 days):
/// the server keeps durations in signed nanoseconds, and a worker adds them to clocks.
pub const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Configures a [`Worker`]. Created by [`Worker::builder`]; every setter documents its
/// default, and [`build`](Self::build) validates them all.
#[must_use]
pub struct WorkerBuilder {
    js: jetstream::Context,
    queue: String,
    pub(super) stream: StreamSettings,
    consumer_prefix: String,
    durable: Option<String>,
    concurrency: usize,
    fetch_batch: usize,
    fetch_timeout: Duration,
    idle_wait: Duration,
    task_timeout: Duration,
    ack_wait: Duration,
    progress_interval: Option<Duration>,
    max_ack_pending: Option<i64>,
    max_retries: i64,
    retry_backoff: Vec<Duration>,
    dlq_suffix: String,
    drain_timeout: Option<Duration>,
    unroutable: Unroutable,
    layers: Vec<ProcessLayer>,
    propagator: Option<Arc<dyn Propagator>>,
    observers: Observers,
    handlers: Vec<(String, BoxHandler)>,
    result_retention: Option<Duration>,
    weight: u32,
    /// More queues served by the same worker, with their weights.
    more_queues: Vec<(String, u32)>,
    strict: bool,
}

impl WorkerBuilder {
    pub(super) fn new(js: jetstream::Context, queue: &str) -> Self {
        Self {
            js,
            queue: queue.to_owned(),
            stream: StreamSettings::default(),
            consumer_prefix: wire::DEFAULT_CONSUMER_PREFIX.to_owned(),
            durable: None,
            concurrency: DEFAULT_CONCURRENCY,
            fetch_batch: DEFAULT_FETCH_BATCH,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            idle_wait: DEFAULT_IDLE_WAIT,
            task_timeout: Duration::ZERO,
            ack_wait: DEFAULT_ACK_WAIT,
            progress_interval: None,
            max_ack_pending: None,
            max_retries: -1,
            retry_backoff: Vec::new(),
            dlq_suffix: wire::DEFAULT_DLQ_SUFFIX.to_owned(),
            drain_timeout: None,
            unroutable: Unroutable::DeadLetter,
            layers: Vec::new(),
            propagator: None,
            observers: Observers::default(),
            handlers: Vec::new(),
            result_retention: None,
            weight: 1,
            more_queues: Vec::new(),
            strict: false,
        }
    }

    /// Serves `queue` too, with `weight` (at least 1), from the same handlers and the same
    /// `concurrency`: one worker for several queues. In the default weighted mode, each
    /// queue's share of the tasks started is its weight's share while every queue has
    /// work, and a queue without work leaves its share to the others; with
    /// [`strict_priority`](Self::strict_priority), a queue is served only while every
    /// queue of higher weight is empty. The first queue's weight is set with
    /// [`weight`](Self::weight) (default 1).
    pub fn queue(mut self, queue: impl Into<String>, weight: u32) -> Self {
        self.more_queues.push((queue.into(), weight));
        self
    }

    /// The weight of the worker's first queue when it serves several ([`queue`](Self::queue)).
    /// Default: 1.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// With several queues, serves them in order of weight: a queue only while every queue
    /// of higher weight has nothing delivered and waiting. Default: weighted sharing.
    pub fn strict_priority(mut self) -> Self {
        self.strict = true;
        self
    }

    /// Registers `handler` for tasks named `name`. A handler is an `async fn` whose
    /// arguments are extractors ([`Json<T>`](crate::Json), [`TaskId`](crate::TaskId),
    /// [`Progress`](crate::Progress), [`Cancellation`](crate::Cancellation), ...) and
    /// optionally, last, the [`Task`]; see [`Handler`].
    pub fn handle<H: Handler<A>, A>(mut self, name: impl Into<String>, handler: H) -> Self {
        self.handlers.push((name.into(), handler::boxed(handler)));
        self
    }

    /// The stream holding every queue. Default: `NATASKS`.
    pub fn stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream.name = name.into();
        self
    }

    /// The subject prefix: queue `q` is subject `<prefix>.q`. Default: `natasks`.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream.subject_prefix = prefix.into();
        self
    }

    /// Replicas of a stream natasks creates (1 to 5). Default: 1.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.stream.replicas = replicas;
        self
    }

    /// Prefix of the durable consumer name (`<prefix>-<queue>`). Default: `natasks`.
    pub fn consumer_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.consumer_prefix = prefix.into();
        self
    }

    /// The durable consumer name, overriding `<consumer_prefix>-<queue>`.
    pub fn durable(mut self, name: impl Into<String>) -> Self {
        self.durable = Some(name.into());
        self
    }

    /// How many tasks run at once; a slot is refilled as soon as its task finishes.
    /// Default: 1. Range: 1 to 65,536.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// How many tasks the worker may hold at once, running and prefetched: values above
    /// `concurrency` make it prefetch `fetch_batch - concurrency` tasks. Default: 1 (no
    /// prefetch). Range: 1 to 65,536.
    ///
    /// Without prefetch the worker asks the server only for tasks it can start at once, so
    /// a task's attempts count its runs and a graceful stop hands nothing back; with fast
    /// handlers and low concurrency, throughput is then bound by the round trip of a pull
    /// request. Prefetch removes that bound, at a price: prefetched tasks wait in the worker
    /// (their leases renewed), a graceful stop runs them before it returns (within
    /// `drain_timeout`; any left then are handed back, each with an attempt spent), and a
    /// reconnect hands them back, each with an attempt spent. With `max_retries(0)` such a
    /// task is dead-lettered as `no-outcome` without running (the build logs a warning).
    /// Two to four times `concurrency` suits handlers that take microseconds.
    pub fn fetch_batch(mut self, n: usize) -> Self {
        self.fetch_batch = n;
        self
    }

    /// How long a pull request waits for messages before it is renewed. Default: 5 s.
    /// Minimum: 1 s.
    ///
    /// A graceful shutdown of an idle worker takes up to this long: the worker keeps its
    /// inbox until the request it already sent has ended, and runs what it still brings,
    /// so that no task reaches an inbox nobody reads (it would come back only after the ack
    /// wait, with an attempt spent).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// Pause between attempts to recover after an error (reconnecting, re-creating the
    /// consumer, publishing a dead letter). Default: 250 ms.
    pub fn idle_wait(mut self, wait: Duration) -> Self {
        self.idle_wait = wait;
        self
    }

    /// Longest time one attempt may run; past it the handler is dropped and the attempt
    /// fails (and is retried). Zero disables the limit. Default: disabled.
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.task_timeout = timeout;
        self
    }

    /// How long the server waits for an outcome before redelivering (consumer `ack_wait`).
    /// Default: 30 s.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// How often a running handler's lease is renewed with an in-progress ack. Must be
    /// less than `ack_wait`. Default: a third of `ack_wait`.
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = Some(interval);
        self
    }

    /// Server-side limit of delivered but unacknowledged messages (consumer
    /// `max_ack_pending`): the queue's limit of tasks in flight across every worker. Must be
    /// at least `concurrency`. Default: 128, or `concurrency + fetch_batch` when that is
    /// larger, for a consumer this worker creates; an existing consumer keeps the limit it
    /// has (one an operator set with `natasks queue limit` or
    /// [`Admin::set_limit`](crate::admin::Admin::set_limit)). Set here, it replaces that
    /// limit whenever the worker starts.
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = Some(n);
        self
    }

    /// Retries after the first failed attempt before the task is dead-lettered; `-1` means
    /// unlimited. Default: -1.
    pub fn max_retries(mut self, n: i64) -> Self {
        self.max_retries = n;
        self
    }

    /// Delays before successive retries; the last one repeats. Default: none (retry at once).
    pub fn retry_backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.retry_backoff = delays.into_iter().collect();
        self
    }

    /// Suffix of the dead-letter queue: queue `q` dead-letters into `q<suffix>`.
    /// Default: `-dlq`.
    pub fn dlq_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dlq_suffix = suffix.into();
        self
    }

    /// At shutdown, how long running handlers may take to finish before they are dropped
    /// and their tasks handed back to the broker. Default: `ack_wait`.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = Some(timeout);
        self
    }

    /// What to do with a message that has no task name or names a task no handler knows.
    /// Default: [`Unroutable::DeadLetter`].
    pub fn on_unroutable(mut self, policy: Unroutable) -> Self {
        self.unroutable = policy;
        self
    }

    /// Adds a process middleware; middleware runs in the order added, around the handler.
    pub fn middleware<F, Fut>(mut self, middleware: F) -> Self
    where
        F: Fn(Task, Next) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.layers.push(process_layer(middleware));
        self
    }

    /// Sets the propagator that reads context from headers before processing.
    pub fn propagator(mut self, propagator: impl Propagator) -> Self {
        self.propagator = Some(Arc::new(propagator));
        self
    }

    /// How long the records of tracked tasks ([`Task::tracked`](crate::Task::tracked)) are
    /// kept after their last change, for tasks that do not set their own
    /// ([`Task::tracked_for`](crate::Task::tracked_for)): whole seconds, at least 1 s.
    /// Default: [`DEFAULT_RETENTION`](crate::track::DEFAULT_RETENTION), a day.
    pub fn result_retention(mut self, retention: Duration) -> Self {
        self.result_retention = Some(retention);
        self
    }

    /// Adds an observer that sees every processing attempt (for metrics).
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observers.push(observer);
        self
    }

    /// Validates every option, then creates (or adopts) the stream and the durable consumer.
    pub async fn build(self) -> Result<Worker, SetupError> {
        self.stream.validate()?;
        let queue = wire::validate_queue(&self.queue)?.to_owned();
        let settings = self.validate(&queue)?;
        let routes = self.routes()?;
        if let Some(retention) = self.result_retention {
            let max = crate::track::MAX_RETENTION;
            if retention < Duration::from_secs(1)
                || retention.subsec_nanos() != 0
                || retention > max
            {
                return Err(SetupError::invalid_option(
                    "result_retention",
                    format!("{retention:?} must be whole seconds, from 1 s to 10 years"),
                ));
            }
        }
        let more = self.more_queues()?;
        if !more.is_empty() && settings.retry.exhausted(1) {
            tracing::warn!(
                queue = %queue,
                "a worker serving several queues holds a few tasks of each waiting for a slot; \
                 with max_retries(0), one it must hand back (a reconnect) is dead-lettered \
                 without running"
            );
        }
        let layers: Arc<[ProcessLayer]> = self.layers.clone().into();
        let inner_for = |queue: String, settings: Settings| {
            let tracker = Tracker::new(self.js.clone(), self.stream.clone());
            let limits = Limits::new(self.js.clone(), self.stream.clone(), &queue);
            let waiting_room = Arc::new(tokio::sync::Semaphore::new(settings.concurrency));
            WorkerInner {
                waiting_room,
                stopping: CancellationToken::new(),
                limits: Arc::new(limits),
                tracking: Arc::new(WorkerTracking::new(tracker, self.result_retention)),
                subject: wire::queue_subject(&self.stream.subject_prefix, &queue),
                dlq_subject: wire::queue_subject(&self.stream.subject_prefix, &settings.dlq_queue),
                shared_queue: Arc::from(queue.as_str()),
                queue,
                client: self.js.client(),
                js: self.js.clone(),
                stream: self.stream.clone(),
                settings,
                routes: routes.clone(),
                layers: layers.clone(),
                propagator: self.propagator.clone(),
                observers: self.observers.clone(),
            }
        };
        let mut lanes = Vec::with_capacity(more.len());
        for (queue, weight) in more {
            let settings = self.validate(&queue)?;
            let inner = inner_for(queue, settings);
            let consumer = inner.ensure().await?;
            lanes.push(Lane { inner: Arc::new(inner), consumer, weight });
        }
        let inner = inner_for(queue, settings);
        let consumer = inner.ensure().await?;
        let mut worker = Worker::new(inner, consumer);
        if !lanes.is_empty() {
            let first = Lane {
                inner: worker.inner.clone(),
                consumer: worker.consumer.clone(),
                weight: self.weight,
            };
            lanes.insert(0, first);
            worker.lanes = Some(Arc::new(Lanes { lanes, strict: self.strict }));
        }
        Ok(worker)
    }

    /// The other queues of a worker serving several, checked: valid, distinct names and
    /// weights of at least 1.
    fn more_queues(&self) -> Result<Vec<(String, u32)>, SetupError> {
        if self.more_queues.is_empty() {
            return Ok(Vec::new());
        }
        if self.durable.is_some() {
            return Err(SetupError::invalid_option(
                "durable",
                "a worker serving several queues names its consumers `<consumer_prefix>-<queue>`; a single durable name cannot serve them all",
            ));
        }
        let first = wire::validate_queue(&self.queue)?.to_owned();
        let mut seen = vec![first];
        let mut out = Vec::with_capacity(self.more_queues.len());
        if self.weight == 0 {
            return Err(SetupError::invalid_option(
                "weight",
                format!("weight 0 of queue {:?} must be at least 1", seen[0]),
            ));
        }
        for (queue, weight) in &self.more_queues {
            let queue = wire::validate_queue(queue)?.to_owned();
            if *weight == 0 {
                return Err(SetupError::invalid_option(
                    "queue",
                    format!("weight 0 of queue {queue:?} must be at least 1"),
                ));
            }
            if seen.contains(&queue) {
                return Err(SetupError::invalid_option(
                    "queue",
                    format!("queue {queue:?} is served twice by one worker"),
                ));
            }
            seen.push(queue.clone());
            out.push((queue, *weight));
        }
        Ok(out)
    }

    fn routes(&self) -> Result<HashMap<Arc<str>, BoxHandler>, SetupError> {
        let mut routes = HashMap::with_capacity(self.handlers.len());
        for (name, handler) in &self.handlers {
            wire::validate_task_name(name)
                .map_err(|err| SetupError::invalid_option("handle", err))?;
            if routes.insert(Arc::from(name.as_str()), handler.clone()).is_some() {
                return Err(SetupError::invalid_option(
                    "handle",
                    format!("task {name:?} has two handlers"),
                ));
            }
        }
        Ok(routes)
    }

    fn validate(&self, queue: &str) -> Result<Settings, SetupError> {
        const MAX_SLOTS: usize = 65_536;
        if !(1..=MAX_SLOTS).contains(&self.concurrency) {
            return Err(SetupError::invalid_option(
                "concurrency",
                format!("{} is outside 1..=65536", self.concurrency),
            ));
        }
        if !(1..=MAX_SLOTS).contains(&self.fetch_batch) {
            return Err(SetupError::invalid_option(
                "fetch_batch",
                format!("{} is outside 1..=65536", self.fetch_batch),
            ));
        }
        if self.fetch_timeout < Duration::from_secs(1) || self.fetch_timeout > MAX_FETCH_TIMEOUT {
            return Err(SetupError::invalid_option(
                "fetch_timeout",
                format!("{:?} is outside 1s..=1h", self.fetch_timeout),
            ));
        }
        let waits = [
            ("ack_wait", Some(self.ack_wait)),
            ("task_timeout", Some(self.task_timeout)),
            ("drain_timeout", self.drain_timeout),
            ("idle_wait", Some(self.idle_wait)),
            ("progress_interval", self.progress_interval),
        ];
        for (setting, wait) in waits {
            if let Some(wait) = wait.filter(|wait| *wait > MAX_WAIT) {
                return Err(SetupError::invalid_option(
                    setting,
                    format!("{wait:?} is above the maximum of 365 days"),
                ));
            }
        }
        if self.ack_wait.is_zero() {
            return Err(SetupError::invalid_option("ack_wait", "must be positive"));
        }
        let progress_interval = self.progress_interval.unwrap_or(self.ack_wait / 3);
        if progress_interval.is_zero() || progress_interval >= self.ack_wait {
            return Err(SetupError::invalid_option(
                "progress_interval",
                format!(
                    "{progress_interval:?} must be positive and less than ack_wait ({:?})",
                    self.ack_wait
                ),
            ));
        }
        let max_ack_pending = match self.max_ack_pending {
            Some(n) if n < self.concurrency as i64 => {
                return Err(SetupError::invalid_option(
                    "max_ack_pending",
                    format!(
                        "{n} is below concurrency ({}); slots would stay empty",
                        self.concurrency
                    ),
                ))
            }
            Some(n) => n,
            None => DEFAULT_MAX_ACK_PENDING.max((self.concurrency + self.fetch_batch) as i64),
        };
        let max_retries = match self.max_retries {
            -1 => None,
            n if n >= 0 => Some(n as u64),
            n => {
                return Err(SetupError::invalid_option(
                    "max_retries",
                    format!("{n} is below -1 (-1 means unlimited)"),
                ))
            }
        };
        let dlq_queue = format!("{queue}{}", self.dlq_suffix);
        if self.dlq_suffix.is_empty() {
            return Err(SetupError::invalid_option("dlq_suffix", "must not be empty"));
        }
        wire::validate_queue(&dlq_queue)
            .map_err(|err| SetupError::invalid_option("dlq_suffix", err))?;
        let consumer = match &self.durable {
            Some(name) => name.clone(),
            None => wire::consumer_name(&self.consumer_prefix, queue),
        };
        let consumer_ok = !consumer.is_empty()
            && !consumer.contains(['.', '*', '>', '/', '\\'])
            && !consumer.chars().any(|c| c.is_whitespace() || c.is_control());
        if !consumer_ok {
            let setting = if self.durable.is_some() { "durable" } else { "consumer_prefix" };
            return Err(SetupError::invalid_option(setting, format!("consumer name {consumer:?} must be non-empty, without `.`, `*`, `>`, slashes or whitespace")));
        }
        if let Unroutable::Retry(delay) = self.unroutable {
            if delay.is_zero() {
                return Err(SetupError::invalid_option(
                    "on_unroutable",
                    "the retry delay must be positive",
                ));
            }
        }
        if self.fetch_batch > self.concurrency && self.max_retries == 0 {
            tracing::warn!(
                queue,
                fetch_batch = self.fetch_batch,
                concurrency = self.concurrency,
                "prefetch with max_retries(0): a prefetched task handed back (at a reconnect, or when the drain times out) is dead-lettered as no-outcome without running"
            );
        }
        Ok(Settings {
            consumer,
            concurrency: self.concurrency,
            prefetch: self.fetch_batch.saturating_sub(self.concurrency),
            fetch_timeout: self.fetch_timeout,
            idle_wait: self.idle_wait.max(Duration::from_millis(10)),
            task_timeout: (!self.task_timeout.is_zero()).then_some(self.task_timeout),
            ack_wait: self.ack_wait,
            progress_interval,
            max_ack_pending,
            max_ack_pending_explicit: self.max_ack_pending.is_some(),
            retry: RetryPolicy { max_retries, backoff: self.retry_backoff.clone() },
            dlq_queue,
            drain_timeout: self.drain_timeout.unwrap_or(self.ack_wait),
            unroutable: self.unroutable,
        })
    }
}

/// Validated worker settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) consumer: String,
    pub(crate) concurrency: usize,
    /// Tasks held beyond the free slots.
    pub(crate) prefetch: usize,
    pub(crate) fetch_timeout: Duration,
    pub(crate) idle_wait: Duration,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) ack_wait: Duration,
    pub(crate) progress_interval: Duration,
    pub(crate) max_ack_pending: i64,
    /// Set on the builder: it wins over a limit an operator set on the consumer.
    pub(crate) max_ack_pending_explicit: bool,
    pub(crate) retry: RetryPolicy,
    pub(crate) dlq_queue: String,
    pub(crate) drain_timeout: Duration,
    pub(crate) unroutable: Unroutable,
}
