//! Prometheus metrics (cargo feature `metrics`).
//!
//! [`Metrics`] is an [`Observer`]: give it to a client and to workers and they count every
//! dispatch and processing attempt. [`QueueMetrics`] polls JetStream for the state of
//! queues (backlog, in flight, dead letters, age of the oldest task).
//!
//! ```no_run
//! # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
//! use natasks::metrics::{Metrics, QueueMetrics};
//! use natasks::{Client, Worker};
//!
//! // Once, at startup: install a `metrics` recorder, e.g. metrics-exporter-prometheus
//! // (see `Metrics::histogram_buckets` for the Go buckets).
//! let metrics = Metrics::new();
//! let client = Client::builder(js.clone()).observer(metrics.clone()).build().await?;
//! let worker = Worker::builder(js.clone(), "emails")
//!     .observer(metrics.clone())
//!     .handle("emails.send", |_task: natasks::Task| async { Ok::<_, natasks::HandlerError>(()) })
//!     .build()
//!     .await?;
//! let gauges = QueueMetrics::new(js, ["emails"]).spawn(); // polls until dropped
//! # Ok(()) }
//! ```
//!
//! # Metrics
//!
//! Names get the namespace (default `natasks`) and subsystem (default none) as prefixes,
//! joined with `_` as Prometheus' Go client does: `natasks_dispatch_total`. `status` is
//! `success` or `error` ([`Outcome::is_success`]).
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `dispatch_total` | counter | queue, task, status | dispatches (as the Go library) |
//! | `dispatch_duration_seconds` | histogram | queue, task, status | dispatch latency, until the server confirmed (as Go) |
//! | `process_total` | counter | queue, task, status | processing attempts (as Go) |
//! | `process_duration_seconds` | histogram | queue, task, status | attempt duration, receipt to outcome (as Go) |
//! | `process_inflight` | gauge | queue, task | attempts running now in this process (as Go) |
//! | `retries_total` | counter | queue, task | failed attempts that will be retried |
//! | `dead_letters_total` | counter | queue, task, reason | tasks moved to the dead-letter queue; `reason` as the `Natasks-Dead-Letter-Reason` header |
//! | `queue_pending` | gauge | queue | tasks waiting for their first delivery (from JetStream) |
//! | `queue_in_flight` | gauge | queue | tasks delivered and not yet settled: running, or waiting for a retry (from JetStream) |
//! | `queue_dlq_depth` | gauge | queue | tasks in the queue's dead-letter queue (from JetStream) |
//! | `queue_oldest_pending_age_seconds` | gauge | queue | age of the oldest task still in the queue, waiting, running or waiting for a retry; 0 when empty (from JetStream) |
//!
//! An attempt cut short by shutdown (handed back for redelivery) counts as `error`, as a
//! cancelled handler does in Go. A client with several observers, or two workers in one
//! process with their own [`Metrics`], add up into the same series: registering twice is
//! not an error.
//!
//! # Why the `metrics` facade
//!
//! natasks emits through the `metrics` crate, the facade most Rust services
//! already use (the way `log`/`tracing` are for logs): the library only emits, the
//! application picks the exporter (Prometheus with `metrics-exporter-prometheus`, or
//! StatsD, OpenTelemetry, ...) and installs it once. It follows that
//!
//! * there is no registry to pass around and nothing to register: two workers, two clients
//!   or two [`Metrics`] values in one process feed the same series, where an explicit
//!   registry (`prometheus`, `prometheus-client`) would refuse the second registration or
//!   need the caller to share one collector;
//! * without a recorder installed every call is a no-op, and the feature adds one small
//!   crate to the build;
//! * metric handles are looked up once per queue and task and cached, so the hot path is
//!   a hash lookup and a few atomic operations.
//!
//! The price is that the buckets of a histogram are the exporter's business: the
//! Prometheus exporter renders histograms as summaries unless buckets are set.
//! [`Metrics::histogram_buckets`] gives the full names and the buckets of
//! [`MetricsOptions`] (by default the Go client's [`DEFAULT_BUCKETS`]) to pass to
//! `PrometheusBuilder::set_buckets_for_metric`:
//!
//! ```ignore
//! let metrics = Metrics::new();
//! let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
//! for (name, buckets) in metrics.histogram_buckets() {
//!     builder = builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)?;
//! }
//! let handle = builder.install_recorder()?; // handle.render() is the exposition text
//! ```
//!
//! Install the recorder before the first dispatch or delivery: handles cached while no
//! recorder was installed stay no-ops.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once, PoisonError, RwLock};
use std::thread::LocalKey;
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, Unit};

use crate::observe::{Dispatched, Finished, Observer, Outcome, Started};

