//! The dispatching side: [`Client`] publishes tasks into queues.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, message::PublishMessage};
use futures_util::FutureExt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::error::{DispatchError, DispatchErrorKind, SetupError};
use crate::middleware::{
    dispatch_layer, Dispatch, DispatchFinal, DispatchLayer, DispatchNext, Propagator,
};
use crate::observe::{Dispatched, Observer, Observers};
use crate::stream::StreamSettings;
use crate::task::Task;
use crate::wire;

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
    propagator: Option<Arc<dyn Propagator>>,
    observers: Observers,
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
    pub async fn dispatch(&self, task: Task, queue: &str) -> Result<(), DispatchError> {
        self.run(Dispatch { task, queue: queue.to_owned(), due: None }).await
    }

    /// Publishes `task` to be delivered to `queue` after `delay` (immediately when the delay
    /// is zero). Uses JetStream message schedules: needs nats-server 2.12 or newer.
    pub async fn dispatch_in(
        &self,
        task: Task,
        queue: &str,
        delay: Duration,
    ) -> Result<(), DispatchError> {
        if delay.is_zero() {
            return self.dispatch(task, queue).await;
        }
        self.dispatch_at(task, queue, OffsetDateTime::now_utc() + delay).await
    }

    /// Publishes `task` to be delivered to `queue` at `at` (immediately when `at` is not in
    /// the future). Accepts an [`OffsetDateTime`] or a [`std::time::SystemTime`].
    pub async fn dispatch_at(
        &self,
        task: Task,
        queue: &str,
        at: impl Into<OffsetDateTime>,
    ) -> Result<(), DispatchError> {
        let at = at.into();
        let due = (at > OffsetDateTime::now_utc()).then_some(at);
        self.run(Dispatch { task, queue: queue.to_owned(), due }).await
    }

    /// Whether the NATS connection is currently up.
    pub fn is_ready(&self) -> bool {
        self.inner.publisher.js.client().connection_state()
            == async_nats::connection::State::Connected
    }

    async fn run(&self, dispatch: Dispatch) -> Result<(), DispatchError> {
        #[cfg(feature = "opentelemetry")]
        if let Some(otel) = self.inner.publisher.propagator.as_deref().and_then(|p| p.as_otel()) {
            use opentelemetry::trace::FutureExt as _;
            // The OpenTelemetry span is current for the whole dispatch (the propagator
            // injects its context); the tracing span is its child, should a
            // tracing-opentelemetry layer see it.
            let cx = otel.start_dispatch(&dispatch.queue, &dispatch.task, dispatch.due.is_some());
            let span = dispatch_span(&dispatch);
            crate::otel::adopt(&span, &cx);
            let result = self.run_in(dispatch).with_context(cx.clone()).instrument(span).await;
            crate::otel::end_dispatch(&cx, result.as_ref().err());
            return result;
        }
        let span = dispatch_span(&dispatch);
        self.run_in(dispatch).instrument(span).await
    }

    async fn run_in(&self, dispatch: Dispatch) -> Result<(), DispatchError> {
        let result = if self.inner.layers.is_empty() {
            self.inner.publisher.publish(dispatch).await
        } else {
            let next = DispatchNext::new(self.inner.layers.clone(), self.inner.publish.clone());
            next.run(dispatch).await
        };
        if let Err(err) = &result {
            tracing::Span::current().record("otel.status_code", "ERROR");
            tracing::debug!(error = %err, "dispatch failed");
        }
        result
    }
}

