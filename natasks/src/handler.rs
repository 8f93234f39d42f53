//! Handlers: plain `async fn`s whose arguments are extractors ([`FromTask`]), returning
//! `Result<T, E>` where `T: Serialize` is the task's result.

use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::Serialize;

use crate::error::HandlerError;
use crate::extract::FromTask;
use crate::task::Task;

/// Something the worker can call with a task: an `async fn` or closure taking up to eight
/// extractors ([`Json<T>`](crate::Json), [`TaskId`](crate::TaskId),
/// [`Attempt`](crate::Attempt), [`Progress`](crate::Progress),
/// [`Cancellation`](crate::Cancellation), [`Extension<T>`](crate::Extension) or your own
/// [`FromTask`] types), optionally followed by the [`Task`] itself, and returning
/// `Result<T, E>` where `T: Serialize` and `E: Into<HandlerError>` (any
/// `std::error::Error`, or [`HandlerError`]).
///
/// `T` is the task's result: on a tracked task ([`Task::tracked`]) it is stored and can be
/// read with [`Client::result`](crate::Client::result) or awaited with
/// [`Client::wait`](crate::Client::wait); on other tasks it is dropped. Return `()` when
/// there is no result.
///
/// The `Args` parameter only tells the forms apart; it is inferred.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a natasks handler",
    label = "not a handler",
    note = "a handler is an `async fn` taking extractors (`Json<T>`, `TaskId`, `Attempt`, `Progress`, `Cancellation`, `Extension<T>`), optionally `Task` last, and returning `Result<T, E>` where `T: Serialize` and `E: Into<HandlerError>`"
)]
pub trait Handler<Args>: Clone + Send + Sync + 'static {
    /// Whether an argument needs the worker's per-task channel (progress, cancellation).
    #[doc(hidden)]
    const LIVE: bool;

    /// Runs the handler.
    fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>>;
}

/// How the last argument is taken: [`FromTask`] types by reference, [`Task`] by value.
#[doc(hidden)]
pub mod last {
    use super::*;

    /// The last argument of a handler.
    pub trait FromTaskLast<Via>: Sized {
        /// Takes the value, consuming the task.
        fn from_task_last(task: Task) -> Result<Self, HandlerError>;
        /// See [`FromTask::LIVE`].
        const LIVE: bool;
    }

    /// A [`FromTask`] type as the last argument.
    #[derive(Debug)]
    pub enum ViaRef {}
    /// The task itself as the last argument.
    #[derive(Debug)]
    pub enum ViaTask {}

    impl<T: FromTask> FromTaskLast<ViaRef> for T {
        fn from_task_last(task: Task) -> Result<Self, HandlerError> {
            T::from_task(&task)
        }
        const LIVE: bool = T::LIVE;
    }

    impl FromTaskLast<ViaTask> for Task {
        fn from_task_last(task: Task) -> Result<Self, HandlerError> {
            Ok(task)
        }
        const LIVE: bool = false;
    }
}

use last::FromTaskLast;

impl<F, Fut, R, E> Handler<()> for F
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Serialize,
    E: Into<HandlerError>,
{
    const LIVE: bool = false;

    fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>> {
        finish(&task, self())
    }
}

macro_rules! handler_for {
    ($($arg:ident),*) => {
        impl<F, Fut, R, E, Via, $($arg,)* L> Handler<(Via, $($arg,)* L)> for F
        where
            F: Fn($($arg,)* L) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<R, E>> + Send + 'static,
            R: Serialize,
            E: Into<HandlerError>,
            $($arg: FromTask,)*
            L: FromTaskLast<Via>,
        {
            const LIVE: bool = false $(|| $arg::LIVE)* || L::LIVE;

            #[allow(non_snake_case)]
            fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>> {
                $(
                    let $arg = match $arg::from_task(&task) {
                        Ok(value) => value,
                        Err(err) => return rejected(err),
                    };
                )*
                let keep = Keep::of(&task);
                let last = match L::from_task_last(task) {
                    Ok(value) => value,
                    Err(err) => return rejected(err),
                };
                keep.finish(self($($arg,)* last))
            }
        }
    };
}

handler_for!();
handler_for!(T1);
handler_for!(T1, T2);
handler_for!(T1, T2, T3);
handler_for!(T1, T2, T3, T4);
handler_for!(T1, T2, T3, T4, T5);
handler_for!(T1, T2, T3, T4, T5, T6);
handler_for!(T1, T2, T3, T4, T5, T6, T7);

/// Where a handler's result goes: into the task's live channel when the task is tracked.
struct Keep(Option<Arc<crate::extract::Live>>);

impl Keep {
    fn of(task: &Task) -> Self {
        Self(task.live().filter(|live| live.keep_result).cloned())
    }

    /// Boxes a handler's future, converting its error and keeping its result.
    fn finish<Fut, R, E>(self, fut: Fut) -> BoxFuture<'static, Result<(), HandlerError>>
    where
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        R: Serialize,
        E: Into<HandlerError>,
    {
        async move {
            let value = fut.await.map_err(Into::into)?;
            if let Some(live) = self.0 {
                let json = serde_json::to_vec(&value).map_err(|err| {
                    HandlerError::dead_letter(format!(
                        "the result ({}) does not serialize as JSON: {err}",
                        std::any::type_name::<R>()
                    ))
                })?;
                *live.result.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(json);
            }
            Ok(())
        }
        .boxed()
    }
}

fn finish<Fut, R, E>(task: &Task, fut: Fut) -> BoxFuture<'static, Result<(), HandlerError>>
where
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Serialize,
    E: Into<HandlerError>,
{
    Keep::of(task).finish(fut)
}

/// The outcome for an argument that could not be taken from the task.
fn rejected(err: HandlerError) -> BoxFuture<'static, Result<(), HandlerError>> {
    futures_util::future::ready(Err(err)).boxed()
}

/// A handler with its argument form erased.
#[derive(Clone)]
pub(crate) struct BoxHandler {
    call: Arc<dyn Fn(Task) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>,
    /// Whether its arguments need the per-task channel.
    pub(crate) live: bool,
}

impl BoxHandler {
    pub(crate) fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>> {
        (self.call)(task)
    }
}

pub(crate) fn boxed<H: Handler<A>, A>(handler: H) -> BoxHandler {
    BoxHandler { call: Arc::new(move |task| handler.call(task)), live: H::LIVE }
}
