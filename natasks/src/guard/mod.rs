//! Guards the broker enforces on a dispatch: unique tasks, throttles and debounce.
//!
//! * A **unique** task ([`Task::unique`](crate::Task::unique)) is stored in one atomic batch
//!   with a *lock*: a marker on `<prefix>.__natasks_mark.unique.<queue>.<key>` published
//!   with `Nats-Expected-Last-Subject-Sequence: 0` (the subject must be empty) and a
//!   `Nats-TTL`. The server stores both or neither, so there is never a lock without its
//!   task or a task without its lock, whatever process dies when. 50 dispatchers racing on
//!   one key store one task: the server decides, not the clients.
//! * The worker releases the lock when the task ends for good (success, no-retry failure,
//!   dead letter, cancel): it first has the server confirm the task's ack, then deletes the
//!   lock by its sequence, only if the lock names this task. A worker killed between the
//!   two leaves a lock whose task is gone: the next dispatch with the key sees that (the
//!   task sat at the sequence after its lock, in the same batch) and takes the lock over
//!   atomically, with `Nats-Expected-Last-Subject-Sequence` set to the stale lock's
//!   sequence. The order is deliberate: releasing before the ack would let a worker killed
//!   in between leave the task to be redelivered while a new task with the key runs.
//!   The lock's TTL is the last safety net (a fleet of workers that is gone).
//! * A **throttle** ([`Task::throttle`](crate::Task::throttle)) is the same marker under
//!   `throttle.<queue>.<key>`, living for the window (its TTL) and never released.
//! * **Debounce** ([`Task::debounce`](crate::Task::debounce)) needs no marker: a delayed
//!   task's schedule goes to one subject per queue and key, and a schedule published to a
//!   subject replaces the one there, so only the last dispatch's task runs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{DispatchError, DispatchErrorKind};
use crate::wire;

pub(crate) mod lock;
pub(crate) mod release;
mod task;

/// The longest unique, throttle or debounce key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// The longest unique-key TTL or throttle window: ten years.
pub const MAX_GUARD_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// What a dispatch does when the unique or throttle key it carries is held
/// ([`Task::return_existing`](crate::Task::return_existing)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnConflict {
    /// Fail with [`DispatchErrorKind::Duplicate`] or [`DispatchErrorKind::Throttled`],
    /// naming the task that holds the key. The default.
    #[default]
    Refuse,
    /// Succeed with the receipt of the task that holds the key (`duplicate` set): the new
    /// task is coalesced into it. Nothing new is stored.
    ReturnExisting,
}

/// The guard a task carries to dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Guard {
    pub(crate) kind: GuardKind,
    pub(crate) key: String,
    pub(crate) on_conflict: OnConflict,
}

/// Which guard, with its duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuardKind {
    /// The lock lives until the task ends, or at most `ttl`.
    Unique { ttl: Duration },
    /// The marker lives for the window.
    Throttle { window: Duration },
    /// The task's schedule goes to the key's subject.
    Debounce,
}

impl GuardKind {
    fn word(self) -> &'static str {
        match self {
            Self::Unique { .. } => "unique",
            Self::Throttle { .. } => "throttle",
            Self::Debounce => "debounce",
        }
    }

    fn header(self) -> &'static str {
        match self {
            Self::Unique { .. } => wire::HEADER_UNIQUE_KEY,
            Self::Throttle { .. } => wire::HEADER_THROTTLE_KEY,
            Self::Debounce => wire::HEADER_DEBOUNCE_KEY,
        }
    }
}

/// The subject of the `word` (`unique`, `throttle`) marker of `key` in `queue`.
pub(crate) fn marker_subject(word: &str, prefix: &str, queue: &str, key: &str) -> String {
    wire::marker_subject(prefix, &[word, queue, &wire::encode_token(key)])
}

