//! Dispatching a workflow: its plan first, then its first tasks and its start marker in
//! one atomic batch.

use std::collections::HashSet;

use time::OffsetDateTime;

use super::plan::{self, Kind, Plan, StepPlan, Written};
use super::{
    Chain, Group, Workflow, WorkflowError, WorkflowErrorKind, WorkflowReceipt, HEADER_WORKFLOW,
    HEADER_WORKFLOW_STEP, MAX_STEPS,
};
use crate::batch::{self, publish_atomic, BatchPublishError, Outgoing};
use crate::client::Client;
use crate::task::Task;
use crate::track::client::TrackedDispatch;
use crate::track::{Event, EventKind, DEFAULT_RETENTION};

/// A step ready to go: its message and what its record says.
pub(super) struct Ready {
    pub(super) outgoing: Outgoing,
    /// The task's own guard (a unique key's marker), stored just before it.
    pub(super) guard: Option<Outgoing>,
    pub(super) tracked: TrackedDispatch,
}

impl Client {
    /// Dispatches a [`Chain`] or a [`Group`]: stores its plan, then its first tasks (a
    /// chain's first step, or every member of a group) in one atomic batch, all or none.
    /// The steps after them are dispatched by the workers, each exactly once (see
    /// [`workflow`](crate::workflow)).
    ///
    /// Everything is checked before anything is stored: an empty workflow, too many steps
    /// ([`MAX_STEPS`]), two steps with one id, a later chain step or a callback with a
    /// payload of its own, or any invalid task fails with nothing published.
    pub async fn dispatch_workflow(
        &self,
        workflow: impl Into<Workflow>,
    ) -> Result<WorkflowReceipt, WorkflowError> {
        let id = nuid::next().to_string();
        let (plan, first) = self.plan(&id, workflow.into())?;
        if !self.atomic() {
            let version = self.stream().0.client().server_info().version;
            let message = crate::stream::lacking_atomic(
                "workflows need atomic batches and markers",
                &version,
            );
            return Err(WorkflowError::new(WorkflowErrorKind::Unsupported, message));
        }
        let tracker = self.tracker();
        // The plan goes first: a worker ending a first step reads it. Should the batch
        // below fail, or this process die before it, the plan is never read (no stored
        // task names this workflow) and expires with its retention.
        match plan::write(tracker, &id, &plan, 0).await? {
            Written::Yes => {}
            Written::Conflict => {
                return Err(WorkflowError::new(
                    WorkflowErrorKind::Broker,
                    format!("a workflow with id {id:?} is already recorded"),
                ))
            }
            Written::TooLarge => {
                return Err(WorkflowError::new(
                    WorkflowErrorKind::TooLarge,
                    format!(
                    "the plan of workflow {:?} ({} steps) is larger than the server's max_payload",
                    plan.name,
                    plan.steps.len() + usize::from(plan.callback.is_some())
                ),
                ))
            }
        }
        let (js, settings) = self.stream();
        let mut batch = Vec::with_capacity(first.len() + 1);
        batch.push(plan::marker(&settings.subject_prefix, &id, "start", plan.retention));
        let mut tracked = Vec::with_capacity(first.len());
        for ready in first {
            batch.extend(ready.guard);
            // Where the task lands in the batch.
            let at = batch.len();
            batch.push(ready.outgoing);
            tracked.push((at, ready.tracked));
        }
        let announced = tracked.iter().map(|(_, step)| announce(tracker, step, &id));
        futures_util::future::join_all(announced).await;
        let ack = match publish_atomic(js, batch).await {
            Ok(ack) => ack,
            Err(err) => {
                let what = format!("the first tasks of workflow {:?}", plan.name);
                let err = batch_error(&id, what, err);
                // Announced as dispatched, and not stored: their end is announced too
                // (unless they may have been stored).
                if err.kind() != WorkflowErrorKind::Timeout {
                    let failed = tracked.iter().map(|(_, step)| refused(tracker, step, &id, &err));
                    futures_util::future::join_all(failed).await;
                }
                return Err(err);
            }
        };
        // The batch holds consecutive sequences. The records are written side by side: a
        // group's members are many.
        let records =
            tracked.iter().map(|(at, step)| step.stored(tracker, ack.sequence(*at), false));
        futures_util::future::join_all(records).await;
        let mut steps: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
        steps.extend(plan.callback.iter().map(|c| c.id.clone()));
        Ok(WorkflowReceipt { id, steps })
    }

