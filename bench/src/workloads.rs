//! The workloads, each implemented twice: with natasks and with raw async-nats (the
//! process workloads, in `process.rs`, also with the apalis peer).
//!
//! Both implementations use the same stream (created by a natasks `Client`), the same
//! subjects, headers and payload, the same consumer settings and the same number of
//! publishes in flight, so the difference is the library's own overhead.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, ReplayPolicy};
use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use natasks::{Client, HandlerError, ShutdownHandle, Task, Worker};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::alloc_count::Snapshot;
use crate::BoxError;

mod dashboard;
mod guarded;
mod observed;
mod periodic;
mod process;
mod queues;
mod search;
mod tracking;
mod workflow;
pub use dashboard::dashboard_overview;
pub use guarded::{dispatch_batch, dispatch_unique};
pub use observed::{e2e_observed, e2e_traceparent, Setup};
pub use periodic::periodic;
pub use process::{drain, e2e as e2e_process};
pub use process::{locate_apalis, Shape};
pub use queues::{many_queues, rate_limit_overhead, starvation, Starvation};
pub use search::search_dead;
pub use tracking::{dispatch_tracked, e2e_tracked};
pub use workflow::group;

type Res<T> = Result<T, BoxError>;

/// The payload of every task.
const PAYLOAD: &[u8] = br#"{"user_id":42,"email":"user@example.com","tags":["a","b","c"]}"#;
/// The task name every handler is registered for.
pub(crate) const TASK_NAME: &str = "bench.noop";
/// The queue every workload uses (inside its own stream and subject prefix).
const QUEUE: &str = "q";
/// Publishes in flight while a worker runs (e2e, delayed, alloc, memory).
const PUBLISH_IN_FLIGHT: usize = 256;
/// Pull-request lifetime, as the natasks default `fetch_timeout`.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Consumer ack wait, as the natasks default.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Which implementation a run uses. Apalis (the peer) runs only in the process workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Natasks,
    Raw,
    Apalis,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Natasks => "natasks",
            Impl::Raw => "raw",
            Impl::Apalis => "apalis",
        }
    }
}

/// The result of one run.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub per_s: f64,
    pub lateness: Option<Lateness>,
    pub allocs: Option<Allocs>,
    /// Mean time a handler's `sleep` really took, in milliseconds (e2e_io).
    pub mean_sleep_ms: Option<f64>,
    /// CPU time of this process (all threads; not the server) per task, in microseconds,
    /// over the measured interval.
    pub cpu_us_per_task: Option<f64>,
    /// The same work with untracked natasks tasks, run in the same round (the tracking
    /// workloads, whose natasks sample is the tracked run).
    pub untracked: Option<Box<Sample>>,
    /// More figures of the workload, printed as `<implementation>_<key>=<median>`.
    pub extra: Vec<(String, f64)>,
}