/// What a lock or throttle marker says, in its body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MarkerBody {
    /// The id of the task that holds the key.
    pub(crate) id: String,
    /// The unique or throttle key.
    pub(crate) key: String,
    /// For a delayed task, the subject of its schedule (stored right after the marker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) schedule: Option<String>,
}

/// What the server must support for a guard.
pub(crate) struct Support {
    pub(crate) atomic: bool,
    pub(crate) ttl: bool,
    pub(crate) schedules: bool,
}

impl Guard {
    /// Everything that can refuse a guard before anything is published.
    pub(crate) fn check(
        &self,
        delayed: bool,
        support: Support,
        version: &str,
    ) -> Result<(), DispatchError> {
        let word = self.kind.word();
        let invalid = |problem: String| {
            DispatchError::new(DispatchErrorKind::InvalidTask, format!("{word} key {problem}"))
        };
        if self.key.is_empty() {
            return Err(invalid("is empty".into()));
        }
        if self.key.len() > MAX_KEY_LEN {
            return Err(invalid(format!(
                "is {} bytes long, longer than {MAX_KEY_LEN}",
                self.key.len()
            )));
        }
        if self.key.contains(['\r', '\n']) {
            return Err(invalid(format!("{:?} must not contain CR or LF", self.key)));
        }
        // Received header values are trimmed (async-nats, like other clients): a worker
        // would read another key than the one its lock was taken for.
        if self.key.starts_with(char::is_whitespace) || self.key.ends_with(char::is_whitespace) {
            return Err(invalid(format!(
                "{:?} must not start or end with whitespace (header values are trimmed on \
                 receipt)",
                self.key
            )));
        }
        let server_has_it =
            crate::stream::atomic_support(version) == crate::stream::Support::Supported;
        let unsupported = |what: &str, since: &str| {
            let needs = format!("a {word} task needs {what}");
            let message = crate::stream::lacking(&needs, since, version, server_has_it);
            DispatchError::new(DispatchErrorKind::Unsupported, message)
        };
        let ttl = match self.kind {
            GuardKind::Unique { ttl } => Some(("unique-key TTL", ttl)),
            GuardKind::Throttle { window } => Some(("throttle window", window)),
            GuardKind::Debounce => None,
        };
        if let Some((what, ttl)) = ttl {
            if ttl < Duration::from_secs(1) || ttl > MAX_GUARD_TTL {
                return Err(DispatchError::new(
                    DispatchErrorKind::InvalidTask,
                    format!(
                        "{what} {ttl:?} for key {:?} is outside 1 s to 10 years (the server \
                         counts per-message TTLs in whole seconds)",
                        self.key
                    ),
                ));
            }
            if !support.atomic {
                return Err(unsupported("atomic batches", "nats-server 2.12"));
            }
            if !support.ttl {
                return Err(unsupported("per-message TTLs", "nats-server 2.11"));
            }
        }
        if self.kind == GuardKind::Debounce {
            if !delayed {
                return Err(DispatchError::new(
                    DispatchErrorKind::InvalidTask,
                    format!(
                        "debounce key {:?} needs a delay: dispatch it with `dispatch_in` or \
                         `dispatch_at`",
                        self.key
                    ),
                ));
            }
            if !support.schedules {
                return Err(unsupported("message schedules", "nats-server 2.12"));
            }
        }
        Ok(())
    }

    /// `unique key "k"`, `throttle key "k"` or `debounce key "k"`.
    pub(crate) fn describe(&self) -> String {
        format!("{} key {:?}", self.kind.word(), self.key)
    }

    /// Writes the guard's header on the task.
    pub(crate) fn mark_task(&self, headers: &mut async_nats::HeaderMap) {
        headers.insert(self.kind.header(), self.key.as_str());
    }

    /// The schedule subject of a debounced task, replacing the fresh one.
    pub(crate) fn schedule_subject(&self, prefix: &str, queue: &str) -> Option<String> {
        (self.kind == GuardKind::Debounce).then(|| wire::debounce_subject(prefix, queue, &self.key))
    }

