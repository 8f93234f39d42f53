//! `natasks task`: the status, result and cancellation of a tracked task, by its id.
//!
//! Only tasks dispatched with tracking (`dispatch --track`, `Task::tracked` in the library)
//! have a record; the id is the one `dispatch` prints. Each command opens a client on the
//! stream the global flags name (creating the stream and the record bucket if missing).

use std::time::Duration;

use clap::Subcommand;
use natasks::track::{CancelOutcome, Status, TaskState, TaskStatus, TrackErrorKind};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::output::say;
use crate::{conn, output, Error, Global, Result};

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Where a tracked task is: state, queue, task name, attempt, last change, progress,
    /// last error, and its due, lease or retry time. Exits 0 with state `unknown` (nothing
    /// recorded under the id) or `expired` (its record's retention ran out) too.
    Status {
        /// The task id (as `dispatch` prints it).
        id: String,
    },
    /// Prints what a tracked task's handler returned (JSON). Exits 1 saying where the task
    /// is when it has no result: not finished, failed or dead-lettered (with the last
    /// error), cancelled, expired or unknown.
    Result {
        /// The task id (as `dispatch` prints it).
        id: String,
        /// Wait up to this long for the task to end, e.g. 30s, 5m.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// Cancels a tracked task: a waiting one never runs, a running one's handler is told to
    /// stop. Exits 0 when the task is (or already was) cancelled or signalled, 1 when there
    /// was nothing to cancel (already finished, expired, unknown).
    Cancel {
        /// The task id (as `dispatch` prints it).
        id: String,
    },
}

pub async fn run(g: &Global, cmd: TaskCommand) -> Result<()> {
    match cmd {
        TaskCommand::Status { id } => {
            check_id(&id)?;
            status(g, &id).await
        }
        TaskCommand::Result { id, wait } => {
            check_id(&id)?;
            let wait = match wait.as_deref() {
                Some(text) => Some(
                    output::parse_duration(text)
                        .map_err(|err| Error::msg(format!("invalid --wait: {err}")))?,
                ),
                None => None,
            };
            result(g, &id, wait).await
        }
        TaskCommand::Cancel { id } => {
            check_id(&id)?;
            cancel(g, &id).await
        }
    }
}

