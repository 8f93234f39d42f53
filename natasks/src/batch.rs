//! Atomic batches (nats-server 2.12+, ADR-50): several messages of one stream stored all
//! together or not at all.
//!
//! async-nats has no batch publisher, so the batch goes out as the server expects it over
//! plain NATS: every message carries `Nats-Batch-Id` and `Nats-Batch-Sequence` (1..n); the
//! first is sent as a request (the server answers with an empty reply, or an error when it
//! cannot start the batch), the middle ones are published once it answered, and the last
//! carries `Nats-Batch-Commit: 1` and is a request whose answer is the batch's publish ack. The
//! server checks every condition of every message (`Nats-Expected-Last-Subject-Sequence`,
//! duplicates) when the commit arrives, and stores nothing if one fails. A publisher that
//! dies before the commit leaves an open batch the server abandons after 10 s idle,
//! storing nothing of it.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;

use crate::error::BoxError;
use crate::wire;

/// The most messages a batch may hold: the server's default `jetstream.limits.batch`.
pub(crate) const MAX_BATCH: usize = 1000;

/// One message of a batch, ready to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) subject: String,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

/// What the server said of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchAck {
    /// The stream sequence of the batch's first message.
    pub(crate) first: u64,
    /// The stream sequence of its last message: a batch occupies consecutive sequences.
    pub(crate) last: u64,
    /// How many messages were stored.
    pub(crate) count: u64,
}

impl BatchAck {
    /// The stream sequence of message `index` (from 0) of the batch.
    pub(crate) fn sequence(&self, index: usize) -> u64 {
        self.first + index as u64
    }
}