/// Processing time minus due time, in milliseconds.
#[derive(Debug, Clone)]
pub struct Lateness {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Allocations per task.
#[derive(Debug, Clone)]
pub struct Allocs {
    pub process_allocs: f64,
    pub process_bytes: f64,
    pub dispatch_allocs: f64,
}

/// Connections and a source of unique stream names.
pub struct Env {
    /// Connection used for publishing (natasks clients and raw publishers).
    publish: Context,
    /// Connection used for consuming (natasks workers and raw consumers).
    consume: Context,
    url: String,
    next: AtomicU64,
    run_id: String,
    /// The server's process, when this process started it (its CPU time is read).
    server_pid: Option<u32>,
}

/// The stream and subjects of one run.
#[derive(Debug, Clone)]
struct Layout {
    stream: String,
    prefix: String,
    subject: String,
}

impl Env {
    /// Connects to the server at `url`; `server_pid` is its process when this process
    /// started it, for the server's CPU time per task in the process workloads.
    pub async fn connect(url: &str, server_pid: Option<u32>) -> Res<Self> {
        let publish = jetstream::new(async_nats::connect(url).await?);
        let consume = jetstream::new(async_nats::connect(url).await?);
        let run_id =
            format!("{}_{}", std::process::id(), nuid::next().as_str().get(..6).unwrap_or("x"));
        Ok(Self {
            publish,
            consume,
            url: url.to_owned(),
            next: AtomicU64::new(0),
            run_id,
            server_pid,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn server_version(&self) -> String {
        self.publish.client().server_info().version
    }

    fn layout(&self) -> Layout {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}_{n}", self.run_id);
        Layout {
            stream: format!("BENCH_{id}"),
            prefix: format!("bench_{id}"),
            subject: format!("bench_{id}.{QUEUE}"),
        }
    }

    /// Runs `body` with a fresh stream, deleting the stream afterwards (also on error).
    async fn with_stream<F, Fut, T>(&self, body: F) -> Res<T>
    where
        F: FnOnce(Layout, Client) -> Fut,
        Fut: std::future::Future<Output = Res<T>>,
    {
        let layout = self.layout();
        let client = Client::builder(self.publish.clone())
            .stream_name(layout.stream.clone())
            .subject_prefix(layout.prefix.clone())
            .build()
            .await?;
        let result = body(layout.clone(), client).await;
        if let Err(err) = self.publish.delete_stream(&layout.stream).await {
            eprintln!("natasks-bench: could not delete stream {}: {err}", layout.stream);
        }
        result
    }

    async fn stored(&self, layout: &Layout) -> Res<u64> {
        let mut stream = self.publish.get_stream(&layout.stream).await?;
        Ok(stream.info().await?.state.messages)
    }
}

/// Publishes tasks, with natasks or raw.
#[derive(Clone)]
struct Dispatcher {
    imp: Impl,
    client: Client,
    js: Context,
    layout: Layout,
    headers: HeaderMap,
}

impl Dispatcher {
    fn new(imp: Impl, env: &Env, layout: &Layout, client: &Client) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(natasks::wire::HEADER_TASK, TASK_NAME);
        headers.insert(natasks::wire::HEADER_QUEUE, QUEUE);
        Self {
            imp,
            client: client.clone(),
            js: env.publish.clone(),
            layout: layout.clone(),
            headers,
        }
    }

    /// Raw publishes carry header `name: value` as well.
    fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Publishes one task (due at `due` if given) and waits for the server's ack.
    async fn one(&self, due: Option<SystemTime>) -> Res<()> {
        match self.imp {
            Impl::Natasks => self.natasks(due).await,
            Impl::Raw => self.raw(due).await,
            Impl::Apalis => Err("apalis dispatches only in its own process".into()),
        }
    }

    /// One task with the natasks `Client`.
    async fn natasks(&self, due: Option<SystemTime>) -> Res<()> {
        let task = Task::new(TASK_NAME, Bytes::from_static(PAYLOAD));
        match due {
            None => self.client.dispatch(task, QUEUE).await?,
            Some(at) => self.client.dispatch_at(task, QUEUE, at).await?,
        };
        Ok(())
    }

    /// One task by a raw JetStream publish (with `RAW_TASK_ID=1`, carrying a fresh
    /// `Natasks-Id` as a natasks dispatch does, to tell the id's cost from the rest).
    async fn raw(&self, due: Option<SystemTime>) -> Res<()> {
        let payload = Bytes::from_static(PAYLOAD);
        match due {
            None => {
                let mut headers = self.headers.clone();
                if raw_task_id() {
                    headers.insert(natasks::wire::HEADER_ID, nuid::next().as_str());
                }
                self.js
                    .publish_with_headers(self.layout.subject.clone(), headers, payload)
                    .await?
                    .await?;
            }
            Some(at) => {
                let mut headers = self.headers.clone();
                let at = OffsetDateTime::from(at).format(&Rfc3339)?;
                headers.insert("Nats-Schedule", format!("@at {at}").as_str());
                headers.insert("Nats-Schedule-Target", self.layout.subject.as_str());
                let subject = format!(
                    "{}.{}.{}",
                    self.layout.prefix,
                    natasks::wire::SCHEDULE_TOKEN,
                    nuid::next()
                );
                self.js.publish_with_headers(subject, headers, payload).await?.await?;
            }
        }
        Ok(())
    }

    /// Publishes `n` tasks with `in_flight` publishes outstanding. Each implementation's
    /// publishes are futures of their own type and size: `buffer_unordered` moves every
    /// one into place, and neither should pay for the size of the other's.
    async fn many(&self, n: usize, in_flight: usize, due: Option<SystemTime>) -> Res<()> {
        let tasks = futures_util::stream::iter(0..n);
        match self.imp {
            Impl::Natasks => {
                settle(tasks.map(|_| self.natasks(due)).buffer_unordered(in_flight)).await
            }
            Impl::Raw => settle(tasks.map(|_| self.raw(due)).buffer_unordered(in_flight)).await,
            Impl::Apalis => Err("apalis dispatches only in its own process".into()),
        }
    }
}

/// Whether raw publishes carry a `Natasks-Id` (`RAW_TASK_ID=1`): a knob to tell what the
/// id every natasks task carries costs the server and the worker from the rest.
fn raw_task_id() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RAW_TASK_ID").is_ok_and(|v| v == "1"))
}

/// Awaits every publish of `results`, stopping at the first error.
async fn settle(results: impl futures_util::Stream<Item = Res<()>>) -> Res<()> {
    let mut results = std::pin::pin!(results);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

/// Counts processed tasks and wakes the waiter at the target.
struct Done {
    count: AtomicUsize,
    target: usize,
    notify: Notify,
    failed: Mutex<Option<String>>,
    due: Option<SystemTime>,
    lateness_ms: Mutex<Vec<f64>>,
    slept_ns: AtomicU64,
    sleeps: AtomicU64,
}

impl Done {
    fn new(target: usize, due: Option<SystemTime>) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            target,
            notify: Notify::new(),
            failed: Mutex::new(None),
            due,
            lateness_ms: Mutex::new(Vec::new()),
            slept_ns: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
        })
    }

    /// The simulated I/O of a handler: sleeps `work`, recording how long that really took.
    async fn work(&self, work: Duration) {
        let start = Instant::now();
        tokio::time::sleep(work).await;
        self.slept_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.sleeps.fetch_add(1, Ordering::Relaxed);
    }

    fn mean_sleep_ms(&self) -> Option<f64> {
        let sleeps = self.sleeps.load(Ordering::Relaxed);
        (sleeps > 0).then(|| self.slept_ns.load(Ordering::Relaxed) as f64 / sleeps as f64 / 1e6)
    }

    /// Called by a handler for each processed task.
    fn hit(&self) {
        if let Some(due) = self.due {
            let late = match SystemTime::now().duration_since(due) {
                Ok(late) => late.as_secs_f64() * 1e3,
                Err(early) => -early.duration().as_secs_f64() * 1e3,
            };
            self.lateness_ms.lock().expect("lateness lock").push(late);
        }
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.target {
            self.notify.notify_one();
        }
    }

    fn fail(&self, what: String) {
        self.failed.lock().expect("failure lock").get_or_insert(what);
        self.notify.notify_one();
    }

    fn processed(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until `target` tasks were processed, a helper failed, or `limit` passed.
    async fn wait(&self, limit: Duration) -> Res<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(failure) = self.failed.lock().expect("failure lock").clone() {
                return Err(failure.into());
            }
            if self.processed() >= self.target {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, self.notify.notified()).await.is_err() {
                return Err(format!(
                    "only {} of {} tasks processed within {limit:?}",
                    self.processed(),
                    self.target
                )
                .into());
            }
        }
    }

    /// Waits until at least `count` tasks were processed (polling).
    async fn wait_for(&self, count: usize, limit: Duration) -> Res<()> {
        let deadline = Instant::now() + limit;
        while self.processed() < count {
            if let Some(failure) = self.failed.lock().expect("failure lock").clone() {
                return Err(failure.into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} of {count} tasks processed within {limit:?}",
                    self.processed()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    fn lateness(&self) -> Option<Lateness> {
        let mut values = self.lateness_ms.lock().expect("lateness lock").clone();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Some(Lateness { p50: at(0.5), p99: at(0.99), max: at(1.0) })
    }
}

/// A generous deadline for processing `n` tasks.
fn limit_for(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(2 * n as u64)
}

/// A running natasks worker or raw consumer.
enum Consumer {
    Natasks { shutdown: ShutdownHandle, task: JoinHandle<Result<(), natasks::RunError>> },
    Raw { task: JoinHandle<()> },
}

impl Consumer {
    /// Starts consuming the run's queue with `concurrency` slots; every processed task
    /// sleeps `work` (if given), then counts in `done`.
    async fn start(
        imp: Impl,
        env: &Env,
        layout: &Layout,
        concurrency: usize,
        work: Option<Duration>,
        done: Arc<Done>,
    ) -> Res<Self> {
        match imp {
            Impl::Natasks => {
                let handler = move |_task: Task| {
                    let done = done.clone();
                    async move {
                        if let Some(work) = work {
                            done.work(work).await;
                        }
                        done.hit();
                        Ok::<(), HandlerError>(())
                    }
                };
                let worker = Worker::builder(env.consume.clone(), QUEUE)
                    .stream_name(layout.stream.clone())
                    .subject_prefix(layout.prefix.clone())
                    .concurrency(concurrency)
                    // Holds as many tasks as the raw consumer: `concurrency` running plus a
                    // pull batch of `concurrency` (natasks prefetches above concurrency).
                    .fetch_batch(2 * concurrency)
                    .handle(TASK_NAME, handler)
                    .build()
                    .await?;
                let shutdown = worker.shutdown_handle();
                let task = tokio::spawn(async move { worker.run().await });
                Ok(Consumer::Natasks { shutdown, task })
            }
            Impl::Raw => {
                let stream = env.consume.get_stream(&layout.stream).await?;
                // The consumer natasks creates, field for field.
                let consumer: PullConsumer = stream
                    .create_consumer(pull::Config {
                        durable_name: Some(format!("raw-{QUEUE}")),
                        description: Some("raw bench consumer".to_owned()),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: ACK_WAIT,
                        filter_subject: layout.subject.clone(),
                        max_ack_pending: 128.max(2 * concurrency as i64),
                        replay_policy: ReplayPolicy::Instant,
                        ..Default::default()
                    })
                    .await?;
                let task = tokio::spawn(async move {
                    if let Err(err) = raw_consume(consumer, concurrency, work, done.clone()).await {
                        done.fail(format!("raw consumer failed: {err}"));
                    }
                });
                Ok(Consumer::Raw { task })
            }
            Impl::Apalis => Err("apalis runs only in its own process".into()),
        }
    }

    async fn stop(self) -> Res<()> {
        match self {
            Consumer::Natasks { shutdown, task } => {
                shutdown.shutdown();
                tokio::time::timeout(Duration::from_secs(60), task)
                    .await
                    .map_err(|_| "worker did not stop within 60s")???;
            }
            Consumer::Raw { task } => {
                task.abort();
                let _ = task.await;
            }
        }
        Ok(())
    }
}

/// The raw consumer: with concurrency 1 it processes messages one after another; above 1
/// it takes a semaphore permit, then the next message, and spawns a task that processes
/// and acks it (the same shape as the natasks pull loop).
async fn raw_consume(
    consumer: PullConsumer,
    concurrency: usize,
    work: Option<Duration>,
    done: Arc<Done>,
) -> Res<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_EXPIRES / 4)
        .messages()
        .await?;
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        let permit =
            if concurrency > 1 { Some(slots.clone().acquire_owned().await?) } else { None };
        let message = match messages.next().await {
            Some(Ok(message)) => message,
            Some(Err(err)) if err.kind() == MessagesErrorKind::MissingHeartbeat => continue,
            Some(Err(err)) => return Err(err.into()),
            None => return Err("pull stream ended".into()),
        };
        let done = done.clone();
        let process = async move {
            if let Some(work) = work {
                done.work(work).await;
            }
            done.hit();
            if let Err(err) = message.ack().await {
                done.fail(format!("ack failed: {err}"));
            }
            drop(permit);
        };
        if concurrency > 1 {
            tokio::spawn(process);
        } else {
            process.await;
        }
    }
}

