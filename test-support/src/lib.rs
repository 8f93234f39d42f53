//! Test helpers for `natasks`: start throw-away `nats-server` processes with
//! JetStream enabled, each with its own random port and temporary store
//! directory.
//!
//! The server binaries are installed into `<workspace>/tools/` by
//! `scripts/install-nats-server`:
//!
//! * `tools/nats-server-2.15.1/bin/nats-server`: the default server
//!   ([`server_binary`], override with `NATS_SERVER_BIN`);
//! * `tools/nats-server-2.11.11/bin/nats-server`: an old server without
//!   message-schedule support ([`old_server_binary`], override with
//!   `NATS_SERVER_OLD_BIN`);
//! * `tools/nats-server-2.12.8/bin/nats-server`: a server that runs only one-off
//!   `@at` schedules, no cron or intervals ([`at_only_server_binary`], override
//!   with `NATS_SERVER_2_12_BIN`).
//!
//! ```no_run
//! # async fn example() {
//! use natasks_test_support::NatsServer;
//!
//! let server = NatsServer::start().await;
//! let js = server.jetstream().await;
//! js.query_account().await.unwrap();
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::AccountErrorKind;
use async_nats::ConnectErrorKind;
use tempfile::TempDir;
use tokio::process::{Child, Command};

pub mod api;
pub mod go;

/// Version of the default server installed by `scripts/install-nats-server`.
pub const SERVER_VERSION: &str = "2.15.1";

/// Version of the old server (no message-schedule support) installed by
/// `scripts/install-nats-server`.
pub const OLD_SERVER_VERSION: &str = "2.11.11";

/// Version of the server that runs only `@at` schedules (no cron, no `@every`),
/// installed by `scripts/install-nats-server`.
pub const AT_ONLY_SERVER_VERSION: &str = "2.12.8";

/// How long [`NatsServer::start`] and [`NatsServer::restart`] wait for the
/// server to accept clients.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness probes.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Timeout of each individual step of a readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Number of log lines included in panic messages.
const LOG_TAIL_LINES: usize = 40;
/// Attempts with a fresh random port when the chosen one was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// Root of the cargo workspace (parent of this crate's directory).
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Path of the binary installed by `scripts/install-nats-server` for `version`.
fn installed_binary(version: &str) -> PathBuf {
    workspace_root()
        .join("tools")
        .join(format!("nats-server-{version}"))
        .join("bin")
        .join("nats-server")
}

/// Non-empty value of the environment variable `name`, as a path.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Whether `path` is a regular file we may execute.
fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// `nats-server` found on `PATH`, if any.
fn binary_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
}

/// Locate the `nats-server` binary used by tests.
///
/// Lookup order:
/// 1. the environment variable `NATS_SERVER_BIN`;
/// 2. `<workspace>/tools/nats-server-2.15.1/bin/nats-server` (installed by
///    `scripts/install-nats-server`);
/// 3. `nats-server` on `PATH`.
///
/// # Panics
///
/// Panics if `NATS_SERVER_BIN` points to a missing file, or if no binary is
/// found; the message tells to run `scripts/install-nats-server`.
pub fn server_binary() -> PathBuf {
    if let Some(path) = env_path("NATS_SERVER_BIN") {
        assert!(
            is_executable(&path),
            "NATS_SERVER_BIN={} is not an executable file",
            path.display()
        );
        return path;
    }
    let installed = installed_binary(SERVER_VERSION);
    if is_executable(&installed) {
        return installed;
    }
    if let Some(path) = binary_on_path() {
        return path;
    }
    panic!(
        "nats-server binary not found: looked at $NATS_SERVER_BIN, {} and PATH. \
         Run `scripts/install-nats-server` from the repository root ({}) to install it.",
        installed.display(),
        workspace_root().display()
    );
}

/// Locate the old (2.11.11) `nats-server` binary, which lacks message-schedule
/// support.
///
/// Lookup order: the environment variable `NATS_SERVER_OLD_BIN`, then
/// `<workspace>/tools/nats-server-2.11.11/bin/nats-server`. Returns `None` if
/// neither exists (run `scripts/install-nats-server` to install it).
pub fn old_server_binary() -> Option<PathBuf> {
    if let Some(path) = env_path("NATS_SERVER_OLD_BIN") {
        return is_executable(&path).then_some(path);
    }
    let installed = installed_binary(OLD_SERVER_VERSION);
    is_executable(&installed).then_some(installed)
}

