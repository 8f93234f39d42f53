//! A worker serving several queues from one concurrency budget.
//!
//! Each queue (a lane) keeps a few tasks delivered and waiting (twice its share of the
//! concurrency, at least two; their leases renewed while they wait): that is how the worker
//! knows which queues have work without asking the server for each slot. When a slot
//! frees, the picker chooses among the lanes holding a task: by smooth weighted
//! round-robin (each lane's share of starts is its weight's share among the lanes with
//! work), or strictly by weight. A lane without work leaves its slots to the others, and a
//! waiting task is at most one slot away from starting, so a heavy low-weight queue cannot
//! starve a light high-weight one.

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use futures_util::future::select_all;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pull::{PullError, Puller};
use super::run::{pause, recover, Starter, FLUSH_LIMIT};
use super::{process, WorkerInner};
use crate::error::RunError;

/// One queue of a worker serving several.
pub(crate) struct Lane {
    pub(crate) inner: Arc<WorkerInner>,
    pub(crate) consumer: PullConsumer,
    pub(crate) weight: u32,
}

/// The queues of a worker serving several, and how it chooses among them.
pub(crate) struct Lanes {
    pub(crate) lanes: Vec<Lane>,
    pub(crate) strict: bool,
}

/// Chooses the lane the next free slot goes to.
struct Picker {
    weights: Vec<i64>,
    current: Vec<i64>,
    strict: bool,
}

impl Picker {
    fn new(weights: Vec<i64>, strict: bool) -> Self {
        let current = vec![0; weights.len()];
        Self { weights, current, strict }
    }