/// Dispatches one after another, awaiting each ack.
pub async fn dispatch_serial(env: &Env, imp: Impl, n: usize) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let dispatcher = Dispatcher::new(imp, env, &layout, &client);
        let cpu = CpuTime::now();
        let start = Instant::now();
        for _ in 0..n {
            dispatcher.one(None).await?;
        }
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        check_stored(env, &layout, n).await?;
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            cpu_us_per_task,
            ..Default::default()
        })
    })
    .await
}

/// Dispatches with `in_flight` dispatches outstanding.
pub async fn dispatch_concurrent(env: &Env, imp: Impl, n: usize, in_flight: usize) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let dispatcher = Dispatcher::new(imp, env, &layout, &client);
        let cpu = CpuTime::now();
        let start = Instant::now();
        dispatcher.many(n, in_flight, None).await?;
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        check_stored(env, &layout, n).await?;
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            cpu_us_per_task,
            ..Default::default()
        })
    })
    .await
}

async fn check_stored(env: &Env, layout: &Layout, n: usize) -> Res<()> {
    let stored = env.stored(layout).await?;
    if stored != n as u64 {
        return Err(format!("{stored} tasks stored, expected {n}").into());
    }
    Ok(())
}

/// A consumer with `concurrency` slots runs; `n` tasks are published with 256 in flight;
/// measures from the first publish to the n-th processed task.
pub async fn e2e(
    env: &Env,
    imp: Impl,
    n: usize,
    concurrency: usize,
    work: Option<Duration>,
) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let done = Done::new(n, None);
        let consumer = Consumer::start(imp, env, &layout, concurrency, work, done.clone()).await?;
        let dispatcher = Dispatcher::new(imp, env, &layout, &client);
        let (sample, waited) = drive(dispatcher, consumer, n, &done).await?;
        waited?;
        Ok(Sample { mean_sleep_ms: done.mean_sleep_ms(), ..sample })
    })
    .await
}

