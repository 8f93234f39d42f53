//! Reading a stream's messages without consuming them.
//!
//! A task stream has work-queue retention, on which the server accepts no consumer without
//! acknowledgements and no consumer overlapping the workers' one: reading goes through the
//! stream's message-get API. A scan asks for the next message on a subject filter; where
//! matching messages sit next to each other (a dead-letter queue filled in bulk), it asks
//! for a window of consecutive sequences at once, many requests in flight, and widens the
//! window while it keeps hitting.

use std::ops::ControlFlow;

use std::str::FromStr as _;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use futures_util::StreamExt as _;
use serde::Deserialize;

use super::{AdminError, AdminErrorKind};

/// The widest window of sequences asked for at once.
const MAX_WINDOW: u64 = 256;

/// What a message get found at a sequence.
pub(crate) enum Got {
    /// The message.
    Message(StreamMessage),
    /// A message whose headers natasks cannot read (written by another client: a header
    /// name or value that is not ASCII, a malformed line), with its sequence and why.
    Unreadable(u64, String),
}

/// The message with sequence `seq`; `None` when there is none (deleted, or never stored).
/// A message whose headers cannot be read is an [`AdminErrorKind::InvalidInput`] error.
pub(crate) async fn get(
    js: &Context,
    stream: &Stream,
    seq: u64,
) -> Result<Option<StreamMessage>, AdminError> {
    match fetch(js, stream, seq, None).await? {
        None => Ok(None),
        Some(Got::Message(message)) => Ok(Some(message)),
        Some(Got::Unreadable(seq, why)) => Err(AdminError::new(
            AdminErrorKind::InvalidInput,
            format!("message {seq} cannot be read as a task: {why}"),
        )),
    }
}

/// Reads the message at `seq`, or with `filter` the first at or after `seq` on it, through
/// the stream's message-get API. The headers are decoded here, not by the client: every
/// value of a repeated header is kept, and a message with headers that cannot be decoded is
/// [`Got::Unreadable`] instead of failing the read.
async fn fetch(
    js: &Context,
    stream: &Stream,
    seq: u64,
    filter: Option<&str>,
) -> Result<Option<Got>, AdminError> {
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default)]
        message: Option<Raw>,
        #[serde(default)]
        error: Option<ApiError>,
    }
    #[derive(Deserialize)]
    struct Raw {
        subject: String,
        seq: u64,
        #[serde(default)]
        data: String,
        #[serde(default)]
        hdrs: Option<String>,
        #[serde(with = "time::serde::rfc3339")]
        time: time::OffsetDateTime,
    }
    #[derive(Deserialize)]
    struct ApiError {
        #[serde(default)]
        code: u64,
        #[serde(default)]
        err_code: u64,
        #[serde(default)]
        description: String,
    }
    let name = &stream.cached_info().config.name;
    let what = || format!("read stream {name:?}");
    let body = match filter {
        None => serde_json::json!({ "seq": seq }),
        Some(filter) => serde_json::json!({ "seq": seq, "next_by_subj": filter }),
    };
    let reply: Reply = js
        .request(format!("STREAM.MSG.GET.{name}"), &body)
        .await
        .map_err(|err| AdminError::broker(what(), err))?;
    if let Some(err) = reply.error {
        // 10037: no message found.
        if err.code == 404 || err.err_code == 10037 {
            return Ok(None);
        }
        return Err(AdminError::new(
            AdminErrorKind::Broker,
            format!("{}: {} (error {})", what(), err.description, err.err_code),
        ));
    }
    let Some(raw) = reply.message else { return Ok(None) };
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let decoded = engine.decode(raw.data.as_bytes()).map_err(|e| e.to_string()).and_then(
        |payload| match &raw.hdrs {
            None => Ok((payload, HeaderMap::new())),
            Some(hdrs) => engine
                .decode(hdrs.as_bytes())
                .map_err(|e| e.to_string())
                .and_then(|h| parse_headers(&h))
                .map(|headers| (payload, headers)),
        },
    );
    Ok(Some(match decoded {
        Ok((payload, headers)) => Got::Message(StreamMessage {
            subject: raw.subject.into(),
            sequence: raw.seq,
            headers,
            payload: payload.into(),
            time: raw.time,
        }),
        Err(why) => Got::Unreadable(raw.seq, why),
    }))
}

