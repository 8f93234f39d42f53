//! `natasks ui`: serves the web dashboard (the `natasks-ui` crate) until Ctrl-C.

use std::net::SocketAddr;

use clap::Args;
use natasks_ui::{Auth, Dashboard};

use crate::{conn, Context as _, Error, Global, Result};

/// Serve the web dashboard.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Address to listen on. Beyond loopback, authentication is required (read-only too).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    listen: SocketAddr,
    /// Require this token (`Authorization: Bearer`, or typed into the login page).
    #[arg(long, env = "NATASKS_UI_TOKEN", value_name = "TOKEN", conflicts_with = "basic_auth")]
    auth_token: Option<String>,
    /// Require HTTP basic authentication with `user:password`.
    #[arg(long, env = "NATASKS_UI_BASIC_AUTH", value_name = "USER:PASSWORD")]
    basic_auth: Option<String>,
    /// Show pages only; hide and refuse every action.
    #[arg(long)]
    read_only: bool,
    /// Also answer to this host name (`name` or `name:port`), such as a reverse proxy's
    /// public name; besides it, only `localhost` and IP addresses are served. Repeatable.
    #[arg(long = "allowed-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,
    /// Mark cookies Secure (sent over HTTPS only), for a dashboard behind a TLS proxy.
    #[arg(long)]
    secure_cookies: bool,
}

pub async fn run(g: &Global, args: UiArgs) -> Result<()> {
    let auth = match (&args.auth_token, &args.basic_auth) {
        (Some(token), _) if token.is_empty() => return Err(Error::msg("--auth-token is empty")),
        (Some(token), _) => Some(Auth::token(token.clone())),
        (None, Some(pair)) => {
            Some(Auth::parse_basic(pair).map_err(|err| Error::msg(err.to_string()))?)
        }
        (None, None) => None,
    };
    // One connection for reading, acting and dispatching.
    let js = conn::connect(g).await?;
    let admin = conn::admin_on(g, js.clone());
    let client = conn::client_on(g, js).await?;
    let dashboard = Dashboard::new(admin, client)
        .read_only(args.read_only)
        .auth(auth)
        .allowed_hosts(args.allowed_hosts)
        .secure_cookies(args.secure_cookies);
    // Refuse before binding, so nothing ever listens unprotected.
    dashboard.check_exposure(args.listen).map_err(|err| Error::msg(err.to_string()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context(|| "cannot read the listening address".to_owned())?;
    eprintln!("natasks ui: serving http://{addr}/ (Ctrl-C to stop)");
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    dashboard.serve(listener, stop).await.map_err(|err| Error::msg(crate::one_line(&err)))
}