fn dispatch_span(dispatch: &Dispatch) -> tracing::Span {
    tracing::debug_span!(
        "natasks.dispatch",
        queue = dispatch.queue.as_str(),
        task = dispatch.task.name(),
        message_id = dispatch.task.message_id(),
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
    async fn publish(&self, dispatch: Dispatch) -> Result<(), DispatchError> {
        if self.observers.is_empty() {
            return self.store(dispatch).await;
        }
        let started = Instant::now();
        let (queue, task, delayed) =
            (dispatch.queue.clone(), dispatch.task.name().to_owned(), dispatch.due.is_some());
        let result = self.store(dispatch).await;
        self.observers.dispatched(&Dispatched {
            queue: wire::validate_queue(&queue).unwrap_or(&queue),
            task: &task,
            delayed,
            elapsed: started.elapsed(),
            error: result.as_ref().err(),
        });
        result
    }

    async fn store(&self, dispatch: Dispatch) -> Result<(), DispatchError> {
        // Everything is prepared before the first await, so the future holds only what the
        // publish needs: dispatch futures are many and small this way.
        let Prepared { subject, message, queue, task } = self.prepare(dispatch)?;
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|err| publish_error(&queue, &task, err))?
            .await
            .map_err(|err| publish_error(&queue, &task, err))?;
        tracing::Span::current().record("stream_sequence", ack.sequence);
        #[cfg(feature = "opentelemetry")]
        if self.propagator.is_some() {
            crate::otel::set_current_attribute(
                "stream_sequence",
                i64::try_from(ack.sequence).unwrap_or(i64::MAX),
            );
        }
        tracing::debug!(duplicate = ack.duplicate, "task stored");
        Ok(())
    }

    /// Validates the dispatch and turns it into the message to publish.
    fn prepare(&self, mut dispatch: Dispatch) -> Result<Prepared, DispatchError> {
        let queue = match wire::validate_queue(&dispatch.queue)? {
            wire::DEFAULT_QUEUE if dispatch.queue.is_empty() => wire::DEFAULT_QUEUE.to_owned(),
            _ => dispatch.queue,
        };
        wire::validate_task_name(dispatch.task.name())?;
        if let Some(propagator) = &self.propagator {
            propagator.inject(&mut dispatch.task);
        }
        if let Some(invalid) = dispatch.task.invalid_header() {
            return Err(invalid.clone().into());
        }
        let (task, payload, mut headers, message_id) = dispatch.task.into_parts();
        headers.insert(wire::TASK_NAME, task.as_str());
        headers.insert(wire::QUEUE_NAME, queue.as_str());
        if let Some(id) = &message_id {
            wire::validate_header(wire::NATS_MSG_ID, id)?;
            headers.insert(wire::NATS_MSG_ID, id.as_str());
        }
        let target = wire::queue_subject(&self.stream.subject_prefix, &queue);
        let subject = match dispatch.due {
            None => target,
            Some(at) => {
                if !self.schedules {
                    return Err(DispatchError::new(
                        DispatchErrorKind::SchedulesUnsupported,
                        format!(
                            "delayed dispatch needs message schedules (nats-server 2.12 or newer); the connected server is {}",
                            self.js.client().server_info().version
                        ),
                    ));
                }
                let at = at
                    .to_offset(time::UtcOffset::UTC)
                    .format(&Rfc3339)
                    .expect("a UTC time always formats as RFC 3339");
                headers.insert(wire::NATS_SCHEDULE, format!("@at {at}").as_str());
                headers.insert(wire::NATS_SCHEDULE_TARGET, target.as_str());
                if let Some(id) = &message_id {
                    headers.insert(wire::HEADER_MESSAGE_ID, id.as_str());
                }
                wire::schedule_subject(&self.stream.subject_prefix)
            }
        };
        let message = PublishMessage::build().payload(payload).headers(headers);
        Ok(Prepared { subject, message, queue, task })
    }
}

/// A dispatch ready to publish, with what error messages need.
struct Prepared {
    subject: String,
    message: PublishMessage,
    queue: String,
    task: String,
}

fn publish_error(
    queue: &str,
    task: &str,
    err: async_nats::jetstream::context::PublishError,
) -> DispatchError {
    let (kind, what) = match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => {
            (DispatchErrorKind::PayloadTooLarge, "is larger than the server's max_payload")
        }
        PublishErrorKind::TimedOut => (
            DispatchErrorKind::Timeout,
            "was not confirmed in time: it may still be stored (retry with the same message id), \
             the server may be unreachable, or this user may lack permission to publish to the \
             queue's subject (the server reports permission violations on the connection's \
             event callback)",
        ),
        PublishErrorKind::StreamNotFound => {
            (DispatchErrorKind::Rejected, "found no stream (was the stream deleted?)")
        }
        _ => (DispatchErrorKind::Rejected, "was refused"),
    };
    DispatchError::with_source(kind, format!("task {task:?} for queue {queue:?} {what}"), err)
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
        let publisher = Arc::new(Publisher {
            js: self.js,
            stream: self.stream,
            schedules: state.schedules,
            propagator: self.propagator,
            observers: self.observers,
        });
        let end = publisher.clone();
        let publish: DispatchFinal = Arc::new(move |dispatch| {
            let publisher = end.clone();
            async move { publisher.publish(dispatch).await }.boxed()
        });
        Ok(Client { inner: Arc::new(Inner { layers: self.layers.into(), publisher, publish }) })
    }
}
