//! The live overview: a server-sent event per refresh with every queue's counts, and the
//! change of its stored tasks per second since the previous event.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde_json::json;

use crate::dashboard::State;
use crate::page::{self, Ctx};
use crate::pages::overview::state_text;

/// What one connection remembers between events.
struct Previous {
    at: Instant,
    stored: HashMap<String, u64>,
}

/// `GET /live`: `queues` events, one per refresh, until the browser goes away.
pub(crate) async fn overview(ctx: Ctx) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = ctx.state.clone();
    let events =
        stream::unfold((state, None::<Previous>, true), |(state, previous, first)| async move {
            if !first {
                tokio::time::sleep(state.refresh).await;
            }
            let (event, previous) = snapshot(&state, previous).await;
            Some((Ok(event), (state, previous, false)))
        });
    Sse::new(events).keep_alive(KeepAlive::default())
}

async fn snapshot(state: &State, previous: Option<Previous>) -> (Event, Option<Previous>) {
    let queues = match state.admin.queues().await {
        Ok(queues) => queues,
        Err(err) if err.kind() == natasks::admin::AdminErrorKind::UnknownStream => Vec::new(),
        Err(err) => {
            let event = Event::default().event("failure").data(err.to_string());
            return (event, previous);
        }
    };
    let now = Instant::now();
    let rows: Vec<_> = queues
        .iter()
        .map(|q| {
            let rate = previous.as_ref().and_then(|p| {
                let before = *p.stored.get(&q.name)?;
                let seconds = now.duration_since(p.at).as_secs_f64();
                (seconds > 0.0).then(|| (q.stored as f64 - before as f64) / seconds)
            });
            json!({
                "name": q.name,
                "pending": q.pending,
                "in_flight": q.in_flight,
                "redelivered": q.redelivered,
                "scheduled": q.scheduled,
                "dead_letters": q.dead_letters,
                "rate": rate.map(|r| format!("{r:+.1}")),
                "oldest": q.oldest.map(page::age).unwrap_or_default(),
                "state": state_text(q),
            })
        })
        .collect();
    let stored = queues.iter().map(|q| (q.name.clone(), q.stored)).collect();
    let event = Event::default().event("queues").data(json!({ "queues": rows }).to_string());
    (event, Some(Previous { at: now, stored }))
}
