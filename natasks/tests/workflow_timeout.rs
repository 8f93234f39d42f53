//! A workflow whose atomic batch is not confirmed in time: dispatch fails with a timeout
//! that names the workflow and says it may have been stored, and the workflow is then there
//! in full or not at all, as its status says.

mod common;

use common::*;
use natasks::workflow::{Group, StepState, WorkflowErrorKind};
use natasks::{Client, Task, TaskState};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const QUEUE: &str = "wf";

/// The header that marks the last message of an atomic batch, its commit.
const COMMIT: &[u8] = b"Nats-Batch-Commit";

/// What a [`CommitProxy`] holds back once a client sends a batch commit.
#[derive(Clone, Copy, PartialEq)]
enum Hold {
    /// The server's reply: the server stores the batch, the client never hears of it.
    Reply,
    /// The commit itself, and everything the client sends after it: the server never
    /// completes the batch. On release the connection is closed.
    Commit,
}

/// A TCP proxy in front of a server that, once a client sends a batch commit, holds back
/// what [`Hold`] says until [`release`](Self::release).
struct CommitProxy {
    url: String,
    release: watch::Sender<bool>,
}

impl CommitProxy {
    async fn start(server: &NatsServer, hold: Hold) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let (release, released) = watch::channel(false);
        let upstream = format!("127.0.0.1:{}", server.port());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(relay(client, server, hold, released.clone()));
            }
        });
        Self { url, release }
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    hold: Hold,
    mut released: watch::Receiver<bool>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let (committed_tx, committed) = watch::channel(false);
    let mut released_up = released.clone();
    let upward = async move {
        let mut buf = vec![0; 64 * 1024];
        // Enough of the previous read to find a header split across two reads.
        let mut tail = Vec::new();
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            tail.extend_from_slice(&buf[..n]);
            // Marked before the commit reaches the server: its reply comes after.
            if tail.windows(COMMIT.len()).any(|w| w == COMMIT) {
                committed_tx.send_replace(true);
                if hold == Hold::Commit {
                    let _ = released_up.wait_for(|r| *r).await;
                    return;
                }
            }
            tail.drain(..tail.len().saturating_sub(COMMIT.len()));
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downward = async move {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if hold == Hold::Reply
                && *committed.borrow()
                && released.wait_for(|r| *r).await.is_err()
            {
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(upward, downward);
}

/// Dispatches a group of three members through a [`CommitProxy`] holding back `hold`,
/// checks the timeout it fails with, releases the proxy and returns the workflow id and a
/// client connected directly.
async fn timed_out_dispatch(server: &NatsServer, hold: Hold) -> (String, Client) {
    let js = server.jetstream().await;
    // Created directly: the stream, the plan store and the tracker exist before the proxy
    // holds anything back.
    let direct = Client::new(js).await.expect("client");
    let proxy = CommitProxy::start(server, hold).await;
    let through = async_nats::connect(&proxy.url).await.expect("connect through the proxy");
    let client = Client::new(async_nats::jetstream::new(through)).await.expect("client");

    let mut group = Group::new("nightly");
    for n in 0..3u64 {
        group = group.add(Task::json("member", &n).unwrap(), QUEUE);
    }
    let err = tokio::time::timeout(DEADLINE, client.dispatch_workflow(group))
        .await
        .expect("the commit times out within the deadline")
        .unwrap_err();
    assert_eq!(err.kind(), WorkflowErrorKind::Timeout, "{err}");
    let id = err.workflow().expect("the timeout names the workflow").to_owned();
    let message = err.to_string();
    assert!(message.contains(&format!("{id:?}")), "{message}");
    assert!(message.contains("may have been stored"), "{message}");
    proxy.release();
    (id, direct)
}

#[tokio::test]
async fn a_stored_but_unconfirmed_workflow_is_a_timeout_and_then_whole() {
    let server = NatsServer::start().await;
    let (id, client) = timed_out_dispatch(&server, Hold::Reply).await;

    // The server stored the batch: every member is queued, and the status says so.
    let js = server.jetstream().await;
    assert_eq!(stored(&js, &format!("natasks.{QUEUE}")).await, 3);
    let status = client.workflow_status(&id).await.expect("the workflow is recorded");
    assert_eq!(status.steps.len(), 3, "{status:#?}");
    assert!(
        status.steps.iter().all(|s| s.state == StepState::Task(TaskState::Pending)),
        "every member is queued: {status:#?}"
    );
}

#[tokio::test]
async fn an_uncommitted_workflow_is_a_timeout_and_then_absent() {
    let server = NatsServer::start().await;
    let (id, client) = timed_out_dispatch(&server, Hold::Commit).await;

    // The server never had the commit: no member is queued, and the status says so.
    let js = server.jetstream().await;
    assert_eq!(stored(&js, &format!("natasks.{QUEUE}")).await, 0);
    let status = client.workflow_status(&id).await.expect("the plan is recorded");
    assert_eq!(status.steps.len(), 3, "{status:#?}");
    assert!(
        status.steps.iter().all(|s| s.state == StepState::Waiting),
        "no member is queued: {status:#?}"
    );
}
