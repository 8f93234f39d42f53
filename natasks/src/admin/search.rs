//! Search: tasks by name, header, payload or last error, over pending, in-flight, scheduled
//! and dead tasks.
//!
//! Search reads the stream (nothing is consumed, nothing indexed): its cost grows with the
//! messages it reads, which [`SearchOptions::max_scan`] bounds. A search of one queue reads
//! only that queue's subjects.

use std::ops::ControlFlow;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::Stream;

use super::queues::Reading;
use super::tasks::Place;
use super::tasks::{delayed_wildcard, valid_limit};
use super::{read, Admin, AdminError, AdminErrorKind, TaskState, TaskSummary};
use crate::wire;

/// How often, in messages read, a search reports its progress.
const PROGRESS_EVERY: u64 = 1_000;

/// What a task must contain; every condition given must hold. `Filter::default()` matches
/// every task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// The task name; a trailing `*` matches names starting with the rest (`emails.*`).
    pub name: Option<String>,
    /// A header and its value (the name in any case, the value exactly).
    pub header: Option<(String, String)>,
    /// Bytes the payload contains.
    pub payload_contains: Option<String>,
    /// A field of a JSON payload, by dotted path (`user.id`, `items.0.sku`: a number
    /// indexes an array), and the JSON value it must equal.
    pub json_field: Option<(String, serde_json::Value)>,
    /// Text the last error contains, in any case (dead letters carry a last error).
    pub error_contains: Option<String>,
}

impl Filter {
    /// A filter matching every task; add conditions with the setters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only tasks with this name (a trailing `*`: names starting with the rest).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Only tasks with header `name` set to `value`.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.header = Some((name.into(), value.into()));
        self
    }

    /// Only tasks whose payload contains `text`.
    #[must_use]
    pub fn payload_contains(mut self, text: impl Into<String>) -> Self {
        self.payload_contains = Some(text.into());
        self
    }

    /// Only tasks whose JSON payload has `value` at the dotted `path`.
    #[must_use]
    pub fn json_field(mut self, path: impl Into<String>, value: serde_json::Value) -> Self {
        self.json_field = Some((path.into(), value));
        self
    }

    /// Only tasks whose last error contains `text`, in any case.
    #[must_use]
    pub fn error_contains(mut self, text: impl Into<String>) -> Self {
        self.error_contains = Some(text.into());
        self
    }

    /// Fails with [`AdminErrorKind::InvalidInput`] for a condition that cannot be used: an
    /// empty text, a header name that cannot be one, a JSON path with an empty segment.
    pub fn validate(&self) -> Result<(), AdminError> {
        let invalid = |message: String| Err(AdminError::new(AdminErrorKind::InvalidInput, message));
        let texts = [
            ("task name", self.name.as_deref()),
            ("payload text", self.payload_contains.as_deref()),
            ("error text", self.error_contains.as_deref()),
        ];
        for (what, text) in texts {
            if text == Some("") {
                return invalid(format!(
                    "empty {what} in a filter: leave it out to match every task"
                ));
            }
        }
        if let Some((name, _)) = &self.header {
            if !wire::is_header_name(name) {
                return invalid(format!(
                    "header name {name:?} in a filter cannot be a header name"
                ));
            }
        }
        if let Some((path, _)) = &self.json_field {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return invalid(format!(
                    "JSON path {path:?} in a filter must be field names separated by `.`, none empty"
                ));
            }
        }
        Ok(())
    }

    /// The filter ready to test many messages: what every test would compute alike (the
    /// error text in lower case) is computed here, once.
    pub(crate) fn matcher(&self) -> Matcher<'_> {
        Matcher { filter: self, error: self.error_contains.as_deref().map(str::to_lowercase) }
    }
}

/// A [`Filter`] testing messages ([`Filter::matcher`]).
pub(crate) struct Matcher<'a> {
    filter: &'a Filter,
    /// The error text, lower case.
    error: Option<String>,
}

