//! Periodic schedules on JetStream: declaring one (compare, then publish conditionally),
//! removing, reading and listing them.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, RawMessageErrorKind, Stream};
use async_nats::jetstream::{self, message::StreamMessage};
use async_nats::{HeaderMap, HeaderValue};
use time::OffsetDateTime;

use super::{stored_task, Declared, Every, Scheduled};
use crate::error::{ScheduleError, ScheduleErrorKind};
use crate::stream::{recurring_schedule_support, StreamSettings, Support};
use crate::task::Task;
use crate::wire;

/// Conditional publishes tried before giving up on a schedule other declarers keep
/// changing.
const ATTEMPTS: usize = 5;

/// JetStream error codes of a refused schedule.
const PATTERN_INVALID: u64 = 10189;
const TIME_ZONE_INVALID: u64 = 10223;

pub(super) async fn declare(
    js: &jetstream::Context,
    stream: &StreamSettings,
    id: &str,
    every: &Every,
    task: Task,
    queue: &str,
) -> Result<Declared, ScheduleError> {
    check_id(id)?;
    every.check()?;
    let queue = wire::validate_queue(queue)?.to_owned();
    wire::validate_task_name(task.name())?;
    if let Some(invalid) = task.invalid_header() {
        return Err(invalid.clone().into());
    }
    if task.track().is_some() || task.header(wire::HEADER_TRACK).is_some() {
        return Err(ScheduleError::new(
            ScheduleErrorKind::InvalidTask,
            format!(
                "task {:?} for schedule {id:?} is tracked: every tick of a schedule would share                  one id, so ticks cannot be tracked",
                task.name()
            ),
        ));
    }
    // As dispatch does, a task a handler received leaves behind the headers it arrived with
    // (the server's `Nats-*`, `Natasks-Message-Id`, `Natasks-Periodic*`); only those set
    // since are checked.
    let (name, payload, task_headers, message_id) = task.into_parts();
    if message_id.is_some() {
        return Err(ScheduleError::new(
            ScheduleErrorKind::InvalidTask,
            format!(
                "task {name:?} for schedule {id:?} has a message id: the server drops it from the \
                 tasks a schedule dispatches (use `Task::periodic` to tell ticks apart)"
            ),
        ));
    }
    if let Some((header, _)) =
        task_headers.iter().find(|(header, _)| wire::is_server_header(header.as_ref()))
    {
        return Err(ScheduleError::new(
            ScheduleErrorKind::InvalidTask,
            format!(
                "header name {:?} on the task of schedule {id:?}: `Nats-*` headers are the \
                 server's, and on a schedule they would change the schedule itself",
                header.as_ref() as &str
            ),
        ));
    }
    check_support(js)?;

    // The task's headers, without a digest it may carry (a tick's, or one read back).
    let mut headers = HeaderMap::new();
    for (header, values) in task_headers.iter() {
        if !(header.as_ref() as &str).eq_ignore_ascii_case(wire::HEADER_PERIODIC_DIGEST) {
            for value in values {
                headers.append(header.clone(), value.clone());
            }
        }
    }
    let target = wire::queue_subject(&stream.subject_prefix, &queue);
    headers.insert(wire::TASK_NAME, name.as_str());
    headers.insert(wire::QUEUE_NAME, queue.as_str());
    headers.insert(wire::HEADER_PERIODIC, id);
    headers.insert(wire::HEADER_PERIODIC_SCHEDULE, every.expression());
    headers.insert(wire::NATS_SCHEDULE, every.expression());
    headers.insert(wire::NATS_SCHEDULE_TARGET, target.as_str());
    if let Some(zone) = every.zone() {
        headers.insert(wire::NATS_SCHEDULE_TIME_ZONE, zone);
    }
    // Compared by digest: the stored headers cannot be compared with these, since the
    // server's message-get API keeps only the last value of a repeated header and trims
    // the spaces around a value.
    let wanted = digest(&headers, &payload);
    headers.insert(wire::HEADER_PERIODIC_DIGEST, wanted.as_str());
    let subject = wire::periodic_subject(&stream.subject_prefix, id);
    let handle = handle(js, stream).await?;
    for _ in 0..ATTEMPTS {
        let existing = match handle.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => Some(message),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => None,
            Err(err) => {
                return Err(ScheduleError::with_source(
                    ScheduleErrorKind::Rejected,
                    format!("cannot read schedule {id:?}"),
                    err,
                ))
            }
        };
        let stored = existing.as_ref().and_then(|m| m.headers.get(wire::HEADER_PERIODIC_DIGEST));
        if stored.map(|digest| digest.as_str()) == Some(wanted.as_str()) {
            return Ok(Declared::Unchanged);
        }
        // Publish only over what was just read: of several instances declaring at once,
        // one publishes and the others find its schedule on their next read.
        let mut message = headers.clone();
        let expected = existing.as_ref().map_or(0, |m| m.sequence);
        message.insert(wire::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
        let published =
            match js.publish_with_headers(subject.clone(), message, payload.clone()).await {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
        match published {
            Ok(_) if existing.is_some() => return Ok(Declared::Replaced),
            Ok(_) => return Ok(Declared::Created),
            Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => continue,
            Err(err) => return Err(publish_error(id, every, err)),
        }
    }
    Err(ScheduleError::new(
        ScheduleErrorKind::Rejected,
        format!("schedule {id:?} kept changing while it was declared ({ATTEMPTS} attempts)"),
    ))
}

pub(super) async fn remove(
    js: &jetstream::Context,
    stream: &StreamSettings,
    id: &str,
) -> Result<bool, ScheduleError> {
    check_id(id)?;
    let subject = wire::periodic_subject(&stream.subject_prefix, id);
    let purged = handle(js, stream).await?.purge().filter(&subject).await.map_err(|err| {
        ScheduleError::with_source(
            ScheduleErrorKind::Rejected,
            format!("cannot remove schedule {id:?}"),
            err,
        )
    })?;
    Ok(purged.purged > 0)
}

pub(super) async fn get(
    js: &jetstream::Context,
    stream: &StreamSettings,
    id: &str,
) -> Result<Option<Scheduled>, ScheduleError> {
    check_id(id)?;
    let subject = wire::periodic_subject(&stream.subject_prefix, id);
    match handle(js, stream).await?.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => Ok(Some(scheduled(&message, OffsetDateTime::now_utc()))),
        Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(err) => Err(ScheduleError::with_source(
            ScheduleErrorKind::Rejected,
            format!("cannot read schedule {id:?}"),
            err,
        )),
    }
}

