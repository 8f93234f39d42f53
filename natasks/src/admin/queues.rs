//! The queue overview and queue control.

use std::collections::BTreeMap;

use async_nats::jetstream::consumer::{self, Consumer};
use async_nats::jetstream::stream::Stream;
use futures_util::TryStreamExt;
use time::OffsetDateTime;

use super::{Admin, AdminError, AdminErrorKind, Rate, LIMIT_KEY, RATE_KEY};
use crate::wire;

/// A pause without an end lasts this long (the server needs an end).
const INDEFINITELY: time::Duration = time::Duration::days(100 * 365);

/// One queue, as [`Admin::queues`] sees it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueInfo {
    /// The queue name.
    pub name: String,
    /// Tasks stored on the queue's subject: waiting, in flight or waiting for a retry.
    pub stored: u64,
    /// Stored tasks not handed to a worker: `stored` less `in_flight`.
    pub pending: u64,
    /// Delivered to a worker and not yet acknowledged.
    pub in_flight: u64,
    /// In flight and delivered more than once.
    pub redelivered: u64,
    /// Tasks on the queue's dead-letter queue.
    pub dead_letters: u64,
    /// Delayed tasks for the queue, not due yet (periodic schedules not counted).
    pub scheduled: u64,
    /// When the oldest task still on the queue was stored.
    pub oldest: Option<OffsetDateTime>,
    /// The workers' durable consumer, once a worker consumed the queue.
    pub consumer: Option<String>,
    /// Until when the queue is paused (`None`: not paused). A pause without an end shows
    /// an end a century away.
    pub paused_until: Option<OffsetDateTime>,
    /// The most tasks in flight across every worker (the consumer's `max_ack_pending`).
    pub limit: Option<i64>,
    /// Whether an operator set the limit ([`Admin::set_limit`]); otherwise it is the
    /// workers' default.
    pub limit_set: bool,
    /// Rate limits: the queue's, and per task name.
    pub rates: Vec<RateLimit>,
}

/// A rate limit of a queue, or of one task name in it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimit {
    /// The task name it applies to (`None`: every task of the queue).
    pub task: Option<String>,
    /// The rate.
    pub rate: Rate,
}

impl QueueInfo {
    pub(super) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            stored: 0,
            pending: 0,
            in_flight: 0,
            redelivered: 0,
            dead_letters: 0,
            scheduled: 0,
            oldest: None,
            consumer: None,
            paused_until: None,
            limit: None,
            limit_set: false,
            rates: Vec::new(),
        }
    }

    fn adopt(&mut self, info: &consumer::Info) {
        self.consumer = Some(info.name.clone());
        self.in_flight = info.num_ack_pending as u64;
        self.redelivered = info.num_redelivered as u64;
        self.paused_until = info.paused.then_some(info.config.pause_until).flatten();
        self.limit = Some(info.config.max_ack_pending);
        self.limit_set = info.config.metadata.contains_key(LIMIT_KEY);
        self.rates = rates(&info.config.metadata);
    }
}

/// The rate limits kept in a consumer's metadata; unreadable entries are skipped.
pub(crate) fn rates(metadata: &std::collections::HashMap<String, String>) -> Vec<RateLimit> {
    let mut rates: Vec<RateLimit> = metadata
        .iter()
        .filter_map(|(key, value)| {
            let task = match key.strip_prefix(RATE_KEY)? {
                "" => None,
                rest => Some(rest.strip_prefix('.')?.to_owned()),
            };
            Some(RateLimit { task, rate: value.parse().ok()? })
        })
        .collect();
    rates.sort_by(|a, b| a.task.cmp(&b.task));
    rates
}