impl Matcher<'_> {
    /// Whether the task stored as `message` matches.
    pub(crate) fn matches(&self, message: &StreamMessage) -> bool {
        let filter = self.filter;
        let header = |name: &str| {
            message
                .headers
                .iter()
                .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(name))
                .and_then(|(_, values)| values.first().map(|v| v.as_str()))
        };
        if let Some(want) = &filter.name {
            let name = header(wire::HEADER_TASK).unwrap_or_default();
            let ok = match want.strip_suffix('*') {
                Some(start) => name.starts_with(start),
                None => name == want,
            };
            if !ok {
                return false;
            }
        }
        if let Some((name, value)) = &filter.header {
            if header(name) != Some(value.as_str()) {
                return false;
            }
        }
        if let Some(text) = &self.error {
            let error = header(wire::HEADER_LAST_ERROR).unwrap_or_default();
            if !error.to_lowercase().contains(text.as_str()) {
                return false;
            }
        }
        if let Some(text) = &filter.payload_contains {
            if !contains(&message.payload, text.as_bytes()) {
                return false;
            }
        }
        if let Some((path, value)) = &filter.json_field {
            let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&message.payload) else {
                return false;
            };
            if field(&payload, path) != Some(value) {
                return false;
            }
        }
        true
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The value at a dotted path of a JSON value.
fn field<'a>(value: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(value, |value, key| match value {
        serde_json::Value::Object(map) => map.get(key),
        serde_json::Value::Array(items) => items.get(key.parse::<usize>().ok()?),
        _ => None,
    })
}

/// Where a search looks, and how far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchOptions {
    /// Only this queue (`None`: every queue).
    pub queue: Option<String>,
    /// Only tasks in these states (empty: every state).
    pub states: Vec<TaskState>,
    /// The most tasks returned, 1 to [`MAX_LIMIT`](super::MAX_LIMIT). Default: 100.
    pub limit: usize,
    /// The most messages read; the search stops there (`truncated`). Default: 1,000,000.
    pub max_scan: u64,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self { queue: None, states: Vec::new(), limit: 100, max_scan: 1_000_000 }
    }
}

/// How far a search has come; reported every thousand messages read, and at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SearchProgress {
    /// Messages read so far.
    pub scanned: u64,
    /// Messages the search may read (those stored on its subjects when it started).
    pub total: u64,
    /// Tasks matched so far.
    pub matched: u64,
}

/// What a search found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SearchResult {
    /// Matching tasks, by queue subject then oldest first, at most `limit`.
    pub items: Vec<TaskSummary>,
    /// Messages read.
    pub scanned: u64,
    /// The search stopped before reading everything (it reached `limit` or `max_scan`):
    /// more tasks may match.
    pub truncated: bool,
}

