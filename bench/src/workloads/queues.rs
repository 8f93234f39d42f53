//! Queue-control workloads: several queues in one worker, and rate limits.
//!
//! * `starvation`: one worker (concurrency 8) serves `critical` (weight 9) and `low`
//!   (weight 1). `low` holds a flood of slow tasks (20 ms each) when the worker starts;
//!   `critical` then receives a trickle, one task every 10 ms. Reported: how long a
//!   critical task waits, from its dispatch to its handler's start (p50, p99, max), for
//!   natasks weighted (the `natasks` column), natasks with `strict_priority` (`strict_`
//!   fields) and the raw baseline: one raw pull consumer per queue (`messages()`, batches
//!   of 8) in one process, each loop taking its next message, then a permit from one
//!   semaphore of 8 shared by both queues (tokio's semaphore is first come, first served),
//!   and spawning the handler and the ack. The raw baseline has no notion of priority: a
//!   critical task waits for a permit behind at most the low task already waiting for one.
//!   Tasks/s: every task of both queues over the time to process them all.
//! * `rate_limit_overhead`: `e2e_c64` with a rate far above what the machine reaches
//!   (10,000,000/s: every start is counted, none waits) against the same without a rate
//!   (`norate_` fields) and raw: what counting starts costs per task.
//! * `many_queues_500`: one worker in this process serving 500 queues (weight 1 each,
//!   concurrency 64); 20 tasks dispatched to each (10,000, 256 dispatches in flight, queue
//!   by queue in turn) while it runs. Tasks/s from the first dispatch to the last processed
//!   task; this process's RSS growth from before the worker was built to the end; the
//!   server's consumer count. Raw: 500 raw pull consumers, `messages()` each (batches of 2,
//!   as deep as natasks' lane for one queue of 500), one task per consumer taking a permit
//!   of a semaphore of 64 shared by all, in this process.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, ReplayPolicy};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use natasks::admin::{Admin, Rate};
use natasks::{HandlerError, Task, Worker};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{
    drive, limit_for, memory_kb, Consumer, Dispatcher, Done, Env, Impl, Layout, Res, Sample,
    ACK_WAIT, PAYLOAD, PUBLISH_IN_FLIGHT, PULL_EXPIRES, QUEUE, TASK_NAME,
};

/// The sizes of `starvation`.
#[derive(Debug, Clone, Copy)]
pub struct Starvation {
    /// Slow tasks on `low` when the worker starts.
    pub flood: usize,
    /// Critical tasks, one every 10 ms.
    pub trickle: usize,
}

const SLOTS: usize = 8;
const LOW_WORK: Duration = Duration::from_millis(20);
const TRICKLE_EVERY: Duration = Duration::from_millis(10);
const CRITICAL_WEIGHT: u32 = 9;

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// Critical waits (dispatch to handler start) in milliseconds, and the task count.
#[derive(Default)]
struct Waits {
    ms: Mutex<Vec<f64>>,
}

impl Waits {
    fn record(&self, payload: &[u8]) {
        let sent: u64 = std::str::from_utf8(payload).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        let ms = unix_micros().saturating_sub(sent) as f64 / 1e3;
        self.ms.lock().expect("waits lock").push(ms);
    }

