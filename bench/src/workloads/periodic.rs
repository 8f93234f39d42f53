//! `periodic_1000`: schedules fired by the server, once per tick; how late their tasks
//! are processed behind their tick.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, ReplayPolicy};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use natasks::{Every, HandlerError, Task, Worker};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use super::{Env, Impl, Lateness, Res, Sample, ACK_WAIT, PAYLOAD, PULL_EXPIRES, QUEUE, TASK_NAME};

/// The interval of every schedule.
const INTERVAL: Duration = Duration::from_secs(1);
/// Declarations (or raw publishes) in flight.
const DECLARE_IN_FLIGHT: usize = 64;
/// Slots of the consumer.
const SLOTS: usize = 64;

/// Lateness of every processed tick, in milliseconds.
#[derive(Default)]
struct Ticks(Mutex<Vec<f64>>);

impl Ticks {
    fn record(&self, tick: OffsetDateTime) {
        let late = (OffsetDateTime::now_utc() - tick).as_seconds_f64() * 1e3;
        self.0.lock().expect("ticks lock").push(late);
    }

    fn count(&self) -> usize {
        self.0.lock().expect("ticks lock").len()
    }

    fn lateness(&self) -> Option<Lateness> {
        let mut values = self.0.lock().expect("ticks lock").clone();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Some(Lateness { p50: at(0.5), p99: at(0.99), max: at(1.0) })
    }
}

/// `schedules` schedules, every one firing each second into one queue consumed with 64
/// slots, for `window`; lateness is processing time minus tick time. natasks declares
/// them with `Client::schedule` and its handler reads the tick with `Task::periodic`; raw
/// async-nats publishes the same schedule messages and reads the tick from the server's
/// `Nats-Schedule-Next` header (minus the interval). Tasks/s counts ticks processed in the
/// window.
pub async fn periodic(env: &Env, imp: Impl, schedules: usize, window: Duration) -> Res<Sample> {
    if imp == Impl::Apalis {
        return Err("apalis runs only in the worker-process workloads".into());
    }
    env.with_stream(|layout, client| async move {
        let ticks = Arc::new(Ticks::default());
        let running = match imp {
            Impl::Natasks => {
                let seen = ticks.clone();
                let worker = Worker::builder(env.consume.clone(), QUEUE)
                    .stream_name(layout.stream.clone())
                    .subject_prefix(layout.prefix.clone())
                    .concurrency(SLOTS)
                    .fetch_batch(SLOTS)
                    .handle(TASK_NAME, move |task: Task| {
                        if let Some(tick) = task.periodic() {
                            seen.record(tick.at);
                        }
                        std::future::ready(Ok::<(), HandlerError>(()))
                    })
                    .build()
                    .await?;
                let shutdown = worker.shutdown_handle();
                let join = tokio::spawn(async move { worker.run().await });
                Running::Natasks(shutdown, join)
            }
            Impl::Raw => {
                let stream = env.consume.get_stream(&layout.stream).await?;
                let consumer: PullConsumer = stream
                    .create_consumer(pull::Config {
                        durable_name: Some(format!("raw-{QUEUE}")),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: ACK_WAIT,
                        filter_subject: layout.subject.clone(),
                        max_ack_pending: 128,
                        replay_policy: ReplayPolicy::Instant,
                        ..Default::default()
                    })
                    .await?;
                Running::Raw(tokio::spawn(raw_consume(consumer, ticks.clone())))
            }
            Impl::Apalis => unreachable!("refused above"),
        };

        let start = Instant::now();
        let ids: Vec<String> = (0..schedules).map(|i| format!("bench-{i}")).collect();
        let mut declared = futures_util::stream::iter(ids.iter())
            .map(|id| {
                let client = client.clone();
                let (js, prefix, target) =
                    (env.publish.clone(), layout.prefix.clone(), layout.subject.clone());
                async move {
                    match imp {
                        Impl::Natasks => {
                            let task = Task::new(TASK_NAME, Bytes::from_static(PAYLOAD));
                            client.schedule(id, Every::interval(INTERVAL), task, QUEUE).await?;
                        }
                        Impl::Apalis => unreachable!("refused above"),
                        Impl::Raw => {
                            let mut headers = HeaderMap::new();
                            headers.insert("Nats-Schedule", "@every 1s");
                            headers.insert("Nats-Schedule-Target", target.as_str());
                            headers.insert(natasks::wire::HEADER_TASK, TASK_NAME);
                            headers.insert(natasks::wire::HEADER_QUEUE, QUEUE);
                            let subject = format!(
                                "{prefix}.{}.{}.{id}",
                                natasks::wire::SCHEDULE_TOKEN,
                                natasks::wire::PERIODIC_TOKEN
                            );
                            let payload = Bytes::from_static(PAYLOAD);
                            js.publish_with_headers(subject, headers, payload).await?.await?;
                        }
                    }
                    Res::Ok(())
                }
            })
            .buffer_unordered(DECLARE_IN_FLIGHT);
        while let Some(result) = declared.next().await {
            result?;
        }
        let declaring = start.elapsed();
        // The first ticks come a second after each declaration; count from the first.
        let counted_from = ticks.count();
        tokio::time::sleep(window).await;
        let counted = ticks.count() - counted_from;
        let lateness = ticks.lateness();
        running.stop().await?;
        eprintln!(
            "periodic_1000 {}: declared {schedules} schedules in {declaring:?}; {counted} ticks in {window:?}",
            imp.name()
        );
        // A window of n seconds holds n or n - 1 whole seconds of ticks.
        let expected = schedules as f64 * (window.as_secs_f64() / INTERVAL.as_secs_f64() - 1.0);
        if (counted as f64) < 0.9 * expected {
            return Err(format!("only {counted} ticks processed in {window:?}, expected about {expected:.0}").into());
        }
        Ok(Sample {
            per_s: counted as f64 / window.as_secs_f64(),
            lateness: Some(lateness.ok_or("no tick processed")?),
            ..Default::default()
        })
    })
    .await
}

