//! The unit of work: a name, a payload, headers and an optional message id.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::InvalidName;
use crate::extract::Live;
use crate::guard::Guard;
use crate::wire;

/// A task: a name that selects the handler, raw payload bytes, headers, and an optional
/// message id used by JetStream to drop duplicate dispatches.
///
/// ```
/// use natasks::Task;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Email { to: String }
///
/// let task = Task::json("emails.send", &Email { to: "a@example.com".into() })?
///     .with_header("X-Request-Id", "req-42")
///     .with_message_id("welcome-a@example.com");
/// let email: Email = task.decode()?;
/// assert_eq!(email.to, "a@example.com");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Dispatching a received task again
///
/// A handler may dispatch the task it received, to forward it to another queue or to put it
/// back for later with [`Client::dispatch_in`](crate::Client::dispatch_in). The new dispatch
/// is a new message: it carries the payload and the task's headers (including any set since it
/// was received, and informational ones such as the dead-letter headers), with
/// `Natasks-Task` and `Natasks-Queue` written afresh. It leaves behind the headers that
/// described the message it arrived in: the server's `Nats-*` headers (message id, schedule,
/// expectations) and `Natasks-Message-Id`. It has no message id, so JetStream cannot drop it
/// as a duplicate of the original, unless one is set again with
/// [`with_message_id`](Self::with_message_id).
#[derive(Clone)]
pub struct Task {
    name: Name,
    payload: Bytes,
    /// Shared with the worker's copy of a received message, copied on first write; `None`
    /// until a header is set.
    headers: Option<Arc<HeaderMap>>,
    /// The id dispatch publishes with: only one set with `with_message_id`.
    message_id: Option<String>,
    /// On a received task, the id it was dispatched with; never published again.
    received_id: Option<String>,
    /// On a received task, the headers it arrived with, to leave the per-message ones
    /// behind when it is dispatched again.
    arrived_with: Option<Arc<HeaderMap>>,
    delivery: Option<Delivery>,
    extensions: Extensions,
    /// The first header that could not be set; reported by dispatch.
    invalid_header: Option<InvalidName>,
    /// Set by [`tracked`](Self::tracked): the result retention, zero for the default.
    track: Option<Duration>,
    /// On a received task, the worker's channel to the handler (progress, cancellation,
    /// result); only when the handler or tracking needs it.
    live: Option<Arc<Live>>,
    /// A unique key, throttle or debounce key to dispatch with; boxed, as most tasks have
    /// none.
    pub(crate) guard: Option<Box<Guard>>,
}

