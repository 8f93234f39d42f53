//! The stream every queue lives in: its layout, and creating or adopting it.

use std::time::Duration;

use async_nats::jetstream::{self, context::CreateStreamErrorKind, stream};

use crate::error::{SetupError, SetupErrorKind};
use crate::wire;

/// Where the queues live: the stream name, the subject prefix and, for a stream natasks
/// creates, its replication and duplicate window. Shared by clients and workers.
#[derive(Debug, Clone)]
pub(crate) struct StreamSettings {
    pub(crate) name: String,
    pub(crate) subject_prefix: String,
    pub(crate) replicas: usize,
    pub(crate) duplicate_window: Option<Duration>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: wire::DEFAULT_STREAM.to_owned(),
            subject_prefix: wire::DEFAULT_SUBJECT_PREFIX.to_owned(),
            replicas: 1,
            duplicate_window: None,
        }
    }
}

/// What the server told us about the stream, and a handle to it.
pub(crate) struct StreamState {
    /// The server stores message schedules (nats-server 2.12+).
    pub(crate) schedules: bool,
    /// The stream stores atomic batches (nats-server 2.12+) and captures the marker subjects.
    pub(crate) atomic: bool,
    /// The stream honours per-message TTLs, `Nats-TTL` (nats-server 2.11+).
    pub(crate) ttl: bool,
    /// The stream, for creating consumers.
    pub(crate) stream: stream::Stream,
}