    /// (p50, p99, max)
    fn summary(&self) -> Res<(f64, f64, f64)> {
        let mut values = self.ms.lock().expect("waits lock").clone();
        if values.is_empty() {
            return Err("no critical task ran".into());
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Ok((at(0.5), at(0.99), at(1.0)))
    }
}

/// `starvation`: natasks weighted (and strict in the same call), or raw.
pub async fn starvation(env: &Env, imp: Impl, size: Starvation) -> Res<Sample> {
    match imp {
        Impl::Natasks => {
            let (weighted, wait) = starvation_once(env, imp, false, size).await?;
            let (_, strict) = starvation_once(env, imp, true, size).await?;
            let mut sample = Sample { per_s: weighted, ..Default::default() };
            push_waits(&mut sample, "", wait);
            push_waits(&mut sample, "strict_", strict);
            Ok(sample)
        }
        Impl::Raw => {
            let (per_s, wait) = starvation_once(env, imp, false, size).await?;
            let mut sample = Sample { per_s, ..Default::default() };
            push_waits(&mut sample, "", wait);
            Ok(sample)
        }
        Impl::Apalis => Err("apalis runs only in the worker-process workloads".into()),
    }
}

fn push_waits(sample: &mut Sample, prefix: &str, (p50, p99, max): (f64, f64, f64)) {
    sample.extra.push((format!("{prefix}critical_wait_p50_ms"), p50));
    sample.extra.push((format!("{prefix}critical_wait_p99_ms"), p99));
    sample.extra.push((format!("{prefix}critical_wait_max_ms"), max));
}

/// One run: tasks/s over both queues, and the critical waits.
async fn starvation_once(
    env: &Env,
    imp: Impl,
    strict: bool,
    size: Starvation,
) -> Res<(f64, (f64, f64, f64))> {
    env.with_stream(|layout, client| async move {
        let total = size.flood + size.trickle;
        let done = Done::new(total, None);
        let waits = Arc::new(Waits::default());
        let queues = ["critical", "low"];
        let running = match imp {
            Impl::Natasks => {
                let (done, waits) = (done.clone(), waits.clone());
                let handler = move |task: Task| {
                    let (done, waits) = (done.clone(), waits.clone());
                    async move {
                        if task.name() == "critical" {
                            waits.record(task.payload());
                        } else {
                            tokio::time::sleep(LOW_WORK).await;
                        }
                        done.hit();
                        Ok::<(), HandlerError>(())
                    }
                };
                let mut builder = Worker::builder(env.consume.clone(), "critical")
                    .stream_name(layout.stream.clone())
                    .subject_prefix(layout.prefix.clone())
                    .weight(CRITICAL_WEIGHT)
                    .queue("low", 1)
                    .concurrency(SLOTS)
                    .handle("critical", handler.clone())
                    .handle("low", handler);
                if strict {
                    builder = builder.strict_priority();
                }
                Running::natasks(builder.build().await?)
            }
            Impl::Raw => {
                let slots = Arc::new(Semaphore::new(SLOTS));
                let mut tasks = Vec::new();
                for queue in queues {
                    let consumer = raw_consumer(env, &layout, queue).await?;
                    let (done, waits, slots) = (done.clone(), waits.clone(), slots.clone());
                    tasks.push(tokio::spawn(async move {
                        let critical = queue == "critical";
                        let in_lane = done.clone();
                        let result = raw_lane(consumer, SLOTS, slots, move |message| {
                            let (done, waits) = (in_lane.clone(), waits.clone());
                            async move {
                                if critical {
                                    waits.record(&message.payload);
                                } else {
                                    tokio::time::sleep(LOW_WORK).await;
                                }
                                done.hit();
                                message.ack().await.map_err(|e| e.to_string())
                            }
                        })
                        .await;
                        if let Err(err) = result {
                            done.fail(format!("raw consumer failed: {err}"));
                        }
                    }));
                }
                Running::Raw(tasks)
            }
            Impl::Apalis => return Err("apalis runs only in the worker-process workloads".into()),
        };
        let low = publisher(env, &layout, imp, &client, "low", "low");
        let critical = publisher(env, &layout, imp, &client, "critical", "critical");
        // The flood is stored before the worker starts; the trickle comes while it works.
        let mut flood = futures_util::stream::iter(0..size.flood)
            .map(|_| low.one(Bytes::from_static(PAYLOAD)))
            .buffer_unordered(PUBLISH_IN_FLIGHT);
        while let Some(result) = flood.next().await {
            result?;
        }
        let start = Instant::now();
        let running = running.start();
        let trickle = tokio::spawn({
            let done = done.clone();
            async move {
                let mut tick = tokio::time::interval(TRICKLE_EVERY);
                for _ in 0..size.trickle {
                    tick.tick().await;
                    let sent = Bytes::from(unix_micros().to_string());
                    if let Err(err) = critical.one(sent).await {
                        done.fail(format!("dispatching a critical task failed: {err}"));
                        return;
                    }
                }
            }
        });
        let waited = done.wait(limit_for(total) + LOW_WORK * (size.flood / SLOTS) as u32).await;
        let elapsed = start.elapsed();
        trickle.await?;
        running.stop().await?;
        waited?;
        Ok((total as f64 / elapsed.as_secs_f64(), waits.summary()?))
    })
    .await
}

/// Publishes tasks named `task` to one queue of a run.
struct Publisher {
    imp: Impl,
    client: natasks::Client,
    js: async_nats::jetstream::Context,
    subject: String,
    queue: String,
    task: &'static str,
    headers: HeaderMap,
}

fn publisher(
    env: &Env,
    layout: &Layout,
    imp: Impl,
    client: &natasks::Client,
    queue: &str,
    task: &'static str,
) -> Publisher {
    let mut headers = HeaderMap::new();
    headers.insert(natasks::wire::HEADER_TASK, task);
    headers.insert(natasks::wire::HEADER_QUEUE, queue);
    Publisher {
        imp,
        client: client.clone(),
        js: env.publish.clone(),
        subject: format!("{}.{queue}", layout.prefix),
        queue: queue.to_owned(),
        task,
        headers,
    }
}

impl Publisher {
    async fn one(&self, payload: Bytes) -> Res<()> {
        match self.imp {
            Impl::Natasks => {
                self.client.dispatch(Task::new(self.task, payload), &self.queue).await?;
            }
            _ => {
                let (subject, headers) = (self.subject.clone(), self.headers.clone());
                self.js.publish_with_headers(subject, headers, payload).await?.await?;
            }
        }
        Ok(())
    }
}

/// The consumer natasks creates for `queue`, field for field, under another name.
async fn raw_consumer(env: &Env, layout: &Layout, queue: &str) -> Res<PullConsumer> {
    let stream = env.consume.get_stream(&layout.stream).await?;
    Ok(stream
        .create_consumer(pull::Config {
            durable_name: Some(format!("raw-{queue}")),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            filter_subject: format!("{}.{queue}", layout.prefix),
            max_ack_pending: 128,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await?)
}

/// One raw queue: takes its next message, then a permit of the shared `slots`, and spawns
/// `handle` with the message, releasing the permit when it returns.
async fn raw_lane<F, Fut>(
    consumer: PullConsumer,
    batch: usize,
    slots: Arc<Semaphore>,
    handle: F,
) -> Res<()>
where
    F: Fn(async_nats::jetstream::Message) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_EXPIRES / 4)
        .messages()
        .await?;
    loop {
        let message = match messages.next().await {
            Some(Ok(message)) => message,
            Some(Err(err)) if err.kind() == MessagesErrorKind::MissingHeartbeat => continue,
            Some(Err(err)) => return Err(err.into()),
            None => return Err("pull stream ended".into()),
        };
        let permit = slots.clone().acquire_owned().await?;
        let work = handle(message);
        tokio::spawn(async move {
            if let Err(err) = work.await {
                eprintln!("natasks-bench: raw handler failed: {err}");
            }
            drop(permit);
        });
    }
}

/// A natasks worker built but not yet running, or raw consumer tasks already running.
enum Running {
    Built(Box<Worker>),
    Natasks(natasks::ShutdownHandle, JoinHandle<Result<(), natasks::RunError>>),
    Raw(Vec<JoinHandle<()>>),
}

impl Running {
    fn natasks(worker: Worker) -> Self {
        Running::Built(Box::new(worker))
    }

