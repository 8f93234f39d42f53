//! `natasks batch`: dispatch the tasks of a JSON-lines file, all or none.

use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;
use serde_json::json;

use crate::output::say;
use crate::{conn, output, Context as _, Error, Global, Result};

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// A JSON-lines file (`-` for stdin), one task per line:
    /// `{"queue": "emails", "task": "emails.send", "payload": {...}, "in": "5m",
    /// "message_id": "m-1", "unique": "key", "unique_ttl": "1h", "track": true}`; only
    /// `queue` and `task` are required. At most 1,000 tasks (a unique task counts twice).
    file: PathBuf,
}

/// One line of the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    queue: String,
    task: String,
    #[serde(default)]
    payload: Option<serde_json::Value>,
    #[serde(default, rename = "in")]
    delay: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    unique: Option<String>,
    #[serde(default)]
    unique_ttl: Option<String>,
    #[serde(default)]
    track: bool,
}

pub async fn run(g: &Global, args: BatchArgs) -> Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context(|| "cannot read stdin".to_owned())?
    } else {
        std::fs::read_to_string(&args.file)
            .context(|| format!("cannot read {}", args.file.display()))?
    };
    // Every line is checked before connecting: a bad line dispatches nothing.
    let mut batch = natasks::Batch::new();
    let mut queues = Vec::new();
    for (number, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = |problem: String| Error::msg(format!("line {}: {problem}", number + 1));
        let line: Line = serde_json::from_str(raw).map_err(|err| at(err.to_string()))?;
        let payload = match &line.payload {
            Some(value) => serde_json::to_vec(value).map_err(|err| at(err.to_string()))?,
            None => Vec::new(),
        };
        let mut task = natasks::Task::new(line.task.clone(), payload);
        if let Some(id) = line.message_id {
            task = task.with_message_id(id);
        }
        if let Some(key) = line.unique {
            let ttl = line.unique_ttl.as_deref().unwrap_or("24h");
            let ttl =
                output::parse_duration(ttl).map_err(|err| at(format!("unique_ttl: {err}")))?;
            task = task.unique(key, ttl);
        }
        if line.track {
            task = task.tracked();
        }
        match line.delay.as_deref() {
            Some(delay) => {
                let delay =
                    output::parse_duration(delay).map_err(|err| at(format!("in: {err}")))?;
                batch.add_in(task, &line.queue, delay);
            }
            None => {
                batch.add(task, &line.queue);
            }
        }
        queues.push((line.queue, line.task));
    }
    let client = conn::client(g).await?;
    let count = batch.len();
    let receipts = match client.dispatch_batch(batch).await {
        Ok(receipts) => receipts,
        Err(err) => {
            let outcome = match err.kind() {
                natasks::DispatchErrorKind::Timeout => {
                    "it may have been stored: check the queue before sending it again; sent \
                     again with the same message ids, it is refused if it was"
                }
                natasks::DispatchErrorKind::AlreadyStored => {
                    "nothing new was stored: the batch, or a task of it, already was"
                }
                _ => "nothing was stored",
            };
            return Err(crate::Error(format!(
                "cannot dispatch the batch of {count} tasks ({outcome}): {}",
                crate::one_line(&err)
            )));
        }
    };
    if g.json {
        let tasks: Vec<_> = receipts
            .iter()
            .zip(&queues)
            .map(|(r, (queue, task))| {
                json!({ "queue": queue, "task": task, "id": r.id, "sequence": r.sequence })
            })
            .collect();
        output::json(&json!({ "dispatched": tasks.len(), "tasks": tasks }));
    } else {
        for (receipt, (queue, task)) in receipts.iter().zip(&queues) {
            say!("dispatched {task} to queue {queue} (id {})", receipt.id);
        }
        say!("{} tasks stored together", receipts.len());
    }
    Ok(())
}
