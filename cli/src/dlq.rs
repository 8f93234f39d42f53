//! `natasks dlq`: list, show, requeue and purge dead letters.
//!
//! Dead letters are read with the stream's message-get API, so looking at them consumes
//! nothing. Requeue is safe to interrupt and to re-run: each dead letter is republished with
//! the message id `natasks-requeue-<stream>-<dlq sequence>` and deleted only once the server
//! confirmed the copy, so a re-run within the duplicate window after a crash between the two
//! steps does not store a second copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use async_nats::HeaderMap;
use clap::{ArgGroup, Subcommand};
use serde_json::json;

use crate::{conn, output, Context as _, Error, Global, Result};

const DEFAULT_LIMIT: usize = 100;

/// Headers that describe the failure; removed from a requeued task.
const FAILURE_HEADERS: [&str; 4] = [
    natasks::wire::HEADER_ORIGINAL_QUEUE,
    natasks::wire::HEADER_ATTEMPTS,
    natasks::wire::HEADER_LAST_ERROR,
    natasks::wire::HEADER_DEAD_LETTER_REASON,
];

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters of a queue (oldest first) without consuming them.
    List {
        /// The queue whose dead letters to list (not its `-dlq` name).
        queue: String,
        /// Show at most this many.
        #[arg(long, default_value_t = DEFAULT_LIMIT)]
        limit: usize,
    },
    /// Show one dead letter: headers and payload.
    Show {
        /// The queue the task failed on.
        queue: String,
        /// The dead letter's stream sequence (from `dlq list`).
        seq: u64,
    },
    /// Put dead letters back on their original queue.
    #[command(group(ArgGroup::new("which").required(true).args(["all", "seqs"])))]
    Requeue {
        /// The queue whose dead letters to requeue.
        queue: String,
        /// Requeue every dead letter of the queue.
        #[arg(long)]
        all: bool,
        /// Sequences of the dead letters to requeue.
        seqs: Vec<u64>,
    },
    /// Delete every dead letter of a queue.
    Purge {
        /// The queue whose dead letters to delete.
        queue: String,
    },
}

pub async fn run(g: &Global, cmd: DlqCommand) -> Result<()> {
    let queue = match &cmd {
        DlqCommand::List { queue, .. }
        | DlqCommand::Show { queue, .. }
        | DlqCommand::Requeue { queue, .. }
        | DlqCommand::Purge { queue } => conn::valid_queue(queue)?.to_owned(),
    };
    let js = conn::connect(g).await?;
    let stream = conn::stream(g, &js).await?;
    conn::ensure_known_queue(g, &stream, &queue).await?;
    let dlq = DeadLetters::new(g, stream, &queue);
    match cmd {
        DlqCommand::List { limit, .. } => list(g, &dlq, limit).await,
        DlqCommand::Show { seq, .. } => show(g, &dlq, seq).await,
        DlqCommand::Requeue { all, seqs, .. } => requeue(g, &js, &dlq, all, seqs).await,
        DlqCommand::Purge { .. } => purge(g, &dlq).await,
    }
}

/// The dead-letter queue of one queue.
struct DeadLetters {
    stream: Stream,
    stream_name: String,
    queue: String,
    name: String,
    subject: String,
}

impl DeadLetters {
    fn new(g: &Global, stream: Stream, queue: &str) -> Self {
        let name = conn::dlq_name(g, queue);
        Self {
            stream,
            stream_name: g.stream.clone(),
            queue: queue.to_owned(),
            subject: conn::queue_subject(g, &name),
            name,
        }
    }

    /// The first dead letter at or after `seq`, if any.
    async fn next(&self, seq: u64) -> Result<Option<StreamMessage>> {
        match self.stream.get_first_raw_message_by_subject(&self.subject, seq).await {
            Ok(message) => Ok(Some(message)),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(err).context(|| format!("cannot read {}", self.name)),
        }
    }

    /// The dead letter with this sequence; an error when there is none.
    async fn get(&self, seq: u64) -> Result<StreamMessage> {
        let missing = || {
            Error::msg(format!(
                "no dead letter {seq} on queue {} (already requeued or purged?)",
                self.name
            ))
        };
        match self.stream.get_raw_message(seq).await {
            Ok(message) if message.subject.as_str() == self.subject => Ok(message),
            Ok(_) => Err(missing()),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Err(missing()),
            Err(err) => Err(err).context(|| format!("cannot read {} message {seq}", self.name)),
        }
    }

    async fn count(&self) -> Result<u64> {
        conn::stored(&self.stream, &self.subject).await
    }
}

fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut pairs: Vec<(String, Vec<String>)> = headers
        .iter()
        .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.as_str().to_owned()).collect()))
        .collect();
    pairs.sort();
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .into_iter()
        .map(|(k, mut vs)| {
            let v = if vs.len() == 1 { json!(vs.remove(0)) } else { json!(vs) };
            (k, v)
        })
        .collect();
    serde_json::Value::Object(map)
}

fn summary(message: &StreamMessage) -> serde_json::Value {
    json!({
        "seq": message.sequence,
        "task": header(message, natasks::wire::HEADER_TASK),
        "original_queue": header(message, natasks::wire::HEADER_ORIGINAL_QUEUE),
        "attempts": header(message, natasks::wire::HEADER_ATTEMPTS).and_then(|a| a.parse::<u64>().ok()),
        "reason": header(message, natasks::wire::HEADER_DEAD_LETTER_REASON),
        "last_error": header(message, natasks::wire::HEADER_LAST_ERROR),
        "time": output::time(message.time),
    })
}

async fn list(g: &Global, dlq: &DeadLetters, limit: usize) -> Result<()> {
    let total = dlq.count().await?;
    let mut messages = Vec::new();
    let mut seq = 1;
    while messages.len() < limit {
        let Some(message) = dlq.next(seq).await? else { break };
        seq = message.sequence + 1;
        messages.push(message);
    }
    if g.json {
        let list: Vec<_> = messages.iter().map(summary).collect();
        output::json(&json!(list));
        return Ok(());
    }
    if messages.is_empty() {
        println!("no dead letters for queue {}", dlq.queue);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = messages
        .iter()
        .map(|m| {
            let h = |name| header(m, name).unwrap_or("-").to_owned();
            vec![
                m.sequence.to_string(),
                h(natasks::wire::HEADER_TASK),
                h(natasks::wire::HEADER_ATTEMPTS),
                h(natasks::wire::HEADER_DEAD_LETTER_REASON),
                output::time(m.time),
                output::clip(&h(natasks::wire::HEADER_LAST_ERROR), 60),
            ]
        })
        .collect();
    output::table(&["SEQ", "TASK", "ATTEMPTS", "REASON", "FAILED AT", "LAST ERROR"], &rows);
    let shown = messages.len() as u64;
    if total > shown {
        println!("... {} more (see --limit)", total - shown);
    }
    Ok(())
}

async fn show(g: &Global, dlq: &DeadLetters, seq: u64) -> Result<()> {
    let message = dlq.get(seq).await?;
    let payload_json = serde_json::from_slice::<serde_json::Value>(&message.payload).ok();
    let payload_text = String::from_utf8_lossy(&message.payload).into_owned();
    if g.json {
        output::json(&json!({
            "seq": message.sequence,
            "subject": message.subject.as_str(),
            "time": output::time(message.time),
            "headers": headers_json(&message.headers),
            "payload": payload_text,
            "payload_json": payload_json,
        }));
        return Ok(());
    }
    println!("Sequence: {}", message.sequence);
    println!("Subject:  {}", message.subject);
    println!("Time:     {}", output::time(message.time));
    println!("Headers:");
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_owned())))
        .collect();
    headers.sort();
    for (k, v) in headers {
        println!("  {k}: {v}");
    }
    println!("Payload ({} bytes):", message.payload.len());
    match payload_json {
        Some(value) => println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON values always serialize")
        ),
        None => println!("{payload_text}"),
    }
    Ok(())
}

/// The task to put back: the dead letter's payload and task headers, without the failure
/// headers, server headers and unique key, addressed to `target`, with an id derived from the dead
/// letter's sequence.
fn requeued(stream: &str, message: &StreamMessage, target: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, values) in message.headers.iter() {
        let name: &str = name.as_ref();
        // A unique task's lock was released when it was dead-lettered: the copy comes back
        // as an ordinary task, without a key it does not hold.
        let drop = FAILURE_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
            || name.eq_ignore_ascii_case(natasks::wire::HEADER_QUEUE)
            || name.eq_ignore_ascii_case(natasks::wire::HEADER_UNIQUE_KEY)
            || name.len() >= 5 && name[..5].eq_ignore_ascii_case("Nats-");
        if drop {
            continue;
        }
        // A tracked task's dead letter carries its tracking aside; the requeued task is
        // tracked again.
        let name = if name.eq_ignore_ascii_case(natasks::wire::HEADER_DEAD_LETTER_TRACK) {
            natasks::wire::HEADER_TRACK
        } else {
            name
        };
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    headers.insert(natasks::wire::HEADER_QUEUE, target);
    headers.insert("Nats-Msg-Id", requeue_id(stream, message.sequence).as_str());
    headers
}

