//! The bucket of task records: opening it, reading, writing and watching a record.

use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;
use tokio::sync::OnceCell;

use super::record::{self, Record};
use super::{TrackError, TrackErrorKind, EXPIRED_MEMORY};
use crate::stream::StreamSettings;
use crate::wire;

/// The tracking side of a client or worker: the connection, the layout, and the bucket,
/// opened on first use (so processes that never track create nothing).
pub(crate) struct Tracker {
    js: jetstream::Context,
    stream: StreamSettings,
    store: OnceCell<Store>,
}

impl Tracker {
    pub(crate) fn new(js: jetstream::Context, stream: StreamSettings) -> Self {
        Self { js, stream, store: OnceCell::new() }
    }

    /// The bucket, created on first use.
    pub(crate) async fn store(&self) -> Result<&Store, TrackError> {
        self.store.get_or_try_init(|| Store::open(&self.js, &self.stream)).await
    }

    pub(crate) fn nats(&self) -> async_nats::Client {
        self.js.client()
    }

    pub(crate) fn js(&self) -> &jetstream::Context {
        &self.js
    }

    pub(crate) fn settings(&self) -> &StreamSettings {
        &self.stream
    }

    /// Publishes a core NATS message, logging (not returning) a failure: events and
    /// signals are best-effort.
    pub(crate) async fn announce(&self, subject: String, payload: Vec<u8>) {
        if let Err(err) = self.js.client().publish(subject, payload.into()).await {
            tracing::debug!(error = %err, "could not publish a lifecycle event");
        }
    }
}

/// What the bucket holds for an id.
pub(crate) enum Lookup {
    Found {
        record: Box<Record>,
        revision: u64,
    },
    /// The server's marker for an expired record, at this revision.
    Expired {
        revision: u64,
    },
    /// Nothing (revision 0), or a deleted record at this revision.
    Unknown {
        revision: u64,
    },
}

pub(crate) struct Store {
    js: jetstream::Context,
    kv: kv::Store,
    /// `$KV.<bucket>.`: a record's subject is this plus its key.
    subject_prefix: String,
}

/// The bucket of a stream's task records: `<stream>_TASKS`, with characters a bucket name
/// cannot hold replaced by `_`.
pub(crate) fn bucket_name(stream: &str) -> String {
    let name: String = stream
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    format!("{name}_TASKS")
}

