//! The pull side of the worker: pull requests on an inbox the worker owns, never for more
//! tasks than the worker has free slots plus the prefetch the user asked for.
//!
//! Asking only for what can start at once is what makes a task's attempts count runs: a
//! task the worker holds but cannot start would have to be handed back at shutdown or
//! reconnect, and the broker counts that delivery as an attempt. Without prefetch (the
//! default), every delivered task starts at once, and a graceful shutdown hands nothing
//! back. With prefetch (`fetch_batch` above `concurrency`), prefetched tasks wait in the
//! worker with their leases renewed, and a graceful shutdown runs them before it stops.
//!
//! Owning the inbox is what makes shutdown lossless: the worker stops asking, keeps the
//! inbox until the requests it already sent have ended (running what they bring; it has
//! the slots for it), and only then unsubscribes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use async_nats::{Client, StatusCode, Subscriber};
use futures_util::StreamExt;
use tokio::time::{Instant, Sleep};

use super::ack;

/// When the server, last heard at `heard`, has been silent too long on open pull requests:
/// two heartbeats missed, and a margin.
fn silence_after(heard: Instant, heartbeat: Duration) -> Instant {
    heard + heartbeat * 2 + Duration::from_millis(500)
}

/// Why pulling stopped; the caller recovers (reconnect, re-create the consumer) and pulls
/// again.
#[derive(Debug)]
pub(super) enum PullError {
    /// Neither a message nor a heartbeat arrived in time: pull requests were lost (server
    /// restart, disconnect); new ones are needed.
    Silent,
    /// The server refused or ended the pull (consumer deleted, request limits, ...).
    Refused(String),
    /// A pull request could not be sent.
    Request(String),
    /// The subscription ended (connection closed).
    Closed,
}

impl std::fmt::Display for PullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent => f.write_str("no message or heartbeat from the server in time"),
            Self::Refused(why) => write!(f, "server ended the pull: {why}"),
            Self::Request(why) => write!(f, "could not send a pull request: {why}"),
            Self::Closed => f.write_str("the pull subscription ended"),
        }
    }
}

/// A delivered task and when its lease began (its delivery, or its last renewal).
pub(super) struct Leased {
    pub(super) message: async_nats::Message,
    pub(super) since: Instant,
}

/// Pulls messages for one durable consumer, never requesting more than the free slots.
pub(super) struct Puller {
    consumer: PullConsumer,
    /// Where acks for waiting and handed-back tasks are published.
    client: Client,
    inbox: String,
    subscriber: Subscriber,
    expires: Duration,
    heartbeat: Duration,
    /// Tasks held beyond the free slots.
    prefetch: usize,
    /// Messages requested and not yet delivered (nor expired).
    outstanding: usize,
    /// When the last pull request was sent: every request has ended by `expires` after it.
    last_request: Instant,
    /// Delivered messages not yet started, with when their lease began: prefetched tasks,
    /// and any the server delivered beyond what was asked for (requests the worker gave up
    /// on after a silence that were in fact still open).
    buffer: VecDeque<(Instant, async_nats::Message)>,
    /// When the server last said anything on the inbox (or the last request was sent).
    last_heard: Instant,
    /// Fires no later than the silence deadline (see [`next`](Self::next)): armed once and
    /// moved on only when it fires early, not at every message, so that a worker receiving
    /// tasks one at a time does not register and cancel a timer for each.
    silence: Pin<Box<Sleep>>,
    /// When the server last delivered a task, and whether the consumer still had tasks
    /// pending after it.
    last_delivered: Option<(Instant, bool)>,
    /// Whether `last_delivered` is kept: only a worker serving several queues reads it, and
    /// it costs a parse of every delivery's reply subject.
    watch_backlog: bool,
}

