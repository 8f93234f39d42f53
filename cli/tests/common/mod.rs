//! Runs the built `natasks` binary for the CLI tests, with a deadline.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

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

/// Runs `natasks <args>` against `url` (passed as NATS_URL), with a deadline.
pub async fn natasks(url: &str, args: &[&str]) -> Run {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_natasks"))
        .args(args)
        .env("NATS_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start natasks");
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
