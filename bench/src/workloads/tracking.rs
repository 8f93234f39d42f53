//! The cost of tracking ([`Task::tracked`]): the same work with tracked tasks, with
//! untracked natasks tasks and with raw async-nats, in the same round.
//!
//! * `dispatch_tracked_64`: dispatches with 64 in flight. A tracked dispatch also publishes
//!   the `dispatched` event and writes the task's `pending` record (a second JetStream
//!   publish, awaited); the untracked and raw runs are those of `dispatch_concurrent_64`.
//! * `e2e_tracked_c64`: a natasks worker (concurrency 64) runs while the tasks are
//!   dispatched with 256 in flight, as `e2e_c64`; its handler returns a small result. On a
//!   tracked task the worker also reads the record (a cancel may have come), records
//!   `running`, then `succeeded` with the result, each with its event, before it acks.
//!
//! The natasks column is the tracked run; the untracked run of the round is reported next
//! to it (`untracked_per_s`, `tracked_vs_untracked`). Each run has a stream of its own, and
//! the record bucket the tracked run creates is deleted with it.

use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use natasks::{Client, HandlerError, Task, Worker};
use serde::{Deserialize, Serialize};

use super::{
    check_stored, limit_for, Consumer, CpuTime, Done, Env, Impl, Layout, Res, Sample, PAYLOAD,
    PUBLISH_IN_FLIGHT, QUEUE, TASK_NAME,
};

/// What the e2e handler returns: a small result, as a handler reporting an outcome would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Handled {
    ok: bool,
    user_id: u64,
}

const RESULT: Handled = Handled { ok: true, user_id: 42 };

/// `dispatch_tracked_64`: natasks tracked (with the untracked run of the round), or raw.
pub async fn dispatch_tracked(env: &Env, imp: Impl, n: usize, in_flight: usize) -> Res<Sample> {
    match imp {
        Impl::Natasks => {
            let untracked = dispatch_run(env, n, in_flight, false).await?;
            let tracked = dispatch_run(env, n, in_flight, true).await?;
            Ok(Sample { untracked: Some(Box::new(untracked)), ..tracked })
        }
        Impl::Raw => super::dispatch_concurrent(env, Impl::Raw, n, in_flight).await,
        Impl::Apalis => Err("apalis runs only in the process workloads".into()),
    }
}

/// `e2e_tracked_c64`: natasks tracked (with the untracked run of the round), or raw.
pub async fn e2e_tracked(env: &Env, imp: Impl, n: usize, concurrency: usize) -> Res<Sample> {
    match imp {
        Impl::Natasks => {
            let untracked = e2e_run(env, n, concurrency, false).await?;
            let tracked = e2e_run(env, n, concurrency, true).await?;
            Ok(Sample { untracked: Some(Box::new(untracked)), ..tracked })
        }
        Impl::Raw => super::e2e(env, Impl::Raw, n, concurrency, None).await,
        Impl::Apalis => Err("apalis runs only in the process workloads".into()),
    }
}

/// Dispatches `n` natasks tasks, tracked or not, with `in_flight` outstanding.
async fn dispatch_run(env: &Env, n: usize, in_flight: usize, tracked: bool) -> Res<Sample> {
    with_bucket(env, |layout, client| async move {
        let cpu = CpuTime::now();
        let start = Instant::now();
        dispatch_many(&client, n, in_flight, tracked).await?;
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        check_stored(env, &layout, n).await?;
        check_records(env, &layout, if tracked { n } else { 0 }).await?;
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            cpu_us_per_task,
            ..Default::default()
        })
    })
    .await
}

/// A natasks worker with `concurrency` slots runs while `n` tasks, tracked or not, are
/// dispatched with 256 in flight; from the first dispatch to the n-th handled task.
async fn e2e_run(env: &Env, n: usize, concurrency: usize, tracked: bool) -> Res<Sample> {
    with_bucket(env, |layout, client| async move {
        let done = Done::new(n, None);
        let hit = done.clone();
        let worker = Worker::builder(env.consume.clone(), QUEUE)
            .stream_name(layout.stream.clone())
            .subject_prefix(layout.prefix.clone())
            .concurrency(concurrency)
            .fetch_batch(2 * concurrency)
            .handle(TASK_NAME, move |_task: Task| {
                hit.hit();
                std::future::ready(Ok::<_, HandlerError>(RESULT))
            })
            .build()
            .await?;
        let shutdown = worker.shutdown_handle();
        let consumer =
            Consumer::Natasks { shutdown, task: tokio::spawn(async move { worker.run().await }) };

        let cpu = CpuTime::now();
        let start = Instant::now();
        let publishing = {
            let (client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                let first = dispatch_many(&client, n, PUBLISH_IN_FLIGHT, tracked).await;
                first.map_err(|err| done.fail(format!("publishing failed: {err}"))).ok()
            })
        };
        let waited = done.wait(limit_for(n)).await;
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        let first = publishing.await?;
        consumer.stop().await?;
        waited?;
        if tracked {
            // Every task is recorded, and the handler's result is kept.
            check_records(env, &layout, n).await?;
            let id = first.ok_or("no task dispatched")?;
            let result = client.result::<Handled>(&id).await?;
            if result != RESULT {
                return Err(format!("task {id} recorded {result:?}, not {RESULT:?}").into());
            }
        }
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            cpu_us_per_task,
            ..Default::default()
        })
    })
    .await
}

/// Dispatches `n` tasks (tracked or not) with `in_flight` outstanding; the first id.
async fn dispatch_many(client: &Client, n: usize, in_flight: usize, tracked: bool) -> Res<String> {
    let mut results = futures_util::stream::iter(0..n)
        .map(|_| {
            let task = Task::new(TASK_NAME, Bytes::from_static(PAYLOAD));
            client.dispatch(if tracked { task.tracked() } else { task }, QUEUE)
        })
        .buffer_unordered(in_flight);
    let mut first = None;
    while let Some(receipt) = results.next().await {
        first.get_or_insert(receipt?.id);
    }
    first.ok_or_else(|| "nothing dispatched".into())
}

/// The record bucket of the run's stream, as natasks names it.
fn bucket(layout: &Layout) -> String {
    format!("{}_TASKS", layout.stream)
}

/// Checks that the run's record bucket holds `n` records (none: no bucket, or empty).
async fn check_records(env: &Env, layout: &Layout, n: usize) -> Res<()> {
    let records = match env.publish.get_stream(format!("KV_{}", bucket(layout))).await {
        Ok(mut stream) => stream.info().await?.state.messages,
        Err(_) => 0,
    };
    if records != n as u64 {
        return Err(format!("{records} task records, expected {n}").into());
    }
    Ok(())
}

/// Runs `body` with a fresh stream, deleting the stream and its record bucket afterwards.
pub(super) async fn with_bucket<F, Fut, T>(env: &Env, body: F) -> Res<T>
where
    F: FnOnce(Layout, Client) -> Fut,
    Fut: Future<Output = Res<T>>,
{
    env.with_stream(|layout, client| async move {
        let bucket = bucket(&layout);
        let result = body(layout, client).await;
        // Created by the first tracked dispatch: untracked runs have none.
        if env.publish.get_key_value(&bucket).await.is_ok() {
            if let Err(err) = env.publish.delete_key_value(&bucket).await {
                eprintln!("natasks-bench: could not delete bucket {bucket}: {err}");
            }
        }
        result
    })
    .await
}
