//! Hooks for metrics: an [`Observer`] sees every dispatch and every processing attempt.
//!
//! Tracing needs no hook: every dispatch runs in a `natasks.dispatch` span (level `DEBUG`)
//! and every attempt in a `natasks.process` span (level `INFO`), with these stable fields:
//!
//! | field | `natasks.dispatch` | `natasks.process` |
//! |---|---|---|
//! | `queue` | target queue | queue |
//! | `task` | task name | task name (empty if the message has none) |
//! | `message_id` | message id, if set | message id, if any |
//! | `delayed` | whether it is a delayed dispatch | - |
//! | `attempt` | - | delivery attempt, from 1 |
//! | `stream_sequence` | sequence of the stored message | sequence of the delivered message |
//! | `outcome` | - | [`Outcome::as_str`] |
//! | `messaging.system` | `nats` | `nats` |
//! | `messaging.operation` | `publish` | `process` |
//! | `messaging.destination.name` | queue | queue |
//! | `natasks.task` | task name | task name |
//! | `otel.kind` | `producer` | `consumer` |
//! | `otel.status_code` | `ERROR` when the dispatch failed | `ERROR` unless the outcome is success or handed back |
//!
//! Inside them, failures and retries are events: a retried failure is a `WARN` event
//! ("task failed; will retry", fields `error`, `retry_in`), a dead letter `WARN`, a failure
//! without retry `INFO`, a failed dispatch `DEBUG` (the caller gets the error), a broker
//! problem (ack, lease, dead-letter publish) `WARN` or `ERROR`. The library never prints.
//! With the `opentelemetry` feature, `natasks::otel` joins the spans across services.
//!
//! Observers are for counters and histograms; the `metrics` feature ships one for
//! Prometheus (`natasks::metrics`).

use std::time::Duration;

use crate::error::DispatchError;
use crate::worker::DeadLetterReason;

/// Receives an event for every dispatch and processing attempt. Methods default to doing
/// nothing; they run inline on the hot path, so keep them cheap. Events carry what they
/// report: do not rely on natasks' OpenTelemetry or `tracing` span being current when
/// they arrive.
pub trait Observer: Send + Sync + 'static {
    /// A dispatch finished (stored, refused or failed).
    fn dispatched(&self, event: &Dispatched<'_>) {
        let _ = event;
    }

    /// A delivery is about to be processed; every `started` is followed by one `finished`.
    fn started(&self, event: &Started<'_>) {
        let _ = event;
    }

    /// A delivery was settled.
    fn finished(&self, event: &Finished<'_>) {
        let _ = event;
    }
}

/// A finished dispatch.
#[derive(Debug)]
#[non_exhaustive]
pub struct Dispatched<'a> {
    /// The target queue.
    pub queue: &'a str,
    /// The task name.
    pub task: &'a str,
    /// Whether the task was due later (a delayed dispatch).
    pub delayed: bool,
    /// Time from the call to the server's confirmation or the error.
    pub elapsed: Duration,
    /// The error, if the dispatch failed.
    pub error: Option<&'a DispatchError>,
}

/// A delivery about to be processed.
#[derive(Debug)]
#[non_exhaustive]
pub struct Started<'a> {
    /// The queue.
    pub queue: &'a str,
    /// The task name; `(unrouted)` for a message without one or naming a task no handler
    /// is registered for (names come from the wire: one label for them all keeps metrics
    /// bounded).
    pub task: &'a str,
    /// Delivery attempt, from 1.
    pub attempt: u64,
}

/// A settled delivery.
#[derive(Debug)]
#[non_exhaustive]
pub struct Finished<'a> {
    /// The queue.
    pub queue: &'a str,
    /// The task name; `(unrouted)` for a message without one or naming a task no handler
    /// is registered for (names come from the wire: one label for them all keeps metrics
    /// bounded).
    pub task: &'a str,
    /// Delivery attempt, from 1.
    pub attempt: u64,
    /// Time from receipt to the outcome.
    pub elapsed: Duration,
    /// What happened.
    pub outcome: Outcome,
}

/// What became of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler succeeded; the task was acknowledged.
    Succeeded,
    /// The attempt failed and the task will be retried after the delay, if any.
    Retried(Option<Duration>),
    /// The handler failed with `no_retry`; the task was acknowledged and dropped.
    GaveUp,
    /// The task was moved to the dead-letter queue.
    DeadLettered(DeadLetterReason),
    /// An unroutable message was discarded ([`Unroutable::Discard`](crate::Unroutable::Discard)).
    Discarded,
    /// Shutdown handed the task back unfinished, for another worker.
    HandedBack,
    /// The task was cancelled ([`Client::cancel`](crate::Client::cancel)) and removed.
    Cancelled,
}

impl Outcome {
    /// A short stable label: `succeeded`, `retried`, `gave-up`, `dead-lettered`,
    /// `discarded`, `handed-back` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Retried(_) => "retried",
            Self::GaveUp => "gave-up",
            Self::DeadLettered(_) => "dead-lettered",
            Self::Discarded => "discarded",
            Self::HandedBack => "handed-back",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the attempt succeeded (the `status` label of the Go metrics: `success` or
    /// `error`).
    pub fn is_success(self) -> bool {
        self == Self::Succeeded
    }
}

/// The observers of a client or worker.
#[derive(Clone, Default)]
pub(crate) struct Observers(Vec<std::sync::Arc<dyn Observer>>);

impl Observers {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn push(&mut self, observer: impl Observer) {
        self.0.push(std::sync::Arc::new(observer));
    }

    pub(crate) fn dispatched(&self, event: &Dispatched<'_>) {
        self.0.iter().for_each(|o| o.dispatched(event));
    }

    pub(crate) fn started(&self, event: &Started<'_>) {
        self.0.iter().for_each(|o| o.started(event));
    }

    pub(crate) fn finished(&self, event: &Finished<'_>) {
        self.0.iter().for_each(|o| o.finished(event));
    }
}
