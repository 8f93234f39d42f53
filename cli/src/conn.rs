//! Connecting to NATS, and the operations API for the global flags' stream layout.

use std::time::Duration;

use async_nats::jetstream::{self, context::GetStreamErrorKind, stream::Stream};
use async_nats::ConnectOptions;
use natasks::admin::{Admin, AdminError, AdminErrorKind};

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

/// Checks a queue name given on the command line, as the library does.
pub fn valid_queue(queue: &str) -> Result<&str> {
    natasks::wire::validate_queue(queue).map_err(|err| Error::msg(err.to_string()))
}

/// A client on the stream the global flags name (creating the stream, or adding what it
/// lacks, as every client does).
pub async fn client(g: &Global) -> Result<natasks::Client> {
    client_on(g, connect(g).await?).await
}

/// [`client`], on the connection `js`.
pub async fn client_on(g: &Global, js: jetstream::Context) -> Result<natasks::Client> {
    natasks::Client::builder(js)
        .stream_name(g.stream.clone())
        .subject_prefix(g.subject_prefix.clone())
        .build()
        .await
        .context(|| format!("cannot use stream {:?}", g.stream))
}

/// The admin API for the global flags' layout, on a connection of its own.
pub async fn admin(g: &Global) -> Result<Admin> {
    Ok(admin_on(g, connect(g).await?))
}

/// The admin API for the global flags' layout, on the connection `js`.
pub fn admin_on(g: &Global, js: jetstream::Context) -> Admin {
    Admin::new(js)
        .stream_name(g.stream.clone())
        .subject_prefix(g.subject_prefix.clone())
        .consumer_prefix(g.consumer_prefix.clone())
        .dlq_suffix(g.dlq_suffix.clone())
}

/// An admin error as one line, pointing at `--stream` when the stream is missing.
pub fn admin_error(g: &Global, err: &AdminError) -> Error {
    match err.kind() {
        AdminErrorKind::UnknownStream => {
            Error::msg(format!("{} on {} (see --stream)", err, g.server))
        }
        _ => Error::msg(crate::one_line(err)),
    }
}