    /// Among the lanes `ready` says have a task: the heaviest (strict), or the next by
    /// smooth weighted round-robin.
    fn pick(&mut self, ready: impl Fn(usize) -> bool) -> Option<usize> {
        let eligible: Vec<usize> = (0..self.weights.len()).filter(|&i| ready(i)).collect();
        if self.strict {
            // Ties go to the lane declared first.
            return eligible.into_iter().max_by_key(|&i| (self.weights[i], std::cmp::Reverse(i)));
        }
        let total: i64 = eligible.iter().map(|&i| self.weights[i]).sum();
        let mut best = None;
        for &i in &eligible {
            self.current[i] += self.weights[i];
            if best.is_none_or(|b: usize| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        self.current[chosen] -= total;
        Some(chosen)
    }
}

/// How recently a queue must have delivered a task to keep its turn while its next one is
/// on its way.
const FLOWING: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a slot waits for the task of the queue whose turn it is.
const TURN_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

enum Exit {
    Shutdown,
    Reopen,
}

pub(super) async fn run(lanes: Arc<Lanes>, shutdown: CancellationToken) -> Result<(), RunError> {
    let first = lanes.lanes[0].inner.clone();
    let settings = &first.settings;
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let tracker = TaskTracker::new();
    let mut starter = Starter::new(tracker.clone());
    let abandon = CancellationToken::new();
    let total: u64 = lanes.lanes.iter().map(|l| u64::from(l.weight)).sum();
    // Each lane holds twice its share of the slots, at least two tasks: its next tasks are
    // delivered while the ones before start.
    let depths: Vec<usize> = lanes
        .lanes
        .iter()
        .map(|l| {
            let share =
                (2 * settings.concurrency as u64 * u64::from(l.weight)).div_ceil(total.max(1));
            usize::try_from(share).unwrap_or(usize::MAX).max(2)
        })
        .collect();
    let mut picker =
        Picker::new(lanes.lanes.iter().map(|l| i64::from(l.weight)).collect(), lanes.strict);
    let mut guards = Vec::new();
    for lane in &lanes.lanes {
        // The settings read at build first; `follow` then reads the current ones.
        lane.inner.limits.adopt(lane.consumer.cached_info());
        guards.push((
            lane.inner.tracking.listen(&lane.inner.queue).await,
            lane.inner.limits.follow(&lane.inner.settings.consumer).await,
        ));
    }
    let queues: Vec<&str> = lanes.lanes.iter().map(|l| l.inner.queue.as_str()).collect();
    tracing::info!(
        ?queues,
        strict = lanes.strict,
        concurrency = settings.concurrency,
        "worker started"
    );
    let mut consumers: Vec<Option<PullConsumer>> =
        lanes.lanes.iter().map(|l| Some(l.consumer.clone())).collect();
    let mut drain_deadline = None;
    let period = settings.progress_interval;
    // Tasks waiting in a lane when the worker reopens its pullers (one lane's error
    // reopens them all): kept, leases and all, rather than handed back, which would cost
    // each an attempt.
    let mut kept: Vec<Waiting> = Vec::new();
    // The queue whose turn it is while its next task is on its way.
    let mut turn: Option<usize> = None;

    let result = 'outer: loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        let mut pullers = Vec::with_capacity(lanes.lanes.len());
        for (i, lane) in lanes.lanes.iter().enumerate() {
            let consumer = match consumers[i].take() {
                Some(consumer) => consumer,
                None => match recover(&lane.inner, &shutdown).await {
                    Ok(Some(consumer)) => consumer,
                    Ok(None) => break 'outer Ok(()),
                    Err(err) => break 'outer Err(err),
                },
            };
            let inner = &lane.inner;
            match Puller::open(consumer, inner.client.clone(), settings.fetch_timeout, depths[i])
                .await
            {
                Ok(mut puller) => {
                    puller.watch_backlog();
                    if let Some(waiting) = kept.get_mut(i) {
                        puller.adopt_buffer(std::mem::take(waiting));
                    }
                    pullers.push(puller);
                }
                Err(err) => {
                    tracing::warn!(queue = %inner.queue, error = %err, "cannot start pulling; recovering");
                    keep_and_hand_back(&mut kept, pullers, settings.idle_wait).await;
                    pause(&shutdown, settings.idle_wait).await;
                    continue 'outer;
                }
            }
        }
        let exit = loop {
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => match wait_for_slot(&slots, &mut pullers, &shutdown, period).await {
                    Ok(Some(permit)) => permit,
                    Ok(None) => break Exit::Shutdown,
                    Err(err) => {
                        tracing::warn!(error = %err, "pulling interrupted; recovering");
                        break Exit::Reopen;
                    }
                },
            };
            let picked = loop {
                if let Err(err) = top_up_all(&mut pullers).await {
                    break Err(err);
                }
                if let Err(err) = pullers.iter_mut().try_for_each(Puller::take_in_ready) {
                    break Err(err);
                }
                // A paused queue's held tasks wait in its buffer, leases renewed.
                let open = |i: usize| !lanes.lanes[i].inner.limits.paused();
                let holding = |i: usize| open(i) && pullers[i].has_buffered();
                // A queue whose next task is on its way keeps its turn for a moment: with
                // handlers that finish at once, slots free faster than deliveries arrive,
                // and giving the turn away would favour the lighter queues.
                let active = |i: usize| holding(i) || (open(i) && pullers[i].is_flowing(FLOWING));
                let choice = turn.take().or_else(|| picker.pick(active));
                match choice {
                    Some(lane) if holding(lane) => break Ok(lane),
                    Some(lane) => {
                        turn = Some(lane);
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => break Ok(usize::MAX),
                            tended = tend_any(&mut pullers, period) => if let Err(err) = tended {
                                break Err(err);
                            },
                            () = tokio::time::sleep(TURN_WAIT) => {
                                // Its task is late: the slot goes to a queue holding one.
                                turn = None;
                                let holding = |i: usize| {
                                    !lanes.lanes[i].inner.limits.paused() && pullers[i].has_buffered()
                                };
                                if let Some(lane) = picker.pick(holding) {
                                    break Ok(lane);
                                }
                            }
                        }
                    }
                    None => tokio::select! {
                        biased;
                        () = shutdown.cancelled() => break Ok(usize::MAX),
                        tended = tend_any(&mut pullers, period) => if let Err(err) = tended {
                            break Err(err);
                        },
                    },
                }
            };
            let lane = match picked {
                Ok(usize::MAX) => break Exit::Shutdown,
                Ok(lane) => lane,
                Err(err) => {
                    tracing::warn!(error = %err, "pulling interrupted; recovering");
                    break Exit::Reopen;
                }
            };
            let leased = pullers[lane].pop_buffered().expect("the picked lane holds a task");
            let inner = lanes.lanes[lane].inner.clone();
            starter.start(process::process(inner, leased, permit, abandon.clone()));
        };
        match exit {
            Exit::Shutdown => {
                for lane in &lanes.lanes {
                    lane.inner.stopping.cancel();
                }
                // As a worker of one queue does: run what was delivered or is still on its
                // way, within the drain timeout, then hand back the rest.
                let limit = tokio::time::Instant::now() + settings.drain_timeout;
                drain_deadline = Some(limit);
                // Every lane's waiting tasks keep their leases while they wait for a slot.
                loop {
                    if let Some(lane) = picker.pick(|i| pullers[i].has_buffered()) {
                        let permit = tokio::select! {
                            biased;
                            () = tokio::time::sleep_until(limit) => break,
                            permit = slots.clone().acquire_owned() => match permit {
                                Ok(permit) => permit,
                                Err(_) => break,
                            },
                            tended = tend_any(&mut pullers, period) => match tended {
                                Ok(()) => continue,
                                Err(_) => break,
                            },
                        };
                        let leased =
                            pullers[lane].pop_buffered().expect("the picked lane holds a task");
                        let inner = lanes.lanes[lane].inner.clone();
                        starter.start(process::process(inner, leased, permit, abandon.clone()));
                        continue;
                    }
                    for puller in pullers.iter_mut() {
                        puller.forget_if_expired();
                    }
                    if pullers.iter().all(Puller::exhausted) {
                        break;
                    }
                    // Woken by what the server sends, or when the requests have expired
                    // even if their end was not heard.
                    let expired = pullers.iter().filter_map(Puller::expiry_deadline).min();
                    let expired = async {
                        match expired {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        () = tokio::time::sleep_until(limit) => break,
                        tended = tend_any(&mut pullers, period) => if tended.is_err() { break },
                        () = expired => {}
                    }
                }
                hand_back_all(pullers, FLUSH_LIMIT).await;
                break Ok(());
            }
            Exit::Reopen => {
                keep_and_hand_back(&mut kept, pullers, settings.idle_wait).await;
                pause(&shutdown, settings.idle_wait).await;
            }
        }
    };

