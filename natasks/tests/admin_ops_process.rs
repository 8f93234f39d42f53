//! A bulk requeue killed mid-way (SIGKILL, in a process of its own) and run again: every
//! dead letter ends up on its queue exactly once.
//!
//! The requeue process is this test binary itself: the ignored test
//! `admin_requeue_process` is the program (it needs `NATASKS_ADMIN_URL` and fails without
//! it); the scenario starts it as a child process with `--ignored`, reads one line per dead
//! letter moved, and kills it.

mod common;

use std::ops::ControlFlow;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;

use common::*;
use natasks::admin::{Admin, Filter, Selection};
use natasks::Client;
use tokio::io::AsyncBufReadExt as _;

/// The child connects here; it is a child only when this is set.
const URL_ENV: &str = "NATASKS_ADMIN_URL";
/// Starts every line the child prints for its parent.
const MARKER: &str = "@admin-requeue: ";

/// The requeue program: requeues every dead letter of queue `bulk`, printing
/// `moved <seq>` after each.
#[tokio::test]
#[ignore = "the requeue program of the kill scenario, started by it"]
async fn admin_requeue_process() {
    let url = std::env::var(URL_ENV)
        .unwrap_or_else(|_| panic!("{URL_ENV} is not set: this is a child process"));
    let client = async_nats::connect(&url).await.expect("child connects");
    let admin = Admin::new(async_nats::jetstream::new(client));
    let all = Selection::Matching(Filter::default());
    admin
        .requeue_with("bulk", &all, |step| {
            println!("{MARKER}moved {}", step.sequence);
            ControlFlow::Continue(())
        })
        .await
        .expect("requeue runs");
}

#[tokio::test]
async fn a_bulk_requeue_killed_mid_way_and_run_again_moves_each_dead_letter_once() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    Client::builder(js.clone()).build().await.unwrap();
    const N: u64 = 2_000;
    dead_letters(&js, "bulk", "bulk.job", N).await;

    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "admin_requeue_process", "--nocapture", "--test-threads=1"])
        .env(URL_ENV, server.url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Kill it once it has moved a few hundred: far from done.
    let mut moved = 0u64;
    while moved < 300 {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the child reports progress in time")
            .unwrap()
            .expect("the child is still running");
        moved += u64::from(line.starts_with(MARKER));
    }
    child.start_kill().unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.unwrap().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let back = stored(&js, "natasks.bulk").await;
    let dead = stored(&js, "natasks.bulk-dlq").await;
    assert!(back >= moved && dead > 0, "killed mid-way: {back} back, {dead} dead");
    assert!(back + dead >= N, "none lost: {back} back, {dead} dead");

    // Run again: it finishes, and a task copied just before the kill is not stored twice.
    let admin = Admin::new(js.clone());
    let all = Selection::Matching(Filter::default());
    let outcome = admin.requeue("bulk", &all).await.unwrap();
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    assert_eq!(stored(&js, "natasks.bulk-dlq").await, 0);
    assert_eq!(stored(&js, "natasks.bulk").await, N, "a task was lost or doubled: {outcome:?}");
    let stream = js.get_stream("NATASKS").await.unwrap();
    let mut ids = Vec::new();
    let mut seq = 1;
    while let Ok(m) = stream.get_first_raw_message_by_subject("natasks.bulk", seq).await {
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        ids.push(payload["i"].as_u64().unwrap());
        seq = m.sequence + 1;
    }
    ids.sort();
    assert_eq!(ids, (0..N).collect::<Vec<_>>());
}