impl Admin {
    /// Every queue of the stream: those holding tasks, dead letters or delayed tasks, and
    /// those a worker consumes. Counting delayed tasks per queue reads each one's schedule
    /// message, so this costs a read per delayed task not yet due. A dead-letter queue has a row of its own only when a worker consumes it.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, AdminError> {
        let stream = self.open_stream().await?;
        let reading = self.read_queues(&stream).await?;
        self.overview(&stream, &reading, true, None).await
    }

    /// [`queue`](Self::queue) without counting the queue's delayed tasks (`scheduled` is
    /// 0): it reads no schedule, where `queue` reads every delayed task not yet due.
    pub async fn queue_without_scheduled(&self, queue: &str) -> Result<QueueInfo, AdminError> {
        let queue = valid_queue(queue)?;
        let stream = self.open_stream().await?;
        let reading = self.read_queues(&stream).await?;
        let mut rows = self.overview(&stream, &reading, false, Some(queue)).await?;
        Ok(rows.pop().unwrap_or_else(|| QueueInfo::new(queue)))
    }

    /// The rows of [`queues`](Self::queues) from `reading`, or only the row of `only`; with
    /// `delayed` false, without reading the schedules (every `scheduled` count is 0).
    pub(super) async fn overview(
        &self,
        stream: &Stream,
        reading: &Reading,
        delayed: bool,
        only: Option<&str>,
    ) -> Result<Vec<QueueInfo>, AdminError> {
        let prefix = format!("{}.", self.stream.subject_prefix);
        let wanted = |queue: &str| only.is_none_or(|only| only == queue);
        let mut rows: BTreeMap<String, QueueInfo> = BTreeMap::new();
        for (subject, count) in &reading.counts {
            let Some(queue) = subject.strip_prefix(&prefix) else { continue };
            match queue.strip_suffix(&self.dlq_suffix) {
                Some(base) if !base.is_empty() && wanted(base) => {
                    rows.entry(base.to_owned())
                        .or_insert_with(|| QueueInfo::new(base))
                        .dead_letters = *count
                }
                Some(base) if !base.is_empty() => {}
                _ if wanted(queue) => {
                    rows.entry(queue.to_owned()).or_insert_with(|| QueueInfo::new(queue)).stored =
                        *count
                }
                _ => {}
            }
        }
        let mut scheduled: BTreeMap<String, u64> = BTreeMap::new();
        if delayed {
            let filter = super::tasks::delayed_wildcard(&self.stream.subject_prefix);
            super::read::scan(&self.js, stream, &filter, 1, None, |message| {
                if let Some(queue) = self.schedule_target(&message).filter(|q| wanted(q)) {
                    *scheduled.entry(queue).or_default() += 1;
                }
                std::ops::ControlFlow::Continue(())
            })
            .await?;
        }
        for (queue, count) in scheduled {
            rows.entry(queue.clone()).or_insert_with(|| QueueInfo::new(&queue)).scheduled = count;
        }
        for (queue, info) in self.consumers(stream, reading).await? {
            if wanted(queue) {
                let row = rows.entry(queue.clone()).or_insert_with(|| QueueInfo::new(queue));
                row.adopt(info);
            }
        }
        for row in rows.values_mut() {
            row.pending = row.stored.saturating_sub(row.in_flight);
            if row.stored > 0 {
                let subject = wire::queue_subject(&self.stream.subject_prefix, &row.name);
                if let Ok(first) = stream.get_first_raw_message_by_subject(&subject, 1).await {
                    row.oldest = Some(first.time);
                }
            }
        }
        Ok(rows.into_values().collect())
    }

    /// One queue (see [`queues`](Self::queues)); an unknown queue has every count at zero.
    pub async fn queue(&self, queue: &str) -> Result<QueueInfo, AdminError> {
        let queue = valid_queue(queue)?;
        let all = self.queues().await?;
        Ok(all.into_iter().find(|q| q.name == queue).unwrap_or_else(|| QueueInfo::new(queue)))
    }

    /// Pauses `queue` on the server, until `until` or, with `None`, until
    /// [`resume`](Self::resume): workers (Go ones included) receive none of its tasks
    /// while it lasts; running tasks finish; nothing is lost, redelivered or retried. The
    /// queue must have a worker consumer ([`AdminErrorKind::UnknownQueue`] otherwise).
    /// Needs nats-server 2.11 or newer.
    pub async fn pause(
        &self,
        queue: &str,
        until: Option<OffsetDateTime>,
    ) -> Result<QueueInfo, AdminError> {
        let queue = valid_queue(queue)?;
        let now = OffsetDateTime::now_utc();
        if until.is_some_and(|until| until <= now) {
            return Err(AdminError::new(
                AdminErrorKind::InvalidInput,
                format!("cannot pause queue {queue:?} until a time that has passed"),
            ));
        }
        let until = until.unwrap_or(now + INDEFINITELY);
        let (stream, consumer) = self.queue_consumer(queue).await?;
        stream
            .pause_consumer(&consumer.cached_info().name, until)
            .await
            .map_err(|err| unsupported_or_broker(format!("pause queue {queue:?}"), err, "2.11"))?;
        self.after_change(queue).await
    }

    /// Resumes a paused `queue`: workers receive its tasks again at once. Resuming a queue
    /// that is not paused changes nothing.
    pub async fn resume(&self, queue: &str) -> Result<QueueInfo, AdminError> {
        let queue = valid_queue(queue)?;
        let (stream, consumer) = self.queue_consumer(queue).await?;
        if consumer.cached_info().paused {
            stream.resume_consumer(&consumer.cached_info().name).await.map_err(|err| {
                unsupported_or_broker(format!("resume queue {queue:?}"), err, "2.11")
            })?;
        }
        self.after_change(queue).await
    }

    /// Sets the most tasks of `queue` in flight at once across every worker (the consumer's
    /// `max_ack_pending`), or with `None` removes the operator's limit (128 until a worker
    /// sets its own default, max(128, concurrency + fetch_batch), when it starts). Each
    /// worker still runs at most its own `concurrency`; the queue runs at most
    /// `min(limit, sum of the workers' concurrency)`. A worker whose builder sets
    /// `max_ack_pending` replaces this limit when it starts.
    pub async fn set_limit(
        &self,
        queue: &str,
        limit: Option<i64>,
    ) -> Result<QueueInfo, AdminError> {
        let queue = valid_queue(queue)?;
        if let Some(limit) = limit.filter(|&n| n < 1) {
            return Err(AdminError::new(
                AdminErrorKind::InvalidInput,
                format!("limit {limit} for queue {queue:?} must be at least 1 (pause the queue to stop it)"),
            ));
        }
        self.update_config(queue, |config| match limit {
            Some(limit) => {
                config.max_ack_pending = limit;
                config.metadata.insert(LIMIT_KEY.to_owned(), limit.to_string());
            }
            None => {
                config.max_ack_pending = crate::DEFAULT_MAX_ACK_PENDING;
                config.metadata.remove(LIMIT_KEY);
            }
        })
        .await
    }

    /// Sets the rate limit of `queue`, or of task name `task` in it (`None` removes it):
    /// natasks workers start at most `rate.count()` such tasks per period, across every
    /// worker; the others wait in their worker (lease renewed, no attempt spent) for the
    /// next period. Workers apply a change within moments. Go workers ignore rates. Needs
    /// nats-server 2.12 or newer.
    pub async fn set_rate(
        &self,
        queue: &str,
        task: Option<&str>,
        rate: Option<Rate>,
    ) -> Result<QueueInfo, AdminError> {
        let queue = valid_queue(queue)?;
        if let Some(task) = task {
            wire::validate_task_name(task)
                .map_err(|err| AdminError::new(AdminErrorKind::InvalidInput, err.to_string()))?;
        }
        if rate.is_some() {
            let account = self.js.query_account().await.map_err(|err| {
                AdminError::broker("read the account's JetStream API level (for counters)", err)
            })?;
            if account.requests.level < 2 {
                return Err(AdminError::new(
                    AdminErrorKind::Unsupported,
                    format!(
                        "rate limits need JetStream counters (nats-server 2.12 or newer); the connected server is {}",
                        self.js.client().server_info().version
                    ),
                ));
            }
        }
        let key = match task {
            Some(task) => format!("{RATE_KEY}.{task}"),
            None => RATE_KEY.to_owned(),
        };
        self.update_config(queue, |config| match rate {
            Some(rate) => {
                config.metadata.insert(key, rate.to_string());
            }
            None => {
                config.metadata.remove(&key);
            }
        })
        .await
    }

    async fn update_config(
        &self,
        queue: &str,
        change: impl FnOnce(&mut consumer::Config),
    ) -> Result<QueueInfo, AdminError> {
        let (stream, consumer) = self.queue_consumer(queue).await?;
        let mut config = consumer.cached_info().config.clone();
        change(&mut config);
        stream
            .update_consumer(config)
            .await
            .map_err(|err| AdminError::broker(format!("update queue {queue:?}"), err))?;
        self.after_change(queue).await
    }

    /// Tells the queue's workers to reread its settings, and reads the queue back without
    /// counting its delayed tasks (`scheduled` is 0): that reads every schedule message,
    /// too much for a control command on a stream holding many.
    async fn after_change(&self, queue: &str) -> Result<QueueInfo, AdminError> {
        let subject = wire::control_subject(&self.stream.subject_prefix, queue);
        let client = self.js.client();
        if client.publish(subject, bytes::Bytes::new()).await.is_ok() {
            let _ = client.flush().await;
        }
        self.queue_without_scheduled(queue).await
    }

    /// The task stream, once the settings are known to be usable: every operation opens it
    /// first.
    pub(super) async fn open_stream(&self) -> Result<Stream, AdminError> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        // An empty suffix would make a queue its own dead-letter queue: purging dead letters
        // would purge the queue, and a requeue would select its own copies again.
        let suffix = &self.dlq_suffix;
        let probe = format!("q{suffix}");
        if suffix.is_empty() || wire::validate_queue(&probe).map_or(true, |q| q != probe) {
            return Err(AdminError::new(
                AdminErrorKind::InvalidInput,
                format!(
                    "dlq_suffix {suffix:?} must be non-empty and made of characters a queue \
                     name may hold"
                ),
            ));
        }
        self.js.get_stream(&self.stream.name).await.map_err(|err| match err.kind() {
            GetStreamErrorKind::JetStream(e)
                if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                AdminError::new(
                    AdminErrorKind::UnknownStream,
                    format!("stream {:?} not found (nothing dispatched yet?)", self.stream.name),
                )
            }
            _ => AdminError::broker(format!("read stream {:?}", self.stream.name), err),
        })
    }

    /// The stream and the workers' consumer of `queue`.
    async fn queue_consumer(
        &self,
        queue: &str,
    ) -> Result<(Stream, Consumer<consumer::Config>), AdminError> {
        let stream = self.open_stream().await?;
        let name = wire::consumer_name(&self.consumer_prefix, queue);
        match stream.get_consumer::<consumer::Config>(&name).await {
            Ok(consumer) => Ok((stream, consumer)),
            Err(err) if err.to_string().contains("not found") => Err(AdminError::new(
                AdminErrorKind::UnknownQueue,
                format!(
                    "queue {queue:?} has no worker consumer ({name:?}) in stream {:?}: start a worker first",
                    self.stream.name
                ),
            )),
            Err(err) => Err(AdminError::new(
                AdminErrorKind::Broker,
                format!("read consumer {name:?}: {err}"),
            )),
        }
    }

    /// Reads what the stream holds on each queue subject; the consumers are read when first
    /// asked for ([`consumers`](Self::consumers)).
    pub(super) async fn read_queues(&self, stream: &Stream) -> Result<Reading, AdminError> {
        let filter = wire::queues_wildcard(&self.stream.subject_prefix);
        let counts = subject_counts(&self.js, stream, &filter).await?;
        Ok(Reading { counts, consumers: tokio::sync::OnceCell::new() })
    }

    /// The queues' consumers of `reading`, listed on first use.
    pub(super) async fn consumers<'r>(
        &self,
        stream: &Stream,
        reading: &'r Reading,
    ) -> Result<&'r BTreeMap<String, consumer::Info>, AdminError> {
        reading.consumers.get_or_try_init(|| self.queue_consumers(stream)).await
    }

    /// Consumers of the stream that work a single queue, by queue name. When several
    /// consumers filter on the same queue, the one with the workers' name wins.
    pub(super) async fn queue_consumers(
        &self,
        stream: &Stream,
    ) -> Result<BTreeMap<String, consumer::Info>, AdminError> {
        let infos: Vec<consumer::Info> = stream.consumers().try_collect().await.map_err(|err| {
            AdminError::broker(format!("list consumers of stream {:?}", self.stream.name), err)
        })?;
        let prefix = format!("{}.", self.stream.subject_prefix);
        let mut out: BTreeMap<String, consumer::Info> = BTreeMap::new();
        for info in infos {
            let filters = if info.config.filter_subjects.is_empty() {
                vec![info.config.filter_subject.clone()]
            } else {
                info.config.filter_subjects.clone()
            };
            let [filter] = filters.as_slice() else { continue };
            let Some(queue) = filter.strip_prefix(&prefix) else { continue };
            if queue.is_empty() || queue.contains(['.', '*', '>']) {
                continue;
            }
            let preferred = wire::consumer_name(&self.consumer_prefix, queue);
            match out.get(queue) {
                Some(existing) if existing.name == preferred => {}
                _ => {
                    out.insert(queue.to_owned(), info);
                }
            }
        }
        Ok(out)
    }
}

