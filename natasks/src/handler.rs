//! Handlers: plain `async fn`s that take a [`Task`] (or a typed [`Json`] payload).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;

use crate::error::HandlerError;
use crate::task::Task;

/// A typed JSON payload as a handler argument: `async fn send(Json(email): Json<Email>)`.
///
/// A payload that does not decode is dead-lettered with the decode error, without calling
/// the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json<T>(pub T);

/// Something the worker can call with a task. Implemented for `async fn`s and closures of
/// the forms `Fn(Task)`, `Fn(Json<T>)` and `Fn(Json<T>, Task)` returning
/// `Result<(), E>` where `E: Into<HandlerError>` (any `std::error::Error`, or
/// [`HandlerError`]).
///
/// The `Args` parameter only tells the forms apart; it is inferred.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a natasks handler",
    label = "not a handler",
    note = "a handler is an `async fn` taking `Task`, `Json<T>` or `(Json<T>, Task)` and returning `Result<(), E>` where `E: Into<HandlerError>`"
)]
pub trait Handler<Args>: Clone + Send + Sync + 'static {
    /// Runs the handler.
    fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>>;
}

impl<F, Fut, E> Handler<(Task,)> for F
where
    F: Fn(Task) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<HandlerError>,
{
    fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>> {
        let fut = self(task);
        async move { fut.await.map_err(Into::into) }.boxed()
    }
}

impl<F, Fut, E, T> Handler<(Json<T>,)> for F
where
    F: Fn(Json<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<HandlerError>,
    T: DeserializeOwned + Send + 'static,
{
    fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>> {
        match task.decode::<T>() {
            Ok(value) => {
                let fut = self(Json(value));
                async move { fut.await.map_err(Into::into) }.boxed()
            }
            Err(err) => futures_util::future::ready(Err(HandlerError::dead_letter(err))).boxed(),
        }
    }
}

impl<F, Fut, E, T> Handler<(Json<T>, Task)> for F
where
    F: Fn(Json<T>, Task) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<HandlerError>,
    T: DeserializeOwned + Send + 'static,
{
    fn call(&self, task: Task) -> BoxFuture<'static, Result<(), HandlerError>> {
        match task.decode::<T>() {
            Ok(value) => {
                let fut = self(Json(value), task);
                async move { fut.await.map_err(Into::into) }.boxed()
            }
            Err(err) => futures_util::future::ready(Err(HandlerError::dead_letter(err))).boxed(),
        }
    }
}

/// A handler with its argument form erased.
pub(crate) type BoxHandler =
    Arc<dyn Fn(Task) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

pub(crate) fn boxed<H: Handler<A>, A>(handler: H) -> BoxHandler {
    let _form: PhantomData<A> = PhantomData;
    Arc::new(move |task| handler.call(task))
}