/// Locate the 2.12.8 `nats-server` binary, whose message schedules are `@at` only
/// (recurring schedules arrived in 2.14).
///
/// Lookup order: the environment variable `NATS_SERVER_2_12_BIN`, then
/// `<workspace>/tools/nats-server-2.12.8/bin/nats-server`. Returns `None` if
/// neither exists (run `scripts/install-nats-server` to install it).
pub fn at_only_server_binary() -> Option<PathBuf> {
    if let Some(path) = env_path("NATS_SERVER_2_12_BIN") {
        return is_executable(&path).then_some(path);
    }
    let installed = installed_binary(AT_ONLY_SERVER_VERSION);
    is_executable(&installed).then_some(installed)
}

/// Pick a free TCP port on 127.0.0.1 (bind to port 0, read it, release it).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("failed to bind 127.0.0.1:0 to pick a free port");
    listener.local_addr().expect("failed to read local address of port-picking listener").port()
}

/// Pick `n` distinct free TCP ports on 127.0.0.1. The listeners are held until all are
/// picked: released one by one, the system may hand out the same port twice.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .expect("failed to bind 127.0.0.1:0 to pick a free port")
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr().expect("failed to read local address of a port-picking listener").port()
        })
        .collect()
}

/// Last `n` lines of the file at `path` (or a note why it can't be read).
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("<could not read {}: {err}>", path.display()),
    }
}

/// Why a server did not become ready.
enum NotReady {
    /// The process exited.
    Exited(ExitStatus),
    /// The deadline passed; holds the last probe error.
    Timeout(String),
}

/// One readiness probe: TCP connect, NATS connect + flush, JetStream account
/// info. `Ok` means the server serves clients.
async fn probe(port: u16, tls_ca: Option<&Path>) -> Result<(), String> {
    // Cheap check first: is anything listening yet?
    tokio::time::timeout(
        PROBE_TIMEOUT,
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
    )
    .await
    .map_err(|_| "TCP connect timed out".to_string())?
    .map_err(|err| format!("TCP connect: {err}"))?;

    let url = format!("nats://127.0.0.1:{port}");
    let mut options = async_nats::ConnectOptions::new().connection_timeout(PROBE_TIMEOUT);
    if let Some(ca) = tls_ca {
        options = options.add_root_certificates(ca.to_path_buf()).require_tls(true);
    }
    let client = match options.connect(&url).await {
        Ok(client) => client,
        // The server answered but wants credentials / TLS that a bare probe
        // does not have (custom config file): it is up.
        Err(err)
            if matches!(
                err.kind(),
                ConnectErrorKind::AuthorizationViolation
                    | ConnectErrorKind::Authentication
                    | ConnectErrorKind::Tls
            ) =>
        {
            return Ok(());
        }
        Err(err) => return Err(format!("NATS connect: {err}")),
    };
    tokio::time::timeout(PROBE_TIMEOUT, client.flush())
        .await
        .map_err(|_| "flush timed out".to_string())?
        .map_err(|err| format!("flush: {err}"))?;

    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(PROBE_TIMEOUT);
    match js.query_account().await {
        Ok(_) => Ok(()),
        // A reply arrived but could not be deserialized by this client version
        // (older servers): connect + flush already proved readiness.
        Err(err) if err.kind() == AccountErrorKind::Other => Ok(()),
        Err(err) => Err(format!("JetStream account info: {err}")),
    }
}

/// Builder for a [`NatsServer`] with non-default settings.
///
/// Created by [`NatsServer::builder`].
#[derive(Debug, Default)]
#[must_use = "call `.start().await` to start the server"]
pub struct ServerBuilder {
    binary: Option<PathBuf>,
    args: Vec<String>,
    config: Option<String>,
    port: Option<u16>,
    server_name: Option<String>,
    tls: Option<(String, PathBuf)>,
}