impl Store {
    async fn open(js: &jetstream::Context, stream: &StreamSettings) -> Result<Self, TrackError> {
        let bucket = bucket_name(&stream.name);
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "natasks: the latest state of each tracked task".to_owned(),
            history: 1,
            storage: StorageType::File,
            num_replicas: stream.replicas,
            limit_markers: Some(EXPIRED_MEMORY),
            ..Default::default()
        };
        let kv = match js.create_key_value(config).await {
            Ok(kv) => kv,
            Err(err)
                if err.kind()
                    == async_nats::jetstream::context::CreateKeyValueErrorKind::LimitMarkersNotSupported =>
            {
                return Err(TrackError::new(
                    TrackErrorKind::Unsupported,
                    format!(
                        "tracking tasks needs per-message TTL (nats-server 2.11 or newer); the connected server is {}",
                        js.client().server_info().version
                    ),
                ));
            }
            // Made by another process with other settings (replicas): use it as it is.
            Err(create) => js.get_key_value(&bucket).await.map_err(|_| {
                TrackError::broker(format!("create the task record bucket {bucket:?}"), create)
            })?,
        };
        // A bucket made elsewhere without per-message TTL would refuse every record.
        let config = &kv.stream.cached_info().config;
        if !config.allow_message_ttl || config.max_messages_per_subject != 1 {
            return Err(TrackError::new(
                TrackErrorKind::Unsupported,
                format!(
                    "the task record bucket {bucket:?} exists without per-message TTL or with \
                     history above 1 (made by another tool?); delete it, or give it \
                     `limit_markers` and history 1"
                ),
            ));
        }
        Ok(Self { js: js.clone(), kv, subject_prefix: format!("$KV.{bucket}.") })
    }

    /// The record of task `id`, if any.
    pub(crate) async fn get(&self, id: &str) -> Result<Lookup, TrackError> {
        let key = record::key(id);
        let entry =
            self.kv.entry(key).await.map_err(|err| {
                TrackError::broker(format!("read the record of task {id:?}"), err)
            })?;
        let Some(entry) = entry else { return Ok(Lookup::Unknown { revision: 0 }) };
        lookup(id, entry.operation, &entry.value, entry.revision)
    }

    /// Writes the record of task `id`, kept for its retention; with `expect`, only if the
    /// key's last revision is that one (0: only if the key holds nothing). The new revision.
    pub(crate) async fn put(
        &self,
        id: &str,
        record: &Record,
        expect: Option<u64>,
    ) -> Result<u64, PublishError> {
        let mut message = PublishMessage::build()
            .payload(Bytes::from(record.to_json()))
            .ttl(Duration::from_secs(record.retention.max(1)));
        if let Some(revision) = expect {
            message = message.expected_last_subject_sequence(revision);
        }
        let subject = format!("{}{}", self.subject_prefix, record::key(id));
        let ack = self.js.send_publish(subject, message).await?.await?;
        Ok(ack.sequence)
    }

    /// The value and revision under `key` (a key of another kind of record, such as a
    /// workflow's plan), if a value is there.
    pub(crate) async fn get_raw(
        &self,
        key: &str,
    ) -> Result<Option<(Bytes, u64)>, async_nats::jetstream::kv::EntryError> {
        Ok(self
            .kv
            .entry(key)
            .await?
            .filter(|entry| entry.operation == Operation::Put)
            .map(|entry| (entry.value, entry.revision)))
    }

    /// The value, revision and write time under `key`, if a value is there.
    pub(crate) async fn get_raw_dated(
        &self,
        key: &str,
    ) -> Result<Option<(Bytes, u64, time::OffsetDateTime)>, async_nats::jetstream::kv::EntryError>
    {
        Ok(self
            .kv
            .entry(key)
            .await?
            .filter(|entry| entry.operation == Operation::Put)
            .map(|entry| (entry.value, entry.revision, entry.created)))
    }

    /// Writes `value` under `key`, kept for `ttl`; with `expect`, only if the key's last
    /// revision is that one (0: only if the key holds nothing). The new revision.
    pub(crate) async fn put_raw(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        expect: Option<u64>,
    ) -> Result<u64, PublishError> {
        let mut message = PublishMessage::build().payload(value).ttl(ttl);
        if let Some(revision) = expect {
            message = message.expected_last_subject_sequence(revision);
        }
        let subject = format!("{}{key}", self.subject_prefix);
        let ack = self.js.send_publish(subject, message).await?.await?;
        Ok(ack.sequence)
    }

    /// Every change of task `id`'s record from now on, starting with the current one.
    pub(crate) async fn watch(&self, id: &str) -> Result<kv::Watch, TrackError> {
        self.kv
            .watch_with_history(record::key(id))
            .await
            .map_err(|err| TrackError::broker(format!("watch the record of task {id:?}"), err))
    }
}

/// Reads a bucket entry: a record, or the marker the server leaves when one expires.
pub(crate) fn lookup(
    id: &str,
    operation: Operation,
    value: &[u8],
    revision: u64,
) -> Result<Lookup, TrackError> {
    match operation {
        Operation::Put => match serde_json::from_slice(value) {
            Ok(record) => Ok(Lookup::Found { record: Box::new(record), revision }),
            Err(err) => Err(TrackError::new(
                TrackErrorKind::Broker,
                format!("the record of task {id:?} is not a natasks task record: {err}"),
            )),
        },
        // The server's marker for a record whose TTL ran out.
        Operation::Purge => Ok(Lookup::Expired { revision }),
        Operation::Delete => Ok(Lookup::Unknown { revision }),
    }
}

/// Whether a publish failed because the subject's last sequence was not the expected one.
pub(crate) fn is_conflict(err: &PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    err.kind() == PublishErrorKind::WrongLastSequence
}

/// Whether a publish failed because the message is larger than the server accepts.
pub(crate) fn is_too_large(err: &PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    err.kind() == PublishErrorKind::MaxPayloadExceeded
}

/// The subject of `kind` events of `queue`, for the tracker's layout.
pub(crate) fn events_subject(tracker: &Tracker, queue: &str, kind: &str) -> String {
    wire::events_subject(&tracker.stream.subject_prefix, queue, kind)
}
