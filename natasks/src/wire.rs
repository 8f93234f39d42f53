//! The wire format shared with the Go library: subjects, header names and name rules.
//!
//! See `docs/wire-format.md` in the repository for the full description.

use async_nats::header::HeaderName;

use crate::error::InvalidName;

/// Default stream name.
pub const DEFAULT_STREAM: &str = "NATASKS";
/// Default subject prefix: queue `q` lives on subject `natasks.q`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "natasks";
/// Default consumer name prefix: the worker for queue `q` uses the durable `natasks-q`.
pub const DEFAULT_CONSUMER_PREFIX: &str = "natasks";
/// The queue used when an empty queue name is given.
pub const DEFAULT_QUEUE: &str = "default";
/// Default suffix of dead-letter queues: queue `q` dead-letters into `q-dlq`.
pub const DEFAULT_DLQ_SUFFIX: &str = "-dlq";

/// Header holding the task name.
pub const HEADER_TASK: &str = "Natasks-Task";
/// Header holding the queue the task was dispatched to.
pub const HEADER_QUEUE: &str = "Natasks-Queue";
/// Dead letters: the queue the task failed on.
pub const HEADER_ORIGINAL_QUEUE: &str = "Natasks-Original-Queue";
/// Dead letters: how many times the task was delivered.
pub const HEADER_ATTEMPTS: &str = "Natasks-Attempts";
/// Dead letters: the last error.
pub const HEADER_LAST_ERROR: &str = "Natasks-Last-Error";
/// Dead letters: why the task was dead-lettered (see [`DeadLetterReason`](crate::DeadLetterReason)).
pub const HEADER_DEAD_LETTER_REASON: &str = "Natasks-Dead-Letter-Reason";
/// Dead letters of tracked tasks: the `Natasks-Track` value the task had. A dead letter is
/// not tracked (a worker consuming the dead-letter queue must not rewrite the task's
/// record); a requeue (`natasks dlq requeue`) tracks it again.
pub const HEADER_DEAD_LETTER_TRACK: &str = "Natasks-Dead-Letter-Track";
/// Delayed tasks: the message id given at dispatch, kept because the server strips
/// `Nats-Msg-Id` from the message a schedule produces.
pub const HEADER_MESSAGE_ID: &str = "Natasks-Message-Id";

/// Unique tasks: the task's unique key in its queue (see
/// [`Task::unique`](crate::Task::unique)). A Go worker ignores it.
pub const HEADER_UNIQUE_KEY: &str = "Natasks-Unique-Key";
/// Throttled tasks: the task's throttle key (see [`Task::throttle`](crate::Task::throttle)).
pub const HEADER_THROTTLE_KEY: &str = "Natasks-Throttle-Key";
/// Debounced tasks: the task's debounce key (see [`Task::debounce`](crate::Task::debounce)).
pub const HEADER_DEBOUNCE_KEY: &str = "Natasks-Debounce-Key";

/// The task id natasks gives a task at dispatch: the message id when one is given, else
/// a fresh one. A Go worker ignores it.
pub const HEADER_ID: &str = "Natasks-Id";
/// Tracked tasks: present when the task's status, result and events are recorded; the
/// value is the retention in whole seconds (`0`: the worker's default).
pub const HEADER_TRACK: &str = "Natasks-Track";

/// Periodic tasks: the id of the schedule that produced the task.
pub const HEADER_PERIODIC: &str = "Natasks-Periodic";
/// Periodic tasks: the schedule (the `Nats-Schedule` value, e.g. `@every 1m` or
/// `0 30 2 * * *`) that produced the task.
pub const HEADER_PERIODIC_SCHEDULE: &str = "Natasks-Periodic-Schedule";
/// Periodic schedules: a digest of the definition (FNV-1a 64 of schedule, time zone, target,
/// task name, payload and every header value, in hex), which tells a declaration of the same
/// definition without reading the headers back. Ticks carry it too.
pub const HEADER_PERIODIC_DIGEST: &str = "Natasks-Periodic-Digest";

