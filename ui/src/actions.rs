//! Actions: each is a POST form, checked (read-only mode, CSRF token, origin), shown once
//! more for confirmation, then run; its outcome is reported on the page it returns to.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Form;
use maud::{html, Markup};
use natasks::admin::{AdminError, AdminErrorKind, Selection, TaskState};
use natasks::{DispatchErrorKind, Task};

use crate::page::{queue_path, Ctx};
use crate::pages::list::FilterFields;
use crate::security;

/// A form's fields.
type Fields = BTreeMap<String, String>;

/// A refused or failed action: its status and why.
type Failure = (StatusCode, String);

/// Where an action leaves the browser and what it tells.
struct Done {
    back: String,
    message: String,
}

/// `POST /actions/{action}`.
pub(crate) async fn handle(
    ctx: Ctx,
    Path(action): Path<String>,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let fields: Fields = fields.into_iter().collect();
    if !ctx.can_act() {
        return ctx.error_page(
            StatusCode::FORBIDDEN,
            "Action refused",
            "the dashboard is read-only: actions are disabled",
        );
    }
    if let Err((status, why)) = security::check_form(
        &ctx.state.allowed_hosts,
        &headers,
        fields.get("csrf").map(String::as_str),
    ) {
        return ctx.error_page(status, "Action refused", &why);
    }
    let Some(what) = describe(&action, &fields) else {
        return ctx.error_page(
            StatusCode::NOT_FOUND,
            "Unknown action",
            &format!("there is no action {action:?}"),
        );
    };
    if let Err((status, why)) = check_fields(&action, &fields) {
        return ctx.error_page(status, "Action refused", &why);
    }
    if fields.get("confirm").map(String::as_str) != Some("yes") {
        return confirm(&ctx, &action, &fields, what);
    }
    match run(&ctx, &action, &fields).await {
        Ok(done) => ctx.redirect_with(&done.back, true, &done.message),
        Err((status, why)) => ctx.error_page(status, "Action failed", &why),
    }
}

/// Refuses a form that leaves what the action acts on unstated: every action but `cancel`
/// needs a queue, a one-task or all-matching requeue or delete needs its state.
fn check_fields(action: &str, fields: &Fields) -> Result<(), Failure> {
    let bad = |why: &str| Err((StatusCode::BAD_REQUEST, why.to_owned()));
    let given = |name: &str| fields.get(name).is_some_and(|v| !v.trim().is_empty());
    if action != "cancel" && !given("queue") {
        return bad("the form names no queue");
    }
    if matches!(action, "requeue" | "delete") && !given("state") {
        return bad("the form names no task state");
    }
    if action == "cancel" && !given("id") {
        return bad("the form names no schedule");
    }
    Ok(())
}

/// What the action will do, in words, or `None` for an unknown action.
fn describe(action: &str, fields: &Fields) -> Option<Markup> {
    let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
    let text = match action {
        "pause" => format!(
            "Pause queue {:?}: workers receive none of its tasks until it is resumed.",
            field("queue")
        ),
        "resume" => format!("Resume queue {:?}.", field("queue")),
        "dispatch" => {
            let delay = fields.get("delay").map(|d| d.trim()).filter(|d| !d.is_empty());
            let when = match delay {
                None => "now".to_owned(),
                Some(seconds) => format!("in {seconds} seconds"),
            };
            let payload = field("payload");
            return Some(html! {
                p { (format!("Dispatch task {:?} to queue {:?} {when}.", field("name"), field("queue"))) }
                @if payload.is_empty() {
                    p { "With an empty payload." }
                } @else {
                    p { "Payload (" (payload.len()) " bytes):" }
                    pre.payload { (payload) }
                }
            });
        }
        "requeue" | "delete" => {
            let verb = if action == "requeue" { "Requeue" } else { "Delete" };
            let (state, queue) = (field("state"), field("queue"));
            if fields.get("all").is_none() {
                format!("{verb} {state} task {} of queue {queue:?}.", field("seq"))
            } else {
                let conditions = filter_fields(fields).conditions();
                if conditions.is_empty() {
                    format!("{verb} every {state} task of queue {queue:?}.")
                } else {
                    return Some(html! {
                        p { (format!("{verb} every {state} task of queue {queue:?} matching all of:")) }
                        ul { @for condition in &conditions { li { (condition) } } }
                    });
                }
            }
        }
        "cancel" => format!("Cancel schedule {:?} of queue {:?}.", field("id"), field("queue")),
        _ => return None,
    };
    Some(html! { p { (text) } })
}

/// The confirmation step: the same form once more, with `confirm=yes`. A dispatch's form
/// also carries a random `nonce`, its message id, so confirming twice dispatches once.
fn confirm(ctx: &Ctx, action: &str, fields: &Fields, what: Markup) -> Response {
    let mut fields = fields.clone();
    if action == "dispatch" {
        fields.insert("nonce".to_owned(), security::random_token());
    }
    let fields = &fields;
    let cancel = fields.get("queue").map(|q| queue_path(q)).unwrap_or_else(|| "/".to_owned());
    let body = html! {
        h1 { "Confirm" }
        div.card {
            (what)
            form.inline method="post" action=(ctx.url(&format!("/actions/{action}"))) {
                @for (name, value) in fields {
                    @if name != "confirm" {
                        input type="hidden" name=(name) value=(value);
                    }
                }
                input type="hidden" name="confirm" value="yes";
                button.danger type="submit" id="confirm" { "Confirm" }
            }
            " "
            a.button href=(ctx.url(&cancel)) { "Cancel" }
        }
    };
    ctx.render("Confirm", body)
}