    /// Checks `workflow` and turns it into its plan and its first messages.
    fn plan(&self, id: &str, workflow: Workflow) -> Result<(Plan, Vec<Ready>), WorkflowError> {
        let (kind, name, steps, callback) = match workflow {
            Workflow::Chain(Chain { name, steps }) => (Kind::Chain, name, steps, None),
            Workflow::Group(Group { name, members, callback }) => {
                (Kind::Group, name, members, callback)
            }
        };
        let what = match kind {
            Kind::Chain => "chain",
            Kind::Group => "group",
        };
        if steps.is_empty() {
            return Err(invalid(format!("{what} {name:?} has no steps")));
        }
        let total = steps.len() + usize::from(callback.is_some());
        if total > MAX_STEPS {
            return Err(invalid(format!(
                "{what} {name:?} has {total} steps; a workflow has at most {MAX_STEPS}"
            )));
        }
        let mut plan = Plan {
            kind,
            name: name.clone(),
            created: OffsetDateTime::now_utc(),
            retention: 0,
            steps: Vec::with_capacity(steps.len()),
            callback: None,
            ended: Default::default(),
        };
        let mut ids = HashSet::new();
        let mut first = Vec::new();
        for (index, (task, queue)) in steps.into_iter().enumerate() {
            let later = kind == Kind::Chain && index > 0;
            if later && !task.payload().is_empty() {
                return Err(invalid(format!(
                    "step {index} ({:?}) of chain {name:?} has a payload; every step after the \
                     first takes the previous step's result as its payload",
                    task.name()
                )));
            }
            let role = match kind {
                Kind::Chain => index.to_string(),
                Kind::Group => format!("m{index}"),
            };
            let (mut step, ready) =
                self.step(id, &name, &role, task, &queue, &mut ids, &mut plan)?;
            if later {
                no_guard(&ready, &name)?;
                step.keep(&ready.outgoing);
            } else {
                first.push(ready);
            }
            plan.steps.push(step);
        }
        if let Some((task, queue)) = callback.map(|boxed| *boxed) {
            if !task.payload().is_empty() {
                return Err(invalid(format!(
                    "the callback ({:?}) of group {name:?} has a payload; it receives the \
                     members' outcomes as its payload",
                    task.name()
                )));
            }
            let (mut step, ready) =
                self.step(id, &name, "callback", task, &queue, &mut ids, &mut plan)?;
            no_guard(&ready, &name)?;
            step.keep(&ready.outgoing);
            plan.callback = Some(step);
        }
        Ok((plan, first))
    }

    /// One step: its id, its message (tracked, with the workflow's headers) and its plan.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        id: &str,
        name: &str,
        role: &str,
        mut task: Task,
        queue: &str,
        ids: &mut HashSet<String>,
        plan: &mut Plan,
    ) -> Result<(StepPlan, Ready), WorkflowError> {
        let step_id = match task.dispatch_id() {
            Some(given) => given.to_owned(),
            None => format!("{id}.{role}"),
        };
        if !ids.insert(step_id.clone()) {
            return Err(invalid(format!(
                "two steps of workflow {name:?} have the id {step_id:?}; every step needs its own"
            )));
        }
        if task.track().is_none() {
            task = task.tracked();
        }
        let retention = match task.track() {
            Some(r) if !r.is_zero() => r.as_secs(),
            _ => DEFAULT_RETENTION.as_secs(),
        };
        plan.retention = plan.retention.max(retention);
        let task_name = task.name().to_owned();
        let task = task
            .with_message_id(step_id.clone())
            .with_header(HEADER_WORKFLOW, id)
            .with_header(HEADER_WORKFLOW_STEP, role);
        let prepared = self.outgoing(task, queue, None).map_err(|err| {
            WorkflowError::with_source(
                WorkflowErrorKind::InvalidTask,
                format!("step {role} ({task_name:?}) of workflow {name:?} cannot be dispatched"),
                err,
            )
        })?;
        let step = StepPlan {
            id: step_id.clone(),
            task: prepared.about.task.clone(),
            queue: prepared.about.queue.clone(),
            subject: None,
            headers: Vec::new(),
        };
        let tracked = prepared.track.unwrap_or(TrackedDispatch {
            id: step_id,
            queue: prepared.about.queue,
            task: prepared.about.task,
            retention,
            due: None,
            schedule: None,
            unique_key: None,
        });
        let ready = Ready { outgoing: prepared.message, guard: prepared.marker, tracked };
        Ok((step, ready))
    }
}