enum Running {
    Natasks(natasks::ShutdownHandle, tokio::task::JoinHandle<Result<(), natasks::RunError>>),
    Raw(tokio::task::JoinHandle<Res<()>>),
}

impl Running {
    async fn stop(self) -> Res<()> {
        match self {
            Running::Natasks(shutdown, join) => {
                shutdown.shutdown();
                tokio::time::timeout(Duration::from_secs(60), join)
                    .await
                    .map_err(|_| "worker did not stop within 60s")???;
            }
            Running::Raw(join) => {
                join.abort();
                let _ = join.await;
            }
        }
        Ok(())
    }
}

/// Takes a slot, then the next message, and acks it in a task of its own, recording the
/// lateness of its tick (the next tick the server wrote, minus the interval).
async fn raw_consume(consumer: PullConsumer, ticks: Arc<Ticks>) -> Res<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(SLOTS)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_EXPIRES / 4)
        .messages()
        .await?;
    let slots = Arc::new(Semaphore::new(SLOTS));
    let interval = time::Duration::try_from(INTERVAL)?;
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let message = match messages.next().await {
            Some(Ok(message)) => message,
            Some(Err(err)) if err.kind() == MessagesErrorKind::MissingHeartbeat => continue,
            Some(Err(err)) => return Err(err.into()),
            None => return Err("pull stream ended".into()),
        };
        let ticks = ticks.clone();
        tokio::spawn(async move {
            let next = message.headers.as_ref().and_then(|h| h.get("Nats-Schedule-Next"));
            if let Some(next) = next.and_then(|n| OffsetDateTime::parse(n.as_str(), &Rfc3339).ok())
            {
                ticks.record(next - interval);
            }
            let _ = message.ack().await;
            drop(permit);
        });
    }
}
