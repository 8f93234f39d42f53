//! The pull loop: fill free slots, survive reconnects, shut down without losing tasks.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_nats::client::FlushErrorKind;
use async_nats::connection::State;
use async_nats::jetstream::consumer::PullConsumer;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pull::{PullError, Puller};
use super::{process, WorkerInner};
use crate::error::{RunError, RunErrorKind};

/// Longest wait for the final flush at shutdown.
pub(super) const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

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
    let mut starter = Starter::new(tracker.clone());
    let abandon = CancellationToken::new();
    let mut consumer = Some(consumer);
    // Set when shutdown begins: running handlers and prefetched tasks share it.
    let mut drain_deadline = None;
    tracing::info!(queue = %inner.queue, consumer = %settings.consumer, concurrency = settings.concurrency, "worker started");
    // Cancellations of the tracked tasks this worker runs, while it runs.
    let _cancels = inner.tracking.listen(&inner.queue).await;
    // The queue's rate limits, as operators change them.
    if let Some(consumer) = &consumer {
        inner.limits.adopt(consumer.cached_info());
    }
    let _rates = inner.limits.follow(&settings.consumer).await;

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
        let opened =
            Puller::open(current, inner.client.clone(), settings.fetch_timeout, settings.prefetch)
                .await;
        let mut puller = match opened {
            Ok(puller) => puller,
            Err(err) => {
                tracing::warn!(queue = %inner.queue, error = %err, "cannot start pulling; recovering");
                pause(&shutdown, settings.idle_wait).await;
                continue;
            }
        };
        // Waited on for every task, so registered with the token once, not per task.
        let mut stopping = std::pin::pin!(shutdown.cancelled());
        let exit = loop {
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => match wait_for_slot(&inner, &slots, &mut puller, &shutdown).await {
                    Wait::Slot(permit) => permit,
                    Wait::Shutdown => break Exit::Shutdown,
                    Wait::Reopen => break Exit::Reopen,
                },
            };
            // The slot this task will take is free too.
            let free = slots.available_permits() + 1;
            let next = tokio::select! {
                biased;
                () = stopping.as_mut() => break Exit::Shutdown,
                next = puller.next(free) => next,
            };
            match next {
                Ok(leased) => {
                    starter.start(process::process(inner.clone(), leased, permit, abandon.clone()));
                }
                Err(err) => {
                    let connected = inner.client.connection_state() == State::Connected;
                    if matches!(err, PullError::Silent) && connected {
                        tracing::debug!(queue = %inner.queue, "pull requests went unanswered; renewing them");
                        continue;
                    }
                    tracing::warn!(queue = %inner.queue, error = %err, connected, "pulling interrupted; recovering");
                    break Exit::Reopen;
                }
            }
        };
        match exit {
            Exit::Shutdown => {
                // The requests already sent asked for tasks this worker has slots (or
                // prefetch) for: run them and what the requests still bring rather than
                // hand them back (the broker would count that delivery as an attempt), then
                // let go of the inbox. The requests end by `fetch_timeout`; all of this and
                // the running handlers get the drain timeout.
                let limit = tokio::time::Instant::now() + settings.drain_timeout;
                drain_deadline = Some(limit);
                // A slot first, then the task: at shutdown a task waits for a slot only
                // when the server delivered more than was asked for, its lease kept.
                while !puller.exhausted() {
                    let Some(permit) = slot_before(&inner, &slots, &mut puller, limit).await else {
                        break;
                    };
                    let Some(leased) = puller.next_requested(limit).await else { break };
                    starter.start(process::process(inner.clone(), leased, permit, abandon.clone()));
                }
                let handed_back = puller.hand_back(FLUSH_LIMIT).await;
                if handed_back > 0 {
                    tracing::debug!(queue = %inner.queue, handed_back, "buffered tasks handed back");
                }
                break Ok(());
            }
            Exit::Reopen => {
                // Tasks already delivered to this puller go back at once rather than after
                // the ack wait (if the connection is down, the hand-back waits for it).
                puller.hand_back(settings.idle_wait).await;
                pause(&shutdown, settings.idle_wait).await;
            }
        }
    };

    tracker.close();
    let drain_deadline =
        drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + settings.drain_timeout);
    if tokio::time::timeout_at(drain_deadline, tracker.wait()).await.is_err() {
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
    if tokio::time::timeout(settings.idle_wait.max(FLUSH_LIMIT), inner.client.flush())
        .await
        .is_err()
    {
        tracing::warn!(queue = %inner.queue, "could not flush final acknowledgements");
    }
    tracing::info!(queue = %inner.queue, "worker stopped");
    result
}

