//! Handler arguments: what a handler can take from the task it is called with.
//!
//! A handler is an `async fn` whose arguments are extractors, in any order, with [`Task`]
//! (which takes the whole task) allowed only last:
//!
//! ```
//! use natasks::{Attempt, Cancellation, HandlerError, Json, Progress, TaskId};
//!
//! #[derive(serde::Deserialize)]
//! struct Report { pages: u32 }
//!
//! async fn render(
//!     Json(report): Json<Report>,
//!     TaskId(id): TaskId,
//!     Attempt(attempt): Attempt,
//!     progress: Progress,
//!     cancel: Cancellation,
//! ) -> Result<String, HandlerError> {
//!     for page in 1..=report.pages {
//!         if cancel.is_cancelled() {
//!             return Err(HandlerError::msg("cancelled"));
//!         }
//!         progress.set(f64::from(page) / f64::from(report.pages));
//!     }
//!     Ok(format!("report {id} rendered on attempt {attempt}"))
//! }
//! ```
//!
//! An extractor is anything implementing [`FromTask`]; implement it for your own types to
//! take them as arguments too.

use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::HandlerError;
use crate::task::Task;

/// Something a handler can take as an argument, read from the task it is called with.
///
/// An error fails the attempt before the handler runs, with that error's outcome (a
/// [`Json`] payload that does not decode is dead-lettered, for example).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument",
    label = "not an extractor",
    note = "handler arguments are `Json<T>`, `TaskId`, `Attempt`, `Progress`, `Cancellation`, `Extension<T>`, a type implementing `FromTask`, and last, optionally, `Task`"
)]
pub trait FromTask: Sized {
    /// Takes the value from the task.
    fn from_task(task: &Task) -> Result<Self, HandlerError>;

    /// Whether the argument needs the worker's per-task channel (progress, cancellation).
    /// Only natasks' own extractors set it.
    #[doc(hidden)]
    const LIVE: bool = false;
}

/// A typed JSON payload as a handler argument: `async fn send(Json(email): Json<Email>)`.
///
/// A payload that does not decode is dead-lettered with the decode error, without calling
/// the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromTask for Json<T> {
    fn from_task(task: &Task) -> Result<Self, HandlerError> {
        task.decode().map(Json).map_err(HandlerError::dead_letter)
    }
}

/// The task's id as a handler argument (see [`Task::id`]); `seq-<stream sequence>` for a
/// task dispatched without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskId(pub String);

impl FromTask for TaskId {
    /// A received task dispatched without an id (by the Go library, or a periodic tick)
    /// gets `seq-<stream sequence>`, the id its record would have.
    fn from_task(task: &Task) -> Result<Self, HandlerError> {
        let id = match (task.id(), task.delivery()) {
            (Some(id), _) => id.to_owned(),
            (None, Some(delivery)) => format!("seq-{}", delivery.stream_sequence),
            (None, None) => String::new(),
        };
        Ok(Self(id))
    }
}

/// The delivery attempt as a handler argument, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub u64);

impl FromTask for Attempt {
    fn from_task(task: &Task) -> Result<Self, HandlerError> {
        Ok(Self(task.delivery().map_or(1, |d| d.attempt)))
    }
}

/// A value a middleware put into the task's [extensions](Task::extensions_mut), cloned.
/// Missing, it dead-letters the task with an error naming the type (the worker's
/// middleware does not provide it: a deploy must fix that, not a retry).
#[derive(Debug, Clone)]
pub struct Extension<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromTask for Extension<T> {
    fn from_task(task: &Task) -> Result<Self, HandlerError> {
        task.extensions().get::<T>().cloned().map(Extension).ok_or_else(|| {
            HandlerError::dead_letter(format!(
                "no extension of type {} on task {:?}: no middleware inserted one",
                std::any::type_name::<T>(),
                task.name()
            ))
        })
    }
}

/// Reports a running task's progress: a fraction and/or a small JSON value.
///
/// Each report renews the task's lease. On a tracked task (see
/// [`Task::tracked`]) it also shows in [`Client::status`](crate::Client::status) and on the
/// event stream. Reports are not queued: when several come faster than the worker records
/// them, the latest wins.
#[derive(Clone)]
pub struct Progress {
    live: Option<Arc<Live>>,
}

