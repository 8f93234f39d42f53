//! Helpers shared by the integration tests. Every wait has a deadline.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use natasks::{ShutdownHandle, Task, Worker};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use natasks_test_support::{at_only_server_binary, old_server_binary, NatsServer};

/// Default deadline for a condition to become true.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A channel handlers report to; `recv` waits with a deadline.
pub struct Seen<T> {
    pub tx: mpsc::UnboundedSender<T>,
    rx: mpsc::UnboundedReceiver<T>,
}

impl<T> Seen<T> {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx }
    }

    /// The next reported value, or a panic after `DEADLINE`.
    pub async fn recv(&mut self) -> T {
        self.recv_within(DEADLINE).await.expect("nothing reported before the deadline")
    }

    /// The next reported value within `limit`, or `None`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<T> {
        tokio::time::timeout(limit, self.rx.recv()).await.ok().flatten()
    }

    /// Collects `n` values, panicking if they do not arrive before `limit`.
    pub async fn take(&mut self, n: usize, limit: Duration) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(v)) => out.push(v),
                _ => panic!("only {} of {n} values reported within {limit:?}", out.len()),
            }
        }
        out
    }
}

/// A worker running in the background.
pub struct Running {
    pub handle: ShutdownHandle,
    pub join: JoinHandle<Result<(), natasks::RunError>>,
}

impl Running {
    /// Triggers shutdown and waits (with a deadline) for `run` to return.
    pub async fn stop(self) -> Result<(), natasks::RunError> {
        self.handle.shutdown();
        tokio::time::timeout(DEADLINE, self.join)
            .await
            .expect("worker did not stop in time")
            .expect("worker task panicked")
    }
}

pub fn spawn(worker: Worker) -> Running {
    let handle = worker.shutdown_handle();
    let join = tokio::spawn(async move { worker.run().await });
    Running { handle, join }
}

/// Waits until `condition` returns true, polling every 20 ms, or panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Number of messages stored on `subject` in the natasks stream.
pub async fn stored(js: &jetstream::Context, subject: &str) -> u64 {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let info = stream.info_with_subjects(subject).await.expect("stream info");
    let counts: std::collections::HashMap<String, usize> =
        futures_util::StreamExt::collect::<Vec<_>>(info)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect();
    counts.get(subject).copied().unwrap_or(0) as u64
}

/// Total messages in the natasks stream.
pub async fn stream_messages(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("NATASKS").await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// Reads the first message stored on `subject` without consuming it, waiting for one to
/// appear.
pub async fn first_on(
    js: &jetstream::Context,
    subject: &str,
) -> async_nats::jetstream::message::StreamMessage {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let start = Instant::now();
    loop {
        if let Ok(message) = stream.get_first_raw_message_by_subject(subject, 1).await {
            return message;
        }
        assert!(start.elapsed() < DEADLINE, "no message on {subject} within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A task counting helper handler: reports every task it sees.
pub fn reporter(
    tx: mpsc::UnboundedSender<Task>,
) -> impl Fn(Task) -> std::future::Ready<Result<(), natasks::HandlerError>> + Clone + Send + Sync + 'static
{
    move |task: Task| {
        let _ = tx.send(task);
        std::future::ready(Ok(()))
    }
}

/// Stores `n` dead letters of `queue` (task `name`, payload `{"i":<i>,...}`) as a worker
/// would, many publishes in flight. Returns their sequences.
pub async fn dead_letters(js: &jetstream::Context, queue: &str, name: &str, n: u64) -> Vec<u64> {
    let mut acks = Vec::new();
    let mut seqs = Vec::new();
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Natasks-Task", name);
        headers.insert("Natasks-Queue", format!("{queue}-dlq").as_str());
        headers.insert("Natasks-Original-Queue", queue);
        headers.insert("Natasks-Attempts", "3");
        headers.insert("Natasks-Last-Error", format!("SMTP timeout #{}", i % 10).as_str());
        headers.insert("X-Tenant", format!("t{}", i % 4).as_str());
        let payload = serde_json::json!({"i": i, "user": {"id": i % 100}}).to_string();
        let ack = js
            .publish_with_headers(format!("natasks.{queue}-dlq"), headers, payload.into())
            .await
            .unwrap();
        acks.push(ack);
        if acks.len() == 512 {
            for ack in acks.drain(..) {
                seqs.push(ack.await.unwrap().sequence);
            }
        }
    }
    for ack in acks {
        seqs.push(ack.await.unwrap().sequence);
    }
    seqs
}