/// Runs a confirmed action.
async fn run(ctx: &Ctx, action: &str, fields: &Fields) -> Result<Done, Failure> {
    let admin = &ctx.state.admin;
    let queue = fields.get("queue").map(String::as_str).unwrap_or("");
    let back = queue_path(queue);
    match action {
        "pause" => {
            admin.pause(queue, None).await.map_err(admin_failure)?;
            Ok(Done { back: "/".to_owned(), message: format!("Queue {queue:?} paused.") })
        }
        "resume" => {
            admin.resume(queue).await.map_err(admin_failure)?;
            Ok(Done { back: "/".to_owned(), message: format!("Queue {queue:?} resumed.") })
        }
        "dispatch" => dispatch(ctx, queue, fields).await.map(|message| Done { back, message }),
        "requeue" | "delete" => bulk(ctx, action, queue, fields).await,
        "cancel" => {
            let id = fields.get("id").map(String::as_str).unwrap_or("");
            admin.cancel_schedule(id).await.map_err(admin_failure)?;
            Ok(Done {
                back: "/schedules".to_owned(),
                message: format!("Schedule {id:?} cancelled."),
            })
        }
        _ => Err((StatusCode::NOT_FOUND, format!("there is no action {action:?}"))),
    }
}

/// The search fields an "all matching" action carries.
fn filter_fields(fields: &Fields) -> FilterFields {
    let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
    FilterFields {
        name: field("name"),
        header: field("header"),
        payload: field("payload"),
        json: field("json"),
        error: field("error"),
    }
}

/// Requeue (dead letters) or delete one task, or every task of a state matching a filter.
async fn bulk(ctx: &Ctx, action: &str, queue: &str, fields: &Fields) -> Result<Done, Failure> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    let state_text = fields.get("state").map(String::as_str).unwrap_or("");
    let state: TaskState = state_text.parse().map_err(|err: AdminError| bad(err.to_string()))?;
    let selection = if fields.get("all").is_some() {
        Selection::Matching(filter_fields(fields).filter().map_err(bad)?)
    } else {
        let seq = fields.get("seq").map(String::as_str).unwrap_or("");
        Selection::One(
            seq.parse().map_err(|_| bad(format!("task number {seq:?} is not a number")))?,
        )
    };
    let admin = &ctx.state.admin;
    let outcome = if action == "requeue" {
        if state != TaskState::Dead {
            return Err(bad(format!("only dead letters can be requeued, not {state} tasks")));
        }
        admin.requeue(queue, &selection).await
    } else {
        admin.delete(queue, state, &selection).await
    }
    .map_err(admin_failure)?;
    let verb = if action == "requeue" { "Requeued" } else { "Deleted" };
    let mut message = format!(
        "{verb} {} task{} of {queue:?}",
        outcome.done,
        if outcome.done == 1 { "" } else { "s" }
    );
    if outcome.skipped > 0 {
        message.push_str(&format!(", {} already gone", outcome.skipped));
    }
    if let Some((seq, why)) = outcome.failed.first() {
        message.push_str(&format!(", {} failed (task {seq}: {why})", outcome.failed.len()));
    }
    message.push('.');
    if let (Selection::One(_), true) = (&selection, outcome.done == 0) {
        let why = outcome
            .failed
            .first()
            .map(|(_, why)| why.clone())
            .unwrap_or_else(|| "it is gone".to_owned());
        return Err((StatusCode::NOT_FOUND, format!("nothing done: {why}")));
    }
    Ok(Done { back: format!("{}?state={state}", queue_path(queue)), message })
}

async fn dispatch(ctx: &Ctx, queue: &str, fields: &Fields) -> Result<String, Failure> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    let name = fields.get("name").map(|n| n.trim()).unwrap_or("");
    if name.is_empty() {
        return Err(bad("the task needs a name".to_owned()));
    }
    let payload = fields.get("payload").cloned().unwrap_or_default();
    let delay = match fields.get("delay").map(|d| d.trim()).filter(|d| !d.is_empty()) {
        None => None,
        Some(text) => match text.parse::<u64>() {
            Ok(seconds) if seconds > 0 => Some(Duration::from_secs(seconds)),
            _ => {
                return Err(bad(format!("delay {text:?} is not a whole number of seconds above 0")))
            }
        },
    };
    let mut task = Task::new(name, payload.into_bytes());
    // The confirmation form's nonce: a second post of the same form (a double click, a
    // reload) is acknowledged by the stream but not stored again.
    if let Some(nonce) = fields.get("nonce").filter(|n| !n.is_empty()) {
        task = task.with_message_id(format!("natasks-ui-{nonce}"));
    }
    let client = &ctx.state.client;
    let result = match delay {
        None => client.dispatch(task, queue).await,
        Some(delay) => client.dispatch_in(task, queue, delay).await,
    };
    match result {
        Ok(receipt) => Ok(match delay {
            None => format!("Task {name:?} dispatched to {queue:?} (id {}).", receipt.id),
            Some(d) => format!(
                "Task {name:?} scheduled on {queue:?} in {}s (id {}).",
                d.as_secs(),
                receipt.id
            ),
        }),
        Err(err) => {
            let status = match err.kind() {
                DispatchErrorKind::InvalidTask
                | DispatchErrorKind::PayloadTooLarge
                | DispatchErrorKind::InvalidDueTime => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            Err((status, format!("cannot dispatch: {}", natasks::one_line(&err))))
        }
    }
}

/// The status and message of a failed queue operation.
pub(crate) fn admin_failure(err: AdminError) -> Failure {
    let status = match err.kind() {
        AdminErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        AdminErrorKind::UnknownQueue | AdminErrorKind::UnknownStream | AdminErrorKind::NotFound => {
            StatusCode::NOT_FOUND
        }
        AdminErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::BAD_GATEWAY,
    };
    (status, natasks::one_line(&err))
}
