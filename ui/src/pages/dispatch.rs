//! The dispatch form.

use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;
use serde::Deserialize;

use crate::page::Ctx;

/// Fields the form can be opened with.
#[derive(Deserialize, Default)]
pub(crate) struct Prefill {
    queue: Option<String>,
}

/// `GET /dispatch`: a task's queue, name, payload and optional delay.
pub(crate) async fn page(ctx: Ctx, Query(prefill): Query<Prefill>) -> Response {
    if !ctx.can_act() {
        return ctx.error_page(
            StatusCode::FORBIDDEN,
            "Read-only",
            "the dashboard is read-only: actions are disabled",
        );
    }
    let body = html! {
        h1 { "Dispatch a task" }
        form.card method="post" action=(ctx.url("/actions/dispatch")) {
            (ctx.csrf_field())
            label { "Queue" input name="queue" required value=(prefill.queue.unwrap_or_default()); }
            label { "Task name" input name="name" required; }
            label { "Payload (JSON or text)" textarea name="payload" rows="6" {} }
            label { "Delay in seconds (optional)" input name="delay" inputmode="numeric"; }
            button type="submit" { "Dispatch…" }
        }
    };
    ctx.render("Dispatch", body)
}