impl ServerBuilder {
    /// Use this `nats-server` binary instead of [`server_binary`] (e.g. the
    /// result of [`old_server_binary`]).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Append an extra command-line argument for `nats-server`.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Write `contents` to `server.conf` in the server's temporary directory
    /// and pass it with `-c`. The command-line options set by this crate
    /// (`-js -a 127.0.0.1 -p <port> -sd <store>`) still apply and take
    /// precedence over the file.
    pub fn config_file(mut self, contents: impl Into<String>) -> Self {
        self.config = Some(contents.into());
        self
    }

    /// Listen for clients on this fixed port instead of a random free one
    /// (useful for clusters).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Set the server name (`-n <name>`).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Require TLS with the certificate in `certs` (appended to the config file). The
    /// readiness probe and [`NatsServer::client`] then trust the CA of `certs`, which must
    /// outlive the server.
    pub fn tls(mut self, certs: &TlsCerts) -> Self {
        self.tls = Some((certs.server_config(), certs.ca_file().to_path_buf()));
        self
    }

    /// Start the server and wait until it accepts clients.
    ///
    /// # Panics
    ///
    /// Panics if the binary cannot be found or started, or if the server is
    /// not ready within 10 seconds; the message includes the end of the
    /// server log.
    pub async fn start(self) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("natasks-nats-")
            .tempdir()
            .expect("failed to create temporary directory for nats-server");
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).expect("failed to create nats-server store directory");
        let log = dir.path().join("server.log");
        let (tls_config, tls_ca) = match self.tls {
            Some((config, ca)) => (Some(config), Some(ca)),
            None => (None, None),
        };
        let contents = match (self.config, tls_config) {
            (None, None) => None,
            (config, tls) => Some(config.unwrap_or_default() + "\n" + &tls.unwrap_or_default()),
        };
        let config = contents.map(|contents| {
            let path = dir.path().join("server.conf");
            std::fs::write(&path, contents).expect("failed to write nats-server config file");
            path
        });
        let binary = self.binary.unwrap_or_else(server_binary);

        let fixed_port = self.port.is_some();
        let mut server = NatsServer {
            child: None,
            port: self.port.unwrap_or_else(free_port),
            binary,
            args: self.args,
            config,
            server_name: self.server_name,
            tls_ca,
            store,
            log,
            dir,
        };

        let mut attempt = 1;
        loop {
            server.spawn();
            match server.wait_ready().await {
                Ok(()) => return server,
                // Another process grabbed the random port between picking and
                // binding it: try another one.
                Err(NotReady::Exited(_))
                    if !fixed_port
                        && attempt < PORT_ATTEMPTS
                        && tail(&server.log, LOG_TAIL_LINES).contains("address already in use") =>
                {
                    attempt += 1;
                    server.port = free_port();
                }
                Err(err) => server.fail(err),
            }
        }
    }
}

/// A running `nats-server` with JetStream, listening on 127.0.0.1.
///
/// The process is killed when this value is dropped (also when a test
/// panics), and its temporary directory (store, log, config) is removed.
/// Server output goes to a log file in that directory (see
/// [`NatsServer::log_path`]), not to the test output.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
    args: Vec<String>,
    config: Option<PathBuf>,
    server_name: Option<String>,
    tls_ca: Option<PathBuf>,
    store: PathBuf,
    log: PathBuf,
    // Last field: removed after `Drop::drop` killed the process.
    dir: TempDir,
}

impl NatsServer {
    /// Start a JetStream server on 127.0.0.1 with a random free port and a
    /// temporary store directory, using [`server_binary`]; waits until ready.
    ///
    /// # Panics
    ///
    /// See [`ServerBuilder::start`].
    pub async fn start() -> NatsServer {
        Self::builder().start().await
    }

    /// A builder for a server with a different binary, extra arguments, a
    /// config file, a fixed port or a server name.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// JetStream store directory (kept across [`kill`](Self::kill) and
    /// [`restart`](Self::restart)).
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// The server's temporary directory, holding the store directory, the log
    /// file and the config file (removed on drop).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// File receiving the server's stdout and stderr (appended to on restart).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// The `nats-server` binary this server runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Connect a new client to [`url`](Self::url) (over TLS, trusting the CA, for a
    /// server started with [`ServerBuilder::tls`]).
    ///
    /// # Panics
    ///
    /// Panics (with the URL and error) if the connection fails.
    pub async fn client(&self) -> async_nats::Client {
        let url = self.url();
        let mut options = async_nats::ConnectOptions::new();
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match options.connect(&url).await {
            Ok(client) => client,
            Err(err) => panic!("failed to connect to nats-server at {url}: {err}"),
        }
    }