impl Task {
    /// A task with a raw payload. The name is checked when the task is dispatched.
    pub fn new(name: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            name: Name::Owned(name.into()),
            payload: payload.into(),
            headers: None,
            message_id: None,
            received_id: None,
            arrived_with: None,
            delivery: None,
            extensions: Extensions::default(),
            invalid_header: None,
            track: None,
            live: None,
            guard: None,
        }
    }

    /// A task whose payload is `value` encoded as JSON.
    pub fn json<T: Serialize + ?Sized>(
        name: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(name, serde_json::to_vec(value)?))
    }

    /// The task name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The raw payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Decodes the JSON payload. In a handler, `task.decode::<T>()?` dead-letters the task
    /// when the payload does not decode (a retry would not help).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        serde_json::from_slice(&self.payload).map_err(|source| DecodeError {
            task: self.name.as_str().to_owned(),
            target: std::any::type_name::<T>(),
            source,
        })
    }

    /// The first value of header `key`, if any. A key that is not a valid header name (see
    /// [`set_header`](Self::set_header)) finds nothing.
    pub fn header(&self, key: &str) -> Option<&str> {
        if !wire::is_header_name(key) {
            return None;
        }
        self.headers().get(key).map(|value| value.as_str())
    }

    /// All headers, including the `Natasks-*` ones on a received task.
    pub fn headers(&self) -> &HeaderMap {
        static EMPTY: OnceLock<HeaderMap> = OnceLock::new();
        self.headers.as_deref().unwrap_or_else(|| EMPTY.get_or_init(HeaderMap::new))
    }

    fn headers_mut(&mut self) -> &mut HeaderMap {
        Arc::make_mut(self.headers.get_or_insert_with(Default::default))
    }

    /// Sets header `key` to `value`, replacing earlier values.
    ///
    /// A name must be printable ASCII (`!` to `~`) without `:`, and a value must not contain
    /// CR or LF. An invalid header is not set: dispatch refuses the task with an error
    /// naming it, and publishes nothing.
    pub fn set_header(&mut self, key: &str, value: impl AsRef<str>) -> &mut Self {
        if self.checked(key, value.as_ref()) {
            self.headers_mut().insert(key, value.as_ref());
        }
        self
    }

    /// Appends a value to header `key`. Checked as in [`set_header`](Self::set_header).
    pub fn add_header(&mut self, key: &str, value: impl AsRef<str>) -> &mut Self {
        if self.checked(key, value.as_ref()) {
            self.headers_mut().append(key, value.as_ref());
        }
        self
    }

    /// Whether the header can go on the wire; remembers the first that cannot, so that
    /// dispatch refuses the task with a clear error instead of sending it without the header.
    fn checked(&mut self, key: &str, value: &str) -> bool {
        match wire::validate_header(key, value) {
            Ok(()) => true,
            Err(err) => {
                self.invalid_header.get_or_insert(err);
                false
            }
        }
    }

    /// Sets a header natasks wrote itself, known to be valid, without checking or copying
    /// it.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn set_trusted_header(
        &mut self,
        name: async_nats::header::HeaderName,
        value: String,
    ) {
        self.headers_mut().insert(name, async_nats::HeaderValue::from(value));
    }

    /// Removes the headers named in `names`, in any case.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn remove_headers(&mut self, names: &[&str]) {
        let matches = |name: &str| names.iter().any(|n| n.eq_ignore_ascii_case(name));
        if !self.headers().iter().any(|(name, _)| matches(name.as_ref())) {
            return;
        }
        let kept = retained(self.headers(), |name, _| !matches(name.as_ref()));
        self.headers = Some(Arc::new(kept));
    }

    pub(crate) fn invalid_header(&self) -> Option<&InvalidName> {
        self.invalid_header.as_ref()
    }

    /// Builder form of [`set_header`](Self::set_header).
    #[must_use]
    pub fn with_header(mut self, key: &str, value: impl AsRef<str>) -> Self {
        self.set_header(key, value);
        self
    }

    /// Sets the JetStream message id (`Nats-Msg-Id`): a second dispatch with the same id
    /// within the stream's duplicate window is acknowledged but not stored again.
    ///
    /// A received task dispatched again is published without the id it arrived with; set
    /// one here to make that dispatch deduplicated too.
    #[must_use]
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// The message id: the one set with [`with_message_id`](Self::with_message_id), else on
    /// a received task the id it was dispatched with.
    ///
    /// Dispatching a received task again does not reuse the id it was dispatched with (see
    /// [`Task`]), even though this method reports it.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref().or(self.received_id.as_deref())
    }

    /// The message id a dispatch of this task publishes: only one set with
    /// [`with_message_id`](Self::with_message_id).
    pub(crate) fn dispatch_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The task's id. On a received task: the id natasks gave it at dispatch (the message
    /// id, when one was given), or `None` for a task dispatched without either (by the Go
    /// library, or a periodic tick). Before dispatch: the message id, if set; otherwise the
    /// id is made at dispatch and returned in the [`Receipt`](crate::Receipt).
    pub fn id(&self) -> Option<&str> {
        if self.delivery.is_none() {
            return self.message_id.as_deref();
        }
        let headers = self.arrived_with.as_deref()?;
        headers.get(wire::ID_NAME).map(|v| v.as_str()).or(self.received_id.as_deref())
    }

    /// Records this task's lifecycle: its status ([`Client::status`](crate::Client::status)),
    /// its handler's result ([`Client::wait`](crate::Client::wait)) and its events
    /// ([`Client::events`](crate::Client::events)), and lets it be cancelled
    /// ([`Client::cancel`](crate::Client::cancel)). The records are kept for the worker's
    /// [`result_retention`](crate::WorkerBuilder::result_retention) (default a day) after
    /// the last change. Costs a few writes per attempt; untracked tasks cost nothing.
    #[must_use]
    pub fn tracked(mut self) -> Self {
        self.track = Some(Duration::ZERO);
        self
    }

    /// Like [`tracked`](Self::tracked), keeping the records for `retention` after the last
    /// change instead of the worker's default. Whole seconds, from 1 s to 10 years
    /// ([`MAX_RETENTION`](crate::track::MAX_RETENTION)): dispatch refuses anything else.
    #[must_use]
    pub fn tracked_for(mut self, retention: Duration) -> Self {
        self.track = Some(retention);
        self
    }

    /// The retention [`tracked`](Self::tracked) asked for (zero: the worker's default), on
    /// a task about to be dispatched.
    pub(crate) fn track(&self) -> Option<Duration> {
        self.track
    }

    /// Delivery details; `Some` on a task received by a worker, `None` before dispatch.
    pub fn delivery(&self) -> Option<&Delivery> {
        self.delivery.as_ref()
    }

    /// Values attached by middleware or a propagator for the handler (see [`Extensions`]).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Mutable access to the extensions.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// Name, payload, headers and message id, for publishing. A received task leaves the
    /// per-message headers it arrived with behind (see [`Task`]).
    pub(crate) fn into_parts(self) -> (String, Bytes, HeaderMap, Option<String>) {
        let headers = match (self.headers, &self.arrived_with) {
            (Some(headers), Some(arrived)) => retained(&headers, |name, values| {
                let name_str: &str = name.as_ref();
                // Kept if set since the task arrived.
                !wire::is_message_header(name_str)
                    || !values.iter().eq(arrived.get_all(name.clone()))
            }),
            (headers, _) => headers.map(Arc::unwrap_or_clone).unwrap_or_default(),
        };
        (self.name.into_string(), self.payload, headers, self.message_id)
    }

    /// A task as a worker received it; `message_id` is the id it was dispatched with.
    pub(crate) fn received(
        name: Arc<str>,
        payload: Bytes,
        headers: Arc<HeaderMap>,
        message_id: Option<String>,
        delivery: Delivery,
    ) -> Self {
        Self {
            name: Name::Shared(name),
            payload,
            arrived_with: Some(headers.clone()),
            headers: Some(headers),
            message_id: None,
            received_id: message_id,
            delivery: Some(delivery),
            guard: None,
            extensions: Extensions::default(),
            invalid_header: None,
            track: None,
            live: None,
        }
    }

    pub(crate) fn set_live(&mut self, live: Arc<Live>) {
        self.live = Some(live);
    }

    pub(crate) fn live(&self) -> Option<&Arc<Live>> {
        self.live.as_ref()
    }
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("name", &self.name.as_str())
            .field("payload_len", &self.payload.len())
            .field("message_id", &self.message_id)
            .field("received_id", &self.received_id)
            .field("delivery", &self.delivery)
            .finish_non_exhaustive()
    }
}