impl Admin {
    /// Finds tasks matching `filter` (see [`Filter`]) by reading the stream, calling
    /// `progress` every thousand messages read and at the end. Consumes nothing.
    pub async fn search(
        &self,
        filter: &Filter,
        options: &SearchOptions,
        mut progress: impl FnMut(SearchProgress),
    ) -> Result<SearchResult, AdminError> {
        filter.validate()?;
        valid_limit(options.limit)?;
        if options.max_scan == 0 {
            return Err(AdminError::new(
                AdminErrorKind::InvalidInput,
                "max_scan 0 reads nothing: give at least 1",
            ));
        }
        let queue = match &options.queue {
            Some(queue) => Some(super::queues::valid_queue(queue)?),
            None => None,
        };
        let stream = self.open_stream().await?;
        let reading = self.read_queues(&stream).await?;
        if let Some(queue) = queue {
            self.ensure_known_queue(&stream, &reading, queue).await?;
        }
        let states: &[TaskState] =
            if options.states.is_empty() { &TaskState::ALL } else { &options.states };
        let subjects = self.search_subjects(&stream, &reading, queue, states).await?;
        let total = subjects.iter().map(|(_, count)| count).sum();
        let consumers = self.consumers(&stream, &reading).await?;
        let delivered = |queue: &str| super::tasks::reading_delivered(consumers, queue);
        let mut at = SearchProgress { scanned: 0, total, matched: 0 };
        let mut items = Vec::new();
        let mut truncated = false;
        let matcher = filter.matcher();
        for (subject, _) in &subjects {
            let mut each = |message: StreamMessage| {
                if at.scanned == options.max_scan {
                    truncated = true;
                    return ControlFlow::Break(());
                }
                at.scanned += 1;
                if at.scanned.is_multiple_of(PROGRESS_EVERY) {
                    progress(at);
                }
                let summary = self.summarize(&message, |q| delivered(q));
                let Some(summary) = summary else { return ControlFlow::Continue(()) };
                let wanted = queue.is_none_or(|q| summary.queue == q)
                    && states.contains(&summary.state)
                    && matcher.matches(&message);
                if !wanted {
                    return ControlFlow::Continue(());
                }
                if items.len() == options.limit {
                    truncated = true;
                    return ControlFlow::Break(());
                }
                at.matched += 1;
                items.push(summary);
                ControlFlow::Continue(())
            };
            // A dead-letter queue no worker consumes reads fastest through a consumer.
            let dead = matches!(self.place(subject), Place::Dead(_));
            let rest = if dead {
                read::scan_by_consumer(&stream, subject, &mut each).await?
            } else {
                Some(1)
            };
            if let Some(from) = rest {
                read::scan(&self.js, &stream, subject, from, None, &mut each).await?;
            }
            if truncated {
                break;
            }
        }
        progress(at);
        Ok(SearchResult { items, scanned: at.scanned, truncated })
    }

    /// The subjects (or subject filters) holding tasks of `queue` (or every queue) in
    /// `states`, with the messages stored on them.
    async fn search_subjects(
        &self,
        stream: &Stream,
        reading: &Reading,
        queue: Option<&str>,
        states: &[TaskState],
    ) -> Result<Vec<(String, u64)>, AdminError> {
        let prefix = &self.stream.subject_prefix;
        let queued = states.iter().any(|s| matches!(s, TaskState::Pending | TaskState::InFlight));
        let dead = states.contains(&TaskState::Dead);
        let wanted = |subject: &str| match self.place(subject) {
            Place::Queue(q) => queued && queue.is_none_or(|want| want == q),
            Place::Dead(q) => dead && queue.is_none_or(|want| want == q),
            _ => false,
        };
        let mut subjects: Vec<(String, u64)> = reading
            .counts
            .iter()
            .filter(|(subject, _)| wanted(subject))
            .map(|(subject, count)| (subject.clone(), *count))
            .collect();
        if states.contains(&TaskState::Scheduled) {
            let filter = delayed_wildcard(prefix);
            let counts = super::queues::subject_counts(&self.js, stream, &filter).await?;
            subjects.push((filter, counts.values().sum()));
        }
        Ok(subjects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_paths_walk_objects_and_arrays() {
        let value = json!({"user": {"id": 7, "tags": ["a", "b"]}});
        assert_eq!(field(&value, "user.id"), Some(&json!(7)));
        assert_eq!(field(&value, "user.tags.1"), Some(&json!("b")));
        assert_eq!(field(&value, "user.tags.x"), None);
        assert_eq!(field(&value, "user.name"), None);
    }

    #[test]
    fn bad_filters_are_refused() {
        let kind = |f: Filter| f.validate().unwrap_err().kind();
        assert_eq!(kind(Filter::new().json_field("a..b", json!(1))), AdminErrorKind::InvalidInput);
        assert_eq!(kind(Filter::new().json_field("", json!(1))), AdminErrorKind::InvalidInput);
        assert_eq!(kind(Filter::new().payload_contains("")), AdminErrorKind::InvalidInput);
        assert_eq!(kind(Filter::new().header("bad name", "x")), AdminErrorKind::InvalidInput);
        assert!(Filter::new().name("emails.*").json_field("a.0", json!(1)).validate().is_ok());
    }
}
