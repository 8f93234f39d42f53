//! `natasks queues`: every queue with its counts and controls, read through
//! `natasks::admin`.
//!
//! * `pending`: stored tasks not yet handed to a worker.
//! * `in_flight`: delivered and not yet acknowledged.
//! * `redelivered`: in flight and delivered more than once.
//! * `dlq`: messages on the dead-letter queue `<queue><dlq suffix>`.
//! * `scheduled`: delayed tasks for the queue not due yet.
//! * `oldest`: time of the first task still on the queue (pending or in flight).
//! * `paused`: until when the queue is paused; `limit`: the most tasks in flight across
//!   every worker (`*` when an operator set it); `rates`: its rate limits.

use serde_json::json;

use crate::conn::{admin, admin_error};
use crate::output::{self, say};
use crate::queue::{paused_text, rates_text};
use crate::{Global, Result};

pub async fn run(g: &Global) -> Result<()> {
    let admin = admin(g).await?;
    let rows = admin.queues().await.map_err(|err| admin_error(g, &err))?;
    if g.json {
        let list: Vec<_> = rows
            .iter()
            .map(|row| {
                json!({
                    "queue": row.name,
                    "stored": row.stored,
                    "pending": row.pending,
                    "in_flight": row.in_flight,
                    "redelivered": row.redelivered,
                    "dlq": row.dead_letters,
                    "scheduled": row.scheduled,
                    "oldest": row.oldest.map(output::time),
                    "oldest_age_seconds": row.oldest.map(|t| output::since(t).as_secs()),
                    "consumer": row.consumer,
                    "paused_until": row.paused_until.map(output::time),
                    "limit": row.limit,
                    "limit_set": row.limit_set,
                    "rates": row.rates.iter().map(|r| json!({
                        "task": r.task,
                        "rate": r.rate.to_string(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        output::json(&json!(list));
        return Ok(());
    }
    if rows.is_empty() {
        say!("no queues in stream {:?}", g.stream);
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            vec![
                row.name.clone(),
                row.pending.to_string(),
                row.in_flight.to_string(),
                row.redelivered.to_string(),
                row.dead_letters.to_string(),
                row.scheduled.to_string(),
                row.oldest.map_or_else(|| "-".to_owned(), |t| output::age(output::since(t))),
                paused_text(row.paused_until),
                match (row.limit, row.limit_set) {
                    (Some(limit), true) => format!("{limit}*"),
                    (Some(limit), false) => limit.to_string(),
                    (None, _) => "-".to_owned(),
                },
                rates_text(&row.rates),
                row.consumer.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    output::table(
        &[
            "QUEUE",
            "PENDING",
            "IN FLIGHT",
            "REDELIVERED",
            "DLQ",
            "SCHEDULED",
            "OLDEST",
            "PAUSED",
            "LIMIT",
            "RATES",
            "CONSUMER",
        ],
        &table,
    );
    Ok(())
}