/// One reading of the messages stored per queue subject and of the queues' consumers: an
/// operation answers every question about the queues from it, instead of asking the server
/// again.
pub(crate) struct Reading {
    /// Messages stored per subject matching `<prefix>.*` (queues and dead-letter queues).
    pub(super) counts: BTreeMap<String, u64>,
    consumers: tokio::sync::OnceCell<BTreeMap<String, consumer::Info>>,
}

pub(super) fn valid_queue(queue: &str) -> Result<&str, AdminError> {
    wire::validate_queue(queue)
        .map_err(|err| AdminError::new(AdminErrorKind::InvalidInput, err.to_string()))
}

/// Messages stored per subject matching `filter`, in as many requests as the server needs
/// pages (one for up to 100,000 subjects): the client's pager asks once more after the
/// last page.
pub(super) async fn subject_counts(
    js: &async_nats::jetstream::Context,
    stream: &Stream,
    filter: &str,
) -> Result<BTreeMap<String, u64>, AdminError> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(default)]
        total: u64,
        #[serde(default)]
        state: Option<State>,
        #[serde(default)]
        error: Option<ApiError>,
    }
    #[derive(serde::Deserialize)]
    struct State {
        #[serde(default)]
        subjects: Option<BTreeMap<String, u64>>,
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        err_code: u64,
        #[serde(default)]
        description: String,
    }
    let name = &stream.cached_info().config.name;
    let what = || format!("read the subjects of stream {name:?}");
    let mut counts = BTreeMap::new();
    loop {
        let body = serde_json::json!({ "subjects_filter": filter, "offset": counts.len() });
        let reply: Reply = js
            .request(format!("STREAM.INFO.{name}"), &body)
            .await
            .map_err(|err| AdminError::broker(what(), err))?;
        if let Some(err) = reply.error {
            return Err(AdminError::new(
                AdminErrorKind::Broker,
                format!("{}: {} (error {})", what(), err.description, err.err_code),
            ));
        }
        let page = reply.state.and_then(|state| state.subjects).unwrap_or_default();
        let got = page.len();
        counts.extend(page);
        if got == 0 || counts.len() as u64 >= reply.total {
            return Ok(counts);
        }
    }
}

fn unsupported_or_broker(
    what: String,
    err: impl std::error::Error + Send + Sync + 'static,
    version: &str,
) -> AdminError {
    let text = err.to_string();
    if text.contains("not supported") || text.contains("unknown") {
        return AdminError::new(
            AdminErrorKind::Unsupported,
            format!("{what}: needs nats-server {version} or newer ({text})"),
        );
    }
    AdminError::broker(what, err)
}