impl StreamSettings {
    pub(crate) fn validate(&self) -> Result<(), SetupError> {
        let name_ok = !self.name.is_empty()
            && !self.name.contains(['.', '*', '>', '/', '\\'])
            && !self.name.chars().any(|c| c.is_whitespace() || c.is_control());
        if !name_ok {
            return Err(SetupError::invalid_option(
                "stream_name",
                format!(
                    "{:?} must be non-empty, without `.`, `*`, `>`, slashes or whitespace",
                    self.name
                ),
            ));
        }
        let prefix_ok = !self.subject_prefix.is_empty()
            && !self.subject_prefix.contains(['*', '>'])
            && !self.subject_prefix.starts_with('.')
            && !self.subject_prefix.ends_with('.')
            && !self.subject_prefix.contains("..")
            && !self.subject_prefix.chars().any(|c| c.is_whitespace() || c.is_control());
        if !prefix_ok {
            return Err(SetupError::invalid_option(
                "subject_prefix",
                format!(
                    "{:?} must be a non-empty subject without wildcards, whitespace or empty tokens",
                    self.subject_prefix
                ),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(SetupError::invalid_option(
                "replicas",
                format!("{} is outside 1..=5", self.replicas),
            ));
        }
        if self.duplicate_window.is_some_and(|w| w.is_zero()) {
            return Err(SetupError::invalid_option("duplicate_window", "must be positive"));
        }
        Ok(())
    }

    fn subjects(&self) -> [String; 3] {
        [
            wire::queues_wildcard(&self.subject_prefix),
            wire::schedules_wildcard(&self.subject_prefix),
            wire::markers_wildcard(&self.subject_prefix),
        ]
    }

    /// The stream natasks creates; each feature only where the server has it.
    fn config(&self, features: Features) -> stream::Config {
        let [queues, schedules, markers] = self.subjects();
        let mut subjects = vec![queues, schedules];
        if features.atomic {
            subjects.push(markers);
        }
        stream::Config {
            name: self.name.clone(),
            subjects,
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window.unwrap_or_default(),
            allow_message_schedules: features.schedules,
            allow_atomic_publish: features.atomic,
            allow_message_ttl: features.ttl,
            ..Default::default()
        }
    }

    /// Creates the stream, or adopts an existing one: it must capture `<prefix>.*`. On a
    /// server that stores message schedules (nats-server 2.12+), the schedule subjects and
    /// the schedules flag are added when missing; an older server cannot store them, so its
    /// stream is adopted as it is, without delayed dispatch. Other settings of an existing
    /// stream are left as the operator made them.
    pub(crate) async fn ensure(&self, js: &jetstream::Context) -> Result<StreamState, SetupError> {
        let features = Features::of(&js.client().server_info().version);
        match js.get_stream(&self.name).await {
            Ok(existing) => return self.adopt(js, existing, features).await,
            Err(err) if is_not_found(&err) => {}
            Err(err) => {
                return Err(SetupError::jetstream(format!("read stream {:?}", self.name), err))
            }
        }
        let create_error = match js.create_stream(self.config(features)).await {
            Ok(mut created) => {
                let info = created.info().await.map_err(|err| {
                    SetupError::jetstream(format!("read stream {:?}", self.name), err)
                })?;
                let config = info.config.clone();
                return Ok(self.state(&config, created));
            }
            Err(err) => err,
        };
        // Another process may have created it meanwhile (or only the reply was lost).
        tracing::debug!(stream = %self.name, error = %create_error, "create stream failed, trying to adopt it");
        match js.get_stream(&self.name).await {
            Ok(existing) => self.adopt(js, existing, features).await,
            Err(_) => {
                let message = if create_error.kind() == CreateStreamErrorKind::TimedOut {
                    format!(
                        "stream {name:?} does not exist and creating it got no answer; that \
                         needs permission to publish to `$JS.API.STREAM.CREATE.{name}`: have an \
                         administrator create it first",
                        name = self.name
                    )
                } else {
                    format!("create stream {:?}", self.name)
                };
                Err(SetupError::jetstream(message, create_error))
            }
        }
    }

    /// What the stream, as the server echoes its config, can do.
    fn state(&self, config: &stream::Config, stream: stream::Stream) -> StreamState {
        let [_, schedules, markers] = self.subjects();
        StreamState {
            schedules: config.allow_message_schedules && config.subjects.contains(&schedules),
            atomic: config.allow_atomic_publish && config.subjects.contains(&markers),
            ttl: config.allow_message_ttl,
            stream,
        }
    }

    /// Adopts an existing stream, adding what this server supports and the stream lacks:
    /// the schedule subjects and flag, the marker subjects and atomic batches, per-message
    /// TTLs. An older server cannot store them (and never echoes the flags), so nothing is
    /// asked of it that it would silently drop.
    async fn adopt(
        &self,
        js: &jetstream::Context,
        stream: stream::Stream,
        features: Features,
    ) -> Result<StreamState, SetupError> {
        let mut config = stream.cached_info().config.clone();
        let [queues, schedules, markers] = self.subjects();
        if !config.subjects.contains(&queues) {
            return Err(SetupError::new(
                SetupErrorKind::IncompatibleStream,
                format!(
                    "stream {:?} exists without subject {queues:?} (it has {:?})",
                    self.name, config.subjects
                ),
            ));
        }
        if config.retention != stream::RetentionPolicy::WorkQueue {
            return Err(SetupError::new(
                SetupErrorKind::IncompatibleStream,
                format!("stream {:?} exists without work-queue retention", self.name),
            ));
        }
        let original = config.clone();
        let mut missing = Vec::new();
        if features.schedules {
            if !config.subjects.contains(&schedules) {
                config.subjects.push(schedules);
                missing.push("schedule subjects");
            }
            if !config.allow_message_schedules {
                config.allow_message_schedules = true;
                missing.push("message schedules");
            }
        }
        // What only unique tasks, throttles and batches need: a stream without it still
        // serves everything else, so a user who may not update the stream can use it.
        let required = missing.len();
        if features.atomic {
            if !config.subjects.contains(&markers) {
                config.subjects.push(markers);
                missing.push("marker subjects");
            }
            if !config.allow_atomic_publish {
                config.allow_atomic_publish = true;
                missing.push("atomic batches");
            }
        }
        if features.ttl && !config.allow_message_ttl {
            config.allow_message_ttl = true;
            missing.push("per-message TTLs");
        }
        if missing.is_empty() {
            return Ok(self.state(&config, stream));
        }
        let missing = missing.join(", ");
        tracing::debug!(stream = %self.name, %missing, "adding to the stream");
        let info = match js.update_stream(config).await {
            Ok(info) => info,
            Err(err) if required == 0 => {
                tracing::debug!(stream = %self.name, %missing, error = %err, "could not add them; unique tasks, throttles and batches are unavailable");
                return Ok(self.state(&original, stream));
            }
            Err(err) => {
                let message = if err.kind() == CreateStreamErrorKind::TimedOut {
                    format!(
                        "stream {name:?} lacks {missing} and adding them got no answer; that \
                         needs permission to publish to `$JS.API.STREAM.UPDATE.{name}`: have \
                         an administrator start a natasks client or worker once to add them",
                        name = self.name
                    )
                } else {
                    format!("add {missing} to stream {:?}", self.name)
                };
                return Err(SetupError::jetstream(message, err));
            }
        };
        Ok(self.state(&info.config, stream))
    }
}

/// What the stream may be asked to do on the connected server, judged by the version it
/// announced (from its INFO, which needs no permission, unlike `$JS.API.INFO`). An unknown
/// version enables everything and trusts the config the server echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Features {
    schedules: bool,
    atomic: bool,
    ttl: bool,
}

impl Features {
    fn of(version: &str) -> Self {
        Self {
            schedules: schedule_support(version) != Support::Unsupported,
            atomic: atomic_support(version) != Support::Unsupported,
            // Only guards use TTLs, and they need atomic batches too: an older server's
            // stream is left alone.
            ttl: ttl_support(version) != Support::Unsupported
                && atomic_support(version) != Support::Unsupported,
        }
    }
}

/// Whether the server has a feature, judged by the version it announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Support {
    /// nats-server 2.12 or newer.
    Supported,
    /// Older: it accepts the stream flag but silently drops it.
    Unsupported,
    /// The version cannot be read: enable schedules and trust the config the server echoes.
    Unknown,
}