pub(super) async fn list(
    js: &jetstream::Context,
    stream: &StreamSettings,
) -> Result<Vec<Scheduled>, ScheduleError> {
    let handle = handle(js, stream).await?;
    let wildcard = wire::periodics_wildcard(&stream.subject_prefix);
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    let mut sequence = 1;
    loop {
        let message = match handle.get_first_raw_message_by_subject(&wildcard, sequence).await {
            Ok(message) => message,
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(err) => {
                return Err(ScheduleError::with_source(
                    ScheduleErrorKind::Rejected,
                    "cannot read the periodic schedules",
                    err,
                ))
            }
        };
        sequence = message.sequence + 1;
        out.push(scheduled(&message, now));
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Whether header `name` is written by natasks or the server on a schedule message (the
/// rest are the task's own).
pub(super) fn is_schedule_header(name: &str) -> bool {
    wire::is_server_header(name)
        || [
            wire::HEADER_TASK,
            wire::HEADER_QUEUE,
            wire::HEADER_PERIODIC,
            wire::HEADER_PERIODIC_SCHEDULE,
            wire::HEADER_PERIODIC_DIGEST,
        ]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

fn check_id(id: &str) -> Result<(), ScheduleError> {
    wire::validate_schedule_id(id)
        .map_err(|err| ScheduleError::new(ScheduleErrorKind::InvalidId, err.to_string()))
}

fn check_support(js: &jetstream::Context) -> Result<(), ScheduleError> {
    let version = js.client().server_info().version;
    if recurring_schedule_support(&version) != Support::Unsupported {
        return Ok(());
    }
    let runs = if crate::stream::schedule_support(&version) == Support::Supported {
        "it runs only one-off `@at` schedules, which delayed tasks use"
    } else {
        "it runs no message schedules at all"
    };
    Err(ScheduleError::new(
        ScheduleErrorKind::Unsupported,
        format!(
            "periodic schedules (cron and intervals) need nats-server 2.14 or newer; the \
             connected server is {version} ({runs})"
        ),
    ))
}

/// A handle on the stream, without asking the server for its info.
async fn handle(
    js: &jetstream::Context,
    stream: &StreamSettings,
) -> Result<Stream<()>, ScheduleError> {
    js.get_stream_no_info(&stream.name).await.map_err(|err| {
        ScheduleError::with_source(
            ScheduleErrorKind::Rejected,
            format!("invalid stream name {:?}", stream.name),
            err,
        )
    })
}

/// The digest of a schedule's definition: FNV-1a (64 bits, in hex) of its headers (schedule,
/// time zone, target, task name, the task's headers), sorted by name, each with all its
/// values in order, and of the payload. Every part is length-prefixed, so different
/// definitions make different inputs; FNV-1a is the same on every build and platform.
fn digest(headers: &HeaderMap, payload: &[u8]) -> String {
    let mut sorted: Vec<(&str, &Vec<HeaderValue>)> =
        headers.iter().map(|(name, values)| (name.as_ref(), values)).collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut hash = Fnv1a::new();
    hash.part(b"natasks-periodic-v1");
    hash.count(sorted.len());
    for (name, values) in sorted {
        hash.part(name.as_bytes());
        hash.count(values.len());
        for value in values {
            hash.part(value.as_str().as_bytes());
        }
    }
    hash.part(payload);
    format!("{:016x}", hash.0)
}

/// 64-bit FNV-1a.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn count(&mut self, n: usize) {
        self.write(&(n as u64).to_le_bytes());
    }

    fn part(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.write(bytes);
    }
}

/// A stored schedule message as a [`Scheduled`].
fn scheduled(message: &StreamMessage, now: OffsetDateTime) -> Scheduled {
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str());
    let id = wire::periodic_id(&message.subject)
        .or_else(|| message.subject.rsplit('.').next())
        .unwrap_or_default()
        .to_owned();
    let every = Every::from_headers(
        header(wire::NATS_SCHEDULE).unwrap_or_default(),
        header(wire::NATS_SCHEDULE_TIME_ZONE),
    );
    let queue = match (header(wire::HEADER_QUEUE), header(wire::NATS_SCHEDULE_TARGET)) {
        (Some(queue), _) => queue.to_owned(),
        (None, Some(target)) => target.rsplit('.').next().unwrap_or(target).to_owned(),
        (None, None) => String::new(),
    };
    let name = header(wire::HEADER_TASK).unwrap_or_default();
    let task = stored_task(name, message.payload.clone(), &message.headers);
    let next = every.next_after(message.time, now);
    Scheduled { id, every, queue, task, declared: message.time, next }
}

fn publish_error(
    id: &str,
    every: &Every,
    err: async_nats::jetstream::context::PublishError,
) -> ScheduleError {
    let code = std::error::Error::source(&err)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .map(|err| err.error_code().0);
    let (kind, message) = match (err.kind(), code) {
        (_, Some(TIME_ZONE_INVALID)) => (
            ScheduleErrorKind::InvalidTimeZone,
            format!(
                "invalid time zone {:?} for schedule {id:?}: the server does not know it \
                 (nats-server loads zones from Go's time zone database; use an IANA name \
                 such as `Europe/Berlin`)",
                every.zone().unwrap_or_default()
            ),
        ),
        (_, Some(PATTERN_INVALID)) => (
            ScheduleErrorKind::InvalidSchedule,
            format!("the server refused schedule {:?} for {id:?}", every.to_string()),
        ),
        (PublishErrorKind::TimedOut, _) => (
            ScheduleErrorKind::Timeout,
            format!(
                "schedule {id:?} was not confirmed in time: it may or may not be stored \
                 (declaring it again is safe), or this user may lack permission to publish \
                 to its subject"
            ),
        ),
        _ => (ScheduleErrorKind::Rejected, format!("the server refused schedule {id:?}")),
    };
    ScheduleError::with_source(kind, message, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, *value);
        }
        map
    }

    #[test]
    fn fnv1a_is_the_standard_one() {
        let hash = |bytes: &[u8]| {
            let mut hash = Fnv1a::new();
            hash.write(bytes);
            hash.0
        };
        assert_eq!(hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn digests_see_every_value_in_order() {
        let base = [("Nats-Schedule", "@every 1h"), ("X-Tag", "a"), ("X-Tag", "b")];
        let digest_of = |pairs: &[(&str, &str)], payload: &[u8]| digest(&headers(pairs), payload);
        let wanted = digest_of(&base, b"p");
        // Stable across builds and platforms: a fixed input, a fixed digest.
        assert_eq!(wanted, "b95b9e159cd84f12", "computed independently");
        assert_eq!(wanted.len(), 16);
        // Names in any order: the same.
        let shuffled = [("X-Tag", "a"), ("Nats-Schedule", "@every 1h"), ("X-Tag", "b")];
        assert_eq!(digest_of(&shuffled, b"p"), wanted);
        for (other, payload) in [
            (&[("Nats-Schedule", "@every 1h"), ("X-Tag", "b"), ("X-Tag", "a")][..], &b"p"[..]),
            (&[("Nats-Schedule", "@every 1h"), ("X-Tag", "b")][..], b"p"),
            (&[("Nats-Schedule", "@every 1h"), ("X-Tag", " a"), ("X-Tag", "b")][..], b"p"),
            (&[("Nats-Schedule", "@every 1h"), ("X-Tag", "ab")][..], b"p"),
            (&[("Nats-Schedule", "@every 2h"), ("X-Tag", "a"), ("X-Tag", "b")][..], b"p"),
            (&base[..], b"q"),
            (&base[..], b""),
        ] {
            assert_ne!(digest_of(other, payload), wanted, "{other:?} {payload:?}");
        }
    }
}
