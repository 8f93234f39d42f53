//! Rate limits, as the worker applies them: a JetStream counter per queue (or task name)
//! and period, shared by every worker, counts the tasks started in that period.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use crate::admin::{queues::rates, Rate};
use crate::stream::StreamSettings;
use crate::track::record::key as token;
use crate::wire;

/// The counter streams, by the periods they count: each keeps its counters a little longer
/// than its longest period, so that the streams hold a few hundred subjects per rate, not
/// one per period since the start (`(suffix, subject token, longest period, kept for)`).
const CLASSES: [(&str, &str, u64, Duration); 2] = [
    ("RATES_MINUTE", "m", 60, Duration::from_secs(5 * 60)),
    ("RATES_DAY", "d", 24 * 3600, Duration::from_secs(2 * 24 * 3600)),
];

/// The rates in force for one queue, refreshed when an operator changes them.
pub(crate) struct Limits {
    js: jetstream::Context,
    stream: StreamSettings,
    queue: String,
    /// Whether any rate is set: the one check a task pays when none is.
    any: AtomicBool,
    rates: RwLock<Rates>,
    /// Until when the queue is paused, as last read (the server enforces the pause for
    /// what it delivers; the worker holds back what it already holds).
    paused_until: RwLock<Option<SystemTime>>,
    /// Whether a pause was read at all: the one check a task pays when none was.
    any_pause: AtomicBool,
    /// The counter streams, opened on first use, by class.
    counters: [OnceCell<()>; 2],
}

#[derive(Default)]
struct Rates {
    queue: Option<Rate>,
    tasks: HashMap<String, Rate>,
}

/// Whether a task may start now.
pub(crate) enum Permit {
    Go,
    /// The period's count is reached (or the counter cannot be read): try again then.
    WaitUntil(tokio::time::Instant),
}

impl Limits {
    pub(crate) fn new(js: jetstream::Context, stream: StreamSettings, queue: &str) -> Self {
        Self {
            js,
            stream,
            queue: queue.to_owned(),
            any: AtomicBool::new(false),
            rates: RwLock::new(Rates::default()),
            paused_until: RwLock::new(None),
            any_pause: AtomicBool::new(false),
            counters: [OnceCell::new(), OnceCell::new()],
        }
    }

    /// Applies the consumer's pause and the rates kept in its metadata.
    pub(crate) fn adopt(&self, info: &consumer::Info) {
        let paused = info.paused.then_some(info.config.pause_until).flatten();
        *self.paused_until.write().unwrap_or_else(|p| p.into_inner()) =
            paused.map(SystemTime::from);
        self.any_pause.store(paused.is_some(), Ordering::Release);
        self.adopt_rates(&info.config.metadata);
    }

