//! Handlers: plain `async fn`s that take a [`Task`] (or a typed [`Json`] payload).

use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;

use crate::error::HandlerError;
use crate::task::{DecodeError, Task};

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
        erase(self(task))
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
            Ok(value) => erase(self(Json(value))),
            Err(err) => undecodable(err),
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
            Ok(value) => erase(self(Json(value), task)),
            Err(err) => undecodable(err),
        }
    }
}

/// Boxes a handler's future, converting its error.
fn erase<Fut, E>(fut: Fut) -> BoxFuture<'static, Result<(), HandlerError>>
where
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<HandlerError>,
{
    async move { fut.await.map_err(Into::into) }.boxed()
}

/// The outcome for a payload that does not decode as the handler's type: dead-lettered.
fn undecodable(err: DecodeError) -> BoxFuture<'static, Result<(), HandlerError>> {
    futures_util::future::ready(Err(HandlerError::dead_letter(err))).boxed()
}

/// A handler with its argument form erased.
pub(crate) type BoxHandler =
    Arc<dyn Fn(Task) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

pub(crate) fn boxed<H: Handler<A>, A>(handler: H) -> BoxHandler {
    Arc::new(move |task| handler.call(task))
}
