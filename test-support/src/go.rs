//! The Go side of the interop tests: `natasks-go` (built from `interop/go` by
//! `scripts/build-interop`), run as a child process that prints one JSON line per event.
//!
//! ```no_run
//! # async fn example(url: &str) {
//! use std::time::Duration;
//! use natasks_test_support::go::GoProcess;
//!
//! let mut worker = GoProcess::spawn(&["work", "--url", url, "--queue", "q", "--handle", "t=ok"]).await;
//! worker.wait_for("ready", Duration::from_secs(10), |e| e["event"] == "ready").await;
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::workspace_root;

/// Path of the `natasks-go` binary, built (or brought up to date) once per test process by
/// `scripts/build-interop`. `NATASKS_GO_BIN` names a prebuilt binary instead.
///
/// # Panics
///
/// Panics when the build fails, with the script's output: when Go is not installed that
/// says how to install it. The interop tests fail rather than skip without Go.
pub fn go_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("NATASKS_GO_BIN").filter(|v| !v.is_empty()) {
            return PathBuf::from(path);
        }
        let script = workspace_root().join("scripts").join("build-interop");
        let output = std::process::Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", script.display()));
        assert!(
            output.status.success(),
            "scripts/build-interop failed ({}); the Go/Rust interop tests need Go:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        PathBuf::from(path)
    })
}

/// What a finished `natasks-go` run printed.
#[derive(Debug)]
pub struct GoRun {
    /// Exit code.
    pub code: i32,
    /// Every JSON line printed on stdout.
    pub events: Vec<Value>,
    /// Everything printed on stderr (logs are JSON lines).
    pub stderr: String,
}

impl GoRun {
    /// Panics unless the run exited 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "natasks-go failed: {self:?}");
        self
    }

    /// The only event printed, or a panic.
    #[track_caller]
    pub fn event(&self) -> &Value {
        assert_eq!(self.events.len(), 1, "expected one event: {self:?}");
        &self.events[0]
    }
}

/// Runs `natasks-go <args>` to completion, with a deadline.
pub async fn run_go(args: &[&str], limit: Duration) -> GoRun {
    let mut process = GoProcess::spawn(args).await;
    process.stdin.take();
    let status = tokio::time::timeout(limit, process.child.wait())
        .await
        .unwrap_or_else(|_| panic!("natasks-go {args:?} did not finish within {limit:?}"))
        .expect("wait for natasks-go");
    let mut events = Vec::new();
    // The reader task forwards every line before it ends, which is when stdout closes.
    while let Ok(Some(event)) = tokio::time::timeout(limit, process.events.recv()).await {
        events.push(event);
    }
    GoRun {
        code: status.code().unwrap_or(-1),
        events,
        stderr: tokio::time::timeout(limit, process.stderr_done()).await.unwrap_or_default(),
    }
}

/// A running `natasks-go`: its stdout as parsed JSON events, its stderr kept. Killed on drop.
pub struct GoProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Value>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<tokio::task::JoinHandle<()>>,
    args: Vec<String>,
}

impl GoProcess {
    /// Starts `natasks-go <args>`. Closing its stdin (see [`stop`](Self::stop)) asks a
    /// worker to stop.
    pub async fn spawn(args: &[&str]) -> GoProcess {
        let mut child = Command::new(go_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", go_binary().display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|err| Value::String(format!("not JSON ({err}): {line}")));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().expect("piped stderr");
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut all = stderr.lock().expect("stderr buffer");
                    all.push_str(&line);
                    all.push('\n');
                }
            })
        };
        GoProcess {
            stdin: child.stdin.take(),
            child,
            events,
            stderr,
            stderr_reader: Some(stderr_reader),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// What the process printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    async fn stderr_done(&mut self) -> String {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.await;
        }
        self.stderr()
    }

    /// The next event within `limit`, or `None` (timeout, or stdout closed).
    pub async fn next_event(&mut self, limit: Duration) -> Option<Value> {
        tokio::time::timeout(limit, self.events.recv()).await.ok().flatten()
    }

    /// Waits for the first event matching `matches`, skipping others; panics with the
    /// process's stderr after `limit`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if matches(&event) => return event,
                Ok(Some(_)) => {}
                Ok(None) => panic!(
                    "natasks-go {:?} ended before {what}; stderr:\n{}",
                    self.args,
                    self.stderr()
                ),
                Err(_) => panic!(
                    "natasks-go {:?}: no {what} within {limit:?}; stderr:\n{}",
                    self.args,
                    self.stderr()
                ),
            }
        }
    }

    /// Collects `n` events matching `matches` (others are skipped) within `limit`.
    pub async fn take(
        &mut self,
        n: usize,
        limit: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if matches(&event) => out.push(event),
                Ok(Some(_)) => {}
                _ => panic!(
                    "natasks-go {:?}: only {} of {n} events within {limit:?}; stderr:\n{}",
                    self.args,
                    out.len(),
                    self.stderr()
                ),
            }
        }
        out
    }

    /// Every event already printed, without waiting.
    pub fn drain(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            out.push(event);
        }
        out
    }

    /// Asks the process to stop (closes its stdin), waits up to `limit`, and kills it if it
    /// has not exited by then. Returns its stderr.
    pub async fn stop(mut self, limit: Duration) -> String {
        self.stdin.take();
        if tokio::time::timeout(limit, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        tokio::time::timeout(limit, self.stderr_done()).await.unwrap_or_default()
    }
}
