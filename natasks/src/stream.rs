//! The stream every queue lives in: its layout, and creating or adopting it.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

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

    fn subjects(&self) -> [String; 2] {
        [
            wire::queues_wildcard(&self.subject_prefix),
            wire::schedules_wildcard(&self.subject_prefix),
        ]
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects().to_vec(),
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window.unwrap_or_default(),
            allow_message_schedules: true,
            ..Default::default()
        }
    }

    /// Creates the stream, or adopts an existing one: it must capture `<prefix>.*`; the
    /// schedule subjects and the schedules flag are added when missing. Other settings of an
    /// existing stream are left as the operator made them.
    pub(crate) async fn ensure(&self, js: &jetstream::Context) -> Result<StreamState, SetupError> {
        // Two processes may race to create the stream; the loser adopts the winner's.
        for _ in 0..2 {
            match js.get_stream(&self.name).await {
                Ok(existing) => return self.adopt(js, existing).await,
                Err(err) if is_not_found(&err) => match js.create_stream(self.config()).await {
                    Ok(mut created) => {
                        let info = created.info().await.map_err(|err| {
                            SetupError::jetstream(format!("read stream {:?}", self.name), err)
                        })?;
                        let schedules = info.config.allow_message_schedules;
                        return Ok(StreamState { schedules, stream: created });
                    }
                    Err(err) => {
                        tracing::debug!(stream = %self.name, error = %err, "create stream failed, retrying as adopt");
                        continue;
                    }
                },
                Err(err) => {
                    return Err(SetupError::jetstream(format!("read stream {:?}", self.name), err))
                }
            }
        }
        Err(SetupError::new(
            SetupErrorKind::JetStream,
            format!("stream {:?} could neither be created nor read", self.name),
        ))
    }

    async fn adopt(
        &self,
        js: &jetstream::Context,
        stream: stream::Stream,
    ) -> Result<StreamState, SetupError> {
        let mut config = stream.cached_info().config.clone();
        let [queues, schedules] = self.subjects();
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
        if config.subjects.contains(&schedules) && config.allow_message_schedules {
            return Ok(StreamState { schedules: true, stream });
        }
        if !config.subjects.contains(&schedules) {
            config.subjects.push(schedules);
        }
        config.allow_message_schedules = true;
        let info = js.update_stream(config).await.map_err(|err| {
            SetupError::jetstream(format!("add schedule subjects to stream {:?}", self.name), err)
        })?;
        Ok(StreamState { schedules: info.config.allow_message_schedules, stream })
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
}