/// The default histogram buckets of Prometheus' Go client (`prometheus.DefBuckets`), in
/// seconds, which the Go library's histograms use.
pub const DEFAULT_BUCKETS: [f64; 11] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The default namespace: metric names start with `natasks_`.
pub const DEFAULT_NAMESPACE: &str = "natasks";

/// How often [`QueueMetrics`] polls JetStream by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(15);

/// Names and buckets of the metrics.
#[derive(Debug, Clone)]
pub struct MetricsOptions {
    namespace: String,
    subsystem: String,
    buckets: Vec<f64>,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            subsystem: String::new(),
            buckets: DEFAULT_BUCKETS.to_vec(),
        }
    }
}

impl MetricsOptions {
    /// Namespace `natasks`, no subsystem, [`DEFAULT_BUCKETS`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The first part of every name (empty for none). Default: `natasks`.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The part after the namespace (empty for none). Default: none.
    #[must_use]
    pub fn subsystem(mut self, subsystem: impl Into<String>) -> Self {
        self.subsystem = subsystem.into();
        self
    }

    /// Histogram buckets in seconds, for [`Metrics::histogram_buckets`]. Default:
    /// [`DEFAULT_BUCKETS`].
    #[must_use]
    pub fn buckets(mut self, buckets: impl IntoIterator<Item = f64>) -> Self {
        self.buckets = buckets.into_iter().collect();
        self
    }

    /// The full name of metric `name`: `<namespace>_<subsystem>_<name>` without the empty
    /// parts, as Prometheus' `BuildFQName`.
    pub fn full_name(&self, name: &str) -> String {
        [self.namespace.as_str(), self.subsystem.as_str(), name]
            .iter()
            .filter(|part| !part.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("_")
    }
}

/// Full metric names, built once.
#[derive(Debug)]
struct Names {
    dispatch_total: String,
    dispatch_duration: String,
    process_total: String,
    process_duration: String,
    process_inflight: String,
    retries_total: String,
    dead_letters_total: String,
}

impl Names {
    fn new(options: &MetricsOptions) -> Self {
        let n = |name| options.full_name(name);
        Self {
            dispatch_total: n("dispatch_total"),
            dispatch_duration: n("dispatch_duration_seconds"),
            process_total: n("process_total"),
            process_duration: n("process_duration_seconds"),
            process_inflight: n("process_inflight"),
            retries_total: n("retries_total"),
            dead_letters_total: n("dead_letters_total"),
        }
    }

    /// Sends the help texts to the recorder installed now.
    fn describe(&self) {
        let names = self;
        ::metrics::describe_counter!(
            names.dispatch_total.clone(),
            Unit::Count,
            "Tasks dispatched, by queue, task and status."
        );
        ::metrics::describe_histogram!(
            names.dispatch_duration.clone(),
            Unit::Seconds,
            "Time to dispatch a task, until the server confirmed it is stored."
        );
        ::metrics::describe_counter!(
            names.process_total.clone(),
            Unit::Count,
            "Processing attempts, by queue, task and status."
        );
        ::metrics::describe_histogram!(
            names.process_duration.clone(),
            Unit::Seconds,
            "Time from receiving a task to its outcome."
        );
        ::metrics::describe_gauge!(
            names.process_inflight.clone(),
            Unit::Count,
            "Tasks being processed in this process."
        );
        ::metrics::describe_counter!(
            names.retries_total.clone(),
            Unit::Count,
            "Failed attempts that will be retried."
        );
        ::metrics::describe_counter!(
            names.dead_letters_total.clone(),
            Unit::Count,
            "Tasks moved to the dead-letter queue, by reason."
        );
    }
}

/// A counter and a histogram for one status.
struct Series {
    total: Counter,
    duration: Histogram,
}

impl Series {
    fn new(total: &str, duration: &str, queue: &str, task: &str, status: &'static str) -> Self {
        let labels =
            [("queue", queue.to_owned()), ("task", task.to_owned()), ("status", status.to_owned())];
        Self {
            total: ::metrics::counter!(total.to_owned(), &labels),
            duration: ::metrics::histogram!(duration.to_owned(), &labels),
        }
    }

