//! The dispatching side: [`Client`] publishes tasks into queues.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures_util::FutureExt;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::error::{DispatchError, DispatchErrorKind, SetupError};
use crate::middleware::{
    dispatch_layer, Dispatch, DispatchFinal, DispatchLayer, DispatchNext, Propagator,
};
use crate::observe::{Dispatched, Observer, Observers};
use crate::schedule::{self, DueTime};
use crate::stream::StreamSettings;
use crate::task::Task;
use crate::track::client::TrackedDispatch;
use crate::track::Tracker;
mod batch;
mod guarded;
mod prepare;

pub use self::batch::Batch;
pub(crate) use self::prepare::Prepared;
use self::prepare::{publish_error, About, Rejected};
use crate::batch::Outgoing;
use crate::guard::Guard;

/// Publishes tasks into queues. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # async fn example(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use natasks::{Client, Task};
///
/// let client = Client::new(js).await?;
/// client.dispatch(Task::new("emails.send", "hello"), "emails").await?;
/// client.dispatch_in(Task::new("emails.reminder", "later"), "emails", Duration::from_secs(60)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What the server said of a dispatched task.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// The task id: its message id when one was set, else one natasks made (see
    /// [`Task::id`]). Status, results and cancellation of a tracked task go by it.
    pub id: String,
    /// The stream sequence the task was stored at; `None` when a dispatch middleware ended
    /// the dispatch without publishing.
    pub sequence: Option<u64>,
    /// The server dropped the task as a duplicate of one with the same message id, stored
    /// within the duplicate window (`sequence` is then the original's); or, for a unique or
    /// throttled task dispatched with [`Task::return_existing`], the key was held and this is
    /// the receipt of the task that holds it (`id` and `sequence` are that task's).
    pub duplicate: bool,
}

struct Inner {
    layers: Arc<[DispatchLayer]>,
    publisher: Arc<Publisher>,
    /// The end of the middleware chain, built once: publishes through `publisher`.
    publish: DispatchFinal,
}

/// Turns a dispatch into a stored message.
struct Publisher {
    js: jetstream::Context,
    stream: StreamSettings,
    schedules: bool,
    /// The stream stores atomic batches and markers (nats-server 2.12+).
    atomic: bool,
    /// The stream honours per-message TTLs (nats-server 2.11+).
    ttl: bool,
    propagator: Option<Arc<dyn Propagator>>,
    observers: Observers,
    tracker: Arc<Tracker>,
}

impl Client {
    /// A client with default settings (stream `NATASKS`, subjects `natasks.<queue>`).
    /// Creates the stream if it does not exist.
    pub async fn new(js: jetstream::Context) -> Result<Self, SetupError> {
        Self::builder(js).build().await
    }

    /// A builder for a client with non-default settings.
    pub fn builder(js: jetstream::Context) -> ClientBuilder {
        ClientBuilder {
            js,
            stream: StreamSettings::default(),
            layers: Vec::new(),
            propagator: None,
            observers: Observers::default(),
        }
    }

    /// Publishes `task` to `queue` (an empty queue name means `default`) and waits for the
    /// server to confirm it is stored.
    ///
    /// A task a handler received can be dispatched again (to forward it, or with
    /// [`dispatch_in`](Self::dispatch_in) to look at it again later): that is a new message,
    /// without the message id and the server's `Nats-*` headers the task arrived with (see
    /// [`Task`]), so it is not dropped as a duplicate of the original.
    pub async fn dispatch(&self, task: Task, queue: &str) -> Result<Receipt, DispatchError> {
        self.run(Dispatch::new(task, queue, None)).await
    }

    /// Publishes `task` to be delivered to `queue` after `delay` (immediately when the delay
    /// is zero). Uses JetStream message schedules: needs nats-server 2.12 or newer.
    ///
    /// A delay that puts the due time after the year 2261 (UTC) fails with
    /// [`DispatchErrorKind::InvalidDueTime`] and publishes nothing: nats-server holds a
    /// schedule's time in nanoseconds since 1970, which end in April 2262.
    pub async fn dispatch_in(
        &self,
        task: Task,
        queue: &str,
        delay: Duration,
    ) -> Result<Receipt, DispatchError> {
        if delay.is_zero() {
            return self.dispatch(task, queue).await;
        }
        let due = schedule::due_in(delay)?;
        self.run(Dispatch::new(task, queue, Some(due))).await
    }

