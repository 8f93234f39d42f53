//! Workflows: tasks that run in an order the broker keeps.
//!
//! * A [`Chain`] runs its steps one after the other: each step's task is dispatched when
//!   the step before it succeeded, with that step's result (JSON) as its payload. A step
//!   that ends without success (failed without retry, dead-lettered, cancelled) stops the
//!   chain: later steps are never dispatched, and [`Client::workflow_status`](crate::Client::workflow_status) names the
//!   step and its error.
//! * A [`Group`] runs its members in parallel; once every member has ended, however it
//!   ended, its callback task runs once, with every member's outcome and result as its
//!   payload ([`GroupResults`]).
//!
//! Every step is a [tracked](crate::Task::tracked) task with an id of its own: its status,
//! result and events are those of any tracked task, and its events carry the workflow id
//! ([`Event::workflow`](crate::Event::workflow)). Handlers need no change: a chain step
//! takes the previous result with [`Json`](crate::Json), a callback takes
//! `Json<GroupResults>`.
//!
//! # What the broker guarantees
//!
//! * **Dispatch is atomic.** The plan is recorded first (in the task record bucket, under
//!   a key no task id can have); then the first tasks and a start marker are stored in one
//!   atomic batch: all of them or none. A plan whose batch never committed is never read
//!   by a worker (no task names it) and expires with its retention.
//! * **The next step and the callback are dispatched exactly once.** The worker that ends a
//!   step publishes, before it acknowledges the step, one atomic batch: a marker on a
//!   subject of its own (`<prefix>.__natasks_mark.wf.<workflow>.<step>`) stored only if
//!   that subject is empty, and the next task. The step is acknowledged only after that
//!   batch is stored (or found stored), so a crash before the ack reruns the step, and
//!   the rerun finds the marker and stores nothing, however late it comes: markers live as
//!   long as the workflow's records, not just the duplicate window.
//! * **A group's members are counted with compare-and-set.** Each member's end is written
//!   into the group's record with a compare-and-set on its revision, once per member
//!   (a rerun finds itself there and adds nothing). Whoever sees the set complete (the
//!   member that completed it, or any rerun after a crash) publishes the guarded callback,
//!   and the marker makes it one.
//!
//! # Limits
//!
//! A workflow has at most [`MAX_STEPS`] steps (the server's atomic batch holds at most
//! 1000 messages, and a group's members go out in one batch with its start marker). The
//! plan and a callback's payload must each fit in the server's `max_payload`; a member
//! result that does not fit in the group's record is left out of the callback's payload
//! (read it with [`Client::result`](crate::Client::result) by the member's id).

mod advance;
mod dispatch;
mod error;
mod plan;
mod status;

pub use error::{WorkflowError, WorkflowErrorKind};
pub use status::{
    GroupResults, MemberOutcome, StepRole, StepState, StepStatus, WorkflowKind, WorkflowState,
    WorkflowStatus,
};

pub(crate) use advance::{advance_retrying, StepEnd, StepRef, FOLLOW_RETRY};
pub(crate) use plan::touch as keep_plan;

use crate::task::Task;

/// The most steps a workflow may have (members and callback of a group, steps of a chain).
pub const MAX_STEPS: usize = 999;

/// The header naming the workflow a task is a step of.
pub const HEADER_WORKFLOW: &str = "Natasks-Workflow";
/// The header naming which step of its workflow a task is: the step's index in a chain,
/// `m<index>` for a group member, `callback` for a group's callback.
pub const HEADER_WORKFLOW_STEP: &str = "Natasks-Workflow-Step";

/// Steps that run one after the other, each with the previous step's result.
///
/// ```no_run
/// # async fn example(client: natasks::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use natasks::workflow::Chain;
/// use natasks::Task;
///
/// let chain = Chain::new("thumbnail")
///     .then(Task::json("download", &"https://example.com/cat.png")?, "images")
///     // Empty payloads: each takes the previous step's result.
///     .then(Task::new("resize", ""), "images")
///     .then(Task::new("upload", ""), "images");
/// let receipt = client.dispatch_workflow(chain).await?;
/// println!("workflow {}", receipt.id);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Chain {
    name: String,
    steps: Vec<(Task, String)>,
}

impl Chain {
    /// An empty chain named `name` (shown in its status).
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), steps: Vec::new() }
    }

    /// Adds a step: `task` in `queue`. Every step but the first must have an empty
    /// payload: it receives the previous step's result as its payload.
    pub fn then(mut self, task: Task, queue: &str) -> Self {
        self.steps.push((task, queue.to_owned()));
        self
    }
}

/// Tasks that run in parallel, and a callback that runs once when all have ended.
///
/// ```no_run
/// # async fn example(client: natasks::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use natasks::workflow::Group;
/// use natasks::Task;
///
/// let mut group = Group::new("resize-album");
/// for photo in ["a.png", "b.png", "c.png"] {
///     group = group.add(Task::json("resize", &photo)?, "images");
/// }
/// // The callback's payload is the members' outcomes (`GroupResults`).
/// let receipt = client.dispatch_workflow(group.then(Task::new("album.done", ""), "images")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Group {
    name: String,
    members: Vec<(Task, String)>,
    callback: Option<Box<(Task, String)>>,
}

impl Group {
    /// An empty group named `name` (shown in its status).
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), members: Vec::new(), callback: None }
    }

    /// Adds a member: `task` in `queue`.
    pub fn add(mut self, task: Task, queue: &str) -> Self {
        self.members.push((task, queue.to_owned()));
        self
    }

    /// Sets the callback: `task` in `queue`, dispatched once every member has ended, with
    /// the members' outcomes ([`GroupResults`]) as its payload (its own payload must be
    /// empty). Without a callback, the group only runs its members.
    pub fn then(mut self, task: Task, queue: &str) -> Self {
        self.callback = Some(Box::new((task, queue.to_owned())));
        self
    }
}

/// A chain or a group, as [`Client::dispatch_workflow`](crate::Client::dispatch_workflow)
/// takes it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Workflow {
    /// Steps one after the other.
    Chain(Chain),
    /// Members in parallel, then a callback.
    Group(Group),
}

impl From<Chain> for Workflow {
    fn from(chain: Chain) -> Self {
        Self::Chain(chain)
    }
}

impl From<Group> for Workflow {
    fn from(group: Group) -> Self {
        Self::Group(group)
    }
}

/// What [`Client::dispatch_workflow`](crate::Client::dispatch_workflow) stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkflowReceipt {
    /// The workflow id: [`Client::workflow_status`](crate::Client::workflow_status) goes
    /// by it, and every step's events carry it.
    pub id: String,
    /// The task id of every step, in order (a group's callback last).
    pub steps: Vec<String>,
}
