//! The worker's side: when a step of a workflow ends, dispatch what comes next, once.
//!
//! Runs after the step's outcome is recorded and before the step is acknowledged, so
//! there is no crash window: a worker that dies anywhere in here has not acknowledged the
//! step, which is delivered again; the rerun ends the same way and comes here again, where
//! the markers and the group's record make every repeat a no-op:
//!
//! * before the batch is stored: nothing of it is (atomic), the rerun stores it;
//! * after it is stored: the rerun's batch is refused whole by its marker (the subject
//!   already holds a message), which says the next task is stored;
//! * a group member's end is added to the group's record by compare-and-set, once: a rerun
//!   finds itself there, and publishes the callback if the set is complete (the marker
//!   makes that one callback whoever publishes it and however often).

use std::collections::btree_map::Entry;

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde_json::value::RawValue;

use super::plan::{self, Ended, Kind, Plan, StepPlan, Written};
use super::status::{GroupResults, MemberOutcome};
use super::{WorkflowError, WorkflowErrorKind, HEADER_WORKFLOW, HEADER_WORKFLOW_STEP};
use crate::batch::{self, publish_atomic};
use crate::track::client::TrackedDispatch;
use crate::track::worker::{clip, MAX_ERROR};
use crate::track::Tracker;
use crate::wire;

/// Which step of which workflow a received task is, from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepRef {
    pub(crate) workflow: String,
    /// The task's id: a step is only the task the plan names for it.
    id: String,
    role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Chain(usize),
    Member(usize),
    Callback,
}

impl StepRef {
    /// The step a task is, if its headers name a workflow and a step.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let workflow = headers.get(HEADER_WORKFLOW)?.as_str().to_owned();
        let id = wire::task_id(headers)?.to_owned();
        let step = headers.get(HEADER_WORKFLOW_STEP)?.as_str();
        let role = if step == "callback" {
            Role::Callback
        } else if let Some(member) = step.strip_prefix('m') {
            Role::Member(member.parse().ok()?)
        } else {
            Role::Chain(step.parse().ok()?)
        };
        Some(Self { workflow, id, role })
    }
}

impl StepRef {
    /// Whether this task is `planned`, the step its headers name.
    fn is_planned(&self, planned: Option<&StepPlan>) -> bool {
        planned.is_some_and(|planned| planned.id == self.id)
    }
}

/// How a step ended, as the workflow sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StepEnd<'a> {
    /// With the handler's result (JSON), if any.
    Succeeded(Option<&'a [u8]>),
    /// Without success: the final state's label and the error.
    Ended { state: &'static str, error: Option<&'a str> },
}

/// Dispatches what follows `step`'s end: a chain's next step, or a group's callback once
/// every member ended. Returns once that is stored (or found stored).
pub(crate) async fn advance(
    tracker: &Tracker,
    step: &StepRef,
    end: StepEnd<'_>,
) -> Result<(), WorkflowError> {
    match step.role {
        // A chain stops at a step that did not succeed: its status shows where and why.
        Role::Chain(_) if matches!(end, StepEnd::Ended { .. }) => Ok(()),
        Role::Chain(index) => {
            let StepEnd::Succeeded(result) = end else { return Ok(()) };
            let Some((plan, _)) = plan::read(tracker, &step.workflow).await? else {
                return gone(step);
            };
            if plan.kind != Kind::Chain || !step.is_planned(plan.steps.get(index)) {
                return not_planned(step);
            }
            let Some((next_index, next)) =
                index.checked_add(1).and_then(|next| Some((next, plan.steps.get(next)?)))
            else {
                return Ok(());
            };
            let payload = Bytes::copy_from_slice(result.unwrap_or(b"null"));
            let mark = next_index.to_string();
            let sent = dispatch_guarded(tracker, &step.workflow, &plan, next, &mark, payload).await;
            never_fits(tracker, &step.workflow, &plan, next, sent).await
        }
        Role::Member(index) => member_ended(tracker, step, index, end).await,
        Role::Callback => Ok(()),
    }
}

/// How soon a step whose follower could not be dispatched comes back.
pub(crate) const FOLLOW_RETRY: Duration = Duration::from_secs(1);

/// [`advance`], tried three times over half a second; the error to hand the step back
/// with if it still fails (the step then comes back and tries again).
pub(crate) async fn advance_retrying(
    tracker: &Tracker,
    step: &StepRef,
    end: StepEnd<'_>,
) -> Result<(), String> {
    let mut last = None;
    for pause in [0, 100, 500] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        match advance(tracker, step, end).await {
            Ok(()) => return Ok(()),
            Err(err) => last = Some(err),
        }
    }
    let error = last.map(|err| err.to_string()).unwrap_or_default();
    tracing::warn!(workflow = %step.workflow, %error, "could not dispatch what follows the step; handing it back");
    Err(format!("workflow {}: {error}", step.workflow))
}

