//! A workflow whose atomic batch the server stores but never confirms in time: dispatch
//! fails with a timeout that names the workflow and says it may have been stored, and the
//! workflow is there in full, never in part.

mod common;

use std::sync::Arc;

use common::*;
use natasks::workflow::{Group, StepState, WorkflowErrorKind};
use natasks::{Client, Task, TaskState};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const QUEUE: &str = "wf";

/// The header that marks the last message of an atomic batch, its commit.
const COMMIT: &[u8] = b"Nats-Batch-Commit";

/// A TCP proxy in front of a server. Once a client has sent a batch commit, it forwards the
/// commit to the server but holds back everything the server sends that client until
/// [`release`](Self::release): the server stores the batch, the client never hears of it.
struct WithheldCommitReply {
    url: String,
    release: watch::Sender<bool>,
}

impl WithheldCommitReply {
    async fn start(server: &NatsServer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let (release, released) = watch::channel(false);
        let upstream = format!("127.0.0.1:{}", server.port());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(relay(client, server, released.clone()));
            }
        });
        Self { url, release }
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

async fn relay(client: TcpStream, server: TcpStream, mut released: watch::Receiver<bool>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let (committed_tx, committed) = watch::channel(false);
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
            if *committed.borrow() && released.wait_for(|r| *r).await.is_err() {
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(upward, downward);
}

#[tokio::test]
async fn an_unconfirmed_workflow_commit_is_a_timeout_and_the_workflow_is_whole() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    // Created directly: the stream, the plan store and the tracker exist before the proxy
    // holds anything back.
    Client::new(js.clone()).await.expect("client");
    let proxy = Arc::new(WithheldCommitReply::start(&server).await);
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

    // The server did store the batch: every member is queued, none is missing.
    proxy.release();
    let direct = Client::new(js.clone()).await.expect("client");
    assert_eq!(stored(&js, &format!("natasks.{QUEUE}")).await, 3);
    let status = direct.workflow_status(&id).await.expect("the workflow is recorded");
    assert_eq!(status.steps.len(), 3, "{status:#?}");
    assert!(
        status.steps.iter().all(|s| s.state == StepState::Task(TaskState::Pending)),
        "every member is dispatched: {status:#?}"
    );
}