    /// A JetStream context on a new client (see [`client`](Self::client)).
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// Kill the process with SIGKILL and wait for it to exit. The store
    /// directory is kept, so [`restart`](Self::restart) recovers its data.
    /// Does nothing if the server is not running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `start_kill` sends SIGKILL on unix; errors mean it already exited.
            let _ = child.start_kill();
            if let Err(err) = child.wait().await {
                panic!("failed to wait for killed nats-server: {err}");
            }
        }
    }

    /// Stop the server the way an operator does (SIGTERM: it finishes writing its state,
    /// e.g. the stream's index and message-schedule state, and exits), waiting up to 10
    /// seconds before killing it. The store directory is kept, so
    /// [`restart`](Self::restart) recovers its data. Does nothing if the server is not
    /// running.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        match tokio::time::timeout(READY_TIMEOUT, child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("failed to wait for stopped nats-server: {err}"),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Start the server again on the same port with the same store directory
    /// and arguments; waits until ready. Kills the running process first if
    /// [`kill`](Self::kill) was not called.
    ///
    /// # Panics
    ///
    /// Panics if the server is not ready within 10 seconds (e.g. because the
    /// port was taken meanwhile); the message includes the end of the log.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn();
        if let Err(err) = self.wait_ready().await {
            self.fail(err);
        }
    }

    /// OS process id of the running server, `None` after [`kill`](Self::kill).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Spawn the process (output appended to the log file).
    fn spawn(&mut self) {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("failed to open nats-server log file");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-js")
            .args(["-a", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        if let Some(name) = &self.server_name {
            cmd.arg("-n").arg(name);
        }
        cmd.args(&self.args);
        // Best effort: a marker helps reading logs spanning restarts.
        let _ = writeln!(log, "---- natasks-test-support: starting {cmd:?}");
        let stderr: File =
            log.try_clone().expect("failed to duplicate nats-server log file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        match cmd.spawn() {
            Ok(child) => self.child = Some(child),
            Err(err) => panic!(
                "failed to start nats-server binary {}: {err} \
                 (run `scripts/install-nats-server`?)",
                self.binary.display()
            ),
        }
    }

    /// Poll until the server accepts clients, the process exits, or the
    /// deadline passes.
    async fn wait_ready(&mut self) -> Result<(), NotReady> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(NotReady::Exited(status));
                }
            }
            let last_error = match probe(self.port, self.tls_ca.as_deref()).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout(last_error));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Panic with a description of `err` and the end of the server log.
    fn fail(&mut self, err: NotReady) -> ! {
        let reason = match err {
            NotReady::Exited(status) => format!("exited with {status}"),
            NotReady::Timeout(last) => {
                format!("was not ready within {READY_TIMEOUT:?} (last error: {last})")
            }
        };
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        panic!(
            "nats-server {} on port {} {reason}; last {LOG_TAIL_LINES} lines of {}:\n{}",
            self.binary.display(),
            self.port,
            self.log.display(),
            tail(&self.log, LOG_TAIL_LINES)
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Give the process a moment to die so the temporary directory is
            // not removed under a still-running server.
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                    Ok(Some(_)) | Err(_) => break,
                }
            }
        }
        // `dir` (TempDir) is dropped after this, removing store, log and config.
    }
}

/// How long [`NatsCluster::start`] waits for the cluster to place a replicated stream.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster of JetStream servers on 127.0.0.1, each with its own client port, cluster
/// port, server name (`n0`, `n1`, ...) and store directory.
///
/// Killing a node ([`NatsCluster::kill`]) leaves the others running; dropping the cluster
/// kills every node.
///
/// ```no_run
/// # async fn example() {
/// use natasks_test_support::NatsCluster;
///
/// let cluster = NatsCluster::start(3).await;
/// let js = cluster.jetstream().await;
/// js.query_account().await.unwrap();
/// # }
/// ```
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    names: Vec<String>,
}

