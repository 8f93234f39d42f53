//! [`QueueMetrics`]: queue-level gauges read from JetStream.

use std::collections::HashMap;
use std::time::Duration;

use ::metrics::Unit;
use async_nats::jetstream::{self, context::ConsumerInfoErrorKind, stream::RawMessageErrorKind};
use futures_util::TryStreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{MetricsOptions, DEFAULT_POLL_INTERVAL};
use crate::error::BoxError;
use crate::wire;

/// Polls JetStream for the state of queues and publishes it as gauges (`queue_pending`,
/// `queue_in_flight`, `queue_dlq_depth`, `queue_oldest_pending_age_seconds`, each with a
/// `queue` label): the numbers come from the server (consumer info, per-subject message
/// counts, the first stored message), so they hold for every worker of the queue, in any
/// process.
///
/// Start it with [`spawn`](Self::spawn) next to the workers, or call
/// [`refresh`](Self::refresh) yourself (for example before each scrape).
#[derive(Debug, Clone)]
pub struct QueueMetrics {
    js: jetstream::Context,
    stream: String,
    subject_prefix: String,
    consumer_prefix: String,
    dlq_suffix: String,
    consumers: HashMap<String, String>,
    queues: Vec<String>,
    interval: Duration,
    names: QueueNames,
}

#[derive(Debug, Clone)]
struct QueueNames {
    pending: String,
    in_flight: String,
    dlq_depth: String,
    oldest_age: String,
}

impl QueueNames {
    fn new(options: &MetricsOptions) -> Self {
        Self {
            pending: options.full_name("queue_pending"),
            in_flight: options.full_name("queue_in_flight"),
            dlq_depth: options.full_name("queue_dlq_depth"),
            oldest_age: options.full_name("queue_oldest_pending_age_seconds"),
        }
    }

    /// Sends the help texts to the recorder installed now (cheap; done on every refresh).
    fn describe(&self) {
        let names = self;
        ::metrics::describe_gauge!(
            names.pending.clone(),
            Unit::Count,
            "Tasks waiting for their first delivery."
        );
        ::metrics::describe_gauge!(
            names.in_flight.clone(),
            Unit::Count,
            "Tasks delivered and not yet settled (running or waiting for a retry)."
        );
        ::metrics::describe_gauge!(
            names.dlq_depth.clone(),
            Unit::Count,
            "Tasks in the dead-letter queue."
        );
        ::metrics::describe_gauge!(
            names.oldest_age.clone(),
            Unit::Seconds,
            "Age of the oldest task still in the queue; 0 when it is empty."
        );
    }
}

/// The state of one queue, as read from JetStream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueState {
    /// Tasks waiting for their first delivery.
    pub pending: u64,
    /// Tasks delivered and not yet settled: running, or waiting for a retry.
    pub in_flight: u64,
    /// Tasks in the dead-letter queue.
    pub dlq_depth: u64,
    /// Age of the oldest task still in the queue; zero when it is empty.
    pub oldest_age: Duration,
}

impl QueueMetrics {
    /// Gauges for `queues` in the default stream (`NATASKS`, subjects `natasks.<queue>`,
    /// consumers `natasks-<queue>`, dead-letter queues `<queue>-dlq`), named with the
    /// default [`MetricsOptions`], polled every 15 seconds once spawned.
    pub fn new<Q: Into<String>>(
        js: jetstream::Context,
        queues: impl IntoIterator<Item = Q>,
    ) -> Self {
        let queues = queues
            .into_iter()
            .map(Into::into)
            .map(|q: String| if q.is_empty() { wire::DEFAULT_QUEUE.to_owned() } else { q })
            .collect();
        Self {
            js,
            stream: wire::DEFAULT_STREAM.to_owned(),
            subject_prefix: wire::DEFAULT_SUBJECT_PREFIX.to_owned(),
            consumer_prefix: wire::DEFAULT_CONSUMER_PREFIX.to_owned(),
            dlq_suffix: wire::DEFAULT_DLQ_SUFFIX.to_owned(),
            consumers: HashMap::new(),
            queues,
            interval: DEFAULT_POLL_INTERVAL,
            names: QueueNames::new(&MetricsOptions::default()),
        }
    }

    /// Namespace and subsystem of the gauge names (buckets do not apply).
    #[must_use]
    pub fn options(mut self, options: &MetricsOptions) -> Self {
        self.names = QueueNames::new(options);
        self
    }