pub(crate) const NATS_MSG_ID: &str = "Nats-Msg-Id";
pub(crate) const NATS_SCHEDULE: &str = "Nats-Schedule";
pub(crate) const NATS_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
/// On a message a schedule produced: the schedule's subject.
pub(crate) const NATS_SCHEDULER: &str = "Nats-Scheduler";
pub(crate) const NATS_SCHEDULE_TIME_ZONE: &str = "Nats-Schedule-Time-Zone";
/// On a message a schedule produced: when the schedule fires next (RFC 3339), or `purge`.
pub(crate) const NATS_SCHEDULE_NEXT: &str = "Nats-Schedule-Next";
pub(crate) const NATS_EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// `sub`: the message replaces every other message on its subject.
pub(crate) const NATS_ROLLUP: &str = "Nats-Rollup";
/// Per-message TTL (nats-server 2.11+): whole seconds.
pub(crate) const NATS_TTL: &str = "Nats-TTL";
/// Atomic batches (nats-server 2.12+): the batch's id.
pub(crate) const NATS_BATCH_ID: &str = "Nats-Batch-Id";
/// Atomic batches: the message's place in its batch, from 1.
pub(crate) const NATS_BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
/// Atomic batches: on the last message, `1` stores the batch.
pub(crate) const NATS_BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// [`HEADER_TASK`] as a header name: inserting or looking up a name built once allocates
/// nothing, where a `&str` name is copied into a new one on every call.
pub(crate) const TASK_NAME: HeaderName = HeaderName::from_static(HEADER_TASK);
/// [`HEADER_QUEUE`] as a header name.
pub(crate) const QUEUE_NAME: HeaderName = HeaderName::from_static(HEADER_QUEUE);
/// [`HEADER_ID`] as a header name.
pub(crate) const ID_NAME: HeaderName = HeaderName::from_static(HEADER_ID);
/// [`HEADER_TRACK`] as a header name.
pub(crate) const TRACK_NAME: HeaderName = HeaderName::from_static(HEADER_TRACK);
/// [`HEADER_MESSAGE_ID`] as a header name.
pub(crate) const MESSAGE_ID_NAME: HeaderName = HeaderName::from_static(HEADER_MESSAGE_ID);
/// [`HEADER_UNIQUE_KEY`] as a header name: looked up for every task that ends.
pub(crate) const UNIQUE_KEY_NAME: HeaderName = HeaderName::from_static(HEADER_UNIQUE_KEY);
/// [`NATS_MSG_ID`] as a header name: looked up for every received task.
pub(crate) const NATS_MSG_ID_NAME: HeaderName = HeaderName::from_static(NATS_MSG_ID);

/// The first value of header `name`, as `HeaderMap::get` finds it, by comparing the names
/// of the few headers a task carries instead of hashing: the worker looks up, for every
/// delivery, several headers that are usually absent.
pub(crate) fn header<'a>(
    headers: &'a async_nats::HeaderMap,
    name: &HeaderName,
) -> Option<&'a async_nats::HeaderValue> {
    if headers.len() > 8 {
        return headers.get(name.clone());
    }
    headers.iter().find(|(each, _)| *each == name).and_then(|(_, values)| values.first())
}

/// The id a task was dispatched with: [`HEADER_ID`], else [`HEADER_MESSAGE_ID`] (where a
/// delayed task keeps its message id), else [`NATS_MSG_ID`]. Its tracking record, its
/// unique-key lock and its workflow step are all named by it.
pub(crate) fn task_id(headers: &async_nats::HeaderMap) -> Option<&str> {
    [ID_NAME, MESSAGE_ID_NAME, NATS_MSG_ID_NAME]
        .iter()
        .find_map(|name| header(headers, name))
        .map(|value| value.as_str())
}

/// The subject token reserved for schedules; no queue may use it.
pub const SCHEDULE_TOKEN: &str = "__natasks_schedule";

/// The subject token under [`SCHEDULE_TOKEN`] that holds periodic schedules: schedule `id`
/// lives on `<prefix>.__natasks_schedule.periodic.<id>`. Delayed tasks use one token
/// after [`SCHEDULE_TOKEN`], periodic schedules two, so the two never share a subject.
pub const PERIODIC_TOKEN: &str = "periodic";

