//! `natasks workflow`: the steps of a chain or a group, by the workflow id that
//! `Client::dispatch_workflow` returned.

use clap::Subcommand;
use natasks::workflow::{StepStatus, WorkflowErrorKind, WorkflowState, WorkflowStatus};
use serde_json::{json, Value};

use crate::output::say;
use crate::{output, Error, Global, Result};

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// A workflow's state as a whole (running, succeeded, or failed at which step and
    /// why), then one row per step: index, role, state, attempt, task, queue, task id and
    /// last error. Exits 1 when nothing is recorded under the id.
    Status {
        /// The workflow id.
        id: String,
    },
}

pub async fn run(g: &Global, cmd: WorkflowCommand) -> Result<()> {
    match cmd {
        WorkflowCommand::Status { id } => {
            if id.is_empty()
                || id.len() > natasks::track::MAX_ID
                || id.chars().any(char::is_control)
            {
                return Err(Error::msg(format!(
                    "invalid workflow id {:?}: it must be 1 to {} bytes without control characters",
                    output::clip(&id, 40),
                    natasks::track::MAX_ID
                )));
            }
            status(g, &id).await
        }
    }
}

async fn status(g: &Global, id: &str) -> Result<()> {
    let client = crate::conn::client(g).await?;
    let status = client.workflow_status(id).await.map_err(|err| {
        let hint = match err.kind() {
            WorkflowErrorKind::Unknown => " (never dispatched, or its records expired)",
            _ => "",
        };
        Error::msg(format!("{}{hint}", crate::one_line(&err)))
    })?;
    if g.json {
        output::json(&status_json(&status));
        return Ok(());
    }
    let state = match &status.state {
        WorkflowState::Failed { step, state, error } => {
            let error = error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            format!("failed at step {step} ({state}{error})")
        }
        other => other.as_str().to_owned(),
    };
    say!(
        "workflow {} ({} {:?}, dispatched {}): {state}",
        status.id,
        status.kind.as_str(),
        status.name,
        output::time(status.created_at)
    );
    let rows: Vec<Vec<String>> = status.steps.iter().map(row).collect();
    output::table(
        &["STEP", "ROLE", "STATE", "ATTEMPT", "TASK", "QUEUE", "ID", "LAST ERROR"],
        &rows,
    );
    Ok(())
}

fn row(step: &StepStatus) -> Vec<String> {
    vec![
        step.index.to_string(),
        step.role.as_str().to_owned(),
        step.state.as_str().to_owned(),
        step.attempt.to_string(),
        step.task.clone(),
        step.queue.clone(),
        step.id.clone(),
        step.last_error.as_deref().map(|e| output::clip(e, 60)).unwrap_or_default(),
    ]
}

fn status_json(status: &WorkflowStatus) -> Value {
    let failed = match &status.state {
        WorkflowState::Failed { step, state, error } => {
            json!({ "step": step, "state": state, "error": error })
        }
        _ => Value::Null,
    };
    let steps: Vec<Value> = status
        .steps
        .iter()
        .map(|s| {
            json!({
                "index": s.index,
                "role": s.role.as_str(),
                "state": s.state.as_str(),
                "attempt": s.attempt,
                "task": s.task,
                "queue": s.queue,
                "id": s.id,
                "last_error": s.last_error,
            })
        })
        .collect();
    json!({
        "id": status.id,
        "name": status.name,
        "kind": status.kind.as_str(),
        "state": status.state.as_str(),
        "failed": failed,
        "created_at": output::time(status.created_at),
        "steps": steps,
    })
}