    /// Whether the queue is paused: tasks the worker already holds wait (leases renewed)
    /// instead of starting.
    pub(crate) fn paused(&self) -> bool {
        if !self.any_pause.load(Ordering::Acquire) {
            return false;
        }
        let until = *self.paused_until.read().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| SystemTime::now() < until)
    }

    fn adopt_rates(&self, metadata: &HashMap<String, String>) {
        let mut next = Rates::default();
        for limit in rates(metadata) {
            match limit.task {
                None => next.queue = Some(limit.rate),
                Some(task) => {
                    next.tasks.insert(task, limit.rate);
                }
            }
        }
        let any = next.queue.is_some() || !next.tasks.is_empty();
        *self.rates.write().unwrap_or_else(|p| p.into_inner()) = next;
        self.any.store(any, Ordering::Release);
    }

    /// Whether any rate is set.
    pub(crate) fn active(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Counts a start of `task` against every rate that applies, or says when to try again.
    pub(crate) async fn acquire(&self, task: &str) -> Permit {
        let applicable: Vec<(Option<&str>, Rate)> = {
            let rates = self.rates.read().unwrap_or_else(|p| p.into_inner());
            let mut list = Vec::with_capacity(2);
            if let Some(rate) = rates.queue {
                list.push((None, rate));
            }
            if let Some(rate) = rates.tasks.get(task) {
                list.push((Some(task), *rate));
            }
            list
        };
        for (scope, rate) in applicable {
            if let Some(retry) = self.count(scope, rate).await {
                return Permit::WaitUntil(retry);
            }
        }
        Permit::Go
    }

    /// Counts one start in the current period of `rate`; `None` if it is within the rate,
    /// else when the next period begins.
    async fn count(&self, scope: Option<&str>, rate: Rate) -> Option<tokio::time::Instant> {
        let period = rate.period().as_secs().max(1);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let window = now.as_secs() / period;
        let next = Duration::from_secs((window + 1) * period).saturating_sub(now);
        let retry = tokio::time::Instant::now() + next;
        let class = CLASSES.iter().position(|c| period <= c.2).unwrap_or(CLASSES.len() - 1);
        if let Err(err) = self.counters[class].get_or_try_init(|| self.open(class)).await {
            tracing::warn!(queue = %self.queue, error = %err, "cannot open the rate counters; waiting");
            return Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
        let scope = scope.map_or_else(|| "_".to_owned(), |task| format!("t{}", token(task)));
        let subject = format!(
            "{}.{}.{}.{scope}.{period}.{window}",
            rates_root(&self.stream.subject_prefix),
            CLASSES[class].1,
            self.queue
        );
        let message = PublishMessage::build().header("Nats-Incr", "+1");
        let counted = async { self.js.send_publish(subject, message).await?.await };
        match counted.await {
            Ok(ack) => {
                let value = ack.value.as_deref().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                (value > u64::from(rate.count())).then_some(retry)
            }
            Err(err) => {
                tracing::warn!(queue = %self.queue, error = %err, "cannot count a start against the rate; waiting");
                Some(tokio::time::Instant::now() + Duration::from_secs(1))
            }
        }
    }

    /// Creates the counter stream of `class`, or adopts it.
    async fn open(&self, class: usize) -> Result<(), async_nats::Error> {
        let (suffix, token, _, age) = CLASSES[class];
        let name = format!("{}_{suffix}", self.stream.name);
        if self.js.get_stream(&name).await.is_ok() {
            return Ok(());
        }
        let config = stream::Config {
            name,
            description: Some("natasks: tasks started per period, for rate limits".to_owned()),
            subjects: vec![format!("{}.{token}.>", rates_root(&self.stream.subject_prefix))],
            storage: stream::StorageType::File,
            num_replicas: self.stream.replicas,
            max_messages_per_subject: 1,
            max_age: age,
            allow_message_counter: true,
            ..Default::default()
        };
        self.js.get_or_create_stream(config).await?;
        Ok(())
    }

    /// Rereads the rates whenever an operator changes the queue's settings, and every
    /// half minute in case a signal was missed, until dropped.
    pub(crate) async fn follow(self: &Arc<Self>, consumer: &str) -> Option<FollowGuard> {
        let subject = wire::control_subject(&self.stream.subject_prefix, &self.queue);
        let mut signals = match self.js.client().subscribe(subject).await {
            Ok(signals) => signals,
            Err(err) => {
                tracing::warn!(error = %err, "cannot hear queue setting changes; rates are reread every 30 s");
                return None;
            }
        };
        // Listening first, then reading: a change made after the read is heard.
        self.reread(consumer).await;
        let this = self.clone();
        let consumer = consumer.to_owned();
        let handle = tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(Duration::from_secs(30), signals.next()).await;
                this.reread(&consumer).await;
            }
        });
        Some(FollowGuard(handle))
    }

    async fn reread(&self, consumer: &str) {
        let Ok(stream) = self.js.get_stream(&self.stream.name).await else { return };
        if let Ok(info) = stream.consumer_info(consumer).await {
            self.adopt(&info);
        }
    }
}

/// The root of the counter subjects: `_natasks.<prefix>.rates`.
fn rates_root(prefix: &str) -> String {
    format!("{}.{prefix}.rates", wire::EVENTS_ROOT)
}

/// Stops following setting changes when the worker's run ends.
pub(crate) struct FollowGuard(tokio::task::JoinHandle<()>);

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