/// The `dispatched` event of a step, naming its workflow.
pub(super) async fn announce(tracker: &crate::track::Tracker, step: &TrackedDispatch, id: &str) {
    let mut event = Event::new(EventKind::Dispatched, &step.id, &step.queue, &step.task, 0);
    event.workflow = Some(id.to_owned());
    event.publish(tracker).await;
}

/// Announces that step `step` of workflow `id`, announced as dispatched, was not stored.
async fn refused(
    tracker: &crate::track::Tracker,
    step: &TrackedDispatch,
    id: &str,
    error: &WorkflowError,
) {
    let mut event = Event::new(EventKind::Failed, &step.id, &step.queue, &step.task, 0);
    event.workflow = Some(id.to_owned());
    event.error = Some(error.to_string());
    event.publish(tracker).await;
}

/// A step dispatched later by a worker cannot carry a guard of its own: its marker is the
/// workflow's.
fn no_guard(ready: &Ready, name: &str) -> Result<(), WorkflowError> {
    match ready.guard {
        Some(_) => Err(invalid(format!(
            "step {:?} of workflow {name:?} is unique or throttled; only the first tasks of a \
             workflow may be",
            ready.tracked.id
        ))),
        None => Ok(()),
    }
}

/// The server's error code for a message larger than the stream accepts.
const MESSAGE_TOO_LARGE: u64 = 10054;

/// The error of a batch the server did not store. `what` names what it held.
pub(super) fn batch_error(id: &str, what: String, err: BatchPublishError) -> WorkflowError {
    let (kind, problem) = match &err {
        BatchPublishError::Timeout(_) => (
            WorkflowErrorKind::Timeout,
            format!(
                "may have been stored: the server did not confirm them in time; see the \
                 status of workflow {id:?} before dispatching it again"
            ),
        ),
        BatchPublishError::Empty | BatchPublishError::TooLarge(_) => {
            (WorkflowErrorKind::InvalidWorkflow, "do not fit in one atomic batch".to_owned())
        }
        BatchPublishError::Refused { code: batch::ATOMIC_DISABLED, .. } => (
            WorkflowErrorKind::Unsupported,
            "need atomic batches, which the stream does not allow (nats-server 2.12 or newer)"
                .to_owned(),
        ),
        BatchPublishError::Refused { code: MESSAGE_TOO_LARGE, .. }
        | BatchPublishError::MessageTooLarge { .. } => {
            (WorkflowErrorKind::TooLarge, "are larger than the server's max_payload".to_owned())
        }
        _ => (WorkflowErrorKind::Broker, "were not stored".to_owned()),
    };
    let error = WorkflowError::with_source(kind, format!("{what} {problem}"), err);
    match kind {
        WorkflowErrorKind::Timeout => error.for_workflow(id),
        _ => error,
    }
}

fn invalid(message: String) -> WorkflowError {
    WorkflowError::new(WorkflowErrorKind::InvalidWorkflow, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unconfirmed commit may have stored the workflow: the error says so, apart from
    /// a refusal, and names the workflow so that the caller can look at its status
    /// instead of dispatching a second copy.
    #[test]
    fn an_unconfirmed_batch_may_be_stored() {
        let timeout = BatchPublishError::Timeout("no reply".into());
        let err = batch_error("w1", "the first tasks of workflow \"nightly\"".to_owned(), timeout);
        assert_eq!(err.kind(), WorkflowErrorKind::Timeout);
        assert_eq!(err.workflow(), Some("w1"));
        assert!(err.to_string().contains("may have been stored"), "{err}");
        let sent = BatchPublishError::Send("no connection".into());
        let err = batch_error("w1", "the first tasks".to_owned(), sent);
        assert_eq!(err.kind(), WorkflowErrorKind::Broker);
        assert_eq!(err.workflow(), None, "nothing of it was stored");
    }
}
