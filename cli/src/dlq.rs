//! `natasks dlq`: list, show, requeue, delete and purge dead letters, through
//! `natasks::admin`.
//!
//! Looking at dead letters consumes nothing. Requeue is safe to interrupt (Ctrl-C finishes
//! the dead letter being moved, then stops) and to run again: the library publishes each
//! copy with a message id derived from the dead letter, and deletes the dead letter only
//! once the server confirmed the copy.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, Subcommand};
use natasks::admin::{Admin, BulkOutcome, Filter, Selection, TaskDetail, TaskState};
use serde_json::json;

use crate::filter::Which;
use crate::output::{self, say};
use crate::{conn, Error, Global, Result};

const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters of a queue (oldest first) without consuming them.
    List {
        /// The queue whose dead letters to list (not its `-dlq` name).
        queue: String,
        /// Show at most this many.
        #[arg(long, default_value_t = DEFAULT_LIMIT)]
        limit: usize,
        /// Start after this sequence (the last one of the previous page).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
    },
    /// Show one dead letter: headers and payload.
    Show {
        /// The queue the task failed on.
        queue: String,
        /// The dead letter's stream sequence (from `dlq list`).
        seq: u64,
    },
    /// Put dead letters back on their original queue: by sequence, --all, or those matching
    /// the filter flags.
    Requeue(BulkArgs),
    /// Delete dead letters: by sequence, --all, or those matching the filter flags.
    Delete(BulkArgs),
    /// Delete every dead letter of a queue.
    Purge {
        /// The queue whose dead letters to delete.
        queue: String,
    },
}

/// Which dead letters a bulk command acts on.
#[derive(Debug, Args)]
#[command(
    mut_arg("all", |a| a.help("Every dead letter of the queue")),
    mut_arg("seqs", |a| a.help("Sequences of the dead letters"))
)]
pub struct BulkArgs {
    /// The queue whose dead letters to act on.
    pub queue: String,
    /// By sequence, every one, or those matching the filter flags.
    #[command(flatten)]
    pub which: Which,
}

pub async fn run(g: &Global, cmd: DlqCommand) -> Result<()> {
    let queue = match &cmd {
        DlqCommand::List { queue, .. }
        | DlqCommand::Show { queue, .. }
        | DlqCommand::Purge { queue } => queue,
        DlqCommand::Requeue(args) | DlqCommand::Delete(args) => &args.queue,
    };
    conn::valid_queue(queue)?;
    let admin = conn::admin(g).await?;
    match cmd {
        DlqCommand::List { queue, limit, after } => list(g, &admin, &queue, limit, after).await,
        DlqCommand::Show { queue, seq } => show(g, &admin, &queue, seq).await,
        DlqCommand::Requeue(args) => bulk(g, &admin, &args, Bulk::Requeue).await,
        DlqCommand::Delete(args) => bulk(g, &admin, &args, Bulk::Delete).await,
        DlqCommand::Purge { queue } => {
            let purged =
                admin.purge(&queue, TaskState::Dead).await.map_err(|e| conn::admin_error(g, &e))?;
            if g.json {
                output::json(&json!({ "queue": queue, "purged": purged }));
            } else {
                say!("purged {purged} dead letter(s) from {}", dlq_name(g, &queue));
            }
            Ok(())
        }
    }
}

fn dlq_name(g: &Global, queue: &str) -> String {
    format!("{queue}{}", g.dlq_suffix)
}