    fn observe(&self, elapsed: Duration) {
        self.total.increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

struct DispatchHandles {
    success: Series,
    error: Series,
}

struct ProcessHandles {
    success: Series,
    error: Series,
    inflight: Gauge,
    retries: Counter,
}

/// Handles by queue, then task name, shared by the clones of a [`Metrics`]; looked up
/// without allocating.
type Cache<H> = RwLock<HashMap<String, HashMap<String, Arc<H>>>>;

/// Handles used lately on one thread, for one kind of handles.
type Recent<H> = RefCell<RecentList<H>>;

/// How many (metrics, queue, task) handles a thread remembers per kind.
const RECENT: usize = 16;

/// Once the list is full, one miss in this many replaces an entry.
const REPLACE_EVERY: u32 = 64;

struct RecentList<H> {
    entries: Vec<RecentEntry<H>>,
    /// Misses since the list filled up.
    misses: u32,
}

struct RecentEntry<H> {
    /// [`Inner::id`] of the metrics the handles belong to.
    metrics: u64,
    queue: Box<str>,
    task: Box<str>,
    handles: Arc<H>,
}

thread_local! {
    // A thread sees few (queue, task) pairs; finding their handles here leaves the shared
    // cache's lock alone, which every thread would otherwise write to on every event.
    static RECENT_DISPATCH: Recent<DispatchHandles> =
        const { RefCell::new(RecentList { entries: Vec::new(), misses: 0 }) };
    static RECENT_PROCESS: Recent<ProcessHandles> =
        const { RefCell::new(RecentList { entries: Vec::new(), misses: 0 }) };
}

fn with_handles<H, T>(
    metrics: u64,
    (cache, recent): (&Cache<H>, &'static LocalKey<Recent<H>>),
    (queue, task): (&str, &str),
    make: impl FnOnce() -> H,
    f: impl FnOnce(&H) -> T,
) -> T {
    let found = |entry: &&RecentEntry<H>| {
        entry.metrics == metrics && &*entry.queue == queue && &*entry.task == task
    };
    let mut f = Some(f);
    let hit = recent
        .try_with(|recent| {
            let recent = recent.try_borrow().ok()?;
            let entry = recent.entries.iter().find(found)?;
            f.take().map(|f| f(&entry.handles))
        })
        .ok()
        .flatten();
    if let Some(value) = hit {
        return value;
    }
    let handles = shared_handles(cache, queue, task, make);
    let _ = recent.try_with(|recent| {
        let Ok(mut recent) = recent.try_borrow_mut() else { return };
        let entry = || RecentEntry {
            metrics,
            queue: queue.into(),
            task: task.into(),
            handles: handles.clone(),
        };
        if recent.entries.len() < RECENT {
            recent.entries.push(entry());
            return;
        }
        // A thread cycling through more pairs than it keeps would otherwise replace an
        // entry, and allocate, on every event; replacing on one miss in REPLACE_EVERY keeps
        // such misses as cheap as the shared map alone and still follows a changing mix.
        recent.misses = recent.misses.wrapping_add(1);
        if recent.misses % REPLACE_EVERY == 0 {
            let slot = (recent.misses / REPLACE_EVERY) as usize % RECENT;
            recent.entries[slot] = entry();
        }
    });
    let f = f.take().expect("not called on a miss");
    f(&handles)
}

fn shared_handles<H>(
    cache: &Cache<H>,
    queue: &str,
    task: &str,
    make: impl FnOnce() -> H,
) -> Arc<H> {
    {
        let map = cache.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(handles) = map.get(queue).and_then(|tasks| tasks.get(task)) {
            return handles.clone();
        }
    }
    let mut map = cache.write().unwrap_or_else(PoisonError::into_inner);
    map.entry(queue.to_owned())
        .or_default()
        .entry(task.to_owned())
        .or_insert_with(|| Arc::new(make()))
        .clone()
}

/// Gives every [`Metrics`] (and its clones) an id, for the per-thread handles.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Counts dispatches and processing attempts: an [`Observer`] for
/// [`ClientBuilder::observer`](crate::ClientBuilder::observer) and
/// [`WorkerBuilder::observer`](crate::WorkerBuilder::observer). Cheap to clone; clones
/// share their handle cache. See the [module docs](self) for the metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tells this metrics' handles from others' in the per-thread handles.
    id: u64,
    options: MetricsOptions,
    names: Names,
    /// Help texts go to the recorder when the first handles are made, not at construction:
    /// the recorder may be installed in between.
    described: Once,
    dispatch: Cache<DispatchHandles>,
    process: Cache<ProcessHandles>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").field("options", &self.inner.options).finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics with the default names (`natasks_...`) and buckets.
    pub fn new() -> Self {
        Self::with_options(MetricsOptions::default())
    }

    /// Metrics with other names or buckets.
    pub fn with_options(options: MetricsOptions) -> Self {
        let names = Names::new(&options);
        Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                options,
                names,
                described: Once::new(),
                dispatch: RwLock::default(),
                process: RwLock::default(),
            }),
        }
    }

    /// The options these metrics were made with.
    pub fn options(&self) -> &MetricsOptions {
        &self.inner.options
    }