/// Publishing an atomic batch failed; nothing was stored unless it is
/// [`BatchPublishError::Timeout`], where the outcome is unknown.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchPublishError {
    /// The batch holds no message.
    #[error("an atomic batch needs at least one message")]
    Empty,
    /// The batch holds more than [`MAX_BATCH`] messages.
    #[error("an atomic batch holds at most {MAX_BATCH} messages, this one {0}")]
    TooLarge(usize),
    /// A message is larger than the server's `max_payload` (headers and payload, as the
    /// client counts them): the client would refuse to send it, after earlier messages had
    /// opened the batch on the server.
    #[error(
        "message {index} of the batch is {size} bytes with its headers, more than the \
         server's max_payload of {max_payload}"
    )]
    MessageTooLarge {
        /// Its index in the batch, from 0.
        index: usize,
        /// Its size: headers and payload.
        size: usize,
        /// The server's `max_payload`.
        max_payload: usize,
    },
    /// The server refused the batch.
    #[error("the server refused the batch (error {code}): {description}")]
    Refused {
        /// The JetStream error code (`err_code`).
        code: u64,
        /// The server's description.
        description: String,
    },
    /// The commit was sent but not confirmed in time: the batch may or may not be stored.
    #[error("the server did not confirm the batch in time")]
    Timeout(#[source] BoxError),
    /// The batch could not be sent (no connection, no stream listening).
    #[error("the batch could not be sent")]
    Send(#[source] BoxError),
}

/// `Nats-Expected-Last-Subject-Sequence` did not hold for a message of the batch.
pub(crate) const WRONG_LAST_SEQUENCE: u64 = 10071;
/// The stream does not allow atomic batches.
pub(crate) const ATOMIC_DISABLED: u64 = 10174;
/// A message of the batch has a `Nats-Msg-Id` the stream already stored (or that another
/// message of the batch carries).
pub(crate) const DUPLICATE_MESSAGE_ID: u64 = 10201;
/// The stream has as many batches in flight as the server allows.
pub(crate) const TOO_MANY_IN_FLIGHT: u64 = 10210;

impl BatchPublishError {
    /// The JetStream error code the server refused the batch with.
    pub(crate) fn code(&self) -> Option<u64> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: Option<u64>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// How long the commit may take to be confirmed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a batch waits, at most, for a free slot when the stream has as many batches
/// in flight as the server allows (50 per stream by default).
const BUSY_PATIENCE: Duration = Duration::from_secs(5);

/// Stores all `messages` or none. They must all be captured by one stream (the task stream);
/// at most [`MAX_BATCH`]. Checked before anything is sent: an empty or oversized batch,
/// or one holding a message over the server's `max_payload`, publishes nothing. When the
/// stream has as many batches in flight as the server allows, the batch (refused whole,
/// nothing stored) is sent again after a short pause, for up to
/// 5 s.
pub(crate) async fn publish_atomic(
    js: &jetstream::Context,
    messages: Vec<Outgoing>,
) -> Result<BatchAck, BatchPublishError> {
    let total = messages.len();
    if total == 0 {
        return Err(BatchPublishError::Empty);
    }
    if total > MAX_BATCH {
        return Err(BatchPublishError::TooLarge(total));
    }
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match publish_once(js, &messages).await {
            Err(err)
                if err.code() == Some(TOO_MANY_IN_FLIGHT) && started.elapsed() < BUSY_PATIENCE =>
            {
                // Spread the retries of many dispatchers refused at once.
                let jitter = Duration::from_micros(u64::from(nuid::next().as_bytes()[21]) * 20);
                tokio::time::sleep(pause + jitter).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

async fn publish_once(
    js: &jetstream::Context,
    messages: &[Outgoing],
) -> Result<BatchAck, BatchPublishError> {
    let total = messages.len();
    let client = js.client();
    let batch_id = nuid::next().to_string();
    let max_payload = client.server_info().max_payload;
    let mut ready = Vec::with_capacity(total);
    for (index, message) in messages.iter().enumerate() {
        let mut headers = message.headers.clone();
        let position = index + 1;
        headers.insert(wire::NATS_BATCH_ID, batch_id.as_str());
        headers.insert(wire::NATS_BATCH_SEQUENCE, position.to_string().as_str());
        if position == total {
            headers.insert(wire::NATS_BATCH_COMMIT, "1");
        }
        // Checked before the first message opens the batch: the client refuses to send a
        // message over max_payload, and a batch opened but never committed holds one of
        // the stream's 50 batch slots for 10 s.
        let size = wire_len(&headers) + message.payload.len();
        if size > max_payload {
            return Err(BatchPublishError::MessageTooLarge { index, size, max_payload });
        }
        ready.push((message.subject.clone(), headers, message.payload.clone()));
    }
    for (index, (subject, headers, payload)) in ready.into_iter().enumerate() {
        let position = index + 1;
        if position == total {
            let request = async_nats::Request::new()
                .payload(payload)
                .headers(headers)
                .timeout(Some(COMMIT_TIMEOUT));
            let reply =
                client.send_request(subject, request).await.map_err(|err| match err.kind() {
                    async_nats::RequestErrorKind::TimedOut => {
                        BatchPublishError::Timeout(err.into())
                    }
                    _ => BatchPublishError::Send(err.into()),
                })?;
            let reply = parse(&reply.payload)?;
            let count = reply.count.unwrap_or(total as u64);
            return Ok(BatchAck { first: reply.seq + 1 - count, last: reply.seq, count });
        }
        if position == 1 {
            // The server answers the first message: an empty reply, or why it cannot start
            // the batch. The rest is sent only after that answer: sent at once, messages of
            // concurrent batches reached the server before their batch had started, and
            // the batch failed as incomplete (seen on nats-server 2.15.1).
            let reply = client
                .request_with_headers(subject, headers, payload)
                .await
                .map_err(|err| BatchPublishError::Send(err.into()))?;
            if !reply.payload.is_empty() {
                parse(&reply.payload)?;
            }
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|err| BatchPublishError::Send(err.into()))?;
        }
    }
    unreachable!("the last message of a non-empty batch returns")
}

/// The size of `headers` on the wire, as async-nats counts it against `max_payload`:
/// `NATS/1.0\r\n`, a `name: value\r\n` line per value, and `\r\n`.
fn wire_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|value| AsRef::<[u8]>::as_ref(name).len() + 2 + value.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    b"NATS/1.0\r\n".len() + lines + 2
}

fn parse(payload: &[u8]) -> Result<Reply, BatchPublishError> {
    let reply: Reply = serde_json::from_slice(payload).map_err(|err| {
        BatchPublishError::Send(
            format!(
                "unreadable reply {:?}: {err}",
                String::from_utf8_lossy(&payload[..payload.len().min(200)])
            )
            .into(),
        )
    })?;
    match reply.error {
        Some(ApiError { err_code, description }) => {
            Err(BatchPublishError::Refused { code: err_code, description })
        }
        None => Ok(reply),
    }
}