    /// The marker stored in the task's batch, for a unique or throttled task. A unique
    /// task due after `delay` holds its key until then, and for its TTL after that.
    pub(crate) fn marker(
        &self,
        prefix: &str,
        queue: &str,
        id: &str,
        schedule: Option<&str>,
        delay: Duration,
    ) -> Option<crate::batch::Outgoing> {
        let ttl = match self.kind {
            GuardKind::Unique { ttl } => ttl.saturating_add(delay),
            GuardKind::Throttle { window } => window,
            GuardKind::Debounce => return None,
        };
        let body = MarkerBody {
            id: id.to_owned(),
            key: self.key.clone(),
            schedule: schedule.map(str::to_owned),
        };
        Some(lock::marker(self.marker_subject(prefix, queue), &body, ttl, 0))
    }

    /// Where the marker of this guard's key lives.
    pub(crate) fn marker_subject(&self, prefix: &str, queue: &str) -> String {
        marker_subject(self.kind.word(), prefix, queue, &self.key)
    }

    /// Whether a marker held for this key is the task's own lock (unique) rather than a
    /// window (throttle).
    pub(crate) fn is_unique(&self) -> bool {
        matches!(self.kind, GuardKind::Unique { .. })
    }

    /// How long a throttle window lasts.
    pub(crate) fn window(&self) -> Option<Duration> {
        match self.kind {
            GuardKind::Throttle { window } => Some(window),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Support {
        Support { atomic: true, ttl: true, schedules: true }
    }

    fn unique(key: &str, ttl: Duration) -> Guard {
        Guard { kind: GuardKind::Unique { ttl }, key: key.into(), on_conflict: OnConflict::Refuse }
    }

    #[test]
    fn bad_keys_and_ttls_are_refused() {
        let hour = Duration::from_secs(3600);
        for (guard, says) in [
            (unique("", hour), "is empty"),
            (unique(&"k".repeat(1025), hour), "longer than 1024"),
            (unique("a\nb", hour), "CR or LF"),
            (unique(" k", hour), "whitespace"),
            (unique("k\u{a0}", hour), "whitespace"),
            (unique("k", Duration::from_millis(999)), "outside 1 s"),
            (unique("k", MAX_GUARD_TTL + Duration::from_secs(1)), "outside 1 s"),
        ] {
            let err = guard.check(false, all(), "2.15.1").unwrap_err();
            assert_eq!(err.kind(), DispatchErrorKind::InvalidTask);
            assert!(err.to_string().contains(says), "{err}");
        }
        for good in ["ann@example.com", "a b.c", "Größe ✓", &"k".repeat(1024)] {
            assert!(unique(good, hour).check(false, all(), "2.15.1").is_ok(), "{good}");
        }
    }

    #[test]
    fn old_servers_are_named() {
        let old = Support { atomic: false, ttl: true, schedules: false };
        let err = unique("k", Duration::from_secs(5)).check(false, old, "2.11.11").unwrap_err();
        assert_eq!(err.kind(), DispatchErrorKind::Unsupported);
        assert!(err.to_string().contains("2.11.11"), "{err}");
    }

    #[test]
    fn debounce_needs_a_delay() {
        let debounce =
            Guard { kind: GuardKind::Debounce, key: "k".into(), on_conflict: OnConflict::Refuse };
        let err = debounce.check(false, all(), "2.15.1").unwrap_err();
        assert!(err.to_string().contains("needs a delay"), "{err}");
        assert!(debounce.check(true, all(), "2.15.1").is_ok());
    }

    #[test]
    fn markers_live_under_the_queue_and_encoded_key() {
        let guard = unique("ann@example.com", Duration::from_secs(60));
        assert_eq!(
            guard.marker_subject("natasks", "emails"),
            "natasks.__natasks_mark.unique.emails.ann%40example%2Ecom"
        );
    }
}
