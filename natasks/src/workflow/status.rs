//! Reading a workflow: the state of each step, and the callback's payload.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::plan::{self, Kind, Plan, StepPlan};
use super::{WorkflowError, WorkflowErrorKind};
use crate::client::Client;
use crate::track::{Status, TaskState};

/// What is known of a workflow ([`Client::workflow_status`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WorkflowStatus {
    /// The workflow id.
    pub id: String,
    /// The name it was given.
    pub name: String,
    /// A chain or a group.
    pub kind: WorkflowKind,
    /// Where it is, as a whole.
    pub state: WorkflowState,
    /// When it was dispatched.
    pub created_at: OffsetDateTime,
    /// Every step, in order: a chain's steps, or a group's members then its callback.
    pub steps: Vec<StepStatus>,
}

/// The two shapes of workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkflowKind {
    /// Steps one after the other.
    Chain,
    /// Members in parallel, then a callback.
    Group,
}

impl WorkflowKind {
    /// `chain` or `group`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chain => "chain",
            Self::Group => "group",
        }
    }
}

/// Where a workflow is, as a whole.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WorkflowState {
    /// Steps are still to run.
    Running,
    /// Every step of a chain succeeded; a group's callback succeeded (or, without a
    /// callback, every member did).
    Succeeded,
    /// A step ended without success: a chain stopped there; a group's callback failed (or,
    /// without a callback, a member did).
    Failed {
        /// The index of the step in [`WorkflowStatus::steps`].
        step: usize,
        /// How it ended (`failed`, `dead_lettered`, `cancelled`).
        state: String,
        /// Its last error, if any.
        error: Option<String>,
    },
}

impl WorkflowState {
    /// `running`, `succeeded` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed { .. } => "failed",
        }
    }
}

/// The part a step plays in its workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepRole {
    /// A step of a chain.
    Step,
    /// A member of a group.
    Member,
    /// A group's callback.
    Callback,
}

impl StepRole {
    /// `step`, `member` or `callback`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::Member => "member",
            Self::Callback => "callback",
        }
    }
}

/// Where a step is.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StepState {
    /// Not dispatched yet: what comes before it has not ended (or it never will).
    Waiting,
    /// Dispatched: its task's state.
    Task(TaskState),
    /// Its task's record expired.
    Expired,
}

impl StepState {
    /// `waiting`, `expired`, or the task state's label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Task(state) => state.as_str(),
            Self::Expired => "expired",
        }
    }
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StepStatus {
    /// Its place in [`WorkflowStatus::steps`].
    pub index: usize,
    /// Step, member or callback.
    pub role: StepRole,
    /// Its task id ([`Client::status`](crate::Client::status) and
    /// [`Client::result`](crate::Client::result) go by it).
    pub id: String,
    /// The task name.
    pub task: String,
    /// The queue.
    pub queue: String,
    /// Where it is.
    pub state: StepState,
    /// The attempt that recorded the state (0 before the first).
    pub attempt: u64,
    /// The last error of a failed attempt.
    pub last_error: Option<String>,
}

/// The payload of a group's callback: how every member ended. Take it in the callback's
/// handler as `Json<GroupResults>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupResults {
    /// The workflow id.
    pub workflow: String,
    /// The group's name.
    pub name: String,
    /// Every member, in the order they were added.
    pub members: Vec<MemberOutcome>,
}

/// How one member of a group ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MemberOutcome {
    /// Its place in the group.
    pub index: usize,
    /// Its task id.
    pub id: String,
    /// `succeeded`, `failed`, `dead_lettered` or `cancelled`.
    pub state: String,
    /// Its last error, when it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its handler's result, when it succeeded (and the result fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The result was too large to pass along: read it with
    /// [`Client::result`](crate::Client::result) by [`id`](Self::id).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_omitted: bool,
}

impl MemberOutcome {
    /// Whether the member succeeded.
    pub fn succeeded(&self) -> bool {
        self.state == "succeeded"
    }
}