impl Puller {
    pub(super) async fn open(
        consumer: PullConsumer,
        client: Client,
        expires: Duration,
        prefetch: usize,
    ) -> Result<Self, PullError> {
        let inbox = client.new_inbox();
        let subscriber =
            client.subscribe(inbox.clone()).await.map_err(|e| PullError::Request(e.to_string()))?;
        let now = Instant::now();
        let heartbeat = expires / 4;
        Ok(Self {
            silence: Box::pin(tokio::time::sleep_until(silence_after(now, heartbeat))),
            consumer,
            client,
            inbox,
            subscriber,
            expires,
            heartbeat,
            prefetch,
            outstanding: 0,
            last_request: now,
            buffer: VecDeque::new(),
            last_heard: now,
            last_delivered: None,
            watch_backlog: false,
        })
    }

    /// Asks for more tasks if at least half of what the worker may hold (`free` slots plus
    /// the prefetch) is neither requested nor delivered: a busy worker sends a request per
    /// half-batch, not per task.
    pub(super) async fn top_up(&mut self, free: usize) -> Result<(), PullError> {
        let capacity = free + self.prefetch;
        let held = self.outstanding + self.buffer.len();
        if held < capacity && (held == 0 || capacity - held >= capacity.div_ceil(2)) {
            self.request(capacity - held).await?;
        }
        Ok(())
    }

    /// Asks for whatever is missing of what the worker may hold (the prefetch): a worker
    /// serving several queues keeps each queue's waiting tasks full, so that a queue with
    /// work is never seen empty while its next task is on its way.
    pub(super) async fn top_up_fully(&mut self) -> Result<(), PullError> {
        let held = self.outstanding + self.buffer.len();
        if held < self.prefetch {
            self.request(self.prefetch - held).await?;
        }
        Ok(())
    }

    /// The next message, for a worker with `free` free slots (counting the one the message
    /// will take).
    pub(super) async fn next(&mut self, free: usize) -> Result<Leased, PullError> {
        loop {
            self.top_up(free).await?;
            if let Some((since, message)) = self.buffer.pop_front() {
                return Ok(self.lease(message, since));
            }
            let message = tokio::select! {
                biased;
                message = self.subscriber.next() => message.ok_or(PullError::Closed)?,
                () = self.silence.as_mut() => {
                    let deadline = silence_after(self.last_heard, self.heartbeat);
                    if Instant::now() < deadline {
                        // The server spoke since the timer was armed.
                        self.silence.as_mut().reset(deadline);
                        continue;
                    }
                    // The requests are gone with the server's state; start over.
                    self.outstanding = 0;
                    self.silence.as_mut().reset(silence_after(Instant::now(), self.heartbeat));
                    return Err(PullError::Silent);
                }
            };
            if let Some(message) = self.receive(message)? {
                // Received just now: `receive` read the clock.
                return Ok(self.lease(message, self.last_heard));
            }
        }
    }

