//! The record kept per tracked task: its JSON form and its key.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use super::{TaskState, TaskStatus};
use crate::extract::ProgressReport;

/// A task's latest recorded state, as stored (JSON) under its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) state: Tag,
    pub(crate) queue: String,
    pub(crate) task: String,
    #[serde(default)]
    pub(crate) attempt: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) at: OffsetDateTime,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) due: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) since: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) lease_until: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) next_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) progress: Option<ProgressReport>,
    /// The handler's result (JSON), on `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<Box<RawValue>>,
    /// The task's stream sequence, while it waits in its queue (lets cancel remove it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sequence: Option<u64>,
    /// The schedule subject of a delayed task (lets cancel remove the schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) schedule: Option<String>,
    /// The task's unique key, for a unique task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) unique_key: Option<String>,
    /// Seconds the record is kept after this change.
    pub(crate) retention: u64,
    /// On `cancelled`: whether the `cancelled` event was published.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) cancel_announced: bool,
}

/// The state names in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Tag {
    Pending,
    Scheduled,
    Running,
    Retrying,
    Succeeded,
    Failed,
    DeadLettered,
    Cancelled,
}

impl Record {
    /// A record in `state` with nothing else set yet.
    pub(crate) fn new(state: Tag, queue: &str, task: &str, attempt: u64, retention: u64) -> Self {
        Self {
            state,
            queue: queue.to_owned(),
            task: task.to_owned(),
            attempt,
            at: OffsetDateTime::now_utc(),
            due: None,
            since: None,
            lease_until: None,
            next_at: None,
            error: None,
            reason: None,
            progress: None,
            result: None,
            sequence: None,
            schedule: None,
            unique_key: None,
            retention,
            cancel_announced: false,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        // A record holds only strings, numbers, times and already valid JSON.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn is_final(&self) -> bool {
        matches!(self.state, Tag::Succeeded | Tag::Failed | Tag::DeadLettered | Tag::Cancelled)
    }

    /// The public view of the record of task `id`.
    pub(crate) fn status(&self, id: &str) -> TaskStatus {
        let state = match self.state {
            Tag::Pending => TaskState::Pending,
            Tag::Scheduled => TaskState::Scheduled { due: self.due.unwrap_or(self.at) },
            Tag::Running => TaskState::Running {
                since: self.since.unwrap_or(self.at),
                lease_until: self.lease_until.unwrap_or(self.at),
            },
            Tag::Retrying => TaskState::Retrying { next_at: self.next_at },
            Tag::Succeeded => TaskState::Succeeded,
            Tag::Failed => TaskState::Failed,
            Tag::DeadLettered => {
                TaskState::DeadLettered { reason: self.reason.clone().unwrap_or_default() }
            }
            Tag::Cancelled => TaskState::Cancelled,
        };
        TaskStatus {
            id: id.to_owned(),
            queue: self.queue.clone(),
            task: self.task.clone(),
            state,
            attempt: self.attempt,
            updated_at: self.at,
            progress: self.progress.clone(),
            last_error: self.error.clone(),
            unique_key: self.unique_key.clone(),
        }
    }
}

/// The bucket key of task `id`: letters, digits, `-` and `_` as they are, every other byte
/// as `=XX` (hex), so any id (an e-mail address, a URL) is one valid key, and distinct ids
/// are distinct keys.
pub(crate) fn key(id: &str) -> String {
    let mut key = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            key.push(char::from(byte));
        } else {
            key.push_str(&format!("={byte:02X}"));
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_and_distinct() {
        assert_eq!(key("abc-_1"), "abc-_1");
        assert_eq!(key("a@b.c"), "a=40b=2Ec");
        assert_eq!(key("=40"), "=3D40");
        assert_ne!(key("a.b"), key("a=2Eb"));
        assert_eq!(key("ü"), "=C3=BC");
    }

    #[test]
    fn record_round_trip() {
        let mut record = Record::new(Tag::Succeeded, "q", "t", 2, 60);
        record.result = Some(RawValue::from_string("{\"n\":1}".into()).unwrap());
        let json = record.to_json();
        let back: Record = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.state, Tag::Succeeded);
        assert_eq!(back.result.unwrap().get(), "{\"n\":1}");
        assert!(std::str::from_utf8(&json).unwrap().contains("\"state\":\"succeeded\""));
    }
}
