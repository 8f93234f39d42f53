//! Search: tasks by name, header, payload, JSON field or last error, in one queue or all,
//! in one state or all; and the "all matching" actions on the result.

use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};
use natasks::admin::{SearchOptions, TaskState};
use serde::Deserialize;

use crate::actions::admin_failure;
use crate::page::Ctx;
use crate::pages::list::{self, FilterFields};
use crate::pages::queue::label;

/// Results on the page.
const LIMIT: usize = 100;

/// The search form.
#[derive(Deserialize, Default)]
pub(crate) struct SearchQuery {
    #[serde(default)]
    queue: String,
    #[serde(default)]
    state: String,
    #[serde(flatten)]
    filter: FilterFields,
}

/// `GET /search?…`: the form, and the results once anything is asked.
pub(crate) async fn page(ctx: Ctx, Query(query): Query<SearchQuery>) -> Response {
    let asked =
        !query.queue.trim().is_empty() || !query.state.is_empty() || !query.filter.is_empty();
    let results = if asked { Some(run(&ctx, &query).await) } else { None };
    let results = match results {
        Some(Err((status, why))) => return ctx.error_page(status, "Search failed", &why),
        Some(Ok(found)) => Some(found),
        None => None,
    };
    let body = html! {
        h1 { "Search" }
        (form(&query))
        @if let Some((items, scanned, truncated)) = &results {
            p.hint {
                (items.len()) " found, " (scanned) (if *scanned == 1 { " message read" } else { " messages read" })
                @if *truncated { ". More may match: narrow the search." }
            }
            @if !items.is_empty() {
                (list::table(&ctx, items, true))
                (bulk(&ctx, &query))
            }
        }
    };
    ctx.render("Search", body)
}

type Found = (Vec<natasks::admin::TaskSummary>, u64, bool);

async fn run(ctx: &Ctx, query: &SearchQuery) -> Result<Found, (StatusCode, String)> {
    let filter = query.filter.filter().map_err(|why| (StatusCode::BAD_REQUEST, why))?;
    let mut options = SearchOptions { limit: LIMIT, ..SearchOptions::default() };
    if !query.queue.trim().is_empty() {
        options.queue = Some(query.queue.trim().to_owned());
    }
    if !query.state.is_empty() {
        let state = query
            .state
            .parse::<TaskState>()
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        options.states = vec![state];
    }
    let result = ctx.state.admin.search(&filter, &options, |_| {}).await.map_err(admin_failure)?;
    Ok((result.items, result.scanned, result.truncated))
}

fn form(query: &SearchQuery) -> Markup {
    let f = &query.filter;
    html! {
        form.card.search method="get" {
            label { "Queue" input name="queue" value=(query.queue) placeholder="every queue"; }
            label { "State" select name="state" {
                option value="" selected[query.state.is_empty()] { "any" }
                @for s in TaskState::ALL {
                    option value=(s.as_str()) selected[query.state == s.as_str()] { (label(s)) }
                }
            } }
            label { "Task name" input name="name" value=(f.name) placeholder="emails.*"; }
            label { "Header" input name="header" value=(f.header) placeholder="X-Tenant=acme"; }
            label { "Payload contains" input name="payload" value=(f.payload); }
            label { "JSON field" input name="json" value=(f.json) placeholder="user.id=42"; }
            label { "Last error contains" input name="error" value=(f.error); }
            button type="submit" { "Search" }
        }
    }
}

/// "Requeue all matching" (dead letters of one queue) and "Delete all matching" (one queue,
/// one state): the filter travels with the form and the server applies it again.
fn bulk(ctx: &Ctx, query: &SearchQuery) -> Markup {
    let queue = query.queue.trim();
    let state = query.state.parse::<TaskState>().ok();
    html! {
        @if ctx.can_act() {
            @if let (false, Some(state)) = (queue.is_empty(), state) {
                div.actions {
                    @if state == TaskState::Dead { (all_matching(ctx, "requeue", queue, state, query, "Requeue all matching…")) }
                    (all_matching(ctx, "delete", queue, state, query, "Delete all matching…"))
                }
            } @else {
                p.hint { "Choose a queue and a state to requeue or delete all matching tasks." }
            }
        }
    }
}

fn all_matching(
    ctx: &Ctx,
    action: &str,
    queue: &str,
    state: TaskState,
    query: &SearchQuery,
    text: &str,
) -> Markup {
    html! {
        form.inline method="post" action=(ctx.url(&format!("/actions/{action}"))) {
            (ctx.csrf_field())
            input type="hidden" name="queue" value=(queue);
            input type="hidden" name="state" value=(state.as_str());
            input type="hidden" name="all" value="1";
            @for (name, value) in query.filter.pairs() {
                @if !value.trim().is_empty() { input type="hidden" name=(name) value=(value); }
            }
            button.secondary type="submit" { (text) }
        }
    }
}