/// Message schedules arrived in nats-server 2.12 (JetStream API level 2). The version comes
/// from the server's INFO, which needs no permission, unlike `$JS.API.INFO`.
pub(crate) fn schedule_support(version: &str) -> Support {
    version_support(version, (2, 12))
}

/// Atomic batches arrived in nats-server 2.12 (JetStream API level 2).
pub(crate) fn atomic_support(version: &str) -> Support {
    version_support(version, (2, 12))
}

/// The error text of an operation that needs a stream feature the stream lacks. `needs`
/// names both (`a batch needs atomic batches`), `since` the first server with the feature
/// (`nats-server 2.12`). When the connected server has it, only the stream's flag is
/// missing, which a client or worker allowed to update the stream sets; otherwise the
/// server is too old.
pub(crate) fn lacking(needs: &str, since: &str, version: &str, server_has_it: bool) -> String {
    if server_has_it {
        format!(
            "{needs}, which the stream does not allow: a natasks client or worker allowed to \
             update the stream (`$JS.API.STREAM.UPDATE.<stream>`) adds them when it starts"
        )
    } else {
        format!("{needs} ({since} or newer); the connected server is {version}")
    }
}

/// [`lacking`] for atomic batches.
pub(crate) fn lacking_atomic(needs: &str, version: &str) -> String {
    lacking(needs, "nats-server 2.12", version, atomic_support(version) == Support::Supported)
}

/// Per-message TTLs arrived in nats-server 2.11 (JetStream API level 1).
pub(crate) fn ttl_support(version: &str) -> Support {
    version_support(version, (2, 11))
}

/// Recurring schedules (`@every`, cron, time zones) arrived in nats-server 2.14 (JetStream
/// API level 4); 2.12 runs only `@at` schedules.
pub(crate) fn recurring_schedule_support(version: &str) -> Support {
    version_support(version, (2, 14))
}

/// Whether `version` is at least `major.minor`.
fn version_support(version: &str, (need_major, need_minor): (u32, u32)) -> Support {
    let mut numbers = version.split('.').map(|part| {
        let digits = part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len());
        part[..digits].parse::<u32>().ok()
    });
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= (need_major, need_minor) => {
            Support::Supported
        }
        (Some(_), Some(_)) => Support::Unsupported,
        _ => Support::Unknown,
    }
}

fn is_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(
        err.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        let bad = StreamSettings { name: "a.b".into(), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("`stream_name`"));
        let bad = StreamSettings { subject_prefix: "a.*".into(), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("`subject_prefix`"));
        let bad = StreamSettings { replicas: 0, ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("`replicas`"));
        assert!(StreamSettings::default().validate().is_ok());
    }

    #[test]
    fn schedules_need_nats_server_2_12() {
        for (version, support) in [
            ("2.9.10", Support::Unsupported),
            ("2.10.22", Support::Unsupported),
            ("2.11.11", Support::Unsupported),
            ("2.12.0", Support::Supported),
            ("2.12.0-RC.1", Support::Supported),
            ("2.15.1", Support::Supported),
            ("3.0.0", Support::Supported),
            ("", Support::Unknown),
            ("v2", Support::Unknown),
        ] {
            assert_eq!(schedule_support(version), support, "{version}");
        }
    }

    #[test]
    fn batches_and_ttls_by_version() {
        assert_eq!(
            Features::of("2.9.10"),
            Features { schedules: false, atomic: false, ttl: false }
        );
        assert_eq!(
            Features::of("2.11.4"),
            Features { schedules: false, atomic: false, ttl: false }
        );
        assert_eq!(Features::of("2.12.0"), Features { schedules: true, atomic: true, ttl: true });
        assert_eq!(Features::of("v?"), Features { schedules: true, atomic: true, ttl: true });
    }

    #[test]
    fn recurring_schedules_need_nats_server_2_14() {
        for (version, support) in [
            ("2.11.11", Support::Unsupported),
            ("2.12.8", Support::Unsupported),
            ("2.14.0", Support::Supported),
            ("2.15.1", Support::Supported),
            ("", Support::Unknown),
        ] {
            assert_eq!(recurring_schedule_support(version), support, "{version}");
        }
    }
}