impl Client {
    /// What is known of workflow `id`: its state as a whole, and every step's.
    ///
    /// A chain's state is that of its steps: running until the last step succeeds, failed
    /// at the first step that ended without success. A group's is its callback's (or, with
    /// none, its members'). Steps not dispatched yet are [`StepState::Waiting`].
    /// The first tasks of a workflow whose dispatch timed out (see
    /// [`WorkflowErrorKind::Timeout`]) are [`TaskState::Pending`] if the server stored them
    /// and [`StepState::Waiting`] if it did not.
    pub async fn workflow_status(&self, id: &str) -> Result<WorkflowStatus, WorkflowError> {
        crate::track::validate_id(id)
            .map_err(|err| WorkflowError::new(WorkflowErrorKind::InvalidId, err.to_string()))?;
        let Some((plan, _)) = plan::read(self.tracker(), id).await? else {
            return Err(WorkflowError::new(
                WorkflowErrorKind::Unknown,
                format!("nothing is recorded for workflow {id:?}"),
            ));
        };
        let (kind, role) = match plan.kind {
            Kind::Chain => (WorkflowKind::Chain, StepRole::Step),
            Kind::Group => (WorkflowKind::Group, StepRole::Member),
        };
        let mut planned: Vec<(StepRole, &StepPlan)> =
            plan.steps.iter().map(|step| (role, step)).collect();
        planned.extend(plan.callback.iter().map(|step| (StepRole::Callback, step)));
        let reads = planned
            .iter()
            .enumerate()
            .map(|(index, (role, step))| self.step_status(index, *role, step));
        let mut steps: Vec<StepStatus> = futures_util::future::try_join_all(reads).await?;
        // The first tasks were stored in one batch with the start marker; a dispatch whose
        // commit was not confirmed in time wrote no records for them. The marker says
        // whether they are queued.
        // (A plan read from the bucket may hold fewer steps than its kind implies.)
        let first = match plan.kind {
            Kind::Chain => 1,
            Kind::Group => plan.steps.len(),
        }
        .min(steps.len());
        let unrecorded = |s: &StepStatus| s.state == StepState::Waiting;
        if steps[..first].iter().any(unrecorded) && self.started(id).await? {
            for step in steps[..first].iter_mut().filter(|s| unrecorded(s)) {
                step.state = StepState::Task(TaskState::Pending);
            }
        }
        let state = overall(&plan, &steps);
        Ok(WorkflowStatus {
            id: id.to_owned(),
            name: plan.name,
            kind,
            state,
            created_at: plan.created,
            steps,
        })
    }

    /// Whether the start marker of workflow `id` is stored: its first tasks are.
    async fn started(&self, id: &str) -> Result<bool, WorkflowError> {
        let (js, settings) = self.stream();
        let broker = |err: crate::BoxError| {
            WorkflowError::with_source(
                WorkflowErrorKind::Broker,
                format!("read the start marker of workflow {id:?}"),
                err,
            )
        };
        let stream = js.get_stream_no_info(&settings.name).await.map_err(|e| broker(e.into()))?;
        let subject = plan::marker(&settings.subject_prefix, id, "start", 0).subject;
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(err) => Err(broker(err.into())),
        }
    }

    async fn step_status(
        &self,
        index: usize,
        role: StepRole,
        step: &StepPlan,
    ) -> Result<StepStatus, WorkflowError> {
        let status = self.status(&step.id).await.map_err(|err| {
            WorkflowError::with_source(
                WorkflowErrorKind::Broker,
                format!("read the status of step {index} ({:?})", step.id),
                err,
            )
        })?;
        let (state, attempt, last_error) = match status {
            Status::Known(task) => (StepState::Task(task.state), task.attempt, task.last_error),
            Status::Expired => (StepState::Expired, 0, None),
            _ => (StepState::Waiting, 0, None),
        };
        Ok(StepStatus {
            index,
            role,
            id: step.id.clone(),
            task: step.task.clone(),
            queue: step.queue.clone(),
            state,
            attempt,
            last_error,
        })
    }
}

/// The workflow's state from its steps'.
fn overall(plan: &Plan, steps: &[StepStatus]) -> WorkflowState {
    let failed = |step: &StepStatus| WorkflowState::Failed {
        step: step.index,
        state: step.state.as_str().to_owned(),
        error: step.last_error.clone(),
    };
    let ended_badly = |step: &StepStatus| match &step.state {
        StepState::Task(state) => state.is_final() && *state != TaskState::Succeeded,
        _ => false,
    };
    let succeeded = |step: &StepStatus| step.state == StepState::Task(TaskState::Succeeded);
    let decisive: Vec<&StepStatus> = match plan.kind {
        Kind::Chain => steps.iter().collect(),
        Kind::Group if plan.callback.is_some() => steps.last().into_iter().collect(),
        Kind::Group => steps.iter().collect(),
    };
    if let Some(bad) = decisive.iter().find(|s| ended_badly(s)) {
        return failed(bad);
    }
    if decisive.iter().all(|s| succeeded(s)) {
        WorkflowState::Succeeded
    } else {
        WorkflowState::Running
    }
}