/// Publishes `n` tasks while `consumer` runs, timing from the first publish to the n-th
/// processed task, then stops the consumer. The sample, and whether every task was
/// processed in time (checked by the caller once it has cleaned up).
async fn drive(
    dispatcher: Dispatcher,
    consumer: Consumer,
    n: usize,
    done: &Arc<Done>,
) -> Res<(Sample, Res<()>)> {
    let cpu = CpuTime::now();
    let start = Instant::now();
    let publishing = spawn_publisher(dispatcher, n, None, done.clone());
    let waited = done.wait(limit_for(n)).await;
    let elapsed = start.elapsed();
    let cpu_us_per_task = cpu.us_per_task(n);
    publishing.await?;
    consumer.stop().await?;
    let sample =
        Sample { per_s: n as f64 / elapsed.as_secs_f64(), cpu_us_per_task, ..Default::default() };
    Ok((sample, waited))
}

fn spawn_publisher(
    dispatcher: Dispatcher,
    n: usize,
    due: Option<SystemTime>,
    done: Arc<Done>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(err) = dispatcher.many(n, PUBLISH_IN_FLIGHT, due).await {
            done.fail(format!("publishing failed: {err}"));
        }
    })
}

/// `n` tasks all due at the same instant (`lead` after the start), consumed with 64 slots;
/// reports the lateness of processing behind the due time.
pub async fn delayed_burst(env: &Env, imp: Impl, n: usize, lead: Duration) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let due = SystemTime::now() + lead;
        let done = Done::new(n, Some(due));
        let consumer = Consumer::start(imp, env, &layout, 64, None, done.clone()).await?;
        let dispatcher = Dispatcher::new(imp, env, &layout, &client);
        let start = Instant::now();
        dispatcher.many(n, PUBLISH_IN_FLIGHT, Some(due)).await?;
        let dispatched = start.elapsed();
        if SystemTime::now() >= due {
            return Err(format!(
                "dispatching {n} delayed tasks took {dispatched:?}, past the due time; raise the lead"
            )
            .into());
        }
        let early = done.processed();
        let waited = done.wait(lead + limit_for(n)).await;
        consumer.stop().await?;
        waited?;
        if early > 0 {
            return Err(format!("{early} delayed tasks were processed before all were dispatched").into());
        }
        let lateness = done.lateness().ok_or("no lateness recorded")?;
        let drain = (lateness.max / 1e3).max(1e-3);
        Ok(Sample { per_s: n as f64 / drain, lateness: Some(lateness), ..Default::default() })
    })
    .await
}