    /// Publishes `task` to be delivered to `queue` at `at` (immediately when `at` is not in
    /// the future). Accepts an [`OffsetDateTime`] or a [`std::time::SystemTime`] (see
    /// [`DueTime`]).
    ///
    /// A time after the year 2261 (UTC) fails with [`DispatchErrorKind::InvalidDueTime`]
    /// and publishes nothing: nats-server holds a schedule's time in nanoseconds since 1970,
    /// which end in April 2262.
    pub async fn dispatch_at(
        &self,
        task: Task,
        queue: &str,
        at: impl DueTime,
    ) -> Result<Receipt, DispatchError> {
        let at = at.into_due_time()?;
        let due = (at > OffsetDateTime::now_utc()).then_some(at);
        self.run(Dispatch::new(task, queue, due)).await
    }

    /// Whether the NATS connection is currently up.
    pub fn is_ready(&self) -> bool {
        self.inner.publisher.js.client().connection_state()
            == async_nats::connection::State::Connected
    }

    /// The connection and the stream layout: the door through which periodic schedules
    /// (`crate::periodic`) reach JetStream.
    pub(crate) fn stream(&self) -> (&jetstream::Context, &StreamSettings) {
        (&self.inner.publisher.js, &self.inner.publisher.stream)
    }

    /// Whether the stream stores atomic batches and markers: what workflows need.
    pub(crate) fn atomic(&self) -> bool {
        self.inner.publisher.atomic
    }

    /// Turns `task` into the message(s) [`dispatch`](Self::dispatch) (or, with `due`,
    /// [`dispatch_at`](Self::dispatch_at)) would publish, with every header it would
    /// write (id, tracking, propagated context, queue and name, schedule), for a caller that
    /// publishes it in an atomic batch of its own. Dispatch middleware does not run; the
    /// propagator does. A tracked task's records are the caller's to write, through
    /// [`Prepared::track`] and [`tracker`](Self::tracker).
    pub(crate) fn outgoing(
        &self,
        task: Task,
        queue: &str,
        due: Option<OffsetDateTime>,
    ) -> Result<Prepared, DispatchError> {
        self.inner.publisher.prepare(Dispatch::new(task, queue, due)).map_err(|r| r.error)
    }

    /// The door through which task lifecycle operations (`crate::track`) reach the broker.
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.inner.publisher.tracker
    }

    /// Dispatches through the middleware and the observers.
    ///
    /// The futures of the paths most dispatches never take (OpenTelemetry, middleware,
    /// guards, tracking) are boxed, so that a plain dispatch's future stays small: callers
    /// keep many in flight (`join_all`, `buffer_unordered`), and every one of them is moved
    /// into place whole.
    fn run(
        &self,
        dispatch: Dispatch,
    ) -> impl Future<Output = Result<Receipt, DispatchError>> + Send + '_ {
        use futures_util::future::Either;
        #[cfg(feature = "opentelemetry")]
        let otel = self.inner.publisher.propagator.as_deref().and_then(|p| p.as_otel()).is_some();
        #[cfg(not(feature = "opentelemetry"))]
        let otel = false;
        if otel || !self.inner.layers.is_empty() {
            return Either::Left(Box::pin(self.run_layered(dispatch)));
        }
        // Prepared in the span, as it would be under middleware (a propagator may read it).
        let span = dispatch_span(&dispatch);
        let publisher = &self.inner.publisher;
        let started = publisher.clock();
        let prepared = span.in_scope(|| publisher.prepare(dispatch));
        // `map`, not an `async` block awaiting it: that would hold the future twice.
        Either::Right(publisher.send(prepared, started).map(note_failure).instrument(span))
    }

    /// [`run`](Self::run) with middleware or the OpenTelemetry propagator.
    async fn run_layered(&self, dispatch: Dispatch) -> Result<Receipt, DispatchError> {
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = self.inner.publisher.propagator.as_deref().and_then(|p| p.as_otel()) {
            return self.run_otel(otel, dispatch).await;
        }
        let span = dispatch_span(&dispatch);
        self.run_in(dispatch).instrument(span).await
    }

    /// [`run`](Self::run) with the OpenTelemetry propagator: a producer span per dispatch.
    #[cfg(feature = "opentelemetry")]
    async fn run_otel(
        &self,
        otel: &crate::otel::OtelPropagator,
        dispatch: Dispatch,
    ) -> Result<Receipt, DispatchError> {
        {
            // The tracing span is a child of the OpenTelemetry span, should a
            // tracing-opentelemetry layer see it.
            let cx = otel.start_dispatch(&dispatch.queue, &dispatch.task, dispatch.due.is_some());
            let span = dispatch_span(&dispatch);
            crate::otel::adopt(&span, &cx);
            let result = if self.inner.layers.is_empty() {
                // Only natasks runs until the task is stored, so the span's context needs
                // to be current only while the task is prepared (the propagator writes it
                // into the headers), not on every poll of the publish.
                let publisher = &self.inner.publisher;
                let started = publisher.clock();
                let prepared = {
                    let _current = cx.clone().attach();
                    publisher.prepare(dispatch)
                };
                async {
                    let stored = publisher.send(prepared, started).await;
                    if let Some(sequence) = stored.as_ref().ok().and_then(|r| r.sequence) {
                        crate::otel::set_sequence(&cx, sequence);
                    }
                    note_failure(stored)
                }
                .instrument(span)
                .await
            } else {
                // Middleware runs in the span's context.
                use opentelemetry::trace::FutureExt as _;
                self.run_in(dispatch).with_context(cx.clone()).instrument(span).await
            };
            crate::otel::end_dispatch(&cx, result.as_ref().err());
            result
        }
    }

    async fn run_in(&self, dispatch: Dispatch) -> Result<Receipt, DispatchError> {
        note_failure(if self.inner.layers.is_empty() {
            self.inner.publisher.publish(dispatch).await
        } else {
            self.run_layers(dispatch).await
        })
    }

    /// Dispatches through the middleware chain.
    async fn run_layers(&self, mut dispatch: Dispatch) -> Result<Receipt, DispatchError> {
        // The end of the chain leaves the receipt here; middleware sees only `()`.
        let slot = Arc::new(OnceLock::new());
        let id = dispatch.id().to_owned();
        dispatch.receipt = Some(slot.clone());
        let next = DispatchNext::new(self.inner.layers.clone(), self.inner.publish.clone());
        next.run(dispatch).await.map(|()| {
            slot.get().cloned().unwrap_or(Receipt { id, sequence: None, duplicate: false })
        })
    }
}

