//! A queue: its counts and controls, and its tasks in one state, a page at a time.

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;
use natasks::admin::TaskState;
use serde::Deserialize;

use crate::actions::admin_failure;
use crate::page::{self, urlencode, Ctx};
use crate::pages::list;
use crate::pages::overview::{pause_form, state_text};

/// Tasks on one page.
pub(crate) const PAGE_SIZE: usize = 50;

/// Which tasks to list.
#[derive(Deserialize, Default)]
pub(crate) struct Listing {
    state: Option<String>,
    after: Option<u64>,
}

/// `GET /queues/{queue}?state=…&after=…`.
pub(crate) async fn page(
    ctx: Ctx,
    Path(queue): Path<String>,
    Query(listing): Query<Listing>,
) -> Response {
    let state = match listing.state.as_deref().unwrap_or("pending").parse::<TaskState>() {
        Ok(state) => state,
        Err(err) => {
            return ctx.error_page(StatusCode::BAD_REQUEST, "Bad request", &err.to_string())
        }
    };
    let admin = &ctx.state.admin;
    // The counts and the page from one reading of the stream.
    let (info, tasks) = match admin.queue_tasks(&queue, state, listing.after, PAGE_SIZE).await {
        Ok(both) => both,
        Err(err) => {
            let (status, why) = admin_failure(err);
            return ctx.error_page(status, "Queue unavailable", &why);
        }
    };
    let here = ctx.url(&page::queue_path(&queue));
    let count = |s: TaskState| match s {
        TaskState::Pending => Some(info.pending),
        TaskState::InFlight => Some(info.in_flight),
        TaskState::Dead => Some(info.dead_letters),
        TaskState::Scheduled => Some(info.scheduled),
        _ => None,
    };
    let body = html! {
        h1 { "Queue " (queue) }
        div.actions {
            span { (state_text(&info)) }
            @if ctx.can_act() {
                (pause_form(&ctx, &info))
                a.button href=(ctx.url(&format!("/dispatch?queue={}", urlencode(&queue)))) { "Dispatch to this queue" }
            }
        }
        nav.tabs {
            @for s in TaskState::ALL {
                a.current[s == state] href=(format!("{here}?state={}", s.as_str())) {
                    (label(s))
                    @if let Some(n) = count(s) { " (" (n) ")" }
                }
            }
        }
        @if tasks.items.is_empty() {
            p.empty { "No " (label(state).to_lowercase()) " tasks." }
        } @else {
            (list::table(&ctx, &tasks.items, false))
        }
        div.pager {
            @if listing.after.is_some() {
                a href=(format!("{here}?state={}", state.as_str())) { "« First page" }
            }
            @if let Some(next) = tasks.next {
                a href=(format!("{here}?state={}&after={next}", state.as_str())) { "Next page »" }
            }
        }
        @if ctx.can_act() && !tasks.items.is_empty() {
            div.actions {
                @if state == TaskState::Dead {
                    (all_form(&ctx, "requeue", &queue, state, "Requeue all dead letters…"))
                }
                (all_form(&ctx, "delete", &queue, state, &format!("Delete all {} tasks…", label(state).to_lowercase())))
            }
        }
    };
    ctx.render(&format!("Queue {queue}"), body)
}

fn all_form(ctx: &Ctx, action: &str, queue: &str, state: TaskState, text: &str) -> maud::Markup {
    html! {
        form.inline method="post" action=(ctx.url(&format!("/actions/{action}"))) {
            (ctx.csrf_field())
            input type="hidden" name="queue" value=(queue);
            input type="hidden" name="state" value=(state.as_str());
            input type="hidden" name="all" value="1";
            button.secondary[action == "delete"] type="submit" { (text) }
        }
    }
}

/// A state as a tab label.
pub(crate) fn label(state: TaskState) -> &'static str {
    match state {
        TaskState::Pending => "Pending",
        TaskState::InFlight => "In flight",
        TaskState::Scheduled => "Scheduled",
        TaskState::Dead => "Dead",
        _ => "Other",
    }
}