    tracker.close();
    let drain_deadline =
        drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + settings.drain_timeout);
    if tokio::time::timeout_at(drain_deadline, tracker.wait()).await.is_err() {
        tracing::warn!(
            running = tracker.len(),
            "handlers still running after the drain timeout; handing their tasks back"
        );
        abandon.cancel();
        tracker.wait().await;
    }
    if tokio::time::timeout(FLUSH_LIMIT, first.js.client().flush()).await.is_err() {
        tracing::warn!("could not flush final acknowledgements");
    }
    drop(guards);
    tracing::info!(?queues, "worker stopped");
    result
}

/// Keeps every lane's share of tasks requested.
async fn top_up_all(pullers: &mut [Puller]) -> Result<(), PullError> {
    for puller in pullers {
        puller.top_up_fully().await?;
    }
    Ok(())
}

/// Takes in what any lane's server side delivers, renewing the leases of waiting tasks.
/// Requests the server went silent on (a restart loses them) are forgotten, so that the
/// next top-up asks again.
async fn tend_any(pullers: &mut [Puller], period: std::time::Duration) -> Result<(), PullError> {
    let silence = pullers.iter().filter_map(Puller::silence_deadline).min();
    {
        let tends = pullers.iter_mut().map(|puller| puller.tend(period).boxed());
        let silent = async {
            match silence {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            tended = select_all(tends) => return tended.0,
            () = silent => {}
        }
    }
    for puller in pullers.iter_mut() {
        if puller.forget_if_silent() {
            tracing::debug!("pull requests went unanswered; renewing them");
        }
    }
    Ok(())
}

/// Waits for a free slot while the lanes' waiting tasks keep their leases; `None` at
/// shutdown.
async fn wait_for_slot(
    slots: &Arc<Semaphore>,
    pullers: &mut [Puller],
    shutdown: &CancellationToken,
    period: std::time::Duration,
) -> Result<Option<OwnedSemaphorePermit>, PullError> {
    top_up_all(pullers).await?;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(None),
            permit = slots.clone().acquire_owned() => {
                return Ok(Some(permit.expect("the slot semaphore is never closed")));
            }
            tended = tend_any(pullers, period) => tended?,
        }
    }
}

/// The tasks waiting in one lane.
type Waiting = std::collections::VecDeque<(tokio::time::Instant, async_nats::Message)>;

/// Keeps the tasks waiting in each lane for the pullers that replace these, and hands back
/// only what arrives on the old inboxes after they stopped asking.
async fn keep_and_hand_back(
    kept: &mut Vec<Waiting>,
    pullers: Vec<Puller>,
    limit: std::time::Duration,
) {
    kept.resize_with(kept.len().max(pullers.len()), Waiting::new);
    let mut pullers = pullers;
    for (i, puller) in pullers.iter_mut().enumerate() {
        kept[i].extend(puller.take_buffer());
    }
    hand_back_all(pullers, limit).await;
}

async fn hand_back_all(pullers: Vec<Puller>, limit: std::time::Duration) {
    for puller in pullers {
        let handed_back = puller.hand_back(limit).await;
        if handed_back > 0 {
            tracing::debug!(handed_back, "buffered tasks handed back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_shares_follow_the_weights() {
        let mut picker = Picker::new(vec![6, 3, 1], false);
        let mut counts = [0; 3];
        for _ in 0..1000 {
            counts[picker.pick(|_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [600, 300, 100]);
        // A lane without work leaves its share to the others.
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[picker.pick(|i| i != 0).unwrap()] += 1;
        }
        assert_eq!(counts, [0, 300, 100]);
        assert_eq!(picker.pick(|_| false), None);
    }

    #[test]
    fn strict_serves_the_heaviest_ready_lane() {
        let mut picker = Picker::new(vec![1, 5, 5], true);
        assert_eq!(picker.pick(|_| true), Some(1), "ties go to the lane declared first");
        assert_eq!(picker.pick(|i| i != 1), Some(2));
        assert_eq!(picker.pick(|i| i == 0), Some(0));
    }
}
