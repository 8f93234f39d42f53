//! The pull loop: fill free slots, survive reconnects, shut down without losing tasks.

use std::sync::Arc;

use async_nats::client::FlushErrorKind;
use async_nats::connection::State;
use async_nats::jetstream::consumer::pull::{MessagesErrorKind, Stream as Messages};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{process, WorkerInner};
use crate::error::{RunError, RunErrorKind};

/// Longest wait for the final flush at shutdown.
const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

enum Exit {
    Shutdown,
    Reopen,
}

pub(super) async fn run(
    inner: Arc<WorkerInner>,
    consumer: PullConsumer,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let settings = &inner.settings;
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let tracker = TaskTracker::new();
    let abandon = CancellationToken::new();
    let mut consumer = Some(consumer);
    tracing::info!(queue = %inner.queue, consumer = %settings.consumer, concurrency = settings.concurrency, "worker started");

    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        let current = match consumer.take() {
            Some(current) => current,
            None => match recover(&inner, &shutdown).await {
                Ok(Some(current)) => current,
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            },
        };
        let opened = current
            .stream()
            .max_messages_per_batch(settings.pull_batch)
            .expires(settings.fetch_timeout)
            .heartbeat(settings.fetch_timeout / 4)
            .messages()
            .await;
        let mut messages = match opened {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(queue = %inner.queue, error = %err, "cannot start pulling; recovering");
                continue;
            }
        };
        let exit = loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Exit::Shutdown,
                permit = slots.clone().acquire_owned() => permit.expect("the slot semaphore is never closed"),
            };
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Exit::Shutdown,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    tracker.spawn(process::process(
                        inner.clone(),
                        message,
                        permit,
                        abandon.clone(),
                    ));
                }
                Some(Err(err)) => {
                    let connected = inner.js.client().connection_state() == State::Connected;
                    if err.kind() == MessagesErrorKind::MissingHeartbeat && connected {
                        tracing::debug!(queue = %inner.queue, "missed a heartbeat; still connected");
                        continue;
                    }
                    tracing::warn!(queue = %inner.queue, error = %err, connected, "pulling interrupted; recovering");
                    break Exit::Reopen;
                }
                None => break Exit::Reopen,
            }
        };
        match exit {
            Exit::Shutdown => {
                hand_back(&inner, &mut messages).await;
                break Ok(());
            }
            Exit::Reopen => {
                drop(messages);
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(settings.idle_wait) => {}
                }
            }
        }
    };

    tracker.close();
    if tokio::time::timeout(settings.drain_timeout, tracker.wait()).await.is_err() {
        tracing::warn!(
            queue = %inner.queue,
            running = tracker.len(),
            drain_timeout = ?settings.drain_timeout,
            "handlers still running after the drain timeout; handing their tasks back"
        );
        abandon.cancel();
        tracker.wait().await;
    }
    // Acks and hand-backs are fire-and-forget publishes: make sure they left the process
    // before `run` returns (the caller may exit right after).
    if tokio::time::timeout(settings.idle_wait.max(FLUSH_LIMIT), inner.js.client().flush())
        .await
        .is_err()
    {
        tracing::warn!(queue = %inner.queue, "could not flush final acknowledgements");
    }
    tracing::info!(queue = %inner.queue, "worker stopped");
    result
}

/// Negatively acks every message already buffered by the pull stream, so the broker
/// redelivers them at once (to another worker) instead of after the ack wait.
async fn hand_back(inner: &WorkerInner, messages: &mut Messages) {
    let mut handed_back = 0usize;
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
            tracing::warn!(queue = %inner.queue, error = %err, "could not hand back a buffered task");
        }
        handed_back += 1;
    }
    if handed_back > 0 {
        tracing::debug!(queue = %inner.queue, handed_back, "buffered tasks handed back");
    }
}

/// Waits for the connection, then re-creates the stream and consumer if needed.
/// `Ok(None)` means shutdown was requested meanwhile.
async fn recover(
    inner: &WorkerInner,
    shutdown: &CancellationToken,
) -> Result<Option<PullConsumer>, RunError> {
    let client = inner.js.client();
    let mut announced = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        if is_closed(&client) {
            return Err(RunError::new(
                RunErrorKind::ConnectionClosed,
                format!(
                    "NATS connection closed for good; worker for queue {:?} stops",
                    inner.queue
                ),
            ));
        }
        if client.connection_state() == State::Connected {
            match inner.ensure().await {
                Ok(consumer) => {
                    if announced {
                        tracing::info!(queue = %inner.queue, "connection restored; worker resumes");
                    }
                    return Ok(Some(consumer));
                }
                Err(err) => {
                    tracing::warn!(queue = %inner.queue, error = %err, "cannot re-create stream or consumer yet")
                }
            }
        } else if !announced {
            tracing::warn!(queue = %inner.queue, "NATS disconnected; worker paused until it reconnects");
            announced = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(inner.settings.idle_wait) => {}
        }
    }
}

/// Whether the client's connection is gone for good: its command channel is closed.
fn is_closed(client: &async_nats::Client) -> bool {
    matches!(
        client.flush().now_or_never(),
        Some(Err(err)) if err.kind() == FlushErrorKind::SendError
    )
}
