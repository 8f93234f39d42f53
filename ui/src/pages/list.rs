//! A table of tasks, shared by the queue page and search, and the search filter as form
//! fields.

use maud::{html, Markup};
use natasks::admin::{Filter, TaskState, TaskSummary};
use serde::Deserialize;

use crate::page::{self, Ctx};

/// The filter fields of the search form, also carried by "all matching" actions.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct FilterFields {
    /// Task name; a trailing `*` matches a prefix.
    #[serde(default)]
    pub(crate) name: String,
    /// `Header-Name=value`.
    #[serde(default)]
    pub(crate) header: String,
    /// Text the payload contains.
    #[serde(default)]
    pub(crate) payload: String,
    /// `dotted.path=json value`.
    #[serde(default)]
    pub(crate) json: String,
    /// Text the last error contains.
    #[serde(default)]
    pub(crate) error: String,
}

impl FilterFields {
    /// The fields and their values, for hidden inputs and links.
    pub(crate) fn pairs(&self) -> [(&'static str, &str); 5] {
        [
            ("name", &self.name),
            ("header", &self.header),
            ("payload", &self.payload),
            ("json", &self.json),
            ("error", &self.error),
        ]
    }

    /// The given conditions in words, such as `last error contains "timeout"`.
    pub(crate) fn conditions(&self) -> Vec<String> {
        let given = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        [
            given(&self.name).map(|v| format!("name is {v:?}")),
            given(&self.header).map(|v| format!("header {v}")),
            given(&self.payload).map(|v| format!("payload contains {v:?}")),
            given(&self.json).map(|v| format!("JSON field {v}")),
            given(&self.error).map(|v| format!("last error contains {v:?}")),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Whether any condition is given.
    pub(crate) fn is_empty(&self) -> bool {
        self.pairs().iter().all(|(_, v)| v.trim().is_empty())
    }

    /// The library's filter; a malformed field is an error naming it.
    pub(crate) fn filter(&self) -> Result<Filter, String> {
        let mut filter = Filter::new();
        let given = |s: &str| Some(s.trim()).filter(|s| !s.is_empty()).map(str::to_owned);
        if let Some(name) = given(&self.name) {
            filter = filter.name(name);
        }
        if let Some(header) = given(&self.header) {
            let Some((key, value)) = header.split_once('=') else {
                return Err(format!("header filter {header:?} must be Name=value"));
            };
            filter = filter.header(key.trim(), value.trim());
        }
        if let Some(text) = given(&self.payload) {
            filter = filter.payload_contains(text);
        }
        if let Some(json) = given(&self.json) {
            let Some((path, value)) = json.split_once('=') else {
                return Err(format!("JSON filter {json:?} must be path=value"));
            };
            let value = serde_json::from_str(value.trim())
                .unwrap_or_else(|_| serde_json::Value::String(value.trim().to_owned()));
            filter = filter.json_field(path.trim(), value);
        }
        if let Some(text) = given(&self.error) {
            filter = filter.error_contains(text);
        }
        filter.validate().map_err(|err| err.to_string())?;
        Ok(filter)
    }
}

/// The per-row actions of a task: requeue (dead letters) and delete.
pub(crate) fn row_actions(ctx: &Ctx, task: &TaskSummary) -> Markup {
    html! {
        @if ctx.can_act() {
            span.row-actions {
                @if task.state == TaskState::Dead {
                    (one_task_form(ctx, "requeue", task, "Requeue"))
                }
                (one_task_form(ctx, "delete", task, "Delete"))
            }
        }
    }
}

fn one_task_form(ctx: &Ctx, action: &str, task: &TaskSummary, label: &str) -> Markup {
    html! {
        form.inline method="post" action=(ctx.url(&format!("/actions/{action}"))) {
            (ctx.csrf_field())
            input type="hidden" name="queue" value=(task.queue);
            input type="hidden" name="state" value=(task.state.as_str());
            input type="hidden" name="seq" value=(task.sequence);
            button.small.secondary[action == "delete"] type="submit" { (label) }
        }
    }
}

/// A table of tasks; `show_queue` adds the queue column (search spans queues).
pub(crate) fn table(ctx: &Ctx, tasks: &[TaskSummary], show_queue: bool) -> Markup {
    let dead = tasks.iter().any(|t| t.state == TaskState::Dead);
    let scheduled = tasks.iter().any(|t| t.due.is_some());
    let ids = tasks.iter().any(|t| t.id.is_some());
    html! {
        div.table-wrap {
            table.tasks {
                thead { tr {
                    th { "#" }
                    @if ctx.can_act() { th { "" } }
                    @if show_queue { th { "Queue" } th { "State" } }
                    th { "Task" }
                    @if ids { th.hide-narrow { "Id" } }
                    th { "Stored" }
                    @if scheduled { th { "Due" } }
                    @if dead { th.num { "Attempts" } th { "Last error" } }
                    th.num.hide-narrow { "Bytes" }
                } }
                tbody {
                    @for task in tasks {
                        tr data-seq=(task.sequence) {
                            td { a href=(ctx.url(&format!("/tasks/{}", task.sequence))) { (task.sequence) } }
                            // Actions come before the wide columns, on screen on a phone.
                            @if ctx.can_act() { td { (row_actions(ctx, task)) } }
                            @if show_queue {
                                td { a href=(ctx.url(&page::queue_path(&task.queue))) { (task.queue) } }
                                td { (task.state.as_str()) }
                            }
                            td.wrap { (task.name) }
                            @if ids { td.hide-narrow { (task.id.as_deref().unwrap_or("")) } }
                            td title=(page::time(task.stored_at)) { (page::age(task.stored_at)) " ago" }
                            @if scheduled { td { (task.due.map(page::time).unwrap_or_default()) } }
                            @if dead {
                                td.num { (task.attempts.map(|a| a.to_string()).unwrap_or_default()) }
                                td.wrap { (task.last_error.as_deref().unwrap_or("")) }
                            }
                            td.num.hide-narrow { (task.size) }
                        }
                    }
                }
            }
        }
    }
}
