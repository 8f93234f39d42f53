//! The workflow step hook: what follows a step that ended.

use super::Settle;
use crate::workflow::{StepEnd, StepRef};

/// What follows a workflow step that ended, dispatched before the step is acknowledged
/// (see `crate::workflow`). Should that fail, the step is handed back to come here again.
pub(super) async fn follow(
    tracker: &crate::track::Tracker,
    step: &StepRef,
    settle: Settle,
    result: Option<Vec<u8>>,
) -> Settle {
    let end = match &settle {
        Settle::Ack => StepEnd::Succeeded(result.as_deref()),
        Settle::GiveUp(error) | Settle::Discard(error) => {
            StepEnd::Ended { state: "failed", error: Some(error) }
        }
        Settle::DeadLetter(_, error) => {
            StepEnd::Ended { state: "dead_lettered", error: Some(error) }
        }
        Settle::Cancelled { .. } => StepEnd::Ended { state: "cancelled", error: None },
        Settle::Retry(..) => return settle,
    };
    match handed_back(tracker, step, end).await {
        Some(retry) => retry,
        None => settle,
    }
}

/// Dispatches what follows a step that ended with `end`; the step's new settlement if
/// that failed (it is handed back to come here again).
pub(super) async fn handed_back(
    tracker: &crate::track::Tracker,
    step: &StepRef,
    end: StepEnd<'_>,
) -> Option<Settle> {
    let error = crate::workflow::advance_retrying(tracker, step, end).await.err()?;
    Some(Settle::Retry(Some(crate::workflow::FOLLOW_RETRY), error))
}