/// Marks the current (dispatch) span failed and logs why, if the dispatch failed.
fn note_failure<T>(result: Result<T, DispatchError>) -> Result<T, DispatchError> {
    if let Err(err) = &result {
        tracing::Span::current().record("otel.status_code", "ERROR");
        tracing::debug!(error = %err, "dispatch failed");
    }
    result
}

fn dispatch_span(dispatch: &Dispatch) -> tracing::Span {
    tracing::debug_span!(
        "natasks.dispatch",
        queue = dispatch.queue.as_str(),
        task = dispatch.task.name(),
        message_id = dispatch.task.dispatch_id(),
        delayed = dispatch.due.is_some(),
        stream_sequence = tracing::field::Empty,
        "messaging.system" = "nats",
        "messaging.operation" = "publish",
        "messaging.destination.name" = dispatch.queue.as_str(),
        "natasks.task" = dispatch.task.name(),
        "otel.kind" = "producer",
        "otel.status_code" = tracing::field::Empty,
    )
}

impl Publisher {
    /// Prepares and publishes `dispatch`.
    async fn publish(&self, dispatch: Dispatch) -> Result<Receipt, DispatchError> {
        let started = self.clock();
        let prepared = self.prepare(dispatch);
        self.send(prepared, started).await
    }

    /// The start of a dispatch, if observers want its duration.
    fn clock(&self) -> Option<Instant> {
        (!self.observers.is_empty()).then(Instant::now)
    }