    fn start(self) -> Self {
        match self {
            Running::Built(worker) => {
                let shutdown = worker.shutdown_handle();
                Running::Natasks(shutdown, tokio::spawn(async move { worker.run().await }))
            }
            other => other,
        }
    }

    async fn stop(self) -> Res<()> {
        match self {
            Running::Built(_) => {}
            Running::Natasks(shutdown, join) => {
                shutdown.shutdown();
                tokio::time::timeout(Duration::from_secs(60), join)
                    .await
                    .map_err(|_| "worker did not stop within 60s")???;
            }
            Running::Raw(tasks) => {
                for task in tasks {
                    task.abort();
                    let _ = task.await;
                }
            }
        }
        Ok(())
    }
}

/// The rate of `rate_limit_overhead`: far above what one machine reaches.
const UNREACHED_RATE: u32 = 10_000_000;

/// `rate_limit_overhead`: natasks with the rate (and, in the same call, without), or raw.
pub async fn rate_limit_overhead(env: &Env, imp: Impl, n: usize) -> Res<Sample> {
    match imp {
        Impl::Natasks => {
            let rated = e2e_c64(env, n, true).await?;
            let plain = e2e_c64(env, n, false).await?;
            let mut sample = rated.clone();
            sample.extra.push(("norate_per_s".to_owned(), plain.per_s));
            sample.extra.push(("rate_vs_norate".to_owned(), rated.per_s / plain.per_s.max(1e-9)));
            // Wall time per task added by counting starts, at 64 in flight.
            let added_us = (1.0 / rated.per_s.max(1e-9) - 1.0 / plain.per_s.max(1e-9)) * 1e6;
            sample.extra.push(("added_wall_us_per_task".to_owned(), added_us));
            if let (Some(rated), Some(plain)) = (rated.cpu_us_per_task, plain.cpu_us_per_task) {
                sample.extra.push(("norate_cpu_us_per_task".to_owned(), plain));
                sample.extra.push(("added_cpu_us_per_task".to_owned(), rated - plain));
            }
            Ok(sample)
        }
        Impl::Raw => super::e2e(env, Impl::Raw, n, 64, None).await,
        Impl::Apalis => Err("apalis runs only in the worker-process workloads".into()),
    }
}

/// `e2e_c64` with natasks, the rate set (before the worker starts) or not.
async fn e2e_c64(env: &Env, n: usize, rated: bool) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let counters = format!("{}_RATES_MINUTE", layout.stream);
        let result = e2e_c64_in(env, &layout, client, n, rated).await;
        if rated {
            if let Err(err) = env.publish.delete_stream(&counters).await {
                eprintln!("natasks-bench: could not delete stream {counters}: {err}");
            }
        }
        result
    })
    .await
}

