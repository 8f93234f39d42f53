//! Runs the built `natasks` binary for the CLI tests, with a deadline, and waits for
//! conditions with the same deadline.
#![allow(dead_code)]

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// Deadline of one run of the binary, and of the tests' other waits.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts the run succeeded.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "natasks failed: {self:?}");
        self
    }

    /// Asserts the run failed (exit code 1) saying `expected` on stderr.
    #[track_caller]
    pub fn failed(self, expected: &str) -> Self {
        assert_eq!(self.code, 1, "natasks should have failed: {self:?}");
        assert!(self.stderr.contains(expected), "stderr lacks {expected:?}: {self:?}");
        self
    }

    /// Stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("stdout is not JSON ({err}): {self:?}"))
    }
}

/// Starts `natasks <args>` against `url` (passed as NATS_URL), its output piped; killed
/// when dropped.
pub fn spawn(url: &str, args: &[&str]) -> Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_natasks"))
        .args(args)
        .env("NATS_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start natasks")
}

/// Runs `natasks <args>` against `url` (passed as NATS_URL), with a deadline.
pub async fn natasks(url: &str, args: &[&str]) -> Run {
    let child = spawn(url, args);
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("natasks {args:?} did not finish within {DEADLINE:?}"))
        .expect("wait for natasks");
    Run {
        code: output.status.code().expect("natasks exited by signal"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// Waits until `condition` holds, polling every 20 ms, failing after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `natasks events`: its stdout lines, read with a deadline.
pub struct Tail {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Tail {
    /// Starts `natasks events <args>` and waits until it listens.
    pub async fn start(url: &str, args: &[&str]) -> Tail {
        let mut child = spawn(url, &[&["events"], args].concat());
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = tokio::time::timeout(DEADLINE, stderr.next_line())
            .await
            .expect("natasks events starts within the deadline")
            .expect("read stderr");
        let ready = ready.unwrap_or_default();
        assert!(ready.starts_with("watching events of"), "{ready}");
        Tail { child, stdout }
    }

    /// The next line on stdout.
    pub async fn next_line(&mut self) -> String {
        tokio::time::timeout(DEADLINE, self.stdout.next_line())
            .await
            .expect("an event line within the deadline")
            .expect("read stdout")
            .expect("natasks events is still running")
    }

    /// Kills it.
    pub async fn stop(mut self) {
        self.child.kill().await.expect("kill natasks events");
    }
}