/// The message id of the requeued copy of dead letter `seq`.
pub fn requeue_id(stream: &str, seq: u64) -> String {
    format!("natasks-requeue-{stream}-{seq}")
}

async fn requeue(
    g: &Global,
    js: &async_nats::jetstream::Context,
    dlq: &DeadLetters,
    all: bool,
    seqs: Vec<u64>,
) -> Result<()> {
    // Ctrl-C finishes the message being moved, then stops.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let total = if all { dlq.count().await? } else { seqs.len() as u64 };
    let mut progress = output::Progress::new("requeued", total);
    let mut moved: Vec<serde_json::Value> = Vec::new();
    let mut duplicates = 0u64;
    let mut explicit = seqs.into_iter();
    let mut cursor = 1;
    let mut failure = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let message = if all {
            match dlq.next(cursor).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        } else {
            let Some(seq) = explicit.next() else { break };
            match dlq.get(seq).await {
                Ok(message) => message,
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        };
        cursor = message.sequence + 1;
        match move_one(g, js, dlq, &message).await {
            Ok((target, duplicate)) => {
                duplicates += u64::from(duplicate);
                moved.push(
                    json!({ "seq": message.sequence, "queue": target, "duplicate": duplicate }),
                );
                progress.inc();
            }
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    progress.finish();
    let interrupted = stop.load(Ordering::SeqCst);
    if g.json {
        output::json(&json!({
            "queue": dlq.queue,
            "requeued": moved.len(),
            "already_requeued": duplicates,
            "interrupted": interrupted,
            "tasks": moved,
        }));
    } else {
        println!(
            "requeued {} dead letter(s) from {}{}",
            moved.len(),
            dlq.name,
            if duplicates > 0 {
                format!(" ({duplicates} had been requeued before, not stored twice)")
            } else {
                String::new()
            }
        );
    }
    if let Some(err) = failure {
        return Err(Error::msg(format!("{err} (requeued {} before this)", moved.len())));
    }
    if interrupted {
        return Err(Error::msg(format!(
            "interrupted after requeueing {}; run the command again to continue",
            moved.len()
        )));
    }
    Ok(())
}

/// Publishes the requeued copy, waits for the server's ack, then deletes the dead letter.
/// Returns the target queue and whether the server saw the copy as a duplicate (it was
/// published by an earlier, interrupted run).
async fn move_one(
    g: &Global,
    js: &async_nats::jetstream::Context,
    dlq: &DeadLetters,
    message: &StreamMessage,
) -> Result<(String, bool)> {
    let seq = message.sequence;
    let target = header(message, natasks::wire::HEADER_ORIGINAL_QUEUE)
        .filter(|q| natasks::wire::validate_queue(q).is_ok_and(|v| v == *q))
        .unwrap_or(&dlq.queue)
        .to_owned();
    let headers = requeued(&dlq.stream_name, message, &target);
    let subject = conn::queue_subject(g, &target);
    let what = || format!("cannot requeue dead letter {seq} to queue {target}");
    let publish = PublishMessage::build().payload(message.payload.clone()).headers(headers);
    let ack =
        js.send_publish(subject, publish).await.context(what)?.await.map_err(|err| {
            match err.kind() {
                PublishErrorKind::TimedOut => Error::msg(format!(
                    "{}: the server did not confirm in time (safe to run again)",
                    what()
                )),
                _ => Error::msg(format!("{}: {}", what(), crate::one_line(&err))),
            }
        })?;
    match dlq.stream.delete_message(seq).await {
        Ok(_) => {}
        // Deleted meanwhile (by a concurrent requeue or purge): the copy is stored, done.
        Err(err) if is_missing(&err) => {}
        Err(err) => {
            return Err(err).context(|| {
                format!(
                    "requeued dead letter {seq} to queue {target} but cannot delete it from {} (running the command again is safe)",
                    dlq.name
                )
            })
        }
    }
    Ok((target, ack.duplicate))
}

fn is_missing(err: &async_nats::jetstream::stream::DeleteMessageError) -> bool {
    use async_nats::jetstream::stream::DeleteMessageErrorKind;
    matches!(err.kind(), DeleteMessageErrorKind::JetStream(e)
        if e.error_code() == async_nats::jetstream::ErrorCode::SEQUENCE_NOT_FOUND
            || e.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND)
}

async fn purge(g: &Global, dlq: &DeadLetters) -> Result<()> {
    let response = dlq
        .stream
        .purge()
        .filter(&dlq.subject)
        .await
        .context(|| format!("cannot purge {}", dlq.name))?;
    if g.json {
        output::json(&json!({ "queue": dlq.queue, "purged": response.purged }));
    } else {
        println!("purged {} dead letter(s) from {}", response.purged, dlq.name);
    }
    Ok(())
}
