//! Storing a task together with its guard marker, in one atomic batch.

use super::prepare::About;
use super::{Publisher, Receipt};
use crate::batch::{self, BatchPublishError, Outgoing};
use crate::error::{DispatchError, DispatchErrorKind};

impl Publisher {
    /// Stores `marker` and then `message` in one atomic batch: both or neither.
    pub(super) async fn store_guarded(
        &self,
        marker: Outgoing,
        message: Outgoing,
        about: &About,
        id: String,
    ) -> Result<Receipt, DispatchError> {
        let ack = batch::publish_atomic(&self.js, vec![marker, message]).await.map_err(|err| {
            self.batch_error(format!("task {:?} for queue {:?}", about.task, about.queue), err)
        })?;
        let sequence = ack.last;
        tracing::Span::current().record("stream_sequence", sequence);
        Ok(Receipt { id, sequence: Some(sequence), duplicate: false })
    }

    /// A batch refused for any reason but a guard's condition.
    /// `what` names what was dispatched (`task "x" for queue "q"`).
    pub(crate) fn batch_error(&self, what: String, err: BatchPublishError) -> DispatchError {
        let version = self.js.client().server_info().version;
        let (kind, problem) = match &err {
            BatchPublishError::Empty | BatchPublishError::TooLarge(_) => {
                (DispatchErrorKind::InvalidBatch, "is not a valid batch".to_owned())
            }
            BatchPublishError::Timeout(_) => (
                DispatchErrorKind::Timeout,
                "was not confirmed in time: it may still be stored".to_owned(),
            ),
            BatchPublishError::Refused { code: batch::ATOMIC_DISABLED, .. } => (
                DispatchErrorKind::Unsupported,
                format!(
                    "needs atomic batches, which the stream does not allow (nats-server 2.12 or \
                     newer; the connected server is {version})"
                ),
            ),
            _ => (DispatchErrorKind::Rejected, "was refused".to_owned()),
        };
        DispatchError::with_source(kind, format!("{what} {problem}"), err)
    }
}
