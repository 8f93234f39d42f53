//! The cost of observability: the e2e workload with natasks' metrics and OpenTelemetry
//! switched on, against the same natasks run without them, and the cost of the W3C
//! `traceparent` header alone, measured with raw async-nats.
//!
//! Observed means what a service would run with both features: the Prometheus metrics
//! observer on the client and the worker (with a Prometheus recorder installed and
//! rendered every second, as a scrape would), the OpenTelemetry propagator on both (natasks
//! then starts its OpenTelemetry spans with the global tracer provider), and a tracing
//! subscriber with the OpenTelemetry layer for the application's own spans, natasks kept
//! out of it. The provider samples with `ParentBased(TraceIdRatioBased(ratio))`, the ratio
//! set by the workload, and exports through the SDK's batch processor to an exporter that
//! discards the spans, standing in for a production exporter (an in-memory exporter would
//! keep every span and grow the process).
//!
//! * `e2e_c64_observed`: 10% of traces sampled, every task carrying its trace context
//!   (`OtelPropagator::new()`);
//! * `e2e_c64_observed_all`: every trace sampled;
//! * `e2e_c64_observed_lean`: 10% sampled, only sampled tasks carrying trace context
//!   (`OtelPropagator::new().sampled_only()`);
//! * `e2e_c64_traceparent`: raw async-nats, every message with a `traceparent` header
//!   against the same run without it: what carrying the header costs the client and the
//!   server, natasks aside.
//!
//! Knobs for breaking the cost down: `OBS_MODE=metrics|otel` turns on only the metrics
//! observer or only OpenTelemetry; `OBS_SAMPLE=r` samples ratio `r` of traces in every
//! observed workload; `OBS_EXPORTER=memory` exports to the SDK's in-memory exporter
//! instead; `OBS_LAYER=natasks` lets the OpenTelemetry layer see natasks' tracing spans too
//! (they then become extra OpenTelemetry spans), `OBS_LAYER=none` turns the layer's filter
//! off; `OBS_PROPAGATE=none` starts spans but writes no headers; `OBS_PLAIN_HEADER=1` gives
//! the plain run a header the size of `traceparent`.
//!
//! The subscriber is process-wide and cannot be removed, so it is installed once with a
//! global filter that is off during plain runs (the plain run then pays a disabled-callsite
//! check per span and event, nanoseconds against tens of microseconds per task).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use natasks::metrics::Metrics;
use natasks::otel::opentelemetry::global;
use natasks::otel::opentelemetry::trace::TracerProvider as _;
use natasks::otel::opentelemetry::trace::{Link, SpanKind, TraceId};
use natasks::otel::opentelemetry::{Context as OtelContext, KeyValue};
use natasks::otel::{tracing_opentelemetry, OtelPropagator};
use natasks::{Client, HandlerError, Task, Worker};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, InMemorySpanExporter, Sampler, SamplingResult,
    SdkTracerProvider, ShouldSample, SpanData, SpanExporter,
};
use tracing_subscriber::prelude::*;

use super::{drive, Consumer, Dispatcher, Done, Env, Impl, Res, Sample, QUEUE, TASK_NAME};

/// How an observed run traces.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// The ratio of traces sampled (`OBS_SAMPLE` overrides it).
    pub sample: f64,
    /// Only sampled tasks carry trace context (`OtelPropagator::sampled_only`).
    pub sampled_only: bool,
}

/// The ratio the sampler uses now (bits of an `f64`): each run sets its own, the provider
/// is built once.
static RATIO: AtomicU64 = AtomicU64::new(0);

/// `TraceIdRatioBased` with the ratio of the current run.
#[derive(Debug, Clone)]
struct CurrentRatio;

impl ShouldSample for CurrentRatio {
    fn should_sample(
        &self,
        parent_context: Option<&OtelContext>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        Sampler::TraceIdRatioBased(f64::from_bits(RATIO.load(Ordering::Relaxed))).should_sample(
            parent_context,
            trace_id,
            name,
            span_kind,
            attributes,
            links,
        )
    }
}

/// Whether the OpenTelemetry layer is on.
static OBSERVING: AtomicBool = AtomicBool::new(false);

struct Observability {
    metrics: Metrics,
    prometheus: PrometheusHandle,
    exporter: Option<InMemorySpanExporter>,
    provider: SdkTracerProvider,
}

/// The batch processor's queue. The SDK's default (2,048 spans) holds about 20 ms of spans
/// when every trace is recorded at this rate, and the processor silently drops what does
/// not fit, which would make recording look cheaper than it is; a service at this rate
/// would raise it too. Runs that record every trace check that nothing was dropped.
const SPAN_QUEUE: usize = 16_384;

/// Spans the discarding exporter has received.
static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// A span exporter that drops what it gets, standing in for a production exporter (OTLP
/// over the network) without keeping every span in memory; it counts them.
#[derive(Debug, Default)]
struct DiscardingExporter;

impl SpanExporter for DiscardingExporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        EXPORTED.fetch_add(batch.len() as u64, Ordering::Relaxed);
        drop(std::hint::black_box(batch));
        std::future::ready(Ok(()))
    }
}

