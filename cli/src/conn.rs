//! Connecting to NATS and finding the natasks stream and its queues.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::GetStreamErrorKind, stream::Stream};
use async_nats::ConnectOptions;
use futures_util::TryStreamExt;

use crate::{Context as _, Error, Global, Result};

/// How long to wait for the server to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects with the global flags' credentials and TLS settings.
pub async fn connect(g: &Global) -> Result<jetstream::Context> {
    let failed =
        |err: &dyn std::fmt::Display| Error::msg(format!("cannot connect to {}: {err}", g.server));
    let mut options = match &g.creds {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .context(|| format!("cannot read credentials file {}", path.display()))?,
        None => ConnectOptions::new(),
    };
    if let Some(path) = &g.nkey {
        let seed = std::fs::read_to_string(path)
            .context(|| format!("cannot read nkey seed file {}", path.display()))?;
        options = options.nkey(seed.trim().to_owned());
    }
    match (&g.user, &g.password) {
        (Some(user), password) => {
            options = options.user_and_password(user.clone(), password.clone().unwrap_or_default())
        }
        (None, Some(_)) => return Err(Error::msg("--password needs --user")),
        (None, None) => {}
    }
    if let Some(token) = &g.token {
        options = options.token(token.clone());
    }
    match (&g.tlscert, &g.tlskey) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone()).require_tls(true)
        }
        (None, None) => {}
        _ => return Err(Error::msg("--tlscert and --tlskey go together")),
    }
    if let Some(ca) = &g.tlsca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let servers: Vec<&str> = g.server.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if servers.is_empty() {
        return Err(Error::msg("--server is empty"));
    }
    let addrs = servers
        .iter()
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| failed(&err))?;
    let client = options
        .name("natasks-cli")
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(Some(1))
        .connect(addrs)
        .await
        .map_err(|err| failed(&crate::one_line(&err)))?;
    Ok(jetstream::new(client))
}

/// The natasks stream; a clear error when it does not exist.
pub async fn stream(g: &Global, js: &jetstream::Context) -> Result<Stream> {
    match js.get_stream(&g.stream).await {
        Ok(stream) => Ok(stream),
        Err(err) => match err.kind() {
            GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(Error::msg(format!(
                    "stream {:?} not found on {} (nothing dispatched yet? see --stream)",
                    g.stream, g.server
                )))
            }
            _ => Err(Error::msg(format!(
                "cannot read stream {:?}: {}",
                g.stream,
                crate::one_line(&err)
            ))),
        },
    }
}

/// Subject of queue `q`.
pub fn queue_subject(g: &Global, queue: &str) -> String {
    format!("{}.{queue}", g.subject_prefix)
}

/// Name of the dead-letter queue of `q`.
pub fn dlq_name(g: &Global, queue: &str) -> String {
    format!("{queue}{}", g.dlq_suffix)
}

/// Checks a queue name given on the command line, as the library does.
pub fn valid_queue(queue: &str) -> Result<&str> {
    natasks::wire::validate_queue(queue).map_err(|err| Error::msg(err.to_string()))
}

/// Messages stored per subject matching `filter`.
pub async fn subject_counts(stream: &Stream, filter: &str) -> Result<BTreeMap<String, u64>> {
    let info = stream.info_with_subjects(filter).await.context(|| {
        format!("cannot read subjects of stream {:?}", stream.cached_info().config.name)
    })?;
    let pairs: Vec<(String, usize)> = info.try_collect().await.context(|| {
        format!("cannot read subjects of stream {:?}", stream.cached_info().config.name)
    })?;
    Ok(pairs.into_iter().map(|(subject, count)| (subject, count as u64)).collect())
}

/// Messages stored on one subject.
pub async fn stored(stream: &Stream, subject: &str) -> Result<u64> {
    Ok(subject_counts(stream, subject).await?.get(subject).copied().unwrap_or(0))
}

/// Consumers of the stream that work a single queue, by queue name. When several consumers
/// filter on the same queue, the one named `natasks-<queue>` wins.
pub async fn queue_consumers(
    g: &Global,
    stream: &Stream,
) -> Result<BTreeMap<String, consumer::Info>> {
    let infos: Vec<consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .context(|| format!("cannot list consumers of stream {:?}", g.stream))?;
    let prefix = format!("{}.", g.subject_prefix);
    let mut out: BTreeMap<String, consumer::Info> = BTreeMap::new();
    for info in infos {
        let filters = if info.config.filter_subjects.is_empty() {
            vec![info.config.filter_subject.clone()]
        } else {
            info.config.filter_subjects.clone()
        };
        let [filter] = filters.as_slice() else { continue };
        let Some(queue) = filter.strip_prefix(&prefix) else { continue };
        if queue.is_empty() || queue.contains(['.', '*', '>']) {
            continue;
        }
        let preferred = format!("{}-{queue}", g.consumer_prefix);
        match out.get(queue) {
            Some(existing) if existing.name == preferred => {}
            _ => {
                out.insert(queue.to_owned(), info);
            }
        }
    }
    Ok(out)
}

/// Fails with "unknown queue" unless the queue or its dead-letter queue holds messages or
/// has a worker consumer.
pub async fn ensure_known_queue(g: &Global, stream: &Stream, queue: &str) -> Result<()> {
    let counts = subject_counts(stream, &format!("{}.*", g.subject_prefix)).await?;
    let has = |q: &str| counts.get(&queue_subject(g, q)).is_some_and(|n| *n > 0);
    if has(queue) || has(&dlq_name(g, queue)) {
        return Ok(());
    }
    if queue_consumers(g, stream).await?.contains_key(queue) {
        return Ok(());
    }
    Err(Error::msg(format!(
        "unknown queue {queue:?}: no tasks, dead letters or worker consumer in stream {:?}",
        g.stream
    )))
}