/// Refuses, before connecting, an id the library would refuse: empty, longer than
/// [`natasks::track::MAX_ID`] bytes, or with control characters.
pub fn check_id(id: &str) -> Result<()> {
    let problem = if id.is_empty() {
        "is empty".to_owned()
    } else if id.len() > natasks::track::MAX_ID {
        format!("is longer than {} bytes", natasks::track::MAX_ID)
    } else if id.chars().any(char::is_control) {
        "contains control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::msg(format!("invalid task id {:?}: it {problem}", output::clip(id, 40))))
}

/// A lifecycle error as one line, with a hint for the kinds an operator can act on.
fn track_error(err: &natasks::TrackError) -> Error {
    let hint = match err.kind() {
        TrackErrorKind::Unknown => {
            " (never dispatched with tracking, not recorded yet, or expired long ago)"
        }
        TrackErrorKind::NotFinished => " (use --wait DURATION to wait for it to end)",
        _ => "",
    };
    Error::msg(format!("{}{hint}", crate::one_line(err)))
}

async fn status(g: &Global, id: &str) -> Result<()> {
    let client = conn::client(g).await?;
    let status = client.status(id).await.map_err(|err| track_error(&err))?;
    if g.json {
        output::json(&status_json(id, &status));
        return Ok(());
    }
    match &status {
        Status::Known(s) => print_status(s),
        Status::Expired => say!(
            "task {id}: expired (its record's retention ran out; the bucket remembers that for {})",
            output::age(natasks::track::EXPIRED_MEMORY)
        ),
        Status::Unknown => say!(
            "task {id}: unknown (nothing recorded: never dispatched with tracking, not recorded yet, or expired long ago)"
        ),
        _ => say!("task {id}: {status:?}"),
    }
    Ok(())
}

/// `12s ago` or `in 12s`.
fn relative(at: OffsetDateTime) -> String {
    let now = OffsetDateTime::now_utc();
    if at <= now {
        format!("{} ago", output::age(output::since(at)))
    } else {
        format!("in {}", output::age((at - now).try_into().unwrap_or_default()))
    }
}

fn print_status(s: &TaskStatus) {
    let mut rows: Vec<(&str, String)> = vec![
        ("id", s.id.clone()),
        ("state", s.state.to_string()),
        ("queue", s.queue.clone()),
        ("task", s.task.clone()),
        ("attempt", s.attempt.to_string()),
        ("updated", format!("{} ({})", output::time(s.updated_at), relative(s.updated_at))),
    ];
    match &s.state {
        TaskState::Scheduled { due } => {
            rows.push(("due", format!("{} ({})", output::time(*due), relative(*due))));
        }
        TaskState::Running { since, lease_until } => {
            rows.push(("since", format!("{} ({})", output::time(*since), relative(*since))));
            let gone = if *lease_until < OffsetDateTime::now_utc() {
                "; past: the worker is gone, the task is redelivered after the ack wait"
            } else {
                ""
            };
            rows.push((
                "lease until",
                format!("{} ({}{gone})", output::time(*lease_until), relative(*lease_until)),
            ));
        }
        TaskState::Retrying { next_at } => {
            let next = next_at.map_or("after the ack wait".to_owned(), |at| {
                format!("{} ({})", output::time(at), relative(at))
            });
            rows.push(("next attempt", next));
        }
        TaskState::DeadLettered { reason } => rows.push(("reason", reason.clone())),
        _ => {}
    }
    if let Some(progress) = &s.progress {
        rows.push(("progress", progress_text(progress)));
    }
    if let Some(error) = &s.last_error {
        rows.push(("last error", error.clone()));
    }
    if let Some(key) = &s.unique_key {
        rows.push(("unique key", key.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in rows {
        say!("{key:<width$}  {value}");
    }
}

/// `50%`, `{"rows":50}` or `50% {"rows":50}`.
pub fn progress_text(p: &natasks::ProgressReport) -> String {
    let fraction = p.fraction.map(|f| format!("{:.0}%", f * 100.0));
    let detail = p.detail.as_ref().map(Value::to_string);
    match (fraction, detail) {
        (Some(f), Some(d)) => format!("{f} {d}"),
        (Some(f), None) => f,
        (None, Some(d)) => d,
        (None, None) => "reported".to_owned(),
    }
}

fn progress_json(p: &natasks::ProgressReport) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// The JSON form of a status: `state` is a task state, `expired` or `unknown`.
fn status_json(id: &str, status: &Status) -> Value {
    let s = match status {
        Status::Known(s) => s,
        Status::Expired => return json!({ "id": id, "state": "expired" }),
        _ => return json!({ "id": id, "state": "unknown" }),
    };
    let mut value = json!({
        "id": s.id,
        "state": s.state.as_str(),
        "queue": s.queue,
        "task": s.task,
        "attempt": s.attempt,
        "updated": output::time(s.updated_at),
        "progress": s.progress.as_ref().map(progress_json),
        "last_error": s.last_error,
        "unique_key": s.unique_key,
    });
    let extra = match &s.state {
        TaskState::Scheduled { due } => json!({ "due": output::time(*due) }),
        TaskState::Running { since, lease_until } => json!({
            "since": output::time(*since),
            "lease_until": output::time(*lease_until),
        }),
        TaskState::Retrying { next_at } => json!({ "next_at": next_at.map(output::time) }),
        TaskState::DeadLettered { reason } => json!({ "reason": reason }),
        _ => json!({}),
    };
    if let (Some(value), Value::Object(extra)) = (value.as_object_mut(), extra) {
        value.extend(extra);
    }
    value
}

async fn result(g: &Global, id: &str, wait: Option<Duration>) -> Result<()> {
    let client = conn::client(g).await?;
    let got = match wait {
        Some(timeout) => client.wait::<Value>(id, timeout).await,
        None => client.result::<Value>(id).await,
    };
    match got {
        Ok(value) => {
            if g.json {
                println!("{}", output::json_text(&value, false));
            } else {
                output::json(&value);
            }
            Ok(())
        }
        Err(err) => {
            if g.json {
                let state = match err.kind() {
                    TrackErrorKind::Unknown => Some("unknown".to_owned()),
                    TrackErrorKind::Expired => Some("expired".to_owned()),
                    TrackErrorKind::TimedOut => Some("timed_out".to_owned()),
                    _ => err.status().map(|s| s.state.as_str().to_owned()),
                };
                if let Some(state) = state {
                    let mut value = json!({ "id": id, "state": state });
                    if let Some(s) = err.status() {
                        value["attempt"] = json!(s.attempt);
                        value["last_error"] = json!(s.last_error);
                        if let TaskState::DeadLettered { reason } = &s.state {
                            value["reason"] = json!(reason);
                        }
                    }
                    output::json(&value);
                }
            }
            Err(track_error(&err))
        }
    }
}

async fn cancel(g: &Global, id: &str) -> Result<()> {
    let client = conn::client(g).await?;
    let outcome = client.cancel(id).await.map_err(|err| track_error(&err))?;
    let (label, was, message, ok) = match &outcome {
        CancelOutcome::Cancelled { was } => (
            "cancelled",
            Some(was.as_str()),
            format!("cancelled task {id} (it was {was}): it will not run"),
            true,
        ),
        CancelOutcome::Signalled => (
            "signalled",
            Some("running"),
            format!(
                "signalled task {id}: it is running; its handler is told to stop, and the task ends as cancelled unless it finishes first"
            ),
            true,
        ),
        CancelOutcome::AlreadyCancelled => (
            "already_cancelled",
            Some("cancelled"),
            format!("task {id} was already cancelled: nothing changed"),
            true,
        ),
        CancelOutcome::AlreadyFinished(state) => (
            "already_finished",
            Some(state.as_str()),
            format!("task {id} already finished ({state}): nothing to cancel"),
            false,
        ),
        CancelOutcome::Expired => (
            "expired",
            None,
            format!("the record of task {id} expired: nothing to cancel"),
            false,
        ),
        CancelOutcome::Unknown => (
            "unknown",
            None,
            format!("nothing is recorded for task {id} (never dispatched with tracking, or expired long ago): nothing to cancel"),
            false,
        ),
        other => ("other", None, format!("task {id}: {other:?}"), false),
    };
    if g.json {
        output::json(&json!({ "id": id, "outcome": label, "was": was }));
    } else if ok {
        say!("{message}");
    }
    if ok {
        Ok(())
    } else {
        Err(Error::msg(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("abc").is_ok());
        assert!(check_id("user@example.com/1").is_ok());
        assert!(check_id("").unwrap_err().to_string().contains("is empty"));
        assert!(check_id("a\nb").unwrap_err().to_string().contains("control characters"));
        assert!(check_id(&"x".repeat(257)).unwrap_err().to_string().contains("longer than 256"));
    }

    #[test]
    fn progress_texts() {
        let p = |fraction, detail| natasks::ProgressReport { fraction, detail };
        assert_eq!(progress_text(&p(Some(0.5), None)), "50%");
        assert_eq!(progress_text(&p(None, Some(json!({"rows": 5})))), r#"{"rows":5}"#);
        assert_eq!(progress_text(&p(Some(1.0), Some(json!(3)))), "100% 3");
    }
}