    /// Publishes a prepared dispatch and tells the observers how it went, timed from
    /// `started` (taken before it was prepared).
    ///
    /// A plain task (no guard, not tracked) is stored by a future that holds only its
    /// message; the others' futures are boxed (see [`Client::run`]).
    fn send(
        &self,
        prepared: Result<Prepared, Rejected>,
        started: Option<Instant>,
    ) -> impl Future<Output = Result<Receipt, DispatchError>> + Send + '_ {
        enum Route<'a> {
            Plain(Outgoing, About, String),
            Special(futures_util::future::BoxFuture<'a, (Result<Receipt, DispatchError>, About)>),
            Refused(DispatchError, About),
        }
        let route = match prepared {
            Ok(Prepared { message, marker: None, guard: None, about, id, track: None }) => {
                Route::Plain(message, about, id)
            }
            Ok(Prepared { message, marker, guard, about, id, track }) => {
                Route::Special(Box::pin(async move {
                    let marker = marker.zip(guard);
                    (self.store_special(message, marker, &about, id, track).await, about)
                }))
            }
            Err(Rejected { error, about }) => Route::Refused(error, about),
        };
        async move {
            let (result, about) = match route {
                Route::Plain(message, about, id) => {
                    (self.store_plain(message, &about, id).await, about)
                }
                Route::Special(storing) => storing.await,
                Route::Refused(error, about) => (Err(error), about),
            };
            self.observe(started, &about, &result);
            result
        }
    }

    /// Tells the observers how a dispatch went, if they want to know.
    fn observe(
        &self,
        started: Option<Instant>,
        about: &About,
        result: &Result<Receipt, DispatchError>,
    ) {
        if let Some(started) = started {
            self.observers.dispatched(&Dispatched {
                queue: &about.queue,
                task: &about.task,
                delayed: about.delayed,
                elapsed: started.elapsed(),
                error: result.as_ref().err(),
            });
        }
    }

    /// Stores a task with a guard or a tracking record (see [`store`](Self::store) and
    /// [`store_tracked`](Self::store_tracked)); a debounced task records the tracked task it
    /// replaced as cancelled.
    async fn store_special(
        &self,
        message: Outgoing,
        marker: Option<(Outgoing, Box<Guard>)>,
        about: &About,
        id: String,
        track: Option<TrackedDispatch>,
    ) -> Result<Receipt, DispatchError> {
        let replaces = self.debounced_schedule(&message).await;
        let stored = match track {
            None => self.store(message, marker, about, id).await,
            Some(track) => self.store_tracked(message, marker, about, id, track).await,
        };
        if let (Ok(receipt), Some(replaced)) = (&stored, replaces) {
            if replaced != receipt.id {
                crate::track::client::replaced(&self.tracker, &replaced).await;
            }
        }
        stored
    }

    /// For a debounced task, the id of the tracked task whose schedule it is about to
    /// replace: that task never runs, and is recorded as cancelled once the new one is
    /// stored. (Two dispatches racing on the key may both see the same predecessor; the
    /// one replaced in between then keeps its `scheduled` record until its retention.)
    async fn debounced_schedule(&self, message: &Outgoing) -> Option<String> {
        message.headers.get(crate::wire::HEADER_DEBOUNCE_KEY)?;
        let stream = self.js.get_stream_no_info(&self.stream.name).await.ok()?;
        let previous = stream.get_last_raw_message_by_subject(&message.subject).await.ok()?;
        previous.headers.get(crate::wire::HEADER_TRACK)?;
        crate::wire::task_id(&previous.headers).map(str::to_owned)
    }

    /// Publishes a tracked task between its `dispatched` event and its first record.
    async fn store_tracked(
        &self,
        message: Outgoing,
        marker: Option<(Outgoing, Box<Guard>)>,
        about: &About,
        id: String,
        track: TrackedDispatch,
    ) -> Result<Receipt, DispatchError> {
        if let Err(err) = self.tracker.store().await {
            let message = format!(
                "task {:?} for queue {:?} cannot be tracked: {err}",
                about.task, about.queue
            );
            return Err(DispatchError::with_source(
                DispatchErrorKind::TrackingUnavailable,
                message,
                err,
            ));
        }
        track.announce(&self.tracker).await;
        let stored = self.store(message, marker, about, id).await;
        match &stored {
            Ok(receipt) => {
                let sequence = receipt.sequence.unwrap_or_default();
                track.stored(&self.tracker, sequence, receipt.duplicate).await;
            }
            Err(err) => track.refused(&self.tracker, err).await,
        }
        stored
    }

    /// Stores a prepared task: alone by a plain publish, or with its guard marker in one
    /// atomic batch.
    async fn store(
        &self,
        message: Outgoing,
        marker: Option<(Outgoing, Box<Guard>)>,
        about: &About,
        id: String,
    ) -> Result<Receipt, DispatchError> {
        match marker {
            Some((marker, guard)) => self.store_guarded(marker, message, &guard, about, id).await,
            None => self.store_plain(message, about, id).await,
        }
    }

    /// Stores a task alone, by a plain publish awaiting the server's ack.
    async fn store_plain(
        &self,
        message: Outgoing,
        about: &About,
        id: String,
    ) -> Result<Receipt, DispatchError> {
        let Outgoing { subject, headers, payload } = message;
        let message = PublishMessage::build().payload(payload).headers(headers);
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|err| publish_error(about, err))?
            .await
            .map_err(|err| publish_error(about, err))?;
        tracing::Span::current().record("stream_sequence", ack.sequence);
        tracing::debug!(duplicate = ack.duplicate, "task stored");
        Ok(Receipt { id, sequence: Some(ack.sequence), duplicate: ack.duplicate })
    }
}

