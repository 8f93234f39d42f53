//! The error of workflow operations.

use crate::BoxError;

/// A workflow could not be dispatched or read.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WorkflowError {
    kind: WorkflowErrorKind,
    message: String,
    workflow: Option<String>,
    #[source]
    source: Option<BoxError>,
}

/// What went wrong in a workflow operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkflowErrorKind {
    /// The workflow itself is not valid: empty, too many steps, two steps with one id, a
    /// later chain step with a payload of its own. Nothing was published.
    InvalidWorkflow,
    /// One of its tasks cannot be dispatched (bad name, queue, header or retention); the
    /// message names the step. Nothing was published.
    InvalidTask,
    /// The id given to [`Client::workflow_status`](crate::Client::workflow_status) cannot
    /// be a workflow id.
    InvalidId,
    /// Nothing is recorded under the workflow id.
    Unknown,
    /// The workflow's plan, or the message it must publish, is larger than the server
    /// accepts. Nothing was published.
    TooLarge,
    /// The server cannot run workflows (they need atomic batches and per-message TTL:
    /// nats-server 2.12 or newer, with a stream that allows both).
    Unsupported,
    /// The server did not confirm what was published in time: it may have been stored.
    /// [`WorkflowError::workflow`] names the workflow; look at its status before
    /// dispatching again, which would run a second copy.
    Timeout,
    /// The server could not be reached or refused a request.
    Broker,
}

impl WorkflowError {
    pub(crate) fn new(kind: WorkflowErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), workflow: None, source: None }
    }

    pub(crate) fn with_source(
        kind: WorkflowErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self { kind, message: message.into(), workflow: None, source: Some(source.into()) }
    }

    /// What went wrong.
    pub fn kind(&self) -> WorkflowErrorKind {
        self.kind
    }

    /// The id of the workflow the error is about, when it may exist on the server (a
    /// [`Timeout`](WorkflowErrorKind::Timeout) while dispatching it).
    pub fn workflow(&self) -> Option<&str> {
        self.workflow.as_deref()
    }

    pub(crate) fn for_workflow(mut self, id: &str) -> Self {
        self.workflow = Some(id.to_owned());
        self
    }
}
