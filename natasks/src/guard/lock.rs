//! Markers on the broker: writing one, reading the one that holds a key, and telling
//! whether a unique task's lock still has its task.

use std::time::Duration;

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use async_nats::HeaderMap;
use time::OffsetDateTime;

use super::MarkerBody;
use crate::batch::Outgoing;
use crate::error::BoxError;
use crate::wire;

/// A marker on `subject`, stored only if the subject's last message is at sequence
/// `expect` (0: the subject is empty), removed by the server after `ttl`.
pub(crate) fn marker(subject: String, body: &MarkerBody, ttl: Duration, expect: u64) -> Outgoing {
    let mut headers = HeaderMap::new();
    headers.insert(wire::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expect.to_string().as_str());
    headers.insert(wire::NATS_TTL, ttl_secs(ttl).to_string().as_str());
    let payload = serde_json::to_vec(body).expect("a marker body serializes").into();
    Outgoing { subject, headers, payload }
}

/// Whole seconds, rounded up: the server counts TTLs in seconds.
fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)
}

/// The marker that holds a key.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// Its stream sequence.
    pub(crate) sequence: u64,
    /// When it was stored.
    pub(crate) stored_at: OffsetDateTime,
    pub(crate) body: MarkerBody,
}

impl Held {
    /// The stream sequence of the task stored with it: the next one, as a batch takes
    /// consecutive sequences.
    pub(crate) fn task_sequence(&self) -> u64 {
        self.sequence + 1
    }
}

/// The marker on `subject`, if any.
pub(crate) async fn read(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Option<Held>, BoxError> {
    let stream = js.get_stream_no_info(stream).await?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => {
            let body: MarkerBody = serde_json::from_slice(&message.payload)
                .map_err(|err| format!("unreadable marker on {subject:?}: {err}"))?;
            Ok(Some(Held { sequence: message.sequence, stored_at: message.time, body }))
        }
        Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// How many messages of the queue a liveness check reads, at most, looking for the task
/// a delayed unique task's schedule produced; past it the task counts as alive.
const SCAN_LIMIT: usize = 256;

/// Whether the task a unique lock was stored with may still be pending, scheduled or
/// running. The task (or a delayed task's schedule) was stored at the sequence after the
/// lock; a work-queue stream removes it when it is acked, terminated or cancelled, and
/// sequences are never reused, so a message there is that task.
///
/// A delayed task is alive while its schedule is on its subject. Once the schedule is
/// gone it fired (or was cancelled): the task it produced is then looked for on
/// `queue_subject`, after the lock, by its id; when more than [`SCAN_LIMIT`] other tasks
/// wait there it counts as alive (the worker's release or the lock's TTL then frees it).
pub(crate) async fn task_alive(
    js: &jetstream::Context,
    stream: &str,
    queue_subject: &str,
    held: &Held,
) -> Result<bool, BoxError> {
    let stream = js.get_stream_no_info(stream).await?;
    let Some(schedule) = held.body.schedule.as_deref() else {
        return match stream.get_raw_message(held.task_sequence()).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(err) => Err(err.into()),
        };
    };
    let is_task = |headers: &HeaderMap| wire::task_id(headers) == Some(&held.body.id);
    match stream.get_last_raw_message_by_subject(schedule).await {
        Ok(message) if is_task(&message.headers) => return Ok(true),
        Ok(_) => {}
        Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {}
        Err(err) => return Err(err.into()),
    }
    let mut from = held.sequence + 1;
    for _ in 0..SCAN_LIMIT {
        match stream.get_first_raw_message_by_subject(queue_subject, from).await {
            Ok(message) if is_task(&message.headers) => return Ok(true),
            Ok(message) => from = message.sequence + 1,
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(false),
            Err(err) => return Err(err.into()),
        }
    }
    Ok(true)
}

/// Deletes the marker at `sequence`; a marker already gone (released, expired) is fine.
pub(crate) async fn delete(
    js: &jetstream::Context,
    stream: &str,
    sequence: u64,
) -> Result<(), BoxError> {
    let stream = js.get_stream_no_info(stream).await?;
    match stream.delete_message(sequence).await {
        Ok(_) => Ok(()),
        Err(err) => match err.kind() {
            async_nats::jetstream::stream::DeleteMessageErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::SEQUENCE_NOT_FOUND
                    || e.code() == 404 =>
            {
                Ok(())
            }
            _ => Err(err.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_secs(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn a_marker_expects_its_subject_empty() {
        let body = MarkerBody { id: "t1".into(), key: "k".into(), schedule: None };
        let out = marker("s".into(), &body, Duration::from_secs(60), 0);
        assert_eq!(
            out.headers.get(wire::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE).map(|v| v.as_str()),
            Some("0")
        );
        assert_eq!(out.headers.get(wire::NATS_TTL).map(|v| v.as_str()), Some("60"));
    }
}
