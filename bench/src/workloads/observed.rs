//! `e2e_c64_observed`: the e2e workload with natasks' observability switched on, against
//! the same natasks run without it.
//!
//! Observed means what a service would run with both features: the Prometheus metrics
//! observer on the client and the worker (with a Prometheus recorder installed and
//! rendered every second, as a scrape would), the OpenTelemetry propagator on both, and a
//! tracing subscriber with the OpenTelemetry layer (`info,natasks=debug`, every trace
//! sampled) exporting through the SDK's batch processor to an in-memory exporter that is
//! emptied after each run.
//!
//! Knobs for breaking the cost down (defaults: everything on, every trace sampled):
//! `OBS_MODE=metrics|otel` turns on only the metrics observer or only OpenTelemetry;
//! `OBS_SAMPLE=0.1` samples that ratio of traces; `OBS_LAYER=lean` turns off the layer's
//! location, thread, target, level and busy/idle attributes.
//!
//! The subscriber is process-wide and cannot be removed, so it is installed once with a
//! filter that is off during plain runs (the plain run then pays a disabled-callsite check
//! per span and event, nanoseconds against tens of microseconds per task).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use natasks::metrics::Metrics;
use natasks::otel::opentelemetry::trace::TracerProvider as _;
use natasks::otel::{tracing_opentelemetry, OtelPropagator};
use natasks::{Client, HandlerError, Task, Worker};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::prelude::*;

use super::{
    limit_for, spawn_publisher, Consumer, CpuTime, Dispatcher, Done, Env, Impl, Res, Sample, QUEUE,
    TASK_NAME,
};

/// Whether the OpenTelemetry layer is on.
static OBSERVING: AtomicBool = AtomicBool::new(false);

struct Observability {
    metrics: Metrics,
    prometheus: PrometheusHandle,
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
}

fn observability() -> &'static Observability {
    static ONCE: OnceLock<Observability> = OnceLock::new();
    ONCE.get_or_init(|| {
        let metrics = Metrics::new();
        let mut builder = PrometheusBuilder::new();
        for (name, buckets) in metrics.histogram_buckets() {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
                .expect("buckets are not empty");
        }
        let prometheus = builder.install_recorder().expect("no other metrics recorder");
        let exporter = InMemorySpanExporter::default();
        let ratio: f64 =
            std::env::var("OBS_SAMPLE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
        let provider = SdkTracerProvider::builder()
            .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
                opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(ratio),
            )))
            .with_batch_exporter(exporter.clone())
            .build();
        let filter = tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
            OBSERVING.load(Ordering::Relaxed)
                && (*meta.level() <= tracing::Level::INFO || meta.target().starts_with("natasks"))
        });
        let lean = std::env::var("OBS_LAYER").as_deref() == Ok("lean");
        tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("natasks-bench"))
                    .with_location(!lean)
                    .with_threads(!lean)
                    .with_target(!lean)
                    .with_level(!lean)
                    .with_tracked_inactivity(!lean)
                    .with_filter(filter),
            )
            .init();
        Observability { metrics, prometheus, exporter, provider }
    })
}

fn mode() -> String {
    std::env::var("OBS_MODE").unwrap_or_default()
}

/// One e2e run with 64 slots: observed (metrics, OpenTelemetry) or plain natasks.
pub async fn e2e_observed(env: &Env, observed: bool, n: usize, concurrency: usize) -> Res<Sample> {
    let obs = observability();
    env.with_stream(|layout, plain_client| async move {
        let done = Done::new(n, None);
        let mut client = Client::builder(env.publish.clone())
            .stream_name(layout.stream.clone())
            .subject_prefix(layout.prefix.clone());
        let hit = done.clone();
        let mut worker = Worker::builder(env.consume.clone(), QUEUE)
            .stream_name(layout.stream.clone())
            .subject_prefix(layout.prefix.clone())
            .concurrency(concurrency)
            .fetch_batch(concurrency)
            .handle(TASK_NAME, move |_task: Task| {
                hit.hit();
                std::future::ready(Ok::<(), HandlerError>(()))
            });
        if observed {
            let mode = mode();
            if mode != "otel" {
                client = client.observer(obs.metrics.clone());
                worker = worker.observer(obs.metrics.clone());
            }
            if mode != "metrics" {
                client = client.propagator(OtelPropagator::new());
                worker = worker.propagator(OtelPropagator::new());
            }
        }
        let client = if observed { client.build().await? } else { plain_client };
        let worker = worker.build().await?;
        let shutdown = worker.shutdown_handle();
        let consumer =
            Consumer::Natasks { shutdown, task: tokio::spawn(async move { worker.run().await }) };

        OBSERVING.store(observed && mode() != "metrics", Ordering::Relaxed);
        // A scrape every second while observed.
        let scraper = observed.then(|| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    obs.prometheus.run_upkeep();
                    std::hint::black_box(obs.prometheus.render());
                }
            })
        });

        let dispatcher = Dispatcher::new(Impl::Natasks, env, &layout, &client);
        let cpu = CpuTime::now();
        let start = Instant::now();
        let publishing = spawn_publisher(dispatcher, n, None, done.clone());
        let waited = done.wait(limit_for(n)).await;
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        publishing.await?;
        consumer.stop().await?;
        if let Some(scraper) = scraper {
            scraper.abort();
        }
        OBSERVING.store(false, Ordering::Relaxed);
        if observed {
            obs.provider.force_flush()?;
            obs.exporter.reset();
        }
        waited?;
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            cpu_us_per_task,
            ..Default::default()
        })
    })
    .await
}