/// A batch processor for `exporter` with a queue of [`SPAN_QUEUE`] spans.
fn batch(exporter: impl SpanExporter + 'static) -> BatchSpanProcessor {
    BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().with_max_queue_size(SPAN_QUEUE).build())
        .build()
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
        let sampler = Sampler::ParentBased(Box::new(CurrentRatio));
        let memory = std::env::var("OBS_EXPORTER").as_deref() == Ok("memory");
        let exporter = memory.then(InMemorySpanExporter::default);
        let provider = match &exporter {
            Some(exporter) => {
                SdkTracerProvider::builder().with_span_processor(batch(exporter.clone()))
            }
            None => SdkTracerProvider::builder().with_span_processor(batch(DiscardingExporter)),
        }
        .with_sampler(sampler)
        .build();
        // natasks starts its spans with the global tracer provider.
        global::set_tracer_provider(provider.clone());
        // The application's own tracing spans go to OpenTelemetry through the layer;
        // natasks is kept out of it (its spans are native). OBS_LAYER=natasks lets the
        // layer see natasks' tracing spans too.
        let natasks_in_layer = std::env::var("OBS_LAYER").as_deref() == Ok("natasks");
        let no_layer = std::env::var("OBS_LAYER").as_deref() == Ok("none");
        let filter = tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| {
            !no_layer
                && OBSERVING.load(Ordering::Relaxed)
                && if meta.target().starts_with("natasks") {
                    natasks_in_layer
                } else {
                    *meta.level() <= tracing::Level::INFO
                }
        });
        // A global filter: a span no layer wants is not created at all (a per-layer filter
        // that disables everything still leaves the registry creating every span).
        tracing_subscriber::registry()
            .with(filter)
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("natasks-bench")))
            .init();
        Observability { metrics, prometheus, exporter, provider }
    })
}

/// W3C trace context, or (`OBS_PROPAGATE=none`) spans without headers, to tell the cost of
/// the headers from the cost of the spans.
fn propagator(setup: Setup) -> OtelPropagator {
    let propagator = if std::env::var("OBS_PROPAGATE").as_deref() == Ok("none") {
        OtelPropagator::with(natasks::otel::opentelemetry::trace::noop::NoopTextMapPropagator::new())
    } else {
        OtelPropagator::new()
    };
    if setup.sampled_only {
        propagator.sampled_only()
    } else {
        propagator
    }
}

/// Writes a header as large as `traceparent`, and reads nothing.
struct SameSizeHeader;

impl natasks::Propagator for SameSizeHeader {
    fn inject(&self, task: &mut Task) {
        task.set_header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    }
    fn extract(&self, _task: &mut Task) {}
}

fn mode() -> String {
    std::env::var("OBS_MODE").unwrap_or_default()
}

/// One e2e run: observed (metrics, OpenTelemetry as `setup` says) or plain natasks.
pub async fn e2e_observed(
    env: &Env,
    observed: bool,
    setup: Setup,
    n: usize,
    concurrency: usize,
) -> Res<Sample> {
    let obs = observability();
    let sample_ratio: f64 =
        std::env::var("OBS_SAMPLE").ok().and_then(|s| s.parse().ok()).unwrap_or(setup.sample);
    RATIO.store(f64::to_bits(sample_ratio), Ordering::Relaxed);
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
            .fetch_batch(2 * concurrency)
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
                client = client.propagator(propagator(setup));
                worker = worker.propagator(propagator(setup));
            }
        }
        // `OBS_PLAIN_HEADER=1`: the plain run carries a header the size of `traceparent`,
        // to tell the cost of the header from the cost of the spans.
        let plain_header = std::env::var("OBS_PLAIN_HEADER").as_deref() == Ok("1");
        let client = if observed {
            client.build().await?
        } else if plain_header {
            client.propagator(SameSizeHeader).build().await?
        } else {
            plain_client
        };
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
        let (sample, waited) = drive(dispatcher, consumer, n, &done).await?;
        if let Some(scraper) = scraper {
            scraper.abort();
        }
        OBSERVING.store(false, Ordering::Relaxed);
        let mut exported = 0;
        if observed {
            obs.provider.force_flush()?;
            exported = EXPORTED.swap(0, Ordering::Relaxed);
            if let Some(exporter) = &obs.exporter {
                exported = exporter.get_finished_spans()?.len() as u64;
                exporter.reset();
            }
        }
        waited?;
        // Every task has a dispatch and a process span when every trace is recorded.
        let expected = 2 * n as u64;
        if observed && sample_ratio >= 1.0 && mode() != "metrics" && exported < expected {
            return Err(format!(
                "the span processor dropped {} of {expected} spans; raise SPAN_QUEUE",
                expected - exported
            )
            .into());
        }
        Ok(sample)
    })
    .await
}

/// One raw async-nats e2e run, every message carrying a `traceparent` header or not.
pub async fn e2e_traceparent(
    env: &Env,
    with_header: bool,
    n: usize,
    concurrency: usize,
) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let done = Done::new(n, None);
        let consumer =
            Consumer::start(Impl::Raw, env, &layout, concurrency, None, done.clone()).await?;
        let mut dispatcher = Dispatcher::new(Impl::Raw, env, &layout, &client);
        if with_header {
            dispatcher = dispatcher.with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            );
        }
        let (sample, waited) = drive(dispatcher, consumer, n, &done).await?;
        waited?;
        Ok(sample)
    })
    .await
}