impl NatsCluster {
    /// Start `size` servers routed to each other in one cluster with JetStream, and wait
    /// until the cluster can place a stream replicated on every node.
    ///
    /// # Panics
    ///
    /// Panics if a node does not start, or if no stream with `size` replicas can be
    /// created within 30 seconds.
    pub async fn start(size: usize) -> NatsCluster {
        assert!(size >= 1, "a cluster needs at least one server");
        // Client and route ports in one pick, so that no two nodes are given the same port.
        let mut ports = free_ports(2 * size);
        let cluster_ports = ports.split_off(size);
        let client_ports = ports;
        let routes = cluster_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let names: Vec<String> = (0..size).map(|i| format!("n{i}")).collect();
        // Every node waits for the others before JetStream answers, so they start together.
        let mut starting = tokio::task::JoinSet::new();
        for i in 0..size {
            let builder = NatsServer::builder()
                .port(client_ports[i])
                .server_name(names[i].clone())
                .arg("--cluster_name")
                .arg("natasks-test")
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{}", cluster_ports[i]))
                .arg("--routes")
                .arg(routes.clone());
            starting.spawn(async move { (i, builder.start().await) });
        }
        let mut started: Vec<Option<NatsServer>> = (0..size).map(|_| None).collect();
        while let Some(joined) = starting.join_next().await {
            match joined {
                Ok((i, server)) => started[i] = Some(server),
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(err) => panic!("cluster node start was cancelled: {err}"),
            }
        }
        let servers = started.into_iter().map(|s| s.expect("every node started")).collect();
        let cluster = NatsCluster { servers, names };
        cluster.wait_replicated_streams().await;
        cluster
    }

