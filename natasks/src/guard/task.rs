//! The guard methods of [`Task`]: unique, throttled and debounced tasks.

use std::time::Duration;

use super::{Guard, GuardKind, OnConflict};
use crate::task::Task;
use crate::wire;

impl Task {
    /// Makes the task unique in its queue by `key`: while a task with this key is pending,
    /// scheduled or running in the queue, another dispatch with the key fails with
    /// [`DispatchErrorKind::Duplicate`](crate::DispatchErrorKind::Duplicate), whose
    /// [`existing_id`](crate::DispatchError::existing_id) names the task that holds it (or,
    /// with [`return_existing`](Self::return_existing), returns that task's receipt).
    ///
    /// The key is released when the task ends: success, failure without retry, dead letter
    /// or cancel. `ttl` is the safety net should no worker ever end it (the fleet is gone):
    /// after it the key is free whatever happened (for a delayed task, counted from when it
    /// is due). Whole seconds, 1 s to 10 years.
    ///
    /// Any string is a key (e-mail addresses, spaces, dots, any Unicode), up to 1,024
    /// bytes, without CR or LF and not starting or ending with whitespace (received header
    /// values are trimmed). The server enforces uniqueness (an atomic batch stores the
    /// key's lock and the task, or neither), so racing dispatchers in many processes store
    /// one task. Needs nats-server 2.12 or newer. The task's subject is its queue's as
    /// always, so Go workers process unique tasks too (without releasing the key: it is
    /// then freed when the next dispatch finds its task gone, or by the TTL).
    ///
    /// ```no_run
    /// # async fn example(client: natasks::Client) -> Result<(), natasks::DispatchError> {
    /// use std::time::Duration;
    /// use natasks::{DispatchErrorKind, Task};
    ///
    /// let task = Task::new("invoices.render", "inv-42").unique("inv-42", Duration::from_secs(3600));
    /// match client.dispatch(task, "invoices").await {
    ///     Ok(receipt) => println!("queued {}", receipt.id),
    ///     Err(err) if err.kind() == DispatchErrorKind::Duplicate => {
    ///         println!("already queued as {}", err.existing_id().unwrap_or_default())
    ///     }
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn unique(self, key: impl Into<String>, ttl: Duration) -> Self {
        self.guarded(GuardKind::Unique { ttl }, key.into())
    }

    /// Throttles the task by `key` in its queue: at most one task with the key is accepted
    /// per `window` (whole seconds, 1 s to 10 years), counted from the accepted dispatch.
    /// Later dispatches within the window fail with
    /// [`DispatchErrorKind::Throttled`](crate::DispatchErrorKind::Throttled), which says
    /// when the window ends ([`retry_at`](crate::DispatchError::retry_at)), or, with
    /// [`return_existing`](Self::return_existing), are coalesced into the accepted task:
    /// they return its receipt and store nothing. Needs nats-server 2.12 or newer.
    #[must_use]
    pub fn throttle(self, key: impl Into<String>, window: Duration) -> Self {
        self.guarded(GuardKind::Throttle { window }, key.into())
    }

    /// Debounces the task by `key` in its queue: dispatched with a delay
    /// ([`Client::dispatch_in`](crate::Client::dispatch_in) or
    /// [`dispatch_at`](crate::Client::dispatch_at)), it replaces the pending task with the
    /// same key and restarts the delay, so after a burst of dispatches exactly one task
    /// runs, with the last payload, once the key has been quiet for the delay. The server
    /// does it: each queue and key has one schedule subject, and a schedule replaces the
    /// one there. Needs nats-server 2.12 or newer. A debounced task cannot carry a message
    /// id ([`with_message_id`](Self::with_message_id)): the server would keep the first
    /// dispatch as a duplicate of the next ones.
    #[must_use]
    pub fn debounce(self, key: impl Into<String>) -> Self {
        self.guarded(GuardKind::Debounce, key.into())
    }

    /// For a [`unique`](Self::unique) or [`throttle`](Self::throttle)d task: when its key
    /// is held, the dispatch succeeds with the receipt of the task that holds it (its
    /// `duplicate` set) instead of failing. Call it after `unique` or `throttle`; on other
    /// tasks it does nothing.
    #[must_use]
    pub fn return_existing(mut self) -> Self {
        if let Some(guard) = &mut self.guard {
            guard.on_conflict = OnConflict::ReturnExisting;
        }
        self
    }

    /// The unique key: the one given to [`unique`](Self::unique), or on a received task
    /// the one it was dispatched with.
    pub fn unique_key(&self) -> Option<&str> {
        match &self.guard {
            Some(guard) if guard.is_unique() => Some(&guard.key),
            _ => self.header(wire::HEADER_UNIQUE_KEY),
        }
    }

    fn guarded(mut self, kind: GuardKind, key: String) -> Self {
        let on_conflict = self.guard.as_ref().map(|g| g.on_conflict).unwrap_or_default();
        self.guard = Some(Box::new(Guard { kind, key, on_conflict }));
        self
    }

    /// The guard to dispatch with.
    pub(crate) fn guard(&self) -> Option<&Guard> {
        self.guard.as_deref()
    }

    /// Takes the guard out, for publishing.
    pub(crate) fn take_guard(&mut self) -> Option<Box<Guard>> {
        self.guard.take()
    }
}