/// The subject token reserved for markers: guards stored in the task stream on subjects no
/// worker consumes (`<prefix>.__natasks_mark.<kind>.<queue>.<key>`), such as the lock of a
/// unique task. No queue may use it.
pub const MARK_TOKEN: &str = "__natasks_mark";

/// The longest schedule id, in bytes.
pub const MAX_SCHEDULE_ID: usize = 128;

/// Subject of a queue.
pub(crate) fn queue_subject(prefix: &str, queue: &str) -> String {
    // Built directly: the formatting machinery costs more than the copy, once per dispatch.
    let mut subject = String::with_capacity(prefix.len() + 1 + queue.len());
    subject.push_str(prefix);
    subject.push('.');
    subject.push_str(queue);
    subject
}

/// The stream subject that captures every queue (`<prefix>.*`), as the Go library creates it.
pub(crate) fn queues_wildcard(prefix: &str) -> String {
    format!("{prefix}.*")
}

/// The stream subject that captures schedules, one subject per pending schedule.
pub(crate) fn schedules_wildcard(prefix: &str) -> String {
    format!("{prefix}.{SCHEDULE_TOKEN}.>")
}

/// A fresh schedule subject. Each pending schedule needs its own subject: a second schedule
/// on the same subject replaces the first.
pub(crate) fn schedule_subject(prefix: &str) -> String {
    format!("{prefix}.{SCHEDULE_TOKEN}.{}", nuid::next())
}

/// The stream subject that captures every marker.
pub(crate) fn markers_wildcard(prefix: &str) -> String {
    format!("{prefix}.{MARK_TOKEN}.>")
}

/// The subject of a marker: `<prefix>.__natasks_mark.<part>...`. Each part must be one valid
/// subject token: a fixed word, a queue name, or the output of [`encode_token`].
pub(crate) fn marker_subject(prefix: &str, parts: &[&str]) -> String {
    let mut subject = format!("{prefix}.{MARK_TOKEN}");
    for part in parts {
        subject.push('.');
        subject.push_str(part);
    }
    subject
}

/// The longest token [`encode_token`] writes out in full; longer ones are hashed.
const MAX_ENCODED_TOKEN: usize = 96;

/// Turns any string (an e-mail address, text with spaces, dots or any Unicode) into one
/// valid subject token: ASCII letters, digits, `-` and `_` stay, every other byte becomes
/// `%XX` (upper-case hex), so `decode_token` gives the string back. An encoding longer than
/// 96 characters is replaced by `~` and the SHA-256 of the string in hex (65 characters):
/// `~` never appears in the first form, so the two cannot collide.
pub(crate) fn encode_token(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    if out.is_empty() {
        // No valid subject has an empty token.
        out.push('%');
    }
    if out.len() > MAX_ENCODED_TOKEN {
        let digest = ring::digest::digest(&ring::digest::SHA256, raw.as_bytes());
        out = std::iter::once('~'.to_string())
            .chain(digest.as_ref().iter().map(|b| format!("{b:02x}")))
            .collect();
    }
    out
}