/// A copy of `headers` with the headers `keep` accepts.
fn retained(headers: &HeaderMap, keep: impl Fn(&HeaderName, &[HeaderValue]) -> bool) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for (name, values) in headers.iter() {
        if keep(name, values) {
            for value in values {
                kept.append(name.clone(), value.clone());
            }
        }
    }
    kept
}

/// A task name: owned when made by the caller, shared with the worker's route table when
/// received (so receiving a task does not copy its name).
#[derive(Clone)]
enum Name {
    Owned(String),
    Shared(Arc<str>),
}

impl Name {
    fn as_str(&self) -> &str {
        match self {
            Self::Owned(name) => name,
            Self::Shared(name) => name,
        }
    }

    fn into_string(self) -> String {
        match self {
            Self::Owned(name) => name,
            Self::Shared(name) => name.as_ref().to_owned(),
        }
    }
}

/// Where and how often a received task was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// The queue the worker consumes (shared by every task the worker receives).
    pub queue: Arc<str>,
    /// Delivery attempt, starting at 1.
    pub attempt: u64,
    /// The task's sequence number in the stream.
    pub stream_sequence: u64,
}

impl Delivery {
    pub(crate) fn new(queue: Arc<str>, attempt: u64, stream_sequence: u64) -> Self {
        Self { queue, attempt, stream_sequence }
    }
}

/// The payload of a task did not decode as the handler's type.
#[derive(Debug, thiserror::Error)]
#[error("payload of task {task:?} does not decode as {target}")]
pub struct DecodeError {
    task: String,
    target: &'static str,
    #[source]
    source: serde_json::Error,
}

/// A type map carrying values from middleware and propagators to the handler, one value
/// per type.
#[derive(Default)]
pub struct Extensions {
    map: HashMap<TypeId, Box<dyn AnyClone + Send + Sync>>,
}

impl Extensions {
    /// Inserts a value, returning the previous value of the same type.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        self.map.insert(TypeId::of::<T>(), Box::new(value)).and_then(
            |old: Box<dyn AnyClone + Send + Sync>| old.into_any().downcast::<T>().ok().map(|b| *b),
        )
    }

    /// The value of type `T`, if present.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map.get(&TypeId::of::<T>()).and_then(|v| (**v).as_any().downcast_ref())
    }

    /// Removes and returns the value of type `T`.
    pub fn remove<T: Send + Sync + 'static>(&mut self) -> Option<T> {
        self.map.remove(&TypeId::of::<T>()).and_then(|old: Box<dyn AnyClone + Send + Sync>| {
            old.into_any().downcast::<T>().ok().map(|b| *b)
        })
    }
}

