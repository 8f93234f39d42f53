//! The overview: every queue with its counts, kept current by the live stream.

use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};
use natasks::admin::QueueInfo;

use crate::page::{self, Ctx};

/// `GET /`: every queue.
pub(crate) async fn page(ctx: Ctx) -> Response {
    let queues = match ctx.state.admin.queues().await {
        Ok(queues) => queues,
        Err(err) if err.kind() == natasks::admin::AdminErrorKind::UnknownStream => Vec::new(),
        Err(err) => {
            return ctx.error_page(StatusCode::BAD_GATEWAY, "Queues unavailable", &err.to_string())
        }
    };
    let body = html! {
        h1 { "Queues" }
        @if queues.is_empty() {
            p.empty { "No queues yet: nothing dispatched and no worker running." }
        } @else {
            div.table-wrap {
                table.queues data-live=(ctx.url("/live")) {
                    thead { tr {
                        th { "Queue" } th.num { "Pending" } th.num { "In flight" }
                        th.num.hide-narrow { "Scheduled" }
                        th.num.hide-narrow { "Redelivered" } th.num { "Dead" }
                        th.num.hide-narrow { "Δ/s" } th.hide-narrow { "Oldest" } th { "State" }
                        @if ctx.can_act() { th { "" } }
                    } }
                    tbody {
                        @for queue in &queues { (row(&ctx, queue)) }
                    }
                }
            }
            p.hint { "Counts update live. Δ/s: change of the tasks on the queue per second." }
        }
        script src=(ctx.url("/assets/live.js")) defer {}
    };
    ctx.render("Queues", body)
}

fn row(ctx: &Ctx, queue: &QueueInfo) -> Markup {
    let link = ctx.url(&page::queue_path(&queue.name));
    html! {
        tr data-queue=(queue.name) {
            td { a href=(link) { (queue.name) } }
            td.num data-field="pending" { (queue.pending) }
            td.num data-field="in_flight" { (queue.in_flight) }
            td.num.hide-narrow data-field="scheduled" { (queue.scheduled) }
            td.num.hide-narrow data-field="redelivered" { (queue.redelivered) }
            td.num.alert[queue.dead_letters > 0] data-field="dead_letters" {
                a href=(format!("{link}?state=dead")) { (queue.dead_letters) }
            }
            td.num.hide-narrow data-field="rate" { "–" }
            td.hide-narrow data-field="oldest" { (queue.oldest.map(page::age).unwrap_or_default()) }
            td data-field="state" { (state_text(queue)) }
            @if ctx.can_act() {
                td { (pause_form(ctx, queue)) }
            }
        }
    }
}

/// `paused`, `paused until …`, `running` or `no worker yet`.
pub(crate) fn state_text(queue: &QueueInfo) -> String {
    match (&queue.consumer, queue.paused_until) {
        (None, _) => "no worker yet".to_owned(),
        (Some(_), None) => "running".to_owned(),
        (Some(_), Some(until)) if until.year() > time::OffsetDateTime::now_utc().year() + 50 => {
            "paused".to_owned()
        }
        (Some(_), Some(until)) => format!("paused until {}", page::time(until)),
    }
}

/// The pause or resume button of a queue a worker consumes.
pub(crate) fn pause_form(ctx: &Ctx, queue: &QueueInfo) -> Markup {
    let action = if queue.paused_until.is_some() { "resume" } else { "pause" };
    html! {
        @if queue.consumer.is_some() {
            form.inline method="post" action=(ctx.url(&format!("/actions/{action}"))) {
                (ctx.csrf_field())
                input type="hidden" name="queue" value=(queue.name);
                button.small type="submit" { (if action == "pause" { "Pause" } else { "Resume" }) }
            }
        }
    }
}