async fn list(
    g: &Global,
    admin: &Admin,
    queue: &str,
    limit: usize,
    after: Option<u64>,
) -> Result<()> {
    let page = admin
        .tasks(queue, TaskState::Dead, after, limit)
        .await
        .map_err(|err| conn::admin_error(g, &err))?;
    if g.json {
        let list: Vec<_> = page
            .items
            .iter()
            .map(|t| {
                json!({
                    "seq": t.sequence,
                    "task": t.name,
                    "original_queue": t.queue,
                    "attempts": t.attempts,
                    "reason": t.reason,
                    "last_error": t.last_error,
                    "time": output::time(t.stored_at),
                })
            })
            .collect();
        output::json(&json!(list));
        return Ok(());
    }
    if page.items.is_empty() {
        say!("no dead letters for queue {queue}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = page
        .items
        .iter()
        .map(|t| {
            vec![
                t.sequence.to_string(),
                t.name.clone(),
                t.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                t.reason.clone().unwrap_or_else(|| "-".to_owned()),
                output::time(t.stored_at),
                output::clip(t.last_error.as_deref().unwrap_or("-"), 60),
            ]
        })
        .collect();
    output::table(&["SEQ", "TASK", "ATTEMPTS", "REASON", "FAILED AT", "LAST ERROR"], &rows);
    match (page.next, after) {
        (Some(_), None) => {
            // The dead letters only: counting delayed tasks would read every one.
            let info = admin.queue_without_scheduled(queue).await;
            let total = info.map_err(|e| conn::admin_error(g, &e))?.dead_letters;
            let rest = total.saturating_sub(page.items.len() as u64);
            say!("... {rest} more (see --limit)");
        }
        (Some(next), Some(_)) => say!("... more (see --after {next})"),
        (None, _) => {}
    }
    Ok(())
}

async fn show(g: &Global, admin: &Admin, queue: &str, seq: u64) -> Result<()> {
    let missing = || {
        Error::msg(format!(
            "no dead letter {seq} on queue {} (already requeued or purged?)",
            dlq_name(g, queue)
        ))
    };
    let detail = match admin.task(seq).await {
        Ok(detail) if detail.summary.state == TaskState::Dead && detail.summary.queue == queue => {
            detail
        }
        Ok(_) => return Err(missing()),
        Err(err) if err.kind() == natasks::admin::AdminErrorKind::NotFound => return Err(missing()),
        Err(err) => return Err(conn::admin_error(g, &err)),
    };
    print_detail(g, &detail);
    Ok(())
}

/// Prints a task in full: sequence, subject, time, headers and payload.
pub fn print_detail(g: &Global, detail: &TaskDetail) {
    let payload_json = serde_json::from_slice::<serde_json::Value>(&detail.payload).ok();
    let payload_text = String::from_utf8_lossy(&detail.payload).into_owned();
    if g.json {
        let mut headers = serde_json::Map::new();
        for (k, v) in &detail.headers {
            match headers.get_mut(k) {
                Some(serde_json::Value::Array(vs)) => vs.push(json!(v)),
                Some(first) => *first = json!([first.clone(), v]),
                None => {
                    headers.insert(k.clone(), json!(v));
                }
            }
        }
        output::json(&json!({
            "seq": detail.summary.sequence,
            "queue": detail.summary.queue,
            "state": detail.summary.state.as_str(),
            "subject": detail.subject,
            "time": output::time(detail.summary.stored_at),
            "headers": headers,
            "payload": payload_text,
            "payload_json": payload_json,
        }));
        return;
    }
    say!("Sequence: {}", detail.summary.sequence);
    say!("Subject:  {}", detail.subject);
    say!("State:    {}", detail.summary.state);
    say!("Time:     {}", output::time(detail.summary.stored_at));
    say!("Headers:");
    for (k, v) in &detail.headers {
        say!("  {k}: {v}");
    }
    say!("Payload ({} bytes):", detail.payload.len());
    // The payload keeps its lines; its control characters are shown escaped.
    match payload_json {
        Some(value) => output::json(&value),
        None => println!("{}", output::block(&payload_text)),
    }
}

/// A bulk operation on dead letters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bulk {
    Requeue,
    Delete,
}

async fn bulk(g: &Global, admin: &Admin, args: &BulkArgs, what: Bulk) -> Result<()> {
    let selection = args.which.selection()?;
    let outcome = run_bulk(g, &args.queue, TaskState::Dead, &selection, what, admin).await?;
    let (verb, noun) = match what {
        Bulk::Requeue => ("requeued", "requeueing"),
        Bulk::Delete => ("deleted", "deleting"),
    };
    if !g.json {
        say!(
            "{verb} {} dead letter(s) from {}{}",
            outcome.done,
            dlq_name(g, &args.queue),
            if outcome.duplicates > 0 {
                format!(" ({} had been requeued before, not stored twice)", outcome.duplicates)
            } else {
                String::new()
            }
        );
    }
    finish(&outcome, noun)
}

/// Runs a bulk operation with progress on stderr; Ctrl-C stops it after the current task,
/// a second Ctrl-C at once (a long scan that selects nothing reaches no "after"; every step
/// is safe to interrupt and run again). With --json, prints the outcome.
pub async fn run_bulk(
    g: &Global,
    queue: &str,
    state: TaskState,
    selection: &Selection,
    what: Bulk,
    admin: &Admin,
) -> Result<BulkOutcome> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::SeqCst);
                eprintln!("stopping after the current task; Ctrl-C again to stop now");
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopped; run the command again to continue");
                std::process::exit(130);
            }
        });
    }
    let label = match what {
        Bulk::Requeue => "requeued",
        Bulk::Delete => "deleted",
    };
    let mut progress: Option<output::Progress> = None;
    let mut tasks = Vec::new();
    // A filter's total is what it reads, not what it selects: no progress against it.
    let counted = !matches!(selection, Selection::Matching(f) if *f != Filter::default());
    let step = |step: &natasks::admin::BulkStep| {
        if counted {
            progress.get_or_insert_with(|| output::Progress::new(label, step.total)).inc();
        }
        // Kept only for --json: a run over a million dead letters keeps no list otherwise.
        if g.json {
            tasks.push(
                json!({ "seq": step.sequence, "queue": step.queue, "duplicate": step.duplicate }),
            );
        }
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let outcome = match what {
        Bulk::Requeue => admin.requeue_with(queue, selection, step).await,
        Bulk::Delete => admin.delete_with(queue, state, selection, step).await,
    }
    .map_err(|err| conn::admin_error(g, &err))?;
    if let Some(progress) = progress {
        progress.finish();
    }
    if g.json {
        let mut out = json!({
            "queue": queue,
            label: outcome.done,
            "skipped": outcome.skipped,
            "failed": outcome.failed.iter().map(|(seq, reason)| json!({"seq": seq, "reason": reason})).collect::<Vec<_>>(),
            "interrupted": outcome.stopped,
            "tasks": tasks,
        });
        if what == Bulk::Requeue {
            out["already_requeued"] = json!(outcome.duplicates);
        }
        output::json(&out);
    }
    Ok(outcome)
}

/// The command's error when some tasks failed or it was interrupted.
pub fn finish(outcome: &BulkOutcome, doing: &str) -> Result<()> {
    if let Some((_, reason)) = outcome.failed.first() {
        let more = match outcome.failed.len() {
            1 => String::new(),
            n => format!("; {} more failed", n - 1),
        };
        return Err(Error::msg(format!("{reason}{more} ({} done before this)", outcome.done)));
    }
    if outcome.stopped {
        return Err(Error::msg(format!(
            "interrupted after {doing} {}; run the command again to continue",
            outcome.done
        )));
    }
    Ok(())
}