    /// The full names of the two histograms with their buckets, for the exporter
    /// (`PrometheusBuilder::set_buckets_for_metric(Matcher::Full(name), buckets)`).
    pub fn histogram_buckets(&self) -> [(&str, &[f64]); 2] {
        let buckets = self.inner.options.buckets.as_slice();
        [
            (self.inner.names.dispatch_duration.as_str(), buckets),
            (self.inner.names.process_duration.as_str(), buckets),
        ]
    }

    fn dispatch_handles(&self, queue: &str, task: &str) -> DispatchHandles {
        let n = &self.inner.names;
        self.inner.described.call_once(|| n.describe());
        DispatchHandles {
            success: Series::new(&n.dispatch_total, &n.dispatch_duration, queue, task, "success"),
            error: Series::new(&n.dispatch_total, &n.dispatch_duration, queue, task, "error"),
        }
    }

    fn process_handles(&self, queue: &str, task: &str) -> ProcessHandles {
        let n = &self.inner.names;
        self.inner.described.call_once(|| n.describe());
        let labels = [("queue", queue.to_owned()), ("task", task.to_owned())];
        ProcessHandles {
            success: Series::new(&n.process_total, &n.process_duration, queue, task, "success"),
            error: Series::new(&n.process_total, &n.process_duration, queue, task, "error"),
            inflight: ::metrics::gauge!(n.process_inflight.clone(), &labels),
            retries: ::metrics::counter!(n.retries_total.clone(), &labels),
        }
    }
}

impl Observer for Metrics {
    fn dispatched(&self, event: &Dispatched<'_>) {
        let make = || self.dispatch_handles(event.queue, event.task);
        let handles = (&self.inner.dispatch, &RECENT_DISPATCH);
        with_handles(self.inner.id, handles, (event.queue, event.task), make, |h| {
            let series = if event.error.is_none() { &h.success } else { &h.error };
            series.observe(event.elapsed);
        });
    }

    fn started(&self, event: &Started<'_>) {
        let make = || self.process_handles(event.queue, event.task);
        let handles = (&self.inner.process, &RECENT_PROCESS);
        with_handles(self.inner.id, handles, (event.queue, event.task), make, |h| {
            h.inflight.increment(1.0);
        });
    }

    fn finished(&self, event: &Finished<'_>) {
        let make = || self.process_handles(event.queue, event.task);
        let handles = (&self.inner.process, &RECENT_PROCESS);
        with_handles(self.inner.id, handles, (event.queue, event.task), make, |h| {
            h.inflight.decrement(1.0);
            let series = if event.outcome.is_success() { &h.success } else { &h.error };
            series.observe(event.elapsed);
            if let Outcome::Retried(_) = event.outcome {
                h.retries.increment(1);
            }
        });
        if let Outcome::DeadLettered(reason) = event.outcome {
            ::metrics::counter!(
                self.inner.names.dead_letters_total.clone(),
                "queue" => event.queue.to_owned(),
                "task" => event.task.to_owned(),
                "reason" => reason.as_str(),
            )
            .increment(1);
        }
    }
}

mod queue;

pub use queue::{QueueMetrics, QueueMetricsHandle, QueueState};

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    fn dispatched(metrics: &Metrics, task: &str) {
        metrics.dispatched(&Dispatched {
            queue: "q",
            task,
            delayed: false,
            elapsed: Duration::from_millis(1),
            error: None,
        });
    }

    fn count(text: &str, name: &str, task: &str) -> Option<u64> {
        text.lines()
            .find(|l| {
                l.starts_with(name) && l.contains(&format!("task=\"{task}\",status=\"success\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Handles remembered per thread belong to one `Metrics`, and more (queue, task) pairs
    /// than a thread remembers still count right.
    #[test]
    fn per_thread_handles_keep_metrics_and_series_apart() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let a = Metrics::with_options(MetricsOptions::new().namespace("a"));
        let b = Metrics::with_options(MetricsOptions::new().namespace("b"));
        let tasks: Vec<String> = (0..RECENT + 4).map(|i| format!("t{i}")).collect();
        ::metrics::with_local_recorder(&recorder, || {
            for _ in 0..2 {
                for task in &tasks {
                    dispatched(&a, task);
                }
            }
            // The first pair is remembered for `a`: `b` must not take its handles.
            dispatched(&b, "t0");
        });
        let text = handle.render();
        for task in &tasks {
            assert_eq!(count(&text, "a_dispatch_total", task), Some(2), "{task}:\n{text}");
        }
        assert_eq!(count(&text, "b_dispatch_total", "t0"), Some(1), "{text}");
        assert_eq!(count(&text, "b_dispatch_total", "t1"), None, "{text}");
    }
}