impl Clone for Extensions {
    fn clone(&self) -> Self {
        Self { map: self.map.iter().map(|(k, v)| (*k, (**v).clone_box())).collect() }
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions").field("len", &self.map.len()).finish()
    }
}

trait AnyClone: Any {
    fn clone_box(&self) -> Box<dyn AnyClone + Send + Sync>;
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Clone + Send + Sync + 'static> AnyClone for T {
    fn clone_box(&self) -> Box<dyn AnyClone + Send + Sync> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct Email {
        to: String,
    }

    #[test]
    fn json_round_trip_and_headers() {
        let mut task = Task::json("emails.send", &Email { to: "x".into() }).unwrap();
        task.set_header("A", "1").add_header("A", "2");
        assert_eq!(task.header("A"), Some("1"));
        assert_eq!(task.decode::<Email>().unwrap(), Email { to: "x".into() });
        assert!(task.delivery().is_none());
    }

    #[test]
    fn invalid_header_names_are_not_set_nor_looked_up() {
        let mut task = Task::new("t", "x").with_header("Größe", "1");
        task.add_header("X:Y", "2").set_header("Ä", "3");
        assert_eq!(task.header("Größe"), None);
        assert_eq!(task.header(""), None);
        let err = task.invalid_header().expect("the first invalid header is kept");
        assert!(err.to_string().starts_with("header name \"Größe\""), "{err}");
    }

    fn received(headers: &[(&str, &str)], id: Option<&str>) -> Task {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, *value);
        }
        let delivery = Delivery::new("q".into(), 1, 7);
        Task::received("t".into(), Bytes::new(), Arc::new(map), id.map(str::to_owned), delivery)
    }

    fn names(headers: &HeaderMap) -> Vec<String> {
        let mut names: Vec<String> = headers.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn received_task_dispatched_again_is_a_new_message() {
        let arrived = [
            ("Natasks-Task", "t"),
            ("Natasks-Message-Id", "m-1"),
            ("Nats-Msg-Id", "m-1"),
            ("Nats-Scheduler", "natasks.__natasks_schedule.x"),
            ("Nats-Schedule-Next", "purge"),
            ("X-Tenant", "t1"),
            ("Natasks-Last-Error", "boom"),
        ];
        let task = received(&arrived, Some("m-1"));
        assert_eq!(task.message_id(), Some("m-1"), "the id it was dispatched with");
        assert_eq!(task.header("Nats-Scheduler"), Some("natasks.__natasks_schedule.x"));
        let (_, _, headers, id) = task.clone().into_parts();
        assert_eq!(id, None);
        assert_eq!(names(&headers), ["Natasks-Last-Error", "Natasks-Task", "X-Tenant"]);

        // An id set again is used; headers set since it arrived are kept.
        let mut again = task.with_message_id("m-2");
        again.set_header("Nats-TTL", "1h").set_header("Nats-Msg-Id", "explicit");
        assert_eq!(again.message_id(), Some("m-2"));
        let (_, _, headers, id) = again.into_parts();
        assert_eq!(id.as_deref(), Some("m-2"));
        assert_eq!(headers.get("Nats-TTL").map(|v| v.as_str()), Some("1h"));
        assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("explicit"));
        assert_eq!(headers.get("Nats-Scheduler"), None);
    }

    #[test]
    fn new_task_keeps_every_header() {
        let task = Task::new("t", "x").with_header("Nats-TTL", "1h").with_message_id("m");
        let (_, _, headers, id) = task.into_parts();
        assert_eq!(id.as_deref(), Some("m"));
        assert_eq!(headers.get("Nats-TTL").map(|v| v.as_str()), Some("1h"));
    }

    #[test]
    fn decode_error_names_task_and_type() {
        let task = Task::new("emails.send", "not json");
        let err = task.decode::<Email>().unwrap_err();
        assert!(err.to_string().contains("emails.send"), "{err}");
        assert!(err.to_string().contains("Email"), "{err}");
    }

    #[test]
    fn extensions_by_type() {
        let mut ext = Extensions::default();
        assert_eq!(ext.insert(5u32), None);
        assert_eq!(ext.insert(6u32), Some(5));
        ext.insert(String::from("user"));
        let copy = ext.clone();
        assert_eq!(copy.get::<u32>(), Some(&6));
        assert_eq!(ext.remove::<String>().as_deref(), Some("user"));
        assert_eq!(ext.get::<String>(), None);
    }
}