    /// While every slot is busy: takes in what the server delivers (prefetched tasks, or
    /// more than was asked for), stamped on arrival, and renews the lease of every waiting
    /// message `period` after its lease began, so none runs out its ack wait while it
    /// waits. Returns when a lease was renewed or a message arrived; cancel-safe.
    pub(super) async fn tend(&mut self, period: Duration) -> Result<(), PullError> {
        let due = self.buffer.iter().map(|(since, _)| *since + period).min();
        let renew = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = self.subscriber.next() => {
                let message = message.ok_or(PullError::Closed)?;
                if let Some(message) = self.receive(message)? {
                    self.buffer.push_back((self.last_heard, message));
                }
            }
            () = renew => {
                let now = Instant::now();
                for (since, message) in &mut self.buffer {
                    if now.duration_since(*since) >= period {
                        // Tasks without a reply subject are handed to `process`, which
                        // reports them.
                        if let Some(reply) = &message.reply {
                            let renewed = ack::send(&self.client, reply.clone(), AckKind::Progress).await;
                            if let Err(err) = renewed {
                                tracing::warn!(error = %err, "could not renew the lease of a waiting task");
                            }
                        }
                        *since = now;
                    }
                }
            }
        }
        Ok(())
    }

    /// At shutdown: the next message the requests already sent still bring, or `None` once
    /// they have all been answered or have expired, or at `limit`. Sends no new request.
    pub(super) async fn next_requested(&mut self, limit: Instant) -> Option<Leased> {
        if let Some((since, message)) = self.buffer.pop_front() {
            return Some(self.lease(message, since));
        }
        // Every request has expired by then; the margin covers the server's clock and the
        // expiry notice on its way.
        let expired = self.last_request + self.expires + Duration::from_millis(500);
        let deadline = expired.min(limit);
        while self.outstanding > 0 {
            let message = tokio::time::timeout_at(deadline, self.subscriber.next()).await;
            match message {
                Ok(Some(message)) => match self.receive(message) {
                    Ok(Some(message)) => return Some(self.lease(message, self.last_heard)),
                    Ok(None) => {}
                    Err(_) => return None,
                },
                Ok(None) | Err(_) => return None,
            }
        }
        None
    }

    /// A delivered task waiting in the buffer, if any (a worker serving several queues
    /// keeps one or a few per queue, and picks among them).
    pub(super) fn pop_buffered(&mut self) -> Option<Leased> {
        let (since, message) = self.buffer.pop_front()?;
        Some(self.lease(message, since))
    }

    /// When the server will have been silent for too long on this puller's open requests
    /// (no message, heartbeat or status): past it, they were lost (a server restart, a
    /// leader change) and must be asked again. `None` without open requests.
    pub(super) fn silence_deadline(&self) -> Option<Instant> {
        (self.outstanding > 0).then(|| silence_after(self.last_heard, self.heartbeat))
    }

    /// Forgets requests the server went silent on, if it did; the next top-up asks again.
    /// Returns whether it forgot any.
    pub(super) fn forget_if_silent(&mut self) -> bool {
        let silent = self.silence_deadline().is_some_and(|at| Instant::now() >= at);
        if silent {
            self.outstanding = 0;
        }
        silent
    }

    /// At shutdown, when no new request is sent: when the open requests will all have
    /// expired (with a margin for the server's notice on its way); `None` without any.
    pub(super) fn expiry_deadline(&self) -> Option<Instant> {
        (self.outstanding > 0)
            .then(|| self.last_request + self.expires + Duration::from_millis(500))
    }

    /// At shutdown, when no new request is sent: forgets the requests once they have all
    /// expired (see [`expiry_deadline`](Self::expiry_deadline)).
    pub(super) fn forget_if_expired(&mut self) {
        if self.expiry_deadline().is_some_and(|at| Instant::now() >= at) {
            self.outstanding = 0;
        }
    }

    /// The delivered tasks waiting in the buffer, with when their leases began, taken out
    /// (for the puller that replaces this one).
    pub(super) fn take_buffer(&mut self) -> VecDeque<(Instant, async_nats::Message)> {
        std::mem::take(&mut self.buffer)
    }

    /// Takes over tasks another puller of the same consumer had waiting.
    pub(super) fn adopt_buffer(&mut self, waiting: VecDeque<(Instant, async_nats::Message)>) {
        self.buffer.extend(waiting);
    }

    /// Takes in, without waiting, what the server already delivered on the inbox.
    pub(super) fn take_in_ready(&mut self) -> Result<(), PullError> {
        use futures_util::FutureExt;
        while let Some(message) = self.subscriber.next().now_or_never() {
            let message = message.ok_or(PullError::Closed)?;
            if let Some(message) = self.receive(message)? {
                self.buffer.push_back((self.last_heard, message));
            }
        }
        Ok(())
    }

    /// Keeps track of whether the server said more tasks were pending (see
    /// [`is_flowing`](Self::is_flowing)).
    pub(super) fn watch_backlog(&mut self) {
        self.watch_backlog = true;
    }

    /// Whether tasks are on their way: requests are open, and the server delivered a task
    /// within `window` saying more were pending (a queue with a backlog whose next task has
    /// not arrived yet, not one that receives a trickle).
    pub(super) fn is_flowing(&self, window: Duration) -> bool {
        self.outstanding > 0
            && self.last_delivered.is_some_and(|(at, more)| more && at.elapsed() < window)
    }

    /// Whether a delivered task waits in the buffer.
    pub(super) fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Whether nothing more can come: nothing buffered, nothing requested.
    pub(super) fn exhausted(&self) -> bool {
        self.buffer.is_empty() && self.outstanding == 0
    }

    /// Accounts for one message on the inbox; `Some` for a task.
    fn receive(
        &mut self,
        message: async_nats::Message,
    ) -> Result<Option<async_nats::Message>, PullError> {
        self.last_heard = Instant::now();
        match message.status {
            None | Some(StatusCode::OK) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                if self.watch_backlog {
                    let pending = message.reply.as_deref().and_then(super::ack::pending);
                    self.last_delivered = Some((self.last_heard, pending.is_some_and(|n| n > 0)));
                }
                Ok(Some(message))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Ok(None),
            Some(StatusCode::TIMEOUT) | Some(StatusCode::REQUEST_TERMINATED) => {
                let description = message.description.clone().unwrap_or_default();
                let left = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Pending-Messages"))
                    .and_then(|v| v.as_str().parse::<usize>().ok());
                match left {
                    // A request expired or was cut short with this many unfilled.
                    Some(left) => self.outstanding = self.outstanding.saturating_sub(left),
                    None if description.contains("Consumer Deleted")
                        || description.contains("Exceeded")
                        || description.contains("push based") =>
                    {
                        self.outstanding = 0;
                        return Err(PullError::Refused(description));
                    }
                    None => self.outstanding = 0,
                }
                Ok(None)
            }
            Some(status) => {
                self.outstanding = 0;
                let description = message.description.unwrap_or_default();
                Err(PullError::Refused(format!("status {status} {description}")))
            }
        }
    }

    fn lease(&self, message: async_nats::Message, since: Instant) -> Leased {
        Leased { message, since }
    }

    async fn request(&mut self, batch: usize) -> Result<(), PullError> {
        let config = BatchConfig {
            batch,
            expires: Some(self.expires),
            idle_heartbeat: self.heartbeat,
            ..Default::default()
        };
        self.consumer
            .request_batch(config, self.inbox.clone().into())
            .await
            .map_err(|e| PullError::Request(e.to_string()))?;
        self.outstanding += batch;
        self.last_request = Instant::now();
        self.last_heard = self.last_request;
        if self.silence.deadline() < self.last_heard {
            // Armed before this wait (a silence already reported): from now on.
            self.silence.as_mut().reset(silence_after(self.last_heard, self.heartbeat));
        }
        Ok(())
    }

    /// Stops pulling and hands every message delivered to this worker and not started back
    /// to the broker for immediate redelivery. Returns how many were handed back.
    pub(super) async fn hand_back(mut self, limit: Duration) -> usize {
        // Unsubscribe, then receive what the server sent before it saw the unsubscribe; the
        // subscription ends when the server's answer to the following ping arrives.
        let mut handed_back = 0;
        for (_, message) in std::mem::take(&mut self.buffer) {
            self.nak(message).await;
            handed_back += 1;
        }
        if self.subscriber.drain().await.is_err() {
            return handed_back;
        }
        let deadline = Instant::now() + limit;
        while let Ok(Some(message)) =
            tokio::time::timeout_at(deadline, self.subscriber.next()).await
        {
            if matches!(message.status, None | Some(StatusCode::OK)) {
                self.nak(message).await;
                handed_back += 1;
            }
        }
        handed_back
    }

    /// Hands a delivered task back for immediate redelivery.
    async fn nak(&self, message: async_nats::Message) {
        let Some(reply) = message.reply else {
            tracing::warn!("delivery without a reply subject cannot be handed back");
            return;
        };
        if let Err(err) = ack::send(&self.client, reply, AckKind::Nak(None)).await {
            tracing::warn!(error = %err, "could not hand a task back; it is redelivered after the ack wait");
        }
    }
}
