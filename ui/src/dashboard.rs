//! The dashboard's configuration, its router, and serving it on a listener.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use natasks::admin::Admin;
use natasks::Client;

use crate::{actions, assets, live, pages, security};

/// How often the live overview refreshes by default.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

/// Who may use the dashboard. Without it, anyone who reaches the address may.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Auth {
    /// A secret token: sent as `Authorization: Bearer <token>`, or typed once into the
    /// dashboard's login form, which then keeps a random session id (never the token) in
    /// an HttpOnly cookie.
    Token(String),
    /// HTTP basic authentication with this user name and password.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
}

/// The fewest characters a token or password may have.
pub const MIN_SECRET_LEN: usize = 12;

impl Auth {
    /// A bearer token ([`Auth::Token`]), of at least [`MIN_SECRET_LEN`] characters
    /// ([`Dashboard::serve`] and [`Dashboard::check_exposure`] refuse a shorter one).
    pub fn token(token: impl Into<String>) -> Self {
        Self::Token(token.into())
    }

    /// Basic authentication ([`Auth::Basic`]): a user name and a password of at least
    /// [`MIN_SECRET_LEN`] characters.
    pub fn basic(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self::Basic { user: user.into(), password: password.into() }
    }

    /// Parses `user:password`, the form of the CLI's `--basic-auth`.
    pub fn parse_basic(text: &str) -> Result<Self, DashboardError> {
        match text.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                let auth = Self::basic(user, password);
                auth.check()?;
                Ok(auth)
            }
            _ => Err(DashboardError::new(
                DashboardErrorKind::InvalidConfig,
                "basic auth must be user:password, both non-empty",
            )),
        }
    }

    /// Refuses an empty user name or a secret too short to keep anyone out.
    pub fn check(&self) -> Result<(), DashboardError> {
        let invalid =
            |why: String| Err(DashboardError::new(DashboardErrorKind::InvalidConfig, why));
        match self {
            Self::Token(token) if token.chars().count() < MIN_SECRET_LEN => invalid(format!(
                "the dashboard's token must have at least {MIN_SECRET_LEN} characters, not {}",
                token.chars().count()
            )),
            Self::Basic { user, .. } if user.is_empty() => {
                invalid("basic auth needs a user name".to_owned())
            }
            Self::Basic { password, .. } if password.chars().count() < MIN_SECRET_LEN => {
                invalid(format!(
                    "the dashboard's basic auth password must have at least {MIN_SECRET_LEN} \
                     characters, not {}",
                    password.chars().count()
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether the secret is usable; a router taken with an unusable one lets nobody in.
    pub(crate) fn usable(&self) -> bool {
        self.check().is_ok()
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token(..)"),
            Self::Basic { user, .. } => f.debug_struct("Basic").field("user", user).finish(),
        }
    }
}

/// The web dashboard of the queues of one stream: build it, then take its
/// [`router`](Self::router) into your axum app or [`serve`](Self::serve) it alone.
#[derive(Clone)]
pub struct Dashboard {
    admin: Admin,
    client: Client,
    read_only: bool,
    auth: Option<Auth>,
    refresh: Duration,
    allowed_hosts: Vec<String>,
    secure_cookies: bool,
}

impl fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dashboard")
            .field("read_only", &self.read_only)
            .field("auth", &self.auth)
            .field("refresh", &self.refresh)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("secure_cookies", &self.secure_cookies)
            .finish_non_exhaustive()
    }
}

/// What every handler shares.
pub(crate) struct Shared {
    pub(crate) admin: Admin,
    pub(crate) client: Client,
    pub(crate) read_only: bool,
    pub(crate) auth: Option<Auth>,
    pub(crate) refresh: Duration,
    /// Host names served beside loopback names and IP addresses, lowercase.
    pub(crate) allowed_hosts: Vec<String>,
    /// Whether cookies carry the `Secure` flag.
    pub(crate) secure_cookies: bool,
    /// The login sessions: random ids handed out as cookies by the login form.
    pub(crate) sessions: security::Sessions,
    /// The reading of the queues every open live overview shares.
    pub(crate) live: live::Shared,
}

/// The handlers' state.
pub(crate) type State = Arc<Shared>;

impl Dashboard {
    /// A dashboard over the queues `admin` sees; `client` dispatches the tasks of its
    /// dispatch form. Give both the same stream layout.
    pub fn new(admin: Admin, client: Client) -> Self {
        Self {
            admin,
            client,
            read_only: false,
            auth: None,
            refresh: DEFAULT_REFRESH,
            allowed_hosts: Vec::new(),
            secure_cookies: false,
        }
    }

    /// Read-only mode: pages only; every action is hidden and refused. Default: off.
    #[must_use]
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Requires this authentication for every page and action. Default: none, which
    /// [`serve`](Self::serve) accepts only on a loopback address.
    #[must_use]
    pub fn auth(mut self, auth: impl Into<Option<Auth>>) -> Self {
        self.auth = auth.into();
        self
    }

    /// How often the live overview refreshes. Default: [`DEFAULT_REFRESH`] (1 s); at least
    /// 100 ms.
    #[must_use]
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(Duration::from_millis(100));
        self
    }

    /// Host names the dashboard answers to besides `localhost` and IP addresses, such as
    /// the public name of a reverse proxy in front of it (`ops.example.com`, any port, or
    /// `ops.example.com:8443`, that port only). Requests naming another host are refused,
    /// so a page of another site whose name is rebound to this address cannot use the
    /// dashboard; forms posted from these names are accepted as same-origin. Default: none.
    #[must_use]
    pub fn allowed_hosts<I, S>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_hosts = hosts.into_iter().map(|h| h.into().to_ascii_lowercase()).collect();
        self
    }

    /// Marks the dashboard's cookies `Secure`, so browsers send them over HTTPS only: set it
    /// when the dashboard is reached through a proxy that terminates TLS. Default: off.
    #[must_use]
    pub fn secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }

    /// Whether the dashboard is exposed without authentication: `Err` when `addr` is not a
    /// loopback address and no [`auth`](Self::auth) is set, read-only included, since every
    /// page shows task payloads, which often carry secrets.
    /// Also refuses an [`auth`](Self::auth) whose secret is empty or too short
    /// ([`Auth::check`]).
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), DashboardError> {
        if let Some(auth) = &self.auth {
            auth.check()?;
        }
        if addr.ip().is_loopback() || self.auth.is_some() {
            return Ok(());
        }
        Err(DashboardError::new(
            DashboardErrorKind::Unprotected,
            format!(
                "refusing to serve the dashboard on {addr} without authentication: anyone who \
                 can reach a non-loopback address could read every task's payloads and, unless \
                 read-only, requeue, delete and dispatch tasks; set a token or basic auth, or \
                 listen on a loopback address"
            ),
        ))
    }

    /// The dashboard as an axum router, to serve alone or to `nest` under a path of your
    /// own app (links follow the path it is nested at). Authentication, read-only mode and
    /// CSRF protection are part of it; exposure is yours to judge (see
    /// [`check_exposure`](Self::check_exposure)).
    pub fn router(self) -> Router {
        let state: State = Arc::new(Shared {
            admin: self.admin,
            client: self.client,
            read_only: self.read_only,
            auth: self.auth,
            refresh: self.refresh,
            allowed_hosts: self.allowed_hosts,
            secure_cookies: self.secure_cookies,
            sessions: security::Sessions::default(),
            live: live::Shared::default(),
        });
        let protected = Router::new()
            .route("/", get(pages::overview::page))
            .route("/live", get(live::overview))
            .route("/queues/{queue}", get(pages::queue::page))
            .route("/tasks/{seq}", get(pages::task::page))
            .route("/schedules", get(pages::schedules::page))
            .route("/search", get(pages::search::page))
            .route("/dispatch", get(pages::dispatch::page))
            .route("/actions/{action}", post(actions::handle))
            .route("/logout", post(security::logout))
            .layer(axum::middleware::from_fn_with_state(state.clone(), security::require_auth));
        Router::new()
            .merge(protected)
            .route("/login", get(security::login_page).post(security::login))
            .route("/assets/{file}", get(assets::serve))
            .layer(axum::middleware::from_fn_with_state(state.clone(), security::require_host))
            .with_state(state)
    }

    /// Serves the dashboard on `listener` until `shutdown` completes. Refuses, before
    /// serving anything, an exposed address without authentication
    /// ([`check_exposure`](Self::check_exposure)).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DashboardError> {
        let addr = listener
            .local_addr()
            .map_err(|err| DashboardError::io("cannot read the listener's address", err))?;
        self.check_exposure(addr)?;
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await.map_err(|err| {
            DashboardError::io(format!("serving the dashboard on {addr} failed"), err)
        })
    }
}

/// The dashboard could not be set up or served.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DashboardError {
    kind: DashboardErrorKind,
    message: String,
    #[source]
    source: Option<std::io::Error>,
}

/// What went wrong setting up or serving the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DashboardErrorKind {
    /// Listening beyond loopback without authentication (read-only included).
    Unprotected,
    /// A setting that cannot be used (such as basic auth without a password).
    InvalidConfig,
    /// The listener failed.
    Io,
}

impl DashboardError {
    pub(crate) fn new(kind: DashboardErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Self { kind: DashboardErrorKind::Io, message: message.into(), source: Some(source) }
    }

    /// What went wrong.
    pub fn kind(&self) -> DashboardErrorKind {
        self.kind
    }
}