/// Records a member's end in the group's record, then publishes the callback if every
/// member has ended.
async fn member_ended(
    tracker: &Tracker,
    step: &StepRef,
    index: usize,
    end: StepEnd<'_>,
) -> Result<(), WorkflowError> {
    let mut shed = false;
    // Members end at once by the hundred: a lost race rereads and tries again.
    for _ in 0..1000 {
        let Some((mut plan, revision)) = plan::read(tracker, &step.workflow).await? else {
            return gone(step);
        };
        if plan.kind != Kind::Group || !step.is_planned(plan.steps.get(index)) {
            return not_planned(step);
        }
        let budget = member_budget(tracker, plan.steps.len());
        if let Entry::Vacant(slot) = plan.ended.entry(index) {
            slot.insert(member_end(end, budget));
            if shed {
                shed_results(&mut plan);
            }
            match plan::write(tracker, &step.workflow, &plan, revision).await? {
                Written::Yes => {}
                // Another member ended at the same moment: back off a little, at random,
                // so that a group ending at once does not retry in lockstep.
                Written::Conflict => {
                    let jitter = std::hash::BuildHasher::hash_one(
                        &std::collections::hash_map::RandomState::new(),
                        index,
                    ) % 4_000;
                    tokio::time::sleep(Duration::from_micros(500 + jitter)).await;
                    continue;
                }
                // Left over from records written before results had a budget, or a
                // plan that takes most of the room: keep every end, no result.
                Written::TooLarge if !shed => {
                    shed = true;
                    continue;
                }
                Written::TooLarge => {
                    return Err(WorkflowError::new(
                        WorkflowErrorKind::TooLarge,
                        format!("the record of group {:?} outgrew max_payload", plan.name),
                    ))
                }
            }
        }
        if plan.ended.len() < plan.steps.len() {
            return Ok(());
        }
        let Some(callback) = &plan.callback else { return Ok(()) };
        let results = group_results(&step.workflow, &plan, true);
        let payload = Bytes::from(serde_json::to_vec(&results).unwrap_or_default());
        let sent =
            dispatch_guarded(tracker, &step.workflow, &plan, callback, "callback", payload).await;
        let sent = match sent {
            Err(err) if err.kind() == WorkflowErrorKind::TooLarge => {
                let results = group_results(&step.workflow, &plan, false);
                let payload = Bytes::from(serde_json::to_vec(&results).unwrap_or_default());
                dispatch_guarded(tracker, &step.workflow, &plan, callback, "callback", payload)
                    .await
            }
            sent => sent,
        };
        return never_fits(tracker, &step.workflow, &plan, callback, sent).await;
    }
    Err(WorkflowError::new(
        WorkflowErrorKind::Broker,
        format!("the record of workflow {:?} kept changing; not recorded", step.workflow),
    ))
}

/// The room a member's result (or error) may take in its group's record: an even share of
/// half the server's max_payload, so that the record of every member's end always fits.
fn member_budget(tracker: &Tracker, members: usize) -> usize {
    let max_payload = tracker.js().client().server_info().max_payload;
    max_payload / 2 / members.max(1)
}

/// How a member ended, as its group's record keeps it: its result only if it fits in the
/// member's `budget`, its error clipped as the member's own record clips it.
fn member_end(end: StepEnd<'_>, budget: usize) -> Ended {
    match end {
        // A result over the member's share of the record is left out: the callback reads
        // it from the member's own record.
        StepEnd::Succeeded(result) => {
            let fits = result.is_none_or(|json| json.len() <= budget);
            Ended {
                state: "succeeded".to_owned(),
                error: None,
                result: result
                    .filter(|_| fits)
                    .and_then(|json| std::str::from_utf8(json).ok())
                    .and_then(|json| RawValue::from_string(json.to_owned()).ok()),
                result_omitted: !fits,
            }
        }
        StepEnd::Ended { state, error } => Ended {
            state: state.to_owned(),
            error: error.map(|error| clip(error, budget.min(MAX_ERROR))),
            result: None,
            result_omitted: false,
        },
    }
}

/// Leaves every result out of a group's record (each marked omitted).
fn shed_results(plan: &mut Plan) {
    for ended in plan.ended.values_mut() {
        if ended.result.take().is_some() {
            ended.result_omitted = true;
        }
    }
}

