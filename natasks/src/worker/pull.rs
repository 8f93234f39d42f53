//! The pull side of the worker: pull requests on an inbox the worker owns.
//!
//! Owning the inbox is what makes shutdown lossless. When the worker stops, it drains the
//! inbox subscription: the server stops delivering to it once the unsubscribe is processed,
//! and every message delivered before that still arrives, so each one can be handed back at
//! once instead of waiting out the ack wait on a forgotten pull request.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subscriber};
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

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

/// Pulls messages for one durable consumer, keeping up to `batch` messages requested.
///
/// Messages that arrive while every slot is busy wait in a buffer; [`keep_alive`]
/// (Self::keep_alive) renews their leases, so a task never runs out its ack wait (and is
/// delivered a second time elsewhere) while it waits behind slow handlers.
pub(super) struct Puller {
    consumer: PullConsumer,
    context: jetstream::Context,
    inbox: String,
    subscriber: Subscriber,
    batch: usize,
    expires: Duration,
    heartbeat: Duration,
    /// Messages requested and not yet delivered (nor expired).
    outstanding: usize,
    /// Delivered messages not yet handed to a slot, with when their lease was last renewed.
    buffer: VecDeque<(Instant, async_nats::Message)>,
    /// When the server last said anything on the inbox (or the last request was sent).
    last_heard: Instant,
}

impl Puller {
    pub(super) async fn open(
        consumer: PullConsumer,
        context: jetstream::Context,
        batch: usize,
        expires: Duration,
    ) -> Result<Self, PullError> {
        let client = context.client();
        let inbox = client.new_inbox();
        let subscriber =
            client.subscribe(inbox.clone()).await.map_err(|e| PullError::Request(e.to_string()))?;
        Ok(Self {
            consumer,
            context,
            inbox,
            subscriber,
            batch,
            expires,
            heartbeat: expires / 4,
            outstanding: 0,
            buffer: VecDeque::with_capacity(batch),
            last_heard: Instant::now(),
        })
    }

    /// The next message. Keeps requests topped up: a new request for `batch` messages goes
    /// out whenever at most half a batch is still requested or buffered.
    pub(super) async fn next(&mut self) -> Result<jetstream::Message, PullError> {
        loop {
            if self.outstanding + self.buffer.len() <= self.batch / 2 {
                self.request().await?;
            }
            if let Some((_, message)) = self.buffer.pop_front() {
                return Ok(self.wrap(message));
            }
            let deadline = self.last_heard + self.heartbeat * 2 + Duration::from_millis(500);
            let message = tokio::select! {
                biased;
                message = self.subscriber.next() => message.ok_or(PullError::Closed)?,
                () = tokio::time::sleep_until(deadline) => {
                    // The requests are gone with the server's state; start over.
                    self.outstanding = 0;
                    return Err(PullError::Silent);
                }
            };
            if let Some(message) = self.receive(message)? {
                return Ok(self.wrap(message));
            }
        }
    }

    /// Moves what has arrived into the buffer and renews the lease of every buffered
    /// message that waited `period` or longer. Called while all slots are busy.
    pub(super) async fn keep_alive(&mut self, period: Duration) -> Result<(), PullError> {
        while let Some(Some(message)) = self.subscriber.next().now_or_never() {
            if let Some(message) = self.receive(message)? {
                self.buffer.push_back((Instant::now(), message));
            }
        }
        let now = Instant::now();
        for (renewed, message) in &mut self.buffer {
            if now.duration_since(*renewed) >= period {
                let message =
                    jetstream::Message { message: message.clone(), context: self.context.clone() };
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %err, "could not renew the lease of a waiting task");
                }
                *renewed = now;
            }
        }
        Ok(())
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

    fn wrap(&self, message: async_nats::Message) -> jetstream::Message {
        jetstream::Message { message, context: self.context.clone() }
    }

    async fn request(&mut self) -> Result<(), PullError> {
        let config = BatchConfig {
            batch: self.batch,
            expires: Some(self.expires),
            idle_heartbeat: self.heartbeat,
            ..Default::default()
        };
        self.consumer
            .request_batch(config, self.inbox.clone().into())
            .await
            .map_err(|e| PullError::Request(e.to_string()))?;
        self.outstanding += self.batch;
        self.last_heard = Instant::now();
        Ok(())
    }

    /// Stops pulling and hands every message already delivered to this worker back to the
    /// broker for immediate redelivery. Returns how many were handed back.
    pub(super) async fn hand_back(mut self, limit: Duration) -> usize {
        // Unsubscribe, then receive what the server sent before it saw the unsubscribe; the
        // subscription ends when the server's answer to the following ping arrives.
        let mut handed_back = 0;
        for (_, message) in std::mem::take(&mut self.buffer) {
            let message = self.wrap(message);
            if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(error = %err, "could not hand back a buffered task");
            }
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
                let message = jetstream::Message { message, context: self.context.clone() };
                if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                    tracing::warn!(error = %err, "could not hand back a buffered task");
                }
                handed_back += 1;
            }
        }
        handed_back
    }
}