/// Two first polls in a row that take longer than this (a handler computing without
/// awaiting; one alone may be the thread losing its CPU) stop first polls in the pull loop
/// for [`INLINE_PAUSE`].
const INLINE_BUDGET: Duration = Duration::from_micros(500);
/// How long tasks get a task of their own from the start after a slow first poll.
const INLINE_PAUSE: Duration = Duration::from_secs(1);

/// Starts tasks' processing.
///
/// A task's first poll happens in the pull loop, where most tasks finish (handler, outcome
/// and all) without a task of their own, and so without crossing threads; a task whose
/// handler awaits something continues in a task of its own. A handler that computes
/// without awaiting would hold up the pull loop (and the tasks after it, which then run one
/// at a time): after two first polls in a row over [`INLINE_BUDGET`], every task gets a
/// task of its own from the start, in parallel, for [`INLINE_PAUSE`].
pub(super) struct Starter {
    tracker: TaskTracker,
    spawn_only_until: Option<Instant>,
    /// The last first poll went over the budget.
    slow: bool,
}

impl Starter {
    pub(super) fn new(tracker: TaskTracker) -> Self {
        Self { tracker, spawn_only_until: None, slow: false }
    }

    pub(super) fn start(&mut self, work: impl Future<Output = ()> + Send + 'static) {
        if let Some(until) = self.spawn_only_until {
            if Instant::now() < until {
                self.tracker.spawn(work);
                return;
            }
            self.spawn_only_until = None;
        }
        let mut work = Box::pin(work);
        // What the first poll registers with this waker is registered again, with the
        // spawned task's waker, by the spawned task's first poll.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let started = Instant::now();
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(&mut cx)));
        let took = started.elapsed();
        let slow = took > INLINE_BUDGET;
        if slow && self.slow {
            tracing::debug!(
                ?took,
                "handlers compute without awaiting; tasks get their own task for a while"
            );
            self.spawn_only_until = Some(Instant::now() + INLINE_PAUSE);
        }
        self.slow = slow;
        match polled {
            Ok(Poll::Ready(())) => {}
            Ok(Poll::Pending) => {
                self.tracker.spawn(work);
            }
            // Handler panics are caught inside; this is an observer's or a middleware's.
            // The task comes back after the ack wait, as it would from a crashed worker.
            Err(panic) => tracing::error!(
                panic = process::panic_message(&*panic),
                "processing a task panicked outside the handler; it comes back after the ack wait"
            ),
        }
    }
}

enum Wait {
    Slot(OwnedSemaphorePermit),
    Shutdown,
    Reopen,
}

/// Waits for a free slot. Only prefetched tasks are requested meanwhile; what arrives
/// waits with its lease kept alive until it starts.
async fn wait_for_slot(
    inner: &WorkerInner,
    slots: &Arc<Semaphore>,
    puller: &mut Puller,
    shutdown: &CancellationToken,
) -> Wait {
    let period = inner.settings.progress_interval;
    if let Err(err) = puller.top_up(0).await {
        tracing::warn!(queue = %inner.queue, error = %err, "pulling interrupted; recovering");
        return Wait::Reopen;
    }
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Wait::Shutdown,
            permit = slots.clone().acquire_owned() => {
                return Wait::Slot(permit.expect("the slot semaphore is never closed"));
            }
            tended = puller.tend(period) => {
                if let Err(err) = tended {
                    tracing::warn!(queue = %inner.queue, error = %err, "pulling interrupted; recovering");
                    return Wait::Reopen;
                }
            }
        }
    }
}

/// At shutdown: a free slot before `limit`, keeping the leases of waiting tasks alive.
async fn slot_before(
    inner: &WorkerInner,
    slots: &Arc<Semaphore>,
    puller: &mut Puller,
    limit: tokio::time::Instant,
) -> Option<OwnedSemaphorePermit> {
    loop {
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(limit) => return None,
            permit = slots.clone().acquire_owned() => return permit.ok(),
            tended = puller.tend(inner.settings.progress_interval) => {
                tended.ok()?;
            }
        }
    }
}

/// Sleeps for `wait` unless shutdown comes first.
pub(super) async fn pause(shutdown: &CancellationToken, wait: std::time::Duration) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(wait) => {}
    }
}

/// Waits for the connection, then re-creates the stream and consumer if needed.
/// `Ok(None)` means shutdown was requested meanwhile.
pub(super) async fn recover(
    inner: &WorkerInner,
    shutdown: &CancellationToken,
) -> Result<Option<PullConsumer>, RunError> {
    let client = &inner.client;
    let mut announced = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        if is_closed(client) {
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
                    inner.limits.adopt(consumer.cached_info());
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