async fn e2e_c64_in(
    env: &Env,
    layout: &Layout,
    client: natasks::Client,
    n: usize,
    rated: bool,
) -> Res<Sample> {
    let done = Done::new(n, None);
    let handler = {
        let done = done.clone();
        move |_task: Task| {
            done.hit();
            std::future::ready(Ok::<(), HandlerError>(()))
        }
    };
    // As `Consumer::start` builds it for e2e_c64.
    let worker = Worker::builder(env.consume.clone(), QUEUE)
        .stream_name(layout.stream.clone())
        .subject_prefix(layout.prefix.clone())
        .concurrency(64)
        .fetch_batch(128)
        .handle(TASK_NAME, handler)
        .build()
        .await?;
    if rated {
        // Set before the worker runs: it counts every start from the first.
        let rate = Rate::per_second(UNREACHED_RATE)?;
        Admin::new(env.publish.clone())
            .stream_name(layout.stream.clone())
            .subject_prefix(layout.prefix.clone())
            .set_rate(QUEUE, None, Some(rate))
            .await?;
    }
    let shutdown = worker.shutdown_handle();
    let task = tokio::spawn(async move { worker.run().await });
    let consumer = Consumer::Natasks { shutdown, task };
    let dispatcher = Dispatcher::new(Impl::Natasks, env, layout, &client);
    let (sample, waited) = drive(dispatcher, consumer, n, &done).await?;
    waited?;
    if rated {
        // Every start was counted: the counter stream holds a counter per second.
        let mut stream = env.publish.get_stream(format!("{}_RATES_MINUTE", layout.stream)).await?;
        if stream.info().await?.state.messages == 0 {
            return Err("the rate counted no start".into());
        }
    }
    Ok(sample)
}