    /// Retry creating (and deleting) a stream replicated on every node until it works.
    async fn wait_replicated_streams(&self) {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        let mut js = self.jetstream().await;
        js.set_timeout(Duration::from_secs(2));
        let config = async_nats::jetstream::stream::Config {
            name: "TS_CLUSTER_READY".to_string(),
            subjects: vec!["ts.cluster.ready".to_string()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            num_replicas: self.servers.len(),
            ..Default::default()
        };
        loop {
            let error = match js.create_stream(config.clone()).await {
                Ok(_) => match js.delete_stream(&config.name).await {
                    Ok(_) => return,
                    Err(err) => format!("delete probe stream: {err}"),
                },
                Err(err) => format!("create probe stream: {err}"),
            };
            if Instant::now() >= deadline {
                panic!(
                    "cluster of {} could not place a replicated stream within \
                     {CLUSTER_READY_TIMEOUT:?} (last error: {error}); log of n0:\n{}",
                    self.servers.len(),
                    self.servers[0].log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Client URLs of every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Number of nodes (running or killed).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Node `index`.
    pub fn server(&self, index: usize) -> &NatsServer {
        &self.servers[index]
    }

    /// Server name of node `index` (`n<index>`).
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    /// Index of the node with server name `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Connect a new client that knows every node's URL.
    ///
    /// # Panics
    ///
    /// Panics if no node accepts the connection.
    pub async fn client(&self) -> async_nats::Client {
        let urls = self.urls();
        match async_nats::connect(urls.clone()).await {
            Ok(client) => client,
            Err(err) => panic!("failed to connect to the cluster at {urls:?}: {err}"),
        }
    }

    /// A JetStream context on a new client (see [`client`](Self::client)).
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// Index of the node leading stream `stream`, waiting up to 10 seconds for a leader.
    ///
    /// # Panics
    ///
    /// Panics if no leader is known within 10 seconds.
    pub async fn stream_leader(&self, js: &async_nats::jetstream::Context, stream: &str) -> usize {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match js.get_stream(stream).await {
                Ok(mut handle) => match handle.info().await {
                    Ok(info) => {
                        let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                        if let Some(index) = leader.as_deref().and_then(|l| self.index_of(l)) {
                            return index;
                        }
                        format!("no leader yet (cluster info {:?})", info.cluster)
                    }
                    Err(err) => format!("stream info: {err}"),
                },
                Err(err) => format!("get stream: {err}"),
            };
            assert!(
                Instant::now() < deadline,
                "stream {stream} has no leader after {READY_TIMEOUT:?}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL node `index` and wait for it to exit (see [`NatsServer::kill`]).
    pub async fn kill(&mut self, index: usize) {
        self.servers[index].kill().await;
    }
}

/// A certificate authority and a server certificate for `127.0.0.1` and `localhost`,
/// generated with the `openssl` command into a temporary directory (removed on drop).
#[derive(Debug)]
pub struct TlsCerts {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    // Last field: the files are removed after everything else is dropped.
    dir: TempDir,
}

impl TlsCerts {
    /// Generate a fresh CA (EC P-256) and a server certificate signed by it, valid for
    /// one day for `127.0.0.1`, `::1` and `localhost`.
    ///
    /// # Panics
    ///
    /// Panics if the `openssl` command is missing or fails; the message includes its output.
    pub fn generate() -> TlsCerts {
        let dir = tempfile::Builder::new()
            .prefix("natasks-tls-")
            .tempdir()
            .expect("failed to create temporary directory for certificates");
        let path = |name: &str| dir.path().join(name);
        let ext = path("server.ext");
        std::fs::write(
            &ext,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = IP:127.0.0.1, IP:::1, DNS:localhost\n",
        )
        .expect("failed to write certificate extensions");
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let ca = format!("req -x509 {ec} -keyout ca.key -out ca.pem -days 1");
        let ca: Vec<&str> = ca.split(' ').collect();
        let ca_extra = [
            "-subj",
            "/CN=natasks test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ];
        openssl(dir.path(), &[&ca[..], &ca_extra[..]].concat());
        let csr = format!("req {ec} -keyout server.key -out server.csr -subj /CN=127.0.0.1");
        openssl(dir.path(), &csr.split(' ').collect::<Vec<_>>());
        let sign = "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                    -out server.pem -days 1 -extfile server.ext";
        openssl(dir.path(), &sign.split_whitespace().collect::<Vec<_>>());
        TlsCerts { ca: path("ca.pem"), cert: path("server.pem"), key: path("server.key"), dir }
    }

    /// The CA certificate (PEM) clients trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// The server certificate (PEM).
    pub fn cert_file(&self) -> &Path {
        &self.cert
    }

    /// The server's private key (PEM).
    pub fn key_file(&self) -> &Path {
        &self.key
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `nats-server` config block requiring TLS with this certificate (what
    /// [`ServerBuilder::tls`] adds to the config file).
    pub fn server_config(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  timeout: 2\n}}\n",
            self.cert.display().to_string(),
            self.key.display().to_string(),
            self.ca.display().to_string(),
        )
    }
}

/// Run `openssl` with `args` in `dir`, panicking with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("failed to run `openssl` (is it installed?): {err}"));
    assert!(
        output.status.success(),
        "`openssl {}` failed with {}:\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::stream;

    #[tokio::test]
    async fn stream_survives_kill_and_restart() {
        let mut server = NatsServer::start().await;
        assert!(server.url().ends_with(&format!(":{}", server.port())));
        assert!(server.store_dir().is_dir());
        let first_pid = server.pid().expect("server is running");

        let js = server.jetstream().await;
        let mut created = js
            .create_stream(stream::Config {
                name: "TS_RESTART".to_string(),
                subjects: vec!["ts.restart.>".to_string()],
                ..Default::default()
            })
            .await
            .expect("create stream");
        js.publish("ts.restart.a", "hello".into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
        assert_eq!(created.info().await.expect("info").state.messages, 1);
        drop(js);

        server.kill().await;
        assert_eq!(server.pid(), None);
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await.is_err(),
            "server still accepts connections after kill"
        );

        let port = server.port();
        server.restart().await;
        assert_eq!(server.port(), port);
        assert_ne!(server.pid(), Some(first_pid));

        let js = server.jetstream().await;
        let mut recovered = js.get_stream("TS_RESTART").await.expect("stream kept");
        assert_eq!(recovered.info().await.expect("info").state.messages, 1);
    }

    #[tokio::test]
    async fn builder_options_apply() {
        let server = NatsServer::builder()
            .server_name("ts-builder")
            .config_file("max_payload: 65536\n")
            .arg("--no_advertise")
            .start()
            .await;
        let client = server.client().await;
        let info = client.server_info();
        assert_eq!(info.server_name, "ts-builder");
        assert_eq!(info.max_payload, 65536);
        assert!(info.version.starts_with("2.15."), "{}", info.version);
        server.jetstream().await.query_account().await.expect("JetStream enabled");
    }

    #[tokio::test]
    async fn old_server_reports_2_11() {
        let Some(binary) = old_server_binary() else {
            eprintln!("old nats-server not installed (scripts/install-nats-server); skipping");
            return;
        };
        let server = NatsServer::builder().binary(binary).start().await;
        let client = server.client().await;
        let version = client.server_info().version;
        assert!(version.starts_with("2.11."), "unexpected version {version}");
    }

    #[tokio::test]
    async fn dropping_server_kills_process_and_removes_dir() {
        let server = NatsServer::start().await;
        let port = server.port();
        let dir = server.temp_dir().to_path_buf();
        assert!(server.store_dir().starts_with(&dir));
        assert!(server.log_path().is_file());
        drop(server);
        assert!(!dir.exists(), "temp dir {} not removed", dir.display());
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(),
            "server still listening after drop"
        );
    }

    #[tokio::test]
    #[should_panic(expected = "exited with")]
    async fn startup_failure_panics_with_log() {
        NatsServer::builder().arg("--no-such-flag-for-nats-server").start().await;
    }

    #[tokio::test]
    async fn config_with_auth_is_ready() {
        let server = NatsServer::builder()
            .config_file("authorization { user: \"u\", password: \"p\" }\n")
            .start()
            .await;
        let client = async_nats::ConnectOptions::with_user_and_password("u".into(), "p".into())
            .connect(server.url())
            .await
            .expect("connect with credentials");
        async_nats::jetstream::new(client).query_account().await.expect("JetStream enabled");
    }

    #[tokio::test]
    async fn cluster_replicates_streams_and_survives_losing_the_leader() {
        let mut cluster = NatsCluster::start(3).await;
        assert_eq!(cluster.len(), 3);
        assert_eq!(cluster.urls().len(), 3);
        let mut js = cluster.jetstream().await;
        js.set_timeout(Duration::from_secs(2));
        js.create_stream(stream::Config {
            name: "TS_R3".to_string(),
            subjects: vec!["ts.r3".to_string()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create R3 stream");
        js.publish("ts.r3", "one".into()).await.expect("publish").await.expect("ack");
        let leader = cluster.stream_leader(&js, "TS_R3").await;
        assert_eq!(cluster.index_of(cluster.name(leader)), Some(leader));
        cluster.kill(leader).await;
        assert_eq!(cluster.server(leader).pid(), None);

        // The survivors elect a new leader and keep the data.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ack) = js.publish("ts.r3", "two".into()).await {
                if ack.await.is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "no publish accepted after losing the leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let new_leader = cluster.stream_leader(&js, "TS_R3").await;
        assert_ne!(new_leader, leader);
        let mut handle = js.get_stream("TS_R3").await.expect("stream");
        assert_eq!(handle.info().await.expect("info").state.messages, 2);
    }

    #[tokio::test]
    async fn tls_server_accepts_clients_trusting_the_generated_ca() {
        let certs = TlsCerts::generate();
        assert!(certs.ca_file().is_file() && certs.cert_file().is_file());
        assert!(certs.key_file().starts_with(certs.dir()));
        let server =
            NatsServer::builder().config_file("max_payload: 65536").tls(&certs).start().await;
        assert_eq!(server.client().await.server_info().max_payload, 65536);
        let client = async_nats::ConnectOptions::new()
            .add_root_certificates(certs.ca_file().to_path_buf())
            .require_tls(true)
            .connect(server.url())
            .await
            .expect("TLS connect with the CA");
        assert!(client.server_info().tls_required);
        async_nats::jetstream::new(client).query_account().await.expect("JetStream over TLS");

        let err = async_nats::ConnectOptions::new()
            .connect(server.url())
            .await
            .expect_err("a client not trusting the CA must fail");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}