/// The string an [`encode_token`] token stands for; `None` for a hashed token or one
/// `encode_token` cannot have written.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn decode_token(token: &str) -> Option<String> {
    if token == "%" {
        return Some(String::new());
    }
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else if first.is_ascii_alphanumeric() || first == b'-' || first == b'_' {
            bytes.push(first);
            rest = tail;
        } else {
            return None;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The schedule subject of the debounced tasks of `queue` with `key`: one subject per queue
/// and key, so each new schedule replaces the pending one.
pub(crate) fn debounce_subject(prefix: &str, queue: &str, key: &str) -> String {
    format!("{prefix}.{SCHEDULE_TOKEN}.debounce.{queue}.{}", encode_token(key))
}

/// The subject of periodic schedule `id` (a valid id, see [`validate_schedule_id`]).
pub(crate) fn periodic_subject(prefix: &str, id: &str) -> String {
    format!("{prefix}.{SCHEDULE_TOKEN}.{PERIODIC_TOKEN}.{id}")
}

/// The subject filter matching every periodic schedule.
pub(crate) fn periodics_wildcard(prefix: &str) -> String {
    format!("{prefix}.{SCHEDULE_TOKEN}.{PERIODIC_TOKEN}.*")
}

/// The id of the periodic schedule on `subject`, if it is one (any subject prefix).
pub(crate) fn periodic_id(subject: &str) -> Option<&str> {
    let marker = format!(".{SCHEDULE_TOKEN}.{PERIODIC_TOKEN}.");
    let at = subject.find(&marker)?;
    let id = &subject[at + marker.len()..];
    validate_schedule_id(id).is_ok().then_some(id)
}

/// Checks a periodic schedule id: 1 to 128 ASCII letters, digits, `-` and `_`, so that
/// it is one subject token and reads the same in subjects, headers and the CLI.
pub fn validate_schedule_id(id: &str) -> Result<(), InvalidName> {
    let invalid = |problem| InvalidName { what: "schedule id", value: id.to_owned(), problem };
    if id.is_empty() {
        return Err(invalid("is empty"));
    }
    if id.len() > MAX_SCHEDULE_ID {
        return Err(invalid("is longer than 128 characters"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(invalid("may hold only ASCII letters, digits, `-` and `_`"));
    }
    Ok(())
}

/// Returns the queue name to use (`default` for an empty name) or why it is unusable.
pub fn validate_queue(queue: &str) -> Result<&str, InvalidName> {
    if queue.is_empty() {
        return Ok(DEFAULT_QUEUE);
    }
    let invalid = |problem| InvalidName { what: "queue name", value: queue.to_owned(), problem };
    if queue == SCHEDULE_TOKEN {
        return Err(invalid("is reserved for natasks schedules"));
    }
    if queue == MARK_TOKEN {
        return Err(invalid("is reserved for natasks markers"));
    }
    match scan_token(queue) {
        Scan::Wildcard => Err(invalid("must not contain the wildcards `*` or `>`")),
        _ if queue.contains('.') => {
            Err(invalid("must not contain `.` (a queue is one subject token)"))
        }
        Scan::Blank => Err(invalid("must not contain whitespace or control characters")),
        Scan::Clean => Ok(queue),
    }
}

/// What [`scan_token`] found first in a name, by the precedence of the errors it leads to.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    Clean,
    Wildcard,
    Blank,
}

/// Looks for wildcards (`*`, `>`), then whitespace or control characters, in one pass over
/// an ASCII name (names are checked at every dispatch); other names take the `char` path.
fn scan_token(name: &str) -> Scan {
    if name.is_ascii() {
        let mut blank = false;
        for byte in name.bytes() {
            match byte {
                b'*' | b'>' => return Scan::Wildcard,
                // The same set as `char::is_whitespace` or `char::is_control` on ASCII.
                _ if byte.is_ascii_whitespace() || byte.is_ascii_control() => blank = true,
                _ => {}
            }
        }
        return if blank { Scan::Blank } else { Scan::Clean };
    }
    if name.contains(['*', '>']) {
        Scan::Wildcard
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Scan::Blank
    } else {
        Scan::Clean
    }
}

/// Checks a task name: not empty, no wildcards, no whitespace or control characters.
pub(crate) fn validate_task_name(name: &str) -> Result<(), InvalidName> {
    let invalid = |problem| InvalidName { what: "task name", value: name.to_owned(), problem };
    if name.is_empty() {
        return Err(invalid("is empty"));
    }
    match scan_token(name) {
        Scan::Clean => Ok(()),
        Scan::Wildcard => Err(invalid("must not contain the wildcards `*` or `>`")),
        Scan::Blank => Err(invalid("must not contain whitespace or control characters")),
    }
}

/// Checks a header name and value can be written on the wire.
///
/// A name must be non-empty printable ASCII (letters, digits and punctuation, `!` to `~`)
/// without `:`, as NATS headers require; async-nats panics on any other name, so natasks
/// refuses it first. A value may hold any text but CR and LF.
pub(crate) fn validate_header(name: &str, value: &str) -> Result<(), InvalidName> {
    if !is_header_name(name) {
        return Err(InvalidName {
            what: "header name",
            value: name.to_owned(),
            problem: "must be non-empty printable ASCII (`!` to `~`) without `:`",
        });
    }
    if value.contains(['\r', '\n']) {
        return Err(InvalidName {
            what: "header value",
            value: value.to_owned(),
            problem: "must not contain CR or LF",
        });
    }
    Ok(())
}

/// Whether `name` can be a header name: what async-nats accepts (it panics on anything
/// else), and not empty.
pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Whether header `name` describes one stored message rather than the task: the server's
/// `Nats-*` headers (message id, schedule, expectations), natasks' `Natasks-Message-Id`,
/// the `Natasks-Periodic*` headers of a periodic tick, the guard keys (a task dispatched
/// again holds no lock) and the workflow step a task is (a copy is no step). A received
/// task dispatched again
/// leaves the ones it arrived with behind.
pub(crate) fn is_message_header(name: &str) -> bool {
    is_server_header(name)
        || name.eq_ignore_ascii_case(HEADER_MESSAGE_ID)
        || name.eq_ignore_ascii_case(HEADER_ID)
        || name.eq_ignore_ascii_case(HEADER_PERIODIC)
        || name.eq_ignore_ascii_case(HEADER_PERIODIC_SCHEDULE)
        || name.eq_ignore_ascii_case(HEADER_PERIODIC_DIGEST)
        || name.eq_ignore_ascii_case(HEADER_UNIQUE_KEY)
        || name.eq_ignore_ascii_case(HEADER_THROTTLE_KEY)
        || name.eq_ignore_ascii_case(HEADER_DEBOUNCE_KEY)
        || name.eq_ignore_ascii_case(crate::workflow::HEADER_WORKFLOW)
        || name.eq_ignore_ascii_case(crate::workflow::HEADER_WORKFLOW_STEP)
}

/// Whether header `name` is one of the server's (`Nats-*`, in any case).
pub(crate) fn is_server_header(name: &str) -> bool {
    let prefix = "Nats-";
    name.get(..prefix.len()).is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}

/// Makes an arbitrary error text safe for a header value: one line, at most `max` bytes.
pub(crate) fn header_safe(text: &str, max: usize) -> String {
    let mut out: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// The root of natasks' core (not stored) subjects: lifecycle events and cancellation
/// signals. Outside the stream's subjects, so no queue name can collide with them.
pub const EVENTS_ROOT: &str = "_natasks";

/// The subject of `kind` events of `queue` (`*` matches every queue or kind):
/// `_natasks.<prefix>.events.<queue>.<kind>`.
pub(crate) fn events_subject(prefix: &str, queue: &str, kind: &str) -> String {
    format!("{EVENTS_ROOT}.{prefix}.events.{queue}.{kind}")
}

/// The subject on which the workers of `queue` hear cancellations:
/// `_natasks.<prefix>.cancel.<queue>`.
pub(crate) fn cancel_subject(prefix: &str, queue: &str) -> String {
    format!("{EVENTS_ROOT}.{prefix}.cancel.{queue}")
}

/// The subject on which the workers of `queue` hear that its settings changed (pause,
/// limit, rates): `_natasks.<prefix>.control.<queue>`.
pub(crate) fn control_subject(prefix: &str, queue: &str) -> String {
    format!("{EVENTS_ROOT}.{prefix}.control.{queue}")
}

/// Consumer name for a queue, as the Go library derives it.
pub(crate) fn consumer_name(prefix: &str, queue: &str) -> String {
    let token: String = queue
        .trim()
        .chars()
        .map(|c| if matches!(c, '.' | ' ' | '>' | '*') { '-' } else { c })
        .collect();
    format!("{prefix}-{token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks as they were written before the one-pass scan: the scan must give the
    /// same answer, and the same error, for every name.
    fn reference(queue: bool, name: &str) -> Result<(), &'static str> {
        if name.is_empty() {
            return if queue { Ok(()) } else { Err("is empty") };
        }
        if queue && name == SCHEDULE_TOKEN {
            return Err("is reserved for natasks schedules");
        }
        if queue && name == MARK_TOKEN {
            return Err("is reserved for natasks markers");
        }
        if name.contains(['*', '>']) {
            return Err("must not contain the wildcards `*` or `>`");
        }
        if queue && name.contains('.') {
            return Err("must not contain `.` (a queue is one subject token)");
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain whitespace or control characters");
        }
        Ok(())
    }

    #[test]
    fn one_pass_name_checks_agree_with_the_plain_ones() {
        let mut names: Vec<String> = [
            "",
            "q",
            "emails",
            "a.b",
            "a b",
            "a*b",
            "a>",
            "*",
            ">",
            ".",
            " .",
            ". ",
            "*.",
            ".*",
            " *",
            "* ",
            "a\tb",
            "Größe",
            "ü.x",
            "ü x",
            "ü*",
            "a\u{85}b",
            "a\u{a0}b",
            "a\u{2028}",
            "\u{1b}[2J",
            SCHEDULE_TOKEN,
            MARK_TOKEN,
            "x\u{7f}",
            "x\u{0b}",
            "ü\u{1b}.x",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Every ASCII character, alone and between letters.
        for byte in 0u8..=127 {
            let c = char::from(byte);
            names.push(c.to_string());
            names.push(format!("a{c}b"));
            names.push(format!("a{c}.b"));
        }
        for name in &names {
            let queue = validate_queue(name).map(drop).map_err(|e| e.problem);
            assert_eq!(queue, reference(true, name), "queue {name:?}");
            let task = validate_task_name(name).map_err(|e| e.problem);
            assert_eq!(task, reference(false, name), "task name {name:?}");
        }
    }

    #[test]
    fn header_finds_what_get_finds() {
        let names = [TASK_NAME, QUEUE_NAME, ID_NAME, TRACK_NAME, MESSAGE_ID_NAME, NATS_MSG_ID_NAME];
        let mut headers = async_nats::HeaderMap::new();
        for round in 0..12 {
            for name in &names {
                assert_eq!(header(&headers, name), headers.get(name.clone()), "{name:?} {round}");
            }
            // Two values under one name, then names past the short-map limit.
            headers.append(names[round % names.len()].clone(), format!("v{round}").as_str());
            headers.append(format!("X-Extra-{round}").as_str(), "x");
        }
        assert!(headers.len() > 8);
    }

    #[test]
    fn task_id_prefers_natasks_id_then_message_id_then_nats_msg_id() {
        let mut headers = async_nats::HeaderMap::new();
        assert_eq!(task_id(&headers), None);
        headers.insert(NATS_MSG_ID, "nats");
        assert_eq!(task_id(&headers), Some("nats"));
        headers.insert(HEADER_MESSAGE_ID, "kept");
        assert_eq!(task_id(&headers), Some("kept"));
        headers.insert(HEADER_ID, "id");
        assert_eq!(task_id(&headers), Some("id"));
    }

    #[test]
    fn queue_names() {
        assert_eq!(validate_queue("").unwrap(), "default");
        assert_eq!(validate_queue("emails").unwrap(), "emails");
        assert_eq!(validate_queue("emails-dlq").unwrap(), "emails-dlq");
        for bad in ["a.b", "a*", ">", "a b", "a\tb", SCHEDULE_TOKEN, MARK_TOKEN, "x\ny"] {
            let err = validate_queue(bad).unwrap_err();
            assert!(err.to_string().starts_with("queue name"), "{bad}: {err}");
        }
    }

    #[test]
    fn task_names() {
        assert!(validate_task_name("emails.send").is_ok());
        assert!(validate_task_name("").unwrap_err().to_string().contains("is empty"));
        assert!(validate_task_name("emails.*").is_err());
        assert!(validate_task_name("a b").is_err());
    }

    #[test]
    fn headers() {
        assert!(validate_header("X-Request-Id", "42").is_ok());
        assert!(validate_header("X-Bad", "a\r\nb").is_err());
        assert!(validate_header("Bad Name", "v").is_err());
        assert!(validate_header("", "v").is_err());
        assert!(validate_header("X-Ok_1.~!", "Größe 1").is_ok());
        for bad in ["Größe", "Ä", "X:Colon", "X\tTab", "X\u{7f}", "X\0"] {
            let err = validate_header(bad, "v").unwrap_err();
            assert!(err.to_string().starts_with("header name"), "{bad:?}: {err}");
            // Each would make async-nats panic.
            assert!(bad.parse::<HeaderName>().is_err(), "{bad:?}");
        }
        assert!("X-Ok_1.~!".parse::<HeaderName>().is_ok());
    }

    #[test]
    fn message_headers() {
        for name in [
            "Nats-Msg-Id",
            "Nats-Scheduler",
            "nats-expected-stream",
            "Natasks-Message-Id",
            "Natasks-Periodic",
            "natasks-periodic-schedule",
            "Natasks-Periodic-Digest",
            "Natasks-Workflow",
            "natasks-workflow-step",
        ] {
            assert!(is_message_header(name), "{name}");
        }
        for name in ["Natasks-Task", "Natasks-Last-Error", "X-Nats-Id", "Nats", "traceparent"] {
            assert!(!is_message_header(name), "{name}");
        }
    }

    #[test]
    fn header_safe_text() {
        assert_eq!(header_safe("a\r\nb", 100), "a  b");
        assert_eq!(header_safe("héllo", 2), "h");
    }

    #[test]
    fn subjects() {
        assert_eq!(queue_subject("natasks", "emails"), "natasks.emails");
        assert_eq!(queues_wildcard("natasks"), "natasks.*");
        assert_eq!(schedules_wildcard("natasks"), "natasks.__natasks_schedule.>");
        assert!(schedule_subject("natasks").starts_with("natasks.__natasks_schedule."));
        assert_eq!(consumer_name("natasks", "emails"), "natasks-emails");
        assert_eq!(
            periodic_subject("natasks", "nightly-report"),
            "natasks.__natasks_schedule.periodic.nightly-report"
        );
        assert_eq!(periodics_wildcard("natasks"), "natasks.__natasks_schedule.periodic.*");
        assert_eq!(periodic_id("a.b.__natasks_schedule.periodic.x_1"), Some("x_1"));
        assert_eq!(periodic_id("natasks.__natasks_schedule.AbC123"), None);
    }

    #[test]
    fn markers() {
        assert_eq!(markers_wildcard("natasks"), "natasks.__natasks_mark.>");
        assert_eq!(
            marker_subject("natasks", &["unique", "emails", "k"]),
            "natasks.__natasks_mark.unique.emails.k"
        );
    }

    #[test]
    fn tokens_round_trip() {
        for raw in [
            "order-42",
            "ann@example.com",
            "a b.c*d>e",
            "Größe ✓",
            "100%",
            "~x",
            "",
            "tab\there",
            &"x".repeat(96),
        ] {
            let token = encode_token(raw);
            assert!(!token.is_empty(), "{raw:?}");
            assert!(token.len() <= 96, "{raw:?} -> {token}");
            assert!(
                token.bytes().all(|b| b.is_ascii_graphic() && !b".*>".contains(&b)),
                "{raw:?} -> {token}"
            );
            assert_eq!(decode_token(&token).as_deref(), Some(raw), "{token}");
        }
        assert_eq!(encode_token("ann@example.com"), "ann%40example%2Ecom");
        assert_ne!(encode_token("a.b"), encode_token("a_b"));
    }

    #[test]
    fn long_tokens_are_hashed() {
        let long = "é".repeat(100);
        let token = encode_token(&long);
        assert_eq!(token.len(), 65);
        assert!(token.starts_with('~'));
        assert_eq!(token, encode_token(&long));
        assert_ne!(token, encode_token(&"é".repeat(101)));
        assert_eq!(decode_token(&token), None);
    }

    #[test]
    fn schedule_ids() {
        for good in ["nightly-report", "a", "A_1-b", &"x".repeat(128)] {
            assert!(validate_schedule_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "a*", ">", "ü", "a/b", &"x".repeat(129)] {
            let err = validate_schedule_id(bad).unwrap_err();
            assert!(err.to_string().starts_with("schedule id"), "{bad}: {err}");
        }
    }
}