/// Pre-fills the queue with `n` tasks (counting the dispatch allocations), then drains it
/// with 64 slots, counting allocations while processing.
pub async fn alloc_c64(env: &Env, imp: Impl, n: usize) -> Res<Sample> {
    let _counting = crate::alloc_count::counting();
    env.with_stream(|layout, client| async move {
        let dispatcher = Dispatcher::new(imp, env, &layout, &client);
        let before_dispatch = Snapshot::now();
        dispatcher.many(n, PUBLISH_IN_FLIGHT, None).await?;
        let (dispatch_allocs, _) = Snapshot::now().per_task_since(before_dispatch, n);
        check_stored(env, &layout, n).await?;

        let done = Done::new(n, None);
        let before = Snapshot::now();
        let cpu = CpuTime::now();
        let start = Instant::now();
        let consumer = Consumer::start(imp, env, &layout, 64, None, done.clone()).await?;
        let waited = done.wait(limit_for(n)).await;
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        let (process_allocs, process_bytes) = Snapshot::now().per_task_since(before, n);
        consumer.stop().await?;
        waited?;
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            lateness: None,
            allocs: Some(Allocs { process_allocs, process_bytes, dispatch_allocs }),
            cpu_us_per_task,
            ..Default::default()
        })
    })
    .await
}