    /// The stream, as set on the workers. Default: `NATASKS`.
    #[must_use]
    pub fn stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream = name.into();
        self
    }

    /// The subject prefix, as set on the workers. Default: `natasks`.
    #[must_use]
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.subject_prefix = prefix.into();
        self
    }

    /// The consumer prefix, as set on the workers. Default: `natasks`.
    #[must_use]
    pub fn consumer_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.consumer_prefix = prefix.into();
        self
    }

    /// The consumer of `queue`, for workers built with `durable(name)`.
    #[must_use]
    pub fn durable(mut self, queue: impl Into<String>, name: impl Into<String>) -> Self {
        self.consumers.insert(queue.into(), name.into());
        self
    }

    /// The dead-letter suffix, as set on the workers. Default: `-dlq`.
    #[must_use]
    pub fn dlq_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dlq_suffix = suffix.into();
        self
    }

    /// How often [`spawn`](Self::spawn) polls. Default: 15 seconds.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Reads the state of one queue from JetStream.
    pub async fn read(&self, queue: &str) -> Result<QueueState, BoxError> {
        let stream = self.js.get_stream_no_info(&self.stream).await?;
        let subject = wire::queue_subject(&self.subject_prefix, queue);
        let dlq = wire::queue_subject(&self.subject_prefix, &format!("{queue}{}", self.dlq_suffix));
        let consumer = match self.consumers.get(queue) {
            Some(name) => name.clone(),
            None => wire::consumer_name(&self.consumer_prefix, queue),
        };
        let stored = subject_count(&stream, &subject).await?;
        // A stored task either waits for its first delivery or is delivered and not yet
        // settled (running, or waiting for a retry). Pending is counted from what is stored,
        // not read from the consumer's `num_pending`: the server keeps that counter on the
        // side, and it was seen one too high for as long as tasks stayed in flight.
        let in_flight = match stream.consumer_info(&consumer).await {
            Ok(info) => info.num_ack_pending as u64,
            // No worker yet: everything stored is waiting.
            Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => 0,
            Err(err) => return Err(err.into()),
        };
        let pending = stored.saturating_sub(in_flight);
        let dlq_depth = subject_count(&stream, &dlq).await?;
        let oldest_age = match stream.get_next_raw_message_by_subject(&subject).await {
            Ok(message) => {
                let age = time::OffsetDateTime::now_utc() - message.time;
                age.try_into().unwrap_or(Duration::ZERO)
            }
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Duration::ZERO,
            Err(err) => return Err(err.into()),
        };
        Ok(QueueState { pending, in_flight, dlq_depth, oldest_age })
    }

    /// Reads every queue and sets its gauges. Queues that could not be read keep their
    /// previous values; the first error is returned.
    pub async fn refresh(&self) -> Result<(), BoxError> {
        self.names.describe();
        let mut first_error = None;
        for queue in &self.queues {
            match self.read(queue).await {
                Ok(state) => {
                    let label = [("queue", queue.clone())];
                    ::metrics::gauge!(self.names.pending.clone(), &label).set(state.pending as f64);
                    ::metrics::gauge!(self.names.in_flight.clone(), &label)
                        .set(state.in_flight as f64);
                    ::metrics::gauge!(self.names.dlq_depth.clone(), &label)
                        .set(state.dlq_depth as f64);
                    ::metrics::gauge!(self.names.oldest_age.clone(), &label)
                        .set(state.oldest_age.as_secs_f64());
                }
                Err(err) => {
                    first_error.get_or_insert_with(|| format!("queue {queue:?}: {err}"));
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(err) => Err(err.into()),
        }
    }

    /// Polls in a background task, at once and then every interval, until the handle is
    /// dropped or stopped. Failures are logged (`WARN` once, then `DEBUG` until a poll
    /// succeeds again). Must be called within a Tokio runtime.
    pub fn spawn(self) -> QueueMetricsHandle {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(self.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let refresh = tokio::select! {
                    () = token.cancelled() => return,
                    result = self.refresh() => result,
                };
                match refresh {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("queue metrics: polling JetStream works again");
                    }
                    Ok(()) => {}
                    Err(err) if failing => {
                        tracing::debug!(error = %err, "queue metrics: could not poll JetStream");
                    }
                    Err(err) => {
                        failing = true;
                        tracing::warn!(error = %err, "queue metrics: could not poll JetStream; gauges keep their last values");
                    }
                }
            }
        });
        QueueMetricsHandle { stop, task: Some(task) }
    }
}

/// Stops the [`QueueMetrics`] poller when dropped or [stopped](Self::stop).
#[derive(Debug)]
#[must_use = "the poller stops when the handle is dropped"]
pub struct QueueMetricsHandle {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl QueueMetricsHandle {
    /// Stops polling and waits for the poller to finish.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for QueueMetricsHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Messages stored on exactly `subject`.
async fn subject_count<I>(
    stream: &jetstream::stream::Stream<I>,
    subject: &str,
) -> Result<u64, BoxError> {
    let mut info = stream.info_with_subjects(subject).await?;
    let mut count = 0;
    while let Some((name, n)) = info.try_next().await? {
        if name == subject {
            count += n as u64;
        }
    }
    Ok(count)
}
