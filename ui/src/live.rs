//! The live overview: a server-sent event per refresh with every queue's counts, and the
//! change of its stored tasks per second since the previous event.
//!
//! However many overviews are open, the queues are read once per refresh: the first open
//! page starts a poller, every page subscribes to its readings, and the poller stops once
//! the last page has gone.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use natasks::admin::{AdminErrorKind, QueueInfo};
use serde_json::json;
use tokio::sync::watch;

use crate::dashboard::State;
use crate::page::{self, Ctx};
use crate::pages::overview::state_text;

/// One reading of every queue.
#[derive(Clone)]
struct Reading {
    at: Instant,
    queues: Arc<Result<Vec<QueueInfo>, String>>,
}

type Readings = watch::Receiver<Option<Reading>>;

/// The poller's readings, while a poller runs.
#[derive(Default)]
pub(crate) struct Shared {
    slot: Mutex<Option<Readings>>,
}

/// The readings, starting the poller when none runs.
fn subscribe(state: &State) -> Readings {
    let mut slot = state.live.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(readings) = &*slot {
        let mut readings = readings.clone();
        // The latest reading first, at once.
        readings.mark_changed();
        return readings;
    }
    let (sender, readings) = watch::channel(None);
    *slot = Some(readings.clone());
    tokio::spawn(poll(state.clone(), sender));
    readings
}

/// Reads the queues every refresh while a page listens; the slot's own receiver does not
/// count as one.
async fn poll(state: State, sender: watch::Sender<Option<Reading>>) {
    loop {
        let queues = match state.admin.queues().await {
            Ok(queues) => Ok(queues),
            Err(err) if err.kind() == AdminErrorKind::UnknownStream => Ok(Vec::new()),
            Err(err) => Err(err.to_string()),
        };
        sender.send_replace(Some(Reading { at: Instant::now(), queues: Arc::new(queues) }));
        tokio::time::sleep(state.refresh).await;
        let mut slot = state.live.slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if sender.receiver_count() <= 1 {
            *slot = None;
            return;
        }
    }
}

/// `GET /live`: `queues` events, one per refresh, until the browser goes away.
pub(crate) async fn overview(ctx: Ctx) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let readings = subscribe(&ctx.state);
    let events =
        stream::unfold((readings, None::<Reading>), |(mut readings, previous)| async move {
            loop {
                readings.changed().await.ok()?;
                let Some(reading) = readings.borrow_and_update().clone() else { continue };
                let event = event(&reading, previous.as_ref());
                let keep = if reading.queues.is_ok() { Some(reading) } else { previous };
                return Some((Ok(event), (readings, keep)));
            }
        });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// The event of `reading`, with rates against `previous`.
fn event(reading: &Reading, previous: Option<&Reading>) -> Event {
    let queues = match &*reading.queues {
        Ok(queues) => queues,
        Err(message) => return Event::default().event("failure").data(message.as_str()),
    };
    let before: HashMap<&str, u64> = match previous.map(|p| &*p.queues) {
        Some(Ok(queues)) => queues.iter().map(|q| (q.name.as_str(), q.stored)).collect(),
        _ => HashMap::new(),
    };
    let seconds = previous.map(|p| reading.at.duration_since(p.at).as_secs_f64()).unwrap_or(0.0);
    let rows: Vec<_> = queues
        .iter()
        .map(|q| {
            let rate = before
                .get(q.name.as_str())
                .filter(|_| seconds > 0.0)
                .map(|&b| (q.stored as f64 - b as f64) / seconds);
            json!({
                "name": q.name,
                "pending": q.pending,
                "in_flight": q.in_flight,
                "scheduled": q.scheduled,
                "redelivered": q.redelivered,
                "dead_letters": q.dead_letters,
                "rate": rate.map(|r| format!("{r:+.1}")),
                "oldest": q.oldest.map(page::age).unwrap_or_default(),
                "state": state_text(q),
            })
        })
        .collect();
    Event::default().event("queues").data(json!({ "queues": rows }).to_string())
}