impl Progress {
    /// Reports a fraction done, from 0.0 to 1.0 (clamped; NaN reports 0).
    pub fn set(&self, fraction: f64) {
        self.send(ProgressReport { fraction: Some(clamp(fraction)), detail: None });
    }

    /// Reports a JSON value (for example `{"rows": 1200}`), with an optional fraction.
    /// A value that does not serialize is reported as `null`.
    pub fn report(&self, fraction: Option<f64>, detail: &impl Serialize) {
        let detail = serde_json::to_value(detail).unwrap_or(serde_json::Value::Null);
        self.send(ProgressReport { fraction: fraction.map(clamp), detail: Some(detail) });
    }

    fn send(&self, report: ProgressReport) {
        if let Some(live) = &self.live {
            live.progress.send_replace(Some(report));
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("live", &self.live.is_some()).finish()
    }
}

fn clamp(fraction: f64) -> f64 {
    if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    }
}

impl FromTask for Progress {
    fn from_task(task: &Task) -> Result<Self, HandlerError> {
        Ok(Self { live: task.live().cloned() })
    }
    const LIVE: bool = true;
}

/// A progress report, as recorded in a task's status and events.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ProgressReport {
    /// The fraction done, from 0.0 to 1.0, if reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// A JSON value, if reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The signal that somebody cancelled the running task
/// ([`Client::cancel`](crate::Client::cancel)), as a handler argument.
///
/// The task ends as cancelled (removed, not retried, not dead-lettered) whatever the
/// handler returns after the signal; a handler that never looks at it runs to its end.
/// Only tracked tasks can be cancelled; on others it never fires.
#[derive(Clone)]
pub struct Cancellation {
    token: CancellationToken,
}

impl Cancellation {
    /// Whether the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the task is cancelled (never, if it is not).
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }
}

impl std::fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancellation").field("cancelled", &self.is_cancelled()).finish()
    }
}

impl FromTask for Cancellation {
    fn from_task(task: &Task) -> Result<Self, HandlerError> {
        let token = task.live().map(|live| live.cancel.clone()).unwrap_or_default();
        Ok(Self { token })
    }
    const LIVE: bool = true;
}

/// The worker's per-task channel to a running handler: progress reports out, the
/// cancellation signal in. Made only for tasks whose handler takes [`Progress`] or
/// [`Cancellation`], or that are tracked.
pub(crate) struct Live {
    pub(crate) progress: watch::Sender<Option<ProgressReport>>,
    pub(crate) cancel: CancellationToken,
    /// Whether the handler's result is kept (the task is tracked).
    pub(crate) keep_result: bool,
    /// The handler's result as JSON, once it returned `Ok` on a tracked task.
    pub(crate) result: Mutex<Option<Vec<u8>>>,
}

impl Live {
    pub(crate) fn new(keep_result: bool) -> (Arc<Self>, watch::Receiver<Option<ProgressReport>>) {
        let (progress, reports) = watch::channel(None);
        let live = Self {
            progress,
            cancel: CancellationToken::new(),
            keep_result,
            result: Mutex::new(None),
        };
        (Arc::new(live), reports)
    }

    /// Takes the handler's result.
    pub(crate) fn take_result(&self) -> Option<Vec<u8>> {
        self.result.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_clamped() {
        assert_eq!(clamp(f64::NAN), 0.0);
        assert_eq!(clamp(-1.0), 0.0);
        assert_eq!(clamp(2.0), 1.0);
        assert_eq!(clamp(0.25), 0.25);
    }

    #[test]
    fn extractors_outside_a_worker_do_not_fail() {
        let task = Task::new("t", "{}");
        assert_eq!(Attempt::from_task(&task).unwrap(), Attempt(1));
        assert!(!Cancellation::from_task(&task).unwrap().is_cancelled());
        Progress::from_task(&task).unwrap().set(0.5);
        let err = Extension::<u8>::from_task(&task).unwrap_err();
        assert!(err.to_string().contains("u8"), "{err}");
    }
}