/// Queues of `many_queues_500`.
const MANY: usize = 500;
/// Tasks per queue of `many_queues_500`.
const PER_QUEUE: usize = 20;
/// Slots of the `many_queues_500` worker.
const MANY_SLOTS: usize = 64;

/// `many_queues_500`.
pub async fn many_queues(env: &Env, imp: Impl) -> Res<Sample> {
    if imp == Impl::Apalis {
        return Err("apalis runs only in the worker-process workloads".into());
    }
    env.with_stream(|layout, client| async move {
        let n = MANY * PER_QUEUE;
        let done = Done::new(n, None);
        let names: Vec<String> = (0..MANY).map(|i| format!("q{i:03}")).collect();
        let (rss_before, _) = memory_kb()?;
        let setup = Instant::now();
        let running = match imp {
            Impl::Natasks => {
                let handler = {
                    let done = done.clone();
                    move |_task: Task| {
                        done.hit();
                        std::future::ready(Ok::<(), HandlerError>(()))
                    }
                };
                let mut builder = Worker::builder(env.consume.clone(), &names[0])
                    .stream_name(layout.stream.clone())
                    .subject_prefix(layout.prefix.clone())
                    .concurrency(MANY_SLOTS)
                    .handle(TASK_NAME, handler);
                for name in &names[1..] {
                    builder = builder.queue(name.clone(), 1);
                }
                Running::natasks(builder.build().await?).start()
            }
            _ => {
                let slots = Arc::new(Semaphore::new(MANY_SLOTS));
                let mut tasks = Vec::with_capacity(MANY);
                for name in &names {
                    let consumer = raw_consumer(env, &layout, name).await?;
                    let (done, slots) = (done.clone(), slots.clone());
                    tasks.push(tokio::spawn(async move {
                        let in_lane = done.clone();
                        let result = raw_lane(consumer, 2, slots, move |message| {
                            let done = in_lane.clone();
                            async move {
                                done.hit();
                                message.ack().await.map_err(|e| e.to_string())
                            }
                        })
                        .await;
                        if let Err(err) = result {
                            done.fail(format!("raw consumer failed: {err}"));
                        }
                    }));
                }
                Running::Raw(tasks)
            }
        };
        let set_up = setup.elapsed();
        let publishers: Vec<Publisher> =
            names.iter().map(|q| publisher(env, &layout, imp, &client, q, TASK_NAME)).collect();
        let start = Instant::now();
        let publishers = &publishers;
        let mut published = futures_util::stream::iter(0..n)
            .map(|i| publishers[i % MANY].one(Bytes::from_static(PAYLOAD)))
            .buffer_unordered(PUBLISH_IN_FLIGHT);
        let mut failed = None;
        while let Some(result) = published.next().await {
            if let Err(err) = result {
                failed.get_or_insert(err);
            }
        }
        drop(published);
        let waited = match failed {
            Some(err) => Err(err),
            None => done.wait(limit_for(n)).await,
        };
        let elapsed = start.elapsed();
        let (rss_after, _) = memory_kb()?;
        let mut stream = env.publish.get_stream(&layout.stream).await?;
        let consumers = stream.info().await?.state.consumer_count;
        running.stop().await?;
        waited?;
        eprintln!(
            "many_queues_500 {}: set up {MANY} queues in {set_up:?}; {n} tasks in {elapsed:?}; {consumers} consumers; RSS {rss_before} -> {rss_after} kB",
            imp.name()
        );
        let mut sample = Sample { per_s: n as f64 / elapsed.as_secs_f64(), ..Default::default() };
        sample.extra.push(("rss_growth_kb".to_owned(), rss_after as f64 - rss_before as f64));
        sample.extra.push(("consumer_count".to_owned(), consumers as f64));
        sample.extra.push(("setup_ms".to_owned(), set_up.as_secs_f64() * 1e3));
        Ok(sample)
    })
    .await
}
