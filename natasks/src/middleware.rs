//! Dispatch and process middleware, and the propagator hook.
//!
//! A middleware is an async function that receives the task and a `next` handle; it may
//! read and write headers, rewrite the queue (dispatch), attach values for the handler
//! (process, through [`Task::extensions_mut`]), and short-circuit by not calling `next`.
//!
//! ```
//! use natasks::{DispatchNext, Dispatch, Next, Task};
//!
//! async fn add_request_id(mut dispatch: Dispatch, next: DispatchNext) -> Result<(), natasks::DispatchError> {
//!     dispatch.task.set_header("X-Request-Id", "req-42");
//!     next.run(dispatch).await
//! }
//!
//! #[derive(Clone)]
//! struct RequestId(String);
//!
//! async fn read_request_id(mut task: Task, next: Next) -> Result<(), natasks::HandlerError> {
//!     let id = task.header("X-Request-Id").unwrap_or_default().to_owned();
//!     task.extensions_mut().insert(RequestId(id));
//!     next.run(task).await
//! }
//! ```

use std::future::Future;
use std::sync::{Arc, OnceLock};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use crate::client::Receipt;
use crate::error::{DispatchError, HandlerError};
use crate::handler::BoxHandler;
use crate::task::Task;

/// Maps ambient context to headers on dispatch, and headers back to handler context on
/// processing (for example W3C trace context). Set it on both the client and the worker.
pub trait Propagator: Send + Sync + 'static {
    /// Called on dispatch, after dispatch middleware, before the task is published.
    fn inject(&self, task: &mut Task);
    /// Called on processing, before process middleware; typically reads headers and puts
    /// values into [`Task::extensions_mut`].
    fn extract(&self, task: &mut Task);
    /// `Some` for [`OtelPropagator`](crate::otel::OtelPropagator), which also starts
    /// natasks' OpenTelemetry spans. Not meant to be implemented elsewhere.
    #[cfg(feature = "opentelemetry")]
    #[doc(hidden)]
    fn as_otel(&self) -> Option<&crate::otel::OtelPropagator> {
        None
    }
}

/// A task on its way to a queue, as seen by dispatch middleware.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Dispatch {
    /// The task; middleware may change its headers.
    pub task: Task,
    /// The target queue; middleware may rewrite it.
    pub queue: String,
    /// When the task is due, for delayed dispatches.
    pub due: Option<time::OffsetDateTime>,
    /// The id natasks made for the task (used unless it has a message id).
    pub(crate) id: String,
    /// Where the end of the chain leaves the receipt, when middleware runs.
    pub(crate) receipt: Option<Arc<OnceLock<Receipt>>>,
}

/// A new task id: a NUID from a generator per thread (the shared one takes a lock).
fn fresh_id() -> String {
    thread_local! {
        // Randomized on first use, per thread.
        static IDS: std::cell::RefCell<nuid::NUID> = const { std::cell::RefCell::new(nuid::NUID::new()) };
    }
    IDS.with(|ids| ids.borrow_mut().next().as_str().to_owned())
}

impl Dispatch {
    pub(crate) fn new(task: Task, queue: &str, due: Option<time::OffsetDateTime>) -> Self {
        let id = task.dispatch_id().map_or_else(fresh_id, str::to_owned);
        Self { task, queue: queue.to_owned(), due, id, receipt: None }
    }

    /// The task's id: its message id when it has one, else the id natasks made for it.
    pub fn id(&self) -> &str {
        self.task.dispatch_id().unwrap_or(&self.id)
    }
}

type DispatchFn =
    dyn Fn(Dispatch, DispatchNext) -> BoxFuture<'static, Result<(), DispatchError>> + Send + Sync;
pub(crate) type DispatchLayer = Arc<DispatchFn>;
pub(crate) type DispatchFinal =
    Arc<dyn Fn(Dispatch) -> BoxFuture<'static, Result<(), DispatchError>> + Send + Sync>;

pub(crate) fn dispatch_layer<F, Fut>(f: F) -> DispatchLayer
where
    F: Fn(Dispatch, DispatchNext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), DispatchError>> + Send + 'static,
{
    Arc::new(move |dispatch, next| f(dispatch, next).boxed())
}

/// The rest of the dispatch chain.
pub struct DispatchNext {
    layers: Arc<[DispatchLayer]>,
    index: usize,
    publish: DispatchFinal,
}

impl DispatchNext {
    pub(crate) fn new(layers: Arc<[DispatchLayer]>, publish: DispatchFinal) -> Self {
        Self { layers, index: 0, publish }
    }

    /// Passes the dispatch on to the next middleware, or publishes it.
    pub async fn run(self, dispatch: Dispatch) -> Result<(), DispatchError> {
        match self.layers.get(self.index).cloned() {
            Some(layer) => {
                let next = Self { index: self.index + 1, ..self };
                layer(dispatch, next).await
            }
            None => (self.publish)(dispatch).await,
        }
    }
}

type ProcessFn = dyn Fn(Task, Next) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync;
pub(crate) type ProcessLayer = Arc<ProcessFn>;

pub(crate) fn process_layer<F, Fut>(f: F) -> ProcessLayer
where
    F: Fn(Task, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    Arc::new(move |task, next| f(task, next).boxed())
}

/// The rest of the processing chain: later middleware, then the handler.
pub struct Next {
    layers: Arc<[ProcessLayer]>,
    index: usize,
    handler: BoxHandler,
}

impl Next {
    pub(crate) fn new(layers: Arc<[ProcessLayer]>, handler: BoxHandler) -> Self {
        Self { layers, index: 0, handler }
    }

    /// Passes the task on to the next middleware, or to the handler.
    pub async fn run(self, task: Task) -> Result<(), HandlerError> {
        self.start(task).await
    }

    /// The future of the next middleware, or of the handler, for `task`: called at once,
    /// so what it does before its first await runs in this call.
    pub(crate) fn start(self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>> {
        match self.layers.get(self.index).cloned() {
            Some(layer) => {
                let next = Self { index: self.index + 1, ..self };
                layer(task, next)
            }
            None => self.handler.call(task),
        }
    }
}
