//! `natasks events`: a live tail of the lifecycle events of tracked tasks.
//!
//! Events are core NATS messages: the tail shows what happens while it runs, nothing from
//! before it started, and only tasks dispatched with tracking.

use std::io::Write as _;

use clap::Args;
use futures_util::StreamExt;
use natasks::track::{Event, EventKind};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{conn, output, task, Error, Global, Result};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events of this queue (default: every queue).
    queue: Option<String>,
}

pub async fn run(g: &Global, args: EventsArgs) -> Result<()> {
    if let Some(queue) = &args.queue {
        natasks::wire::validate_queue(queue)
            .map_err(|err| Error::msg(format!("invalid queue: {err}")))?;
    }
    let client = conn::client(g).await?;
    let mut events = client
        .events(args.queue.as_deref())
        .await
        .map_err(|err| Error::msg(format!("cannot watch events: {}", crate::one_line(&err))))?;
    // On stderr, so that stdout holds events only; it also tells that the subscription
    // is in place (what happens from now on is shown).
    eprintln!(
        "watching events of {} (Ctrl-C to stop)",
        args.queue.as_deref().map_or("every queue".to_owned(), |q| format!("queue {q}"))
    );
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let event = tokio::select! {
            _ = &mut stop => return Ok(()),
            event = events.next() => event,
        };
        let Some(event) = event else {
            return Err(Error::msg("the connection to the server closed"));
        };
        let line = if g.json {
            serde_json::to_value(&event).map(|v| output::json_text(&v, false)).unwrap_or_default()
        } else {
            output::safe(&line(&event)).into_owned()
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout (`natasks events | head`) ends the tail quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

/// RFC 3339 UTC time, to the millisecond.
fn time_ms(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let ms = at.millisecond();
    let at = at.replace_nanosecond(0).unwrap_or(at);
    let text = at.format(&Rfc3339).unwrap_or_else(|_| at.to_string());
    match text.strip_suffix('Z') {
        Some(base) => format!("{base}.{ms:03}Z"),
        None => text,
    }
}

/// One readable line: time, queue, kind, task, id, attempt, then what the kind carries.
fn line(event: &Event) -> String {
    let mut line = format!(
        "{}  {}  {:<13}  {}  id={}",
        time_ms(event.at),
        event.queue,
        event.kind.as_str(),
        event.task,
        event.id
    );
    if event.attempt > 0 {
        line.push_str(&format!("  attempt={}", event.attempt));
    }
    if let Some(progress) = &event.progress {
        line.push_str(&format!("  progress={}", task::progress_text(progress)));
    }
    if let Some(next) = event.next_at {
        let label = if event.kind == EventKind::Dispatched { "due" } else { "next" };
        line.push_str(&format!("  {label}={}", output::time(next)));
    }
    if let Some(reason) = &event.reason {
        line.push_str(&format!("  reason={reason}"));
    }
    if let Some(error) = &event.error {
        line.push_str(&format!("  error={}", error.replace(['\n', '\r'], " ")));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_have_milliseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(time_ms(at), "2023-11-14T22:13:20.123Z");
    }
}
