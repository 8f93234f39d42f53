//! `natasks queues`: every queue with its counts.
//!
//! * `stored`: messages on `<prefix>.<queue>` (waiting, in flight or waiting for a retry).
//! * `pending`: stored tasks not yet handed to a worker: `stored` less `in_flight`. (The
//!   consumer's `num_pending` is a counter the server keeps on the side, seen one too high
//!   while tasks were in flight.)
//! * `in_flight`: delivered and not yet acknowledged (the consumer's `num_ack_pending`).
//! * `redelivered`: in flight and delivered more than once (`num_redelivered`).
//! * `dlq`: messages on the dead-letter queue `<queue><dlq suffix>`.
//! * `oldest`: time of the first task still on the queue (pending or in flight).

use std::collections::BTreeMap;

use serde_json::json;

use crate::conn;
use crate::output;
use crate::{Global, Result};

#[derive(Debug, Default)]
struct Row {
    stored: u64,
    dlq: u64,
    consumer: Option<async_nats::jetstream::consumer::Info>,
    oldest: Option<time::OffsetDateTime>,
}

pub async fn run(g: &Global) -> Result<()> {
    let js = conn::connect(g).await?;
    let stream = conn::stream(g, &js).await?;
    let counts = conn::subject_counts(&stream, &format!("{}.*", g.subject_prefix)).await?;
    let consumers = conn::queue_consumers(g, &stream).await?;
    let prefix = format!("{}.", g.subject_prefix);

    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (subject, count) in &counts {
        let Some(queue) = subject.strip_prefix(&prefix) else { continue };
        match queue.strip_suffix(&g.dlq_suffix) {
            Some(base) if !base.is_empty() => rows.entry(base.to_owned()).or_default().dlq = *count,
            _ => rows.entry(queue.to_owned()).or_default().stored = *count,
        }
    }
    // A dead-letter queue gets a row of its own only when a worker consumes it.
    for (queue, info) in consumers {
        let stored = counts.get(&conn::queue_subject(g, &queue)).copied().unwrap_or(0);
        let row = rows.entry(queue).or_default();
        row.stored = stored;
        row.consumer = Some(info);
    }
    for (queue, row) in rows.iter_mut() {
        if row.stored > 0 {
            let subject = conn::queue_subject(g, queue);
            if let Ok(first) = stream.get_first_raw_message_by_subject(&subject, 1).await {
                row.oldest = Some(first.time);
            }
        }
    }

    let pending = |row: &Row| {
        row.stored.saturating_sub(row.consumer.as_ref().map_or(0, |c| c.num_ack_pending as u64))
    };
    if g.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(queue, row)| {
                json!({
                    "queue": queue,
                    "stored": row.stored,
                    "pending": pending(row),
                    "in_flight": row.consumer.as_ref().map_or(0, |c| c.num_ack_pending),
                    "redelivered": row.consumer.as_ref().map_or(0, |c| c.num_redelivered),
                    "dlq": row.dlq,
                    "oldest": row.oldest.map(output::time),
                    "oldest_age_seconds": row.oldest.map(|t| output::since(t).as_secs()),
                    "consumer": row.consumer.as_ref().map(|c| c.name.clone()),
                })
            })
            .collect();
        output::json(&json!(list));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no queues in stream {:?}", g.stream);
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(queue, row)| {
            let consumer = row.consumer.as_ref();
            vec![
                queue.clone(),
                pending(row).to_string(),
                consumer.map_or(0, |c| c.num_ack_pending).to_string(),
                consumer.map_or(0, |c| c.num_redelivered).to_string(),
                row.dlq.to_string(),
                row.oldest.map_or_else(|| "-".to_owned(), |t| output::age(output::since(t))),
                consumer.map_or_else(|| "-".to_owned(), |c| c.name.clone()),
            ]
        })
        .collect();
    output::table(
        &["QUEUE", "PENDING", "IN FLIGHT", "REDELIVERED", "DLQ", "OLDEST", "CONSUMER"],
        &table,
    );
    Ok(())
}