/// Decodes a NATS header block (`NATS/1.0`, then `Name: value` lines, continuation lines
/// starting with a space or tab), keeping every value of a repeated name in order.
pub(crate) fn parse_headers(block: &[u8]) -> Result<HeaderMap, String> {
    let text = std::str::from_utf8(block).map_err(|_| "headers are not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n')).peekable();
    match lines.next() {
        Some(first) if first.starts_with("NATS/1.0") => {}
        _ => return Err("headers do not start with NATS/1.0".to_owned()),
    }
    let mut headers = HeaderMap::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) =
            line.split_once(':').ok_or_else(|| format!("malformed header line {line:?}"))?;
        let mut value = value.trim().to_owned();
        while let Some(more) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
            value.push(' ');
            value.push_str(more.trim());
        }
        let name = async_nats::HeaderName::from_str(name)
            .map_err(|_| format!("header name {name:?} is not valid"))?;
        let value = async_nats::HeaderValue::from_str(&value)
            .map_err(|_| format!("header {name} has a value that is not valid"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Calls `each` with every message on `filter` from sequence `from` to `until` (inclusive;
/// `None`: the stream's last sequence when the scan starts), in sequence order, until it
/// breaks.
///
/// A message whose headers cannot be read is skipped (and logged).
pub(crate) async fn scan(
    js: &Context,
    stream: &Stream,
    filter: &str,
    from: u64,
    until: Option<u64>,
    mut each: impl FnMut(StreamMessage) -> ControlFlow<()>,
) -> Result<(), AdminError> {
    let last = match until {
        Some(until) => until,
        None => last_sequence(stream),
    };
    let mut cursor = from.max(1);
    let mut window = 1u64;
    while cursor <= last {
        if window == 1 {
            let message = match fetch(js, stream, cursor, Some(filter)).await? {
                None => return Ok(()),
                Some(Got::Message(message)) => message,
                Some(Got::Unreadable(seq, why)) => {
                    if seq > last {
                        return Ok(());
                    }
                    tracing::warn!(sequence = seq, reason = %why, "skipping a message that cannot be read as a task");
                    cursor = seq + 1;
                    continue;
                }
            };
            if message.sequence > last {
                return Ok(());
            }
            // No gap before it: matching messages may be packed, try a window next.
            if message.sequence == cursor {
                window = 4;
            }
            cursor = message.sequence + 1;
            if each(message).is_break() {
                return Ok(());
            }
            continue;
        }
        let end = (cursor + window - 1).min(last);
        let requests = (cursor..=end).map(|seq| fetch(js, stream, seq, None));
        let mut replies = futures_util::stream::iter(requests).buffered(window as usize);
        let mut hits = 0;
        while let Some(reply) = replies.next().await {
            let message = match reply? {
                None => continue,
                Some(Got::Message(message)) => message,
                Some(Got::Unreadable(seq, why)) => {
                    tracing::warn!(sequence = seq, reason = %why, "skipping a message that cannot be read as a task");
                    continue;
                }
            };
            if !subject_matches(filter, &message.subject) {
                continue;
            }
            hits += 1;
            if each(message).is_break() {
                return Ok(());
            }
        }
        let asked = end - cursor + 1;
        cursor = end + 1;
        window = if hits * 2 >= asked { (window * 2).min(MAX_WINDOW) } else { 1 };
    }
    Ok(())
}

/// Messages one pull of [`scan_by_consumer`] asks for.
const PULL_BATCH: usize = 1_000;

/// How long [`scan_by_consumer`] waits for the server's next message before it leaves the
/// rest to [`scan`].
const STALL: std::time::Duration = std::time::Duration::from_secs(2);

/// Like [`scan`] from the start of `filter`, through an ephemeral pull consumer that
/// acknowledges nothing (so nothing is consumed), several times faster than message gets
/// for a long subject. The server refuses it where a worker consumer covers `filter` (a
/// work-queue stream's consumers may not overlap), or where the user may not create
/// consumers: then `Ok(false)`, nothing read, and the caller reads with [`scan`]. While it
/// reads, a worker cannot start consuming `filter` (its consumer would overlap); the
/// server removes the consumer after half a minute should this process die.
///
/// `Ok(None)`: read to the end, or stopped by `each`. `Ok(Some(from))`: the caller reads the
/// rest with [`scan`] from `from` (1 when the consumer was refused). That also happens when
/// the server's next message does not come within [`STALL`]: a message whose headers the
/// client cannot decode (another client's) stops the consumer's flow, where [`scan`] skips it.
pub(crate) async fn scan_by_consumer(
    stream: &Stream,
    filter: &str,
    mut each: impl FnMut(StreamMessage) -> ControlFlow<()>,
) -> Result<Option<u64>, AdminError> {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let config = pull::Config {
        filter_subject: filter.to_owned(),
        ack_policy: AckPolicy::Explicit,
        max_ack_pending: -1,
        ack_wait: std::time::Duration::from_secs(600),
        inactive_threshold: std::time::Duration::from_secs(30),
        memory_storage: true,
        ..Default::default()
    };
    let Ok(consumer) = stream.create_consumer(config).await else { return Ok(Some(1)) };
    let name = consumer.cached_info().name.clone();
    let last = last_sequence(stream);
    let read = async {
        let what = || format!("read {filter} of stream {:?}", stream.cached_info().config.name);
        let mut seen = 0;
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(PULL_BATCH)
                .messages()
                .await
                .map_err(|err| AdminError::broker(what(), err))?;
            let mut got = 0;
            loop {
                let message = match tokio::time::timeout(STALL, batch.next()).await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(_) => return Ok(Some(seen + 1)),
                };
                let message = message.map_err(|err| AdminError::broker_boxed(what(), err))?;
                got += 1;
                let (sequence, time) = match message.info() {
                    Ok(info) => (info.stream_sequence, info.published),
                    Err(err) => return Err(AdminError::broker_boxed(what(), err)),
                };
                // Redelivered (only after the long ack wait), or stored after the scan began.
                if sequence <= seen {
                    continue;
                }
                if sequence > last {
                    return Ok(None);
                }
                seen = sequence;
                let (message, _acker) = message.split();
                let message = StreamMessage {
                    subject: message.subject,
                    sequence,
                    headers: message.headers.unwrap_or_default(),
                    payload: message.payload,
                    time,
                };
                if each(message).is_break() {
                    return Ok(None);
                }
            }
            if got == 0 {
                return Ok(None);
            }
        }
    }
    .await;
    let _ = stream.delete_consumer(&name).await;
    read
}

/// The stream's last sequence when it was opened: every operation opens the stream as it
/// starts, so this is the last task stored before the operation began, without asking the
/// server again.
pub(crate) fn last_sequence(stream: &Stream) -> u64 {
    stream.cached_info().state.last_sequence
}

/// Whether `subject` matches the subject filter `filter` (`*` one token, `>` the rest).
pub(crate) fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for want in filter.split('.') {
        if want == ">" {
            return tokens.next().is_some();
        }
        match tokens.next() {
            Some(token) if want == "*" || want == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn filters_match_as_the_server_matches() {
        assert!(subject_matches("natasks.emails", "natasks.emails"));
        assert!(!subject_matches("natasks.emails", "natasks.emails-dlq"));
        assert!(subject_matches("natasks.*", "natasks.emails"));
        assert!(!subject_matches("natasks.*", "natasks.__natasks_schedule.x"));
        assert!(subject_matches("natasks.>", "natasks.__natasks_schedule.x"));
        assert!(!subject_matches("natasks.>", "natasks"));
        assert!(subject_matches("natasks.__natasks_schedule.*", "natasks.__natasks_schedule.x"));
        assert!(!subject_matches("natasks.*.x", "natasks.a.y"));
    }
}