/// The callback's payload: every member's outcome, with its result unless `with_results`
/// is false (then read by id).
fn group_results(id: &str, plan: &Plan, with_results: bool) -> GroupResults {
    let members = plan
        .steps
        .iter()
        .enumerate()
        .map(|(index, member)| {
            let ended = plan.ended.get(&index);
            let result = ended
                .and_then(|e| e.result.as_ref())
                .filter(|_| with_results)
                .and_then(|raw| serde_json::from_str(raw.get()).ok());
            MemberOutcome {
                index,
                id: member.id.clone(),
                state: ended.map_or_else(String::new, |e| e.state.clone()),
                error: ended.and_then(|e| e.error.clone()),
                result_omitted: ended
                    .is_some_and(|e| e.result_omitted || (!with_results && e.result.is_some())),
                result,
            }
        })
        .collect();
    GroupResults { workflow: id.to_owned(), name: plan.name.clone(), members }
}

/// Publishes `next` with `payload`, guarded by marker `mark`: stored once, whoever
/// publishes it and however often.
async fn dispatch_guarded(
    tracker: &Tracker,
    id: &str,
    plan: &Plan,
    next: &StepPlan,
    mark: &str,
    payload: Bytes,
) -> Result<(), WorkflowError> {
    let Some(outgoing) = next.outgoing(payload) else {
        return Err(WorkflowError::new(
            WorkflowErrorKind::Broker,
            format!("the plan of workflow {id:?} has no message for step {mark}"),
        ));
    };
    let prefix = &tracker.settings().subject_prefix;
    let marker = plan::marker(prefix, id, mark, plan.retention);
    let tracked = tracked(plan, next);
    super::dispatch::announce(tracker, &tracked, id).await;
    match publish_atomic(tracker.js(), vec![marker, outgoing]).await {
        Ok(ack) => {
            tracked.stored(tracker, ack.last, false).await;
            Ok(())
        }
        // The marker is there: this step was dispatched already.
        Err(err) if err.code() == Some(batch::WRONG_LAST_SEQUENCE) => Ok(()),
        Err(err) => {
            Err(super::dispatch::batch_error(id, format!("step {mark} of workflow {id:?}"), err))
        }
    }
}

/// What follows a step cannot be dispatched ever when its message does not fit the
/// server: it is recorded failed, saying why (the workflow's status then shows it failed
/// there), and the step that ended is done. Handing the step back would loop.
async fn never_fits(
    tracker: &Tracker,
    id: &str,
    plan: &Plan,
    next: &StepPlan,
    sent: Result<(), WorkflowError>,
) -> Result<(), WorkflowError> {
    match sent {
        Err(err) if err.kind() == WorkflowErrorKind::TooLarge => {
            let error = err.to_string();
            tracing::error!(id = %next.id, %error, "a workflow step can never be dispatched");
            tracked(plan, next).never_stored(tracker, id, &error).await;
            Ok(())
        }
        sent => sent,
    }
}

/// What the record of step `next` is written from.
fn tracked(plan: &Plan, next: &StepPlan) -> TrackedDispatch {
    TrackedDispatch {
        id: next.id.clone(),
        queue: next.queue.clone(),
        task: next.task.clone(),
        retention: plan.retention,
        due: None,
        schedule: None,
        unique_key: None,
    }
}

/// A task that names a workflow and a step the plan gives another task (a forged or
/// stale header): nothing follows it.
fn not_planned(step: &StepRef) -> Result<(), WorkflowError> {
    tracing::warn!(workflow = %step.workflow, id = %step.id, "the task is not the workflow's step it names; nothing follows it");
    Ok(())
}

/// The plan is gone (expired, or never stored because its dispatch failed): nothing can
/// follow.
fn gone(step: &StepRef) -> Result<(), WorkflowError> {
    tracing::warn!(workflow = %step.workflow, "the workflow's plan is not recorded; nothing follows this step");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_from_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(StepRef::from_headers(&headers), None);
        headers.insert(HEADER_WORKFLOW, "w1");
        headers.insert(HEADER_WORKFLOW_STEP, "2");
        assert_eq!(StepRef::from_headers(&headers), None, "a step has an id");
        headers.insert(wire::HEADER_ID, "w1.2");
        assert_eq!(StepRef::from_headers(&headers).unwrap().role, Role::Chain(2));
        headers.insert(HEADER_WORKFLOW_STEP, "m17");
        assert_eq!(StepRef::from_headers(&headers).unwrap().role, Role::Member(17));
        headers.insert(HEADER_WORKFLOW_STEP, "callback");
        assert_eq!(StepRef::from_headers(&headers).unwrap().role, Role::Callback);
        headers.insert(HEADER_WORKFLOW_STEP, "mx");
        assert_eq!(StepRef::from_headers(&headers), None);
    }
}
