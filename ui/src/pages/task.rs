//! One task in full: where it is, its payload, headers, attempts, last error, and for a
//! tracked task its lifecycle record.

use axum::extract::Path;
use axum::response::Response;
use maud::{html, Markup};
use natasks::admin::TaskState;
use natasks::Status;

use crate::actions::admin_failure;
use crate::page::{self, Ctx};
use crate::pages::list;

/// `GET /tasks/{seq}`.
pub(crate) async fn page(ctx: Ctx, Path(seq): Path<u64>) -> Response {
    let task = match ctx.state.admin.task(seq).await {
        Ok(task) => task,
        Err(err) => {
            let (status, why) = admin_failure(err);
            return ctx.error_page(status, "Task unavailable", &why);
        }
    };
    let s = &task.summary;
    let (kind, payload) = page::payload(&task.payload);
    let lifecycle = match &s.id {
        Some(id) => lifecycle(&ctx, id).await,
        None => html! {},
    };
    let queue_link = ctx.url(&format!("{}?state={}", page::queue_path(&s.queue), s.state.as_str()));
    let body = html! {
        h1 { "Task " (seq) }
        div.card {
            dl.facts {
                dt { "Queue" } dd { a href=(queue_link) { (s.queue) } }
                dt { "State" } dd { (s.state.as_str()) }
                dt { "Task name" } dd { (s.name) }
                @if let Some(id) = &s.id { dt { "Id" } dd { (id) } }
                dt { "Stored" } dd { (page::time(s.stored_at)) " (" (page::age(s.stored_at)) " ago)" }
                @if let Some(due) = s.due { dt { "Due" } dd { (page::time(due)) } }
                @if let Some(attempts) = s.attempts { dt { "Attempts" } dd { (attempts) } }
                @if let Some(error) = &s.last_error { dt { "Last error" } dd { (error) } }
                dt { "Subject" } dd { (task.subject) }
            }
            @if ctx.can_act() {
                div.actions { (list::row_actions(&ctx, s)) }
            }
        }
        h2 { "Payload " span.hint { "(" (kind) ", " (s.size) " bytes)" } }
        pre.payload { (payload) }
        @if s.size > page::PAYLOAD_SHOWN {
            p.hint { "Showing the first " (page::PAYLOAD_SHOWN / 1024) " KiB of " (s.size) " bytes." }
        }
        h2 { "Headers" }
        @if task.headers.is_empty() {
            p.empty { "None." }
        } @else {
            div.table-wrap { table {
                tbody { @for (name, value) in &task.headers {
                    tr { th { (name) } td.wrap { (value) } }
                } }
            } }
        }
        (lifecycle)
        @if s.state == TaskState::Dead {
            p.hint { "Requeue puts it back on " (s.queue) " without its failure headers." }
        }
    };
    ctx.render(&format!("Task {seq}"), body)
}

/// A tracked task's recorded state; nothing for an untracked one.
async fn lifecycle(ctx: &Ctx, id: &str) -> Markup {
    let status = match ctx.state.client.status(id).await {
        Ok(Status::Known(status)) => status,
        _ => return html! {},
    };
    html! {
        h2 { "Lifecycle" }
        div.card {
            dl.facts {
                dt { "Recorded state" } dd { (status.state.as_str()) }
                dt { "Attempt" } dd { (status.attempt) }
                dt { "Recorded" } dd { (page::time(status.updated_at)) }
                @if let Some(progress) = &status.progress {
                    dt { "Progress" }
                    dd {
                        @if let Some(f) = progress.fraction { (format!("{:.0}%", f * 100.0)) " " }
                        @if let Some(detail) = &progress.detail { (detail.to_string()) }
                    }
                }
                @if let Some(error) = &status.last_error { dt { "Last error" } dd { (error) } }
            }
        }
    }
}
