//! `natasks search`: find tasks by name, header, payload or last error, through
//! `natasks::admin`. Reads the stream (nothing is consumed); a large search shows its
//! progress on stderr.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use clap::Args;
use natasks::admin::{SearchOptions, SearchProgress, TaskState, TaskSummary};
use serde_json::json;

use crate::filter::{parse_state, FilterArgs};
use crate::output::say;
use crate::{conn, output, Global, Result};

/// Above this many messages to read, a search reports its progress on stderr.
const SHOW_PROGRESS_FROM: u64 = 10_000;

#[derive(Debug, Args)]
pub struct SearchArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Only this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only tasks in this state: pending, in_flight, scheduled, dead (repeatable; default
    /// every state).
    #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
    states: Vec<TaskState>,
    /// Show at most this many tasks.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Read at most this many messages.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    max_scan: u64,
}

pub async fn run(g: &Global, args: SearchArgs) -> Result<()> {
    let filter = args.filter.filter()?;
    if let Some(queue) = &args.queue {
        conn::valid_queue(queue)?;
    }
    let options = SearchOptions {
        queue: args.queue.clone(),
        states: args.states.clone(),
        limit: args.limit,
        max_scan: args.max_scan,
    };
    let admin = conn::admin(g).await?;
    let mut shown = Shown::new();
    let result = admin
        .search(&filter, &options, |at| shown.report(at))
        .await
        .map_err(|err| conn::admin_error(g, &err))?;
    shown.finish();
    if g.json {
        let items: Vec<_> = result.items.iter().map(summary_json).collect();
        output::json(&json!({
            "tasks": items,
            "scanned": result.scanned,
            "truncated": result.truncated,
        }));
        return Ok(());
    }
    if result.items.is_empty() {
        say!("no matching tasks ({} message(s) read)", result.scanned);
    } else {
        let rows: Vec<Vec<String>> = result.items.iter().map(summary_row).collect();
        output::table(&["SEQ", "QUEUE", "STATE", "TASK", "STORED", "LAST ERROR"], &rows);
        say!("{} found, {} message(s) read", result.items.len(), result.scanned);
    }
    if result.truncated {
        say!("stopped early: more may match (see --limit, --max-scan)");
    }
    Ok(())
}

/// A task in a table.
pub fn summary_row(t: &TaskSummary) -> Vec<String> {
    vec![
        t.sequence.to_string(),
        t.queue.clone(),
        t.state.to_string(),
        if t.name.is_empty() { "-".to_owned() } else { t.name.clone() },
        output::time(t.stored_at),
        output::clip(t.last_error.as_deref().unwrap_or("-"), 50),
    ]
}

/// A task as JSON.
pub fn summary_json(t: &TaskSummary) -> serde_json::Value {
    json!({
        "seq": t.sequence,
        "queue": t.queue,
        "state": t.state.as_str(),
        "task": t.name,
        "id": t.id,
        "stored": output::time(t.stored_at),
        "due": t.due.map(output::time),
        "attempts": t.attempts,
        "last_error": t.last_error,
        "size": t.size,
    })
}

/// Search progress on stderr, for a large search: a line every two seconds (on a terminal,
/// rewritten in place).
struct Shown {
    last: Instant,
    tty: bool,
    drawn: bool,
}

impl Shown {
    fn new() -> Self {
        Self { last: Instant::now(), tty: std::io::stderr().is_terminal(), drawn: false }
    }

    fn report(&mut self, at: SearchProgress) {
        let done = at.scanned >= at.total;
        let due = self.last.elapsed() >= Duration::from_secs(2) || done;
        if at.total < SHOW_PROGRESS_FROM || !due {
            return;
        }
        self.last = Instant::now();
        self.drawn = true;
        let line = format!("searched {}/{}, {} found", at.scanned, at.total, at.matched);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty && self.drawn {
            eprintln!();
        }
    }
}