/// Configures a [`Client`]. Created by [`Client::builder`].
#[must_use]
pub struct ClientBuilder {
    js: jetstream::Context,
    stream: StreamSettings,
    layers: Vec<DispatchLayer>,
    propagator: Option<Arc<dyn Propagator>>,
    observers: Observers,
}

impl ClientBuilder {
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

    /// Replicas of a stream natasks creates (1 to 5; use 3 on a cluster). Default: 1.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.stream.replicas = replicas;
        self
    }

    /// How long the stream remembers message ids for deduplication, for a stream natasks
    /// creates. Default: the server's (2 minutes).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.stream.duplicate_window = Some(window);
        self
    }

    /// Adds a dispatch middleware; middleware runs in the order added.
    pub fn middleware<F, Fut>(mut self, middleware: F) -> Self
    where
        F: Fn(Dispatch, DispatchNext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), DispatchError>> + Send + 'static,
    {
        self.layers.push(dispatch_layer(middleware));
        self
    }

    /// Sets the propagator that writes context into headers on dispatch.
    pub fn propagator(mut self, propagator: impl Propagator) -> Self {
        self.propagator = Some(Arc::new(propagator));
        self
    }

    /// Adds an observer that sees every dispatch (for metrics).
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observers.push(observer);
        self
    }

    /// Validates the settings and creates (or adopts) the stream.
    pub async fn build(self) -> Result<Client, SetupError> {
        self.stream.validate()?;
        let state = self.stream.ensure(&self.js).await?;
        let tracker = Arc::new(Tracker::new(self.js.clone(), self.stream.clone()));
        let publisher = Arc::new(Publisher {
            tracker,
            js: self.js,
            stream: self.stream,
            schedules: state.schedules,
            atomic: state.atomic,
            ttl: state.ttl,
            propagator: self.propagator,
            observers: self.observers,
        });
        let end = publisher.clone();
        let publish: DispatchFinal = Arc::new(move |mut dispatch: Dispatch| {
            let publisher = end.clone();
            let slot = dispatch.receipt.take();
            async move {
                let receipt = publisher.publish(dispatch).await?;
                // The dispatch span's context is current while middleware runs.
                #[cfg(feature = "opentelemetry")]
                if let (Some(sequence), Some(_)) =
                    (receipt.sequence, publisher.propagator.as_deref().and_then(|p| p.as_otel()))
                {
                    crate::otel::set_sequence(&opentelemetry::Context::current(), sequence);
                }
                if let Some(slot) = slot {
                    let _ = slot.set(receipt);
                }
                Ok(())
            }
            .boxed()
        });
        Ok(Client { inner: Arc::new(Inner { layers: self.layers.into(), publisher, publish }) })
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A client whose connection never comes up: enough to build futures, not to send.
    async fn offline_client() -> (Client, jetstream::Context) {
        let connection = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("a client that retries in the background");
        let js = jetstream::new(connection);
        let stream = StreamSettings::default();
        let publisher = Arc::new(Publisher {
            js: js.clone(),
            stream: stream.clone(),
            schedules: true,
            atomic: true,
            ttl: true,
            propagator: None,
            observers: Observers::default(),
            tracker: Arc::new(Tracker::new(js.clone(), stream)),
        });
        let end = publisher.clone();
        let publish: DispatchFinal = Arc::new(move |dispatch: Dispatch| {
            let publisher = end.clone();
            async move { publisher.publish(dispatch).await.map(drop) }.boxed()
        });
        let inner = Inner { layers: Arc::from(Vec::new()), publisher, publish };
        (Client { inner: Arc::new(inner) }, js)
    }

    /// A plain dispatch's future is moved whole wherever callers keep it (`join_all`,
    /// `buffer_unordered`, a spawned task): it must stay near the size of async-nats' own
    /// publish future, not carry the state of the guarded, tracked and middleware paths.
    #[tokio::test]
    async fn a_dispatch_future_stays_small() {
        let (client, js) = offline_client().await;
        let publish = js.publish("natasks.default", bytes::Bytes::new());
        let dispatch = client.dispatch(Task::new("t", "x"), "q");
        let (publish, dispatch) =
            (std::mem::size_of_val(&publish), std::mem::size_of_val(&dispatch));
        assert!(
            dispatch <= 2 * publish,
            "a dispatch future takes {dispatch} bytes, async-nats' publish future {publish}"
        );
    }
}
