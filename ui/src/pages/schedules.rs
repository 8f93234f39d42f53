//! Schedules: delayed tasks not yet due and periodic schedules, with their cancel buttons.

use axum::response::Response;
use maud::html;
use natasks::admin::{AdminErrorKind, ScheduleKind};

use crate::actions::admin_failure;
use crate::page::{self, Ctx};

/// `GET /schedules`.
pub(crate) async fn page(ctx: Ctx) -> Response {
    let schedules = match ctx.state.admin.schedules(None).await {
        Ok(list) => list,
        Err(err) if err.kind() == AdminErrorKind::UnknownStream => Vec::new(),
        Err(err) => {
            let (status, why) = admin_failure(err);
            return ctx.error_page(status, "Schedules unavailable", &why);
        }
    };
    let body = html! {
        h1 { "Schedules" }
        @if schedules.is_empty() {
            p.empty { "No delayed tasks waiting and no periodic schedules." }
        } @else {
            div.table-wrap { table.schedules {
                thead { tr {
                    th { "Kind" } th { "Queue" } th { "Task" } th { "When" } th { "Next" }
                    th.hide-narrow { "Id" }
                    @if ctx.can_act() { th { "" } }
                } }
                tbody { @for s in &schedules {
                    tr data-schedule=(s.id) {
                        td { (match s.kind { ScheduleKind::Delayed => "delayed", _ => "periodic" }) }
                        td { a href=(ctx.url(&page::queue_path(&s.queue))) { (s.queue) } }
                        td.wrap { (s.name) }
                        // A delayed task's spec repeats its due time, shown under Next.
                        td.wrap { @if s.kind == ScheduleKind::Delayed { "once" } @else { (s.spec) } }
                        td { (s.next.map(page::time).unwrap_or_default()) }
                        td.hide-narrow { (s.id) }
                        @if ctx.can_act() { td {
                            form.inline method="post" action=(ctx.url("/actions/cancel")) {
                                (ctx.csrf_field())
                                input type="hidden" name="id" value=(s.id);
                                input type="hidden" name="queue" value=(s.queue);
                                button.small.secondary type="submit" { "Cancel" }
                            }
                        } }
                    }
                } }
            } }
        }
    };
    ctx.render("Schedules", body)
}
