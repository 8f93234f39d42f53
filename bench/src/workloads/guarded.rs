//! The cost of the broker-enforced guards, next to plain dispatch in the same round.
//!
//! * `dispatch_batch_64`: natasks stores the tasks in atomic batches of 64
//!   (`Client::dispatch_batch`, one batch awaited at a time); the plain natasks run of the
//!   round dispatches the same tasks one by one with 64 in flight
//!   (`natasks_one_by_one_per_s`, `natasks_batch_vs_one_by_one`), and a run with 8
//!   batches in flight (`natasks_batches_8_in_flight_per_s`); raw publishes them one by one
//!   with 64 in flight, as `dispatch_concurrent_64`.
//! * `dispatch_unique_64`: natasks dispatches unique tasks (each its own key: a lock and
//!   the task in one atomic batch) with 64 in flight; the plain natasks run of the round
//!   dispatches plain tasks (`natasks_plain_per_s`, `natasks_unique_vs_plain`); raw as
//!   `dispatch_concurrent_64`. At most 2,000 tasks a run: each unique dispatch is an atomic
//!   batch, which the server commits one after another (tens per second on a loaded
//!   2-core machine), and a full run's 20,000 would take minutes a round.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use natasks::{Batch, Client, Task};

use super::{check_stored, CpuTime, Env, Impl, Res, Sample, PAYLOAD, QUEUE, TASK_NAME};

/// `dispatch_batch_64`: natasks batches (with the one-by-one run of the round), or raw.
pub async fn dispatch_batch(env: &Env, imp: Impl, n: usize, size: usize) -> Res<Sample> {
    match imp {
        Impl::Natasks => {
            let one_by_one = super::dispatch_concurrent(env, Impl::Natasks, n, size).await?;
            let batched = batches(env, n, size, 1).await?;
            let pipelined = batches(env, n, size, BATCHES_IN_FLIGHT).await?;
            let mut sample = with_plain(batched, one_by_one, "one_by_one", "batch_vs_one_by_one");
            sample.extra.push(("batches_8_in_flight_per_s".to_owned(), pipelined.per_s));
            Ok(sample)
        }
        Impl::Raw => super::dispatch_concurrent(env, Impl::Raw, n, size).await,
        Impl::Apalis => Err("apalis runs only in the process workloads".into()),
    }
}

/// `dispatch_unique_64`: natasks unique tasks (with the plain run of the round), or raw.
pub async fn dispatch_unique(env: &Env, imp: Impl, n: usize, in_flight: usize) -> Res<Sample> {
    let n = n.min(MAX_UNIQUE_TASKS);
    match imp {
        Impl::Natasks => {
            let plain = super::dispatch_concurrent(env, Impl::Natasks, n, in_flight).await?;
            let unique = env
                .with_stream(|layout, client| async move {
                    let cpu = CpuTime::now();
                    let start = Instant::now();
                    unique_many(&client, n, in_flight).await?;
                    let elapsed = start.elapsed();
                    let cpu_us_per_task = cpu.us_per_task(n);
                    // Each task and its lock.
                    check_stored(env, &layout, 2 * n).await?;
                    Ok(Sample {
                        per_s: n as f64 / elapsed.as_secs_f64(),
                        cpu_us_per_task,
                        ..Default::default()
                    })
                })
                .await?;
            Ok(with_plain(unique, plain, "plain", "unique_vs_plain"))
        }
        Impl::Raw => super::dispatch_concurrent(env, Impl::Raw, n, in_flight).await,
        Impl::Apalis => Err("apalis runs only in the process workloads".into()),
    }
}

/// The most tasks a `dispatch_unique_64` run dispatches.
const MAX_UNIQUE_TASKS: usize = 2000;

/// Batches in flight in the pipelined batch run.
const BATCHES_IN_FLIGHT: usize = 8;

/// Stores `n` tasks in batches of `size`, `in_flight` batches at a time.
async fn batches(env: &Env, n: usize, size: usize, in_flight: usize) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let cpu = CpuTime::now();
        let start = Instant::now();
        let sizes = (0..n).step_by(size).map(|first| (n - first).min(size));
        let mut stored = futures_util::stream::iter(sizes)
            .map(|take| client.dispatch_batch(batch(take)))
            .buffer_unordered(in_flight);
        while let Some(result) = stored.next().await {
            result?;
        }
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        check_stored(env, &layout, n).await?;
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            cpu_us_per_task,
            ..Default::default()
        })
    })
    .await
}

fn batch(size: usize) -> Batch {
    (0..size).map(|_| (Task::new(TASK_NAME, PAYLOAD), QUEUE)).collect()
}

async fn unique_many(client: &Client, n: usize, in_flight: usize) -> Res<()> {
    let hour = Duration::from_secs(3600);
    let mut results = futures_util::stream::iter(0..n)
        .map(|i| {
            let task = Task::new(TASK_NAME, PAYLOAD).unique(format!("key-{i}"), hour);
            client.dispatch(task, QUEUE)
        })
        .buffer_unordered(in_flight);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

/// `guarded` with the plain run's rate and the ratio as extra figures.
fn with_plain(guarded: Sample, plain: Sample, label: &str, ratio: &str) -> Sample {
    let mut extra = guarded.extra.clone();
    extra.push((format!("{label}_per_s"), plain.per_s));
    extra.push((ratio.to_owned(), crate::ratio(guarded.per_s, plain.per_s)));
    Sample { extra, ..guarded }
}