/// Resident memory after `first` and after `second` processed tasks.
#[derive(Debug, Clone)]
pub struct MemoryReport {
    pub first: usize,
    pub second: usize,
    pub rss_first_kb: u64,
    pub hwm_first_kb: u64,
    pub rss_second_kb: u64,
    pub hwm_second_kb: u64,
    pub per_s: f64,
}

/// A natasks worker (64 slots, no-op handler) in this process processes `first` tasks,
/// then continues to `second`; tasks are dispatched (from this process too) in chunks so
/// the stream stays small. Reads VmRSS and VmHWM once the queue is drained at each point.
pub async fn memory(env: &Env, first: usize, second: usize) -> Res<MemoryReport> {
    const CHUNK: usize = 5_000;
    env.with_stream(|layout, client| async move {
        let done = Done::new(second, None);
        let consumer = Consumer::start(Impl::Natasks, env, &layout, 64, None, done.clone()).await?;
        let dispatcher = Dispatcher::new(Impl::Natasks, env, &layout, &client);
        let start = Instant::now();
        let mut dispatched = 0;
        let mut first_point = None;
        let result: Res<()> = async {
            while dispatched < second {
                // Keep at most two chunks in the stream.
                done.wait_for(dispatched.saturating_sub(CHUNK), limit_for(CHUNK)).await?;
                let mut chunk = CHUNK.min(second - dispatched);
                if first_point.is_none() {
                    chunk = chunk.min(first - dispatched);
                }
                dispatcher.many(chunk, PUBLISH_IN_FLIGHT, None).await?;
                dispatched += chunk;
                if first_point.is_none() && dispatched >= first {
                    done.wait_for(dispatched, limit_for(CHUNK * 2)).await?;
                    let (rss, hwm) = memory_kb()?;
                    eprintln!(
                        "memory natasks: {} processed, VmRSS {rss} kB, VmHWM {hwm} kB, {}/s",
                        done.processed(),
                        crate::thousands(done.processed() as f64 / start.elapsed().as_secs_f64())
                    );
                    first_point = Some((dispatched, rss, hwm));
                }
            }
            done.wait_for(second, limit_for(CHUNK * 2)).await
        }
        .await;
        let elapsed = start.elapsed();
        let (rss, hwm) = memory_kb()?;
        consumer.stop().await?;
        result?;
        let (first_count, rss_first, hwm_first) = first_point.ok_or("first checkpoint missed")?;
        eprintln!(
            "memory natasks: {} processed, VmRSS {rss} kB, VmHWM {hwm} kB, {}/s",
            done.processed(),
            crate::thousands(second as f64 / elapsed.as_secs_f64())
        );
        Ok(MemoryReport {
            first: first_count,
            second,
            rss_first_kb: rss_first,
            hwm_first_kb: hwm_first,
            rss_second_kb: rss,
            hwm_second_kb: hwm,
            per_s: second as f64 / elapsed.as_secs_f64(),
        })
    })
    .await
}

/// (VmRSS, VmHWM) of this process in kB.
fn memory_kb() -> Res<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Res<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("{name} missing in /proc/self/status"))?;
        let kb = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("cannot parse {line:?}"))?;
        Ok(kb)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time consumed by this process's threads, from `/proc/self/task/*/schedstat`
/// (nanosecond resolution; threads that exited meanwhile are not counted).
struct CpuTime(Option<u64>);

impl CpuTime {
    fn now() -> Self {
        Self(threads_cpu_ns("/proc/self/task"))
    }

    fn us_per_task(&self, tasks: usize) -> Option<f64> {
        let (before, after) = (self.0?, threads_cpu_ns("/proc/self/task")?);
        Some(after.saturating_sub(before) as f64 / 1e3 / tasks.max(1) as f64)
    }
}

/// The time the threads under `tasks_dir` (`/proc/<pid>/task`) have spent on a CPU, user and
/// system, in nanoseconds (the first field of each thread's `schedstat`).
fn threads_cpu_ns(tasks_dir: &str) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(tasks_dir).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}
