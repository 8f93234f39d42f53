//! Reading a stream's messages without consuming them.
//!
//! A task stream has work-queue retention, on which the server accepts no consumer without
//! acknowledgements and no consumer overlapping the workers' one: reading goes through the
//! stream's message-get API. A scan asks for the next message on a subject filter; where
//! matching messages sit next to each other (a dead-letter queue filled in bulk), it asks
//! for a window of consecutive sequences at once, many requests in flight, and widens the
//! window while it keeps hitting.

use std::ops::ControlFlow;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{RawMessageError, RawMessageErrorKind, Stream};
use futures_util::StreamExt as _;

use super::AdminError;

/// The widest window of sequences asked for at once.
const MAX_WINDOW: u64 = 256;

/// The message with sequence `seq`; `None` when there is none (deleted, or never stored).
pub(crate) async fn get(stream: &Stream, seq: u64) -> Result<Option<StreamMessage>, AdminError> {
    absent_is_none(stream.get_raw_message(seq).await, stream)
}

/// The first message at or after `seq` on `filter`.
pub(crate) async fn next(
    stream: &Stream,
    filter: &str,
    seq: u64,
) -> Result<Option<StreamMessage>, AdminError> {
    absent_is_none(stream.get_first_raw_message_by_subject(filter, seq).await, stream)
}

fn absent_is_none(
    result: Result<StreamMessage, RawMessageError>,
    stream: &Stream,
) -> Result<Option<StreamMessage>, AdminError> {
    match result {
        Ok(message) => Ok(Some(message)),
        Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(err) => Err(AdminError::broker(
            format!("read stream {:?}", stream.cached_info().config.name),
            err,
        )),
    }
}

/// Calls `each` with every message on `filter` from sequence `from` to `until` (inclusive;
/// `None`: the stream's last sequence when the scan starts), in sequence order, until it
/// breaks.
pub(crate) async fn scan(
    stream: &Stream,
    filter: &str,
    from: u64,
    until: Option<u64>,
    mut each: impl FnMut(StreamMessage) -> ControlFlow<()>,
) -> Result<(), AdminError> {
    let last = match until {
        Some(until) => until,
        None => last_sequence(stream).await?,
    };
    let mut cursor = from.max(1);
    let mut window = 1u64;
    while cursor <= last {
        if window == 1 {
            let Some(message) = next(stream, filter, cursor).await? else { return Ok(()) };
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
        let requests = (cursor..=end).map(|seq| get(stream, seq));
        let mut replies = futures_util::stream::iter(requests).buffered(window as usize);
        let mut hits = 0;
        while let Some(reply) = replies.next().await {
            let Some(message) = reply? else { continue };
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

/// Like [`scan`] from the start of `filter`, through an ephemeral pull consumer that
/// acknowledges nothing (so nothing is consumed), several times faster than message gets
/// for a long subject. The server refuses it where a worker consumer covers `filter` (a
/// work-queue stream's consumers may not overlap), or where the user may not create
/// consumers: then `Ok(false)`, nothing read, and the caller reads with [`scan`]. While it
/// reads, a worker cannot start consuming `filter` (its consumer would overlap); the
/// server removes the consumer after half a minute should this process die.
pub(crate) async fn scan_by_consumer(
    stream: &Stream,
    filter: &str,
    mut each: impl FnMut(StreamMessage) -> ControlFlow<()>,
) -> Result<bool, AdminError> {
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
    let Ok(consumer) = stream.create_consumer(config).await else { return Ok(false) };
    let name = consumer.cached_info().name.clone();
    let last = last_sequence(stream).await;
    let read = async {
        let last = last?;
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
            while let Some(message) = batch.next().await {
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
                    return Ok(());
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
                    return Ok(());
                }
            }
            if got == 0 {
                return Ok(());
            }
        }
    }
    .await;
    let _ = stream.delete_consumer(&name).await;
    read.map(|()| true)
}

/// The stream's last sequence, read now.
pub(crate) async fn last_sequence(stream: &Stream) -> Result<u64, AdminError> {
    let mut stream = stream.clone();
    let name = stream.cached_info().config.name.clone();
    let info = stream
        .info()
        .await
        .map_err(|err| AdminError::broker(format!("read stream {name:?}"), err))?;
    Ok(info.state.last_sequence)
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
