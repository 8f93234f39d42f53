//! The plan of a workflow, as recorded in the task record bucket, and the markers that
//! guard its dispatches.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use super::{WorkflowError, WorkflowErrorKind};
use crate::batch::Outgoing;
use crate::track::Tracker;
use crate::wire;

/// A workflow's plan: its steps and, for a group, which members have ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) kind: Kind,
    pub(crate) name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) created: OffsetDateTime,
    /// Seconds the plan (and the markers) are kept after the last change.
    pub(crate) retention: u64,
    /// A chain's steps, or a group's members.
    pub(crate) steps: Vec<StepPlan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) callback: Option<StepPlan>,
    /// A group's members that ended, by index.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) ended: BTreeMap<usize, Ended>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    Chain,
    Group,
}

/// One step: who it is, and, for a step dispatched later by a worker, the message to
/// publish (its payload is filled in then).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StepPlan {
    pub(crate) id: String,
    pub(crate) task: String,
    pub(crate) queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) subject: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) headers: Vec<(String, String)>,
}

/// How a group member ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Ended {
    /// The member's final state label (`succeeded`, `failed`, `dead_lettered`, `cancelled`).
    pub(crate) state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<Box<RawValue>>,
    /// The result was too large for the group's record: read it by the member's id.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) result_omitted: bool,
}

impl StepPlan {
    /// The message of a later step with `payload`.
    pub(crate) fn outgoing(&self, payload: Bytes) -> Option<Outgoing> {
        let subject = self.subject.clone()?;
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            headers.append(name.as_str(), value.as_str());
        }
        Some(Outgoing { subject, headers, payload })
    }

    /// Keeps `outgoing`'s subject and headers, to publish it later.
    pub(crate) fn keep(&mut self, outgoing: &Outgoing) {
        self.subject = Some(outgoing.subject.clone());
        self.headers = outgoing
            .headers
            .iter()
            .flat_map(|(name, values)| {
                values.iter().map(move |value| (name.to_string(), value.as_str().to_owned()))
            })
            .collect();
    }
}

/// The bucket key of workflow `id`: `wf.<id encoded as a task key>`. Task keys never hold
/// a `.`, so no task id can have it.
pub(crate) fn key(id: &str) -> String {
    format!("wf.{}", crate::track::record::key(id))
}

/// The marker guarding `step` of workflow `id` (`start`, a chain index, `callback`).
pub(crate) fn marker(prefix: &str, id: &str, step: &str, retention: u64) -> Outgoing {
    let subject = wire::marker_subject(prefix, &["wf", &wire::encode_token(id), step]);
    let mut headers = HeaderMap::new();
    headers.insert(wire::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
    headers.insert(wire::NATS_TTL, format!("{}s", retention.max(1)).as_str());
    Outgoing { subject, headers, payload: Bytes::from(id.to_owned()) }
}

/// Reads the plan of workflow `id` and its revision; `None` when nothing is recorded.
pub(crate) async fn read(
    tracker: &Tracker,
    id: &str,
) -> Result<Option<(Plan, u64)>, WorkflowError> {
    let store = tracker.store().await.map_err(|err| {
        WorkflowError::with_source(WorkflowErrorKind::Broker, "open the task record bucket", err)
    })?;
    let entry = store.get_raw(&key(id)).await.map_err(|err| {
        WorkflowError::with_source(
            WorkflowErrorKind::Broker,
            format!("read the plan of workflow {id:?}"),
            err,
        )
    })?;
    let Some((value, revision)) = entry else { return Ok(None) };
    let plan = serde_json::from_slice(&value).map_err(|err| {
        WorkflowError::with_source(
            WorkflowErrorKind::Broker,
            format!("the record of workflow {id:?} is not a natasks workflow plan"),
            err,
        )
    })?;
    Ok(Some((plan, revision)))
}

/// What became of a write of a plan.
pub(crate) enum Written {
    Yes,
    /// The plan changed since it was read.
    Conflict,
    TooLarge,
}

/// Writes the plan of workflow `id` if its revision is still `expect` (0: if none exists).
pub(crate) async fn write(
    tracker: &Tracker,
    id: &str,
    plan: &Plan,
    expect: u64,
) -> Result<Written, WorkflowError> {
    let store = tracker.store().await.map_err(|err| {
        WorkflowError::with_source(WorkflowErrorKind::Broker, "open the task record bucket", err)
    })?;
    let json = serde_json::to_vec(plan).unwrap_or_default();
    let ttl = Duration::from_secs(plan.retention.max(1));
    match store.put_raw(&key(id), json.into(), ttl, Some(expect)).await {
        Ok(_) => Ok(Written::Yes),
        Err(err) if crate::track::is_conflict(&err) => Ok(Written::Conflict),
        Err(err) if crate::track::is_too_large(&err) => Ok(Written::TooLarge),
        Err(err) => Err(WorkflowError::with_source(
            WorkflowErrorKind::Broker,
            format!("record the plan of workflow {id:?}"),
            err,
        )),
    }
}

/// Keeps the plan of workflow `id` for another retention from now, once a third of it has
/// passed since the plan was last written: called as a step starts and as its lease is
/// renewed, so that the plan lives as long as the records of its steps, however long the
/// workflow runs. Best effort: a plan changed meanwhile was kept anew by that change.
///
/// Returns how long from now the plan needs no keeping (until a third of its retention
/// has passed since it was last written), so that renewals until then need not read it;
/// `None` when that is not known (it could not be read or kept): look again next time.
pub(crate) async fn touch(tracker: &Tracker, id: &str) -> Option<Duration> {
    #[derive(Deserialize)]
    struct Retention {
        retention: u64,
    }
    let store = tracker.store().await.ok()?;
    let (value, revision, written) = store.get_raw_dated(&key(id)).await.ok()??;
    let Retention { retention } = serde_json::from_slice(&value).ok()?;
    let third = Duration::from_secs(retention) / 3;
    // A write stamped ahead of this clock counts as written now.
    let age = Duration::try_from(OffsetDateTime::now_utc() - written).unwrap_or_default();
    if age < third {
        return Some(third - age);
    }
    let ttl = Duration::from_secs(retention.max(1));
    match store.put_raw(&key(id), value, ttl, Some(revision)).await {
        Ok(_) => Some(third),
        Err(err) => {
            if !crate::track::is_conflict(&err) {
                tracing::debug!(workflow = id, error = %err, "could not keep the workflow's plan");
            }
            None
        }
    }
}
