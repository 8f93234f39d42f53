//! Tracking: how a tracked task's attempt ended, recorded before the broker hears it.

use super::workflow::{follow, handed_back};
use super::Settle;
use crate::track::worker::{Attempt, Ended, RecordedEnd, Unrecorded};
use crate::worker::DeadLetterReason;
use crate::workflow::StepEnd;

/// The tracking of a tracked task's attempt, and the handler's result to record.
pub(super) struct Tracked<'a> {
    /// Boxed: most tasks are not tracked, and the processing future is allocated for
    /// every task.
    pub(super) attempt: Option<Box<Attempt<'a>>>,
    pub(super) result: Option<Vec<u8>>,
    /// The end of a workflow step recorded by an earlier delivery: nothing is recorded
    /// again, what follows is dispatched from it.
    pub(super) recorded: Option<Box<RecordedEnd>>,
}

impl Tracked<'_> {
    /// Records how the attempt ended, before the broker hears it. A result too large to
    /// store turns a success into a dead letter saying so.
    pub(super) async fn record(&mut self, settle: Settle) -> Settle {
        let Some(attempt) = &mut self.attempt else { return settle };
        if let (Some(end), Some(step)) = (self.recorded.take(), attempt.step()) {
            let step_end = match end.state {
                "succeeded" => StepEnd::Succeeded(end.result.as_deref()),
                state => StepEnd::Ended { state, error: end.error.as_deref() },
            };
            return Box::pin(handed_back(attempt.tracker(), step, step_end))
                .await
                .unwrap_or(settle);
        }
        let ended = match &settle {
            Settle::Ack => Ended::Succeeded,
            Settle::GiveUp(error) | Settle::Discard(error) => Ended::Failed { error },
            Settle::Retry(delay, error) => Ended::Retrying { delay: *delay, error },
            Settle::DeadLetter(reason, error) => {
                Ended::DeadLettered { reason: reason.as_str(), error }
            }
            Settle::Cancelled { announce } => Ended::Cancelled { announce: *announce },
        };
        let result = if matches!(settle, Settle::Ack) { self.result.take() } else { None };
        // A workflow step needs its result after it is recorded.
        let kept = attempt.step().and(result.clone());
        let settle = match attempt.finish(ended, result).await {
            Ok(()) => settle,
            Err(Unrecorded::ResultTooLarge(error)) => {
                let reason = DeadLetterReason::Rejected;
                let ended = Ended::DeadLettered { reason: reason.as_str(), error: &error };
                let _ = attempt.finish(ended, None).await;
                Settle::DeadLetter(reason, error)
            }
        };
        match attempt.step() {
            Some(step) => Box::pin(follow(attempt.tracker(), step, settle, kept)).await,
            None => settle,
        }
    }
}
