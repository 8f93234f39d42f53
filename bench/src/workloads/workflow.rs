//! `group_64`: a group of 64 tasks with a callback, end to end, one group after another.
//!
//! * natasks: `dispatch_workflow(Group)` of 64 members and a callback; a worker with 64
//!   slots runs the members (each a tracked task returning a small result; each member's
//!   end is added to the group's record by compare-and-set) and then the callback, which
//!   the member completing the group dispatched in an atomic batch with its marker. Timed
//!   from the dispatch to the callback's handler. The same round also runs 64 plain
//!   (untracked) natasks tasks dispatched at once and waited for until handled
//!   (`natasks_plain_per_s`), then 64 tracked ones (`natasks_tracked_per_s`): what the
//!   members cost without the group.
//! * raw async-nats: 64 messages published at once, a pull consumer acking each and
//!   counting in process; at the 64th it publishes the callback message and the consumer
//!   signals when that arrives. No record, no marker: what a group costs without its
//!   guarantees.
//!
//! `per_s` is member tasks per second; `group_ms` the mean time from dispatch to callback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, ReplayPolicy};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use natasks::workflow::{Group, GroupResults};
use natasks::{HandlerError, Json, Task, Worker};
use tokio::sync::mpsc;

use super::tracking::with_bucket;
use super::{Env, Impl, Res, Sample, ACK_WAIT, PAYLOAD, QUEUE, TASK_NAME};

/// The callback's task name.
const CALLBACK: &str = "bench.callback";
/// Longest wait for one group's callback.
const GROUP_LIMIT: Duration = Duration::from_secs(30);

/// `group_64`: `groups` groups of `size` members, one after another.
pub async fn group(env: &Env, imp: Impl, groups: usize, size: usize) -> Res<Sample> {
    match imp {
        Impl::Natasks => natasks_groups(env, groups, size).await,
        Impl::Raw => raw_groups(env, groups, size).await,
        Impl::Apalis => Err("apalis runs only in the process workloads".into()),
    }
}

async fn natasks_groups(env: &Env, groups: usize, size: usize) -> Res<Sample> {
    with_bucket(env, |layout, client| async move {
        let (called, mut callbacks) = mpsc::unbounded_channel::<usize>();
        let (handled, mut plain) = mpsc::unbounded_channel::<()>();
        let worker = Worker::builder(env.consume.clone(), QUEUE)
            .stream_name(layout.stream.clone())
            .subject_prefix(layout.prefix.clone())
            .concurrency(64)
            .fetch_batch(128)
            .handle(TASK_NAME, move |task: Task| {
                // Plain tasks are untracked: they report here; members return a result.
                if task.header(natasks::workflow::HEADER_WORKFLOW).is_none() {
                    let _ = handled.send(());
                }
                std::future::ready(Ok::<_, HandlerError>(42u64))
            })
            .handle(CALLBACK, move |Json(results): Json<GroupResults>| {
                let _ = called.send(results.members.len());
                std::future::ready(Ok::<_, HandlerError>(()))
            })
            .build()
            .await?;
        let shutdown = worker.shutdown_handle();
        let running = tokio::spawn(async move { worker.run().await });

        let start = Instant::now();
        for _ in 0..groups {
            let mut group = Group::new("bench");
            for _ in 0..size {
                group = group.add(Task::new(TASK_NAME, Bytes::from_static(PAYLOAD)), QUEUE);
            }
            client.dispatch_workflow(group.then(Task::new(CALLBACK, ""), QUEUE)).await?;
            let members = tokio::time::timeout(GROUP_LIMIT, callbacks.recv())
                .await
                .map_err(|_| "no callback in time")?
                .ok_or("worker gone")?;
            if members != size {
                return Err(format!("callback saw {members} members, not {size}").into());
            }
        }
        let grouped = start.elapsed();

        let mut plained = Vec::new();
        for tracked in [false, true] {
            let start = Instant::now();
            for _ in 0..groups {
                let dispatches = (0..size).map(|_| {
                    let task = Task::new(TASK_NAME, Bytes::from_static(PAYLOAD));
                    client.dispatch(if tracked { task.tracked() } else { task }, QUEUE)
                });
                futures_util::future::try_join_all(dispatches).await?;
                for _ in 0..size {
                    tokio::time::timeout(GROUP_LIMIT, plain.recv())
                        .await
                        .map_err(|_| "plain tasks not handled in time")?
                        .ok_or("worker gone")?;
                }
            }
            plained.push(start.elapsed());
        }
        shutdown.shutdown();
        running.await??;
        // Nothing was called back twice.
        if callbacks.try_recv().is_ok() {
            return Err("a callback ran twice".into());
        }
        let tasks = (groups * size) as f64;
        Ok(Sample {
            per_s: tasks / grouped.as_secs_f64(),
            extra: vec![
                ("group_ms".into(), grouped.as_secs_f64() * 1e3 / groups as f64),
                ("plain_per_s".into(), tasks / plained[0].as_secs_f64()),
                ("plain_ms".into(), plained[0].as_secs_f64() * 1e3 / groups as f64),
                ("tracked_per_s".into(), tasks / plained[1].as_secs_f64()),
                ("tracked_ms".into(), plained[1].as_secs_f64() * 1e3 / groups as f64),
            ],
            ..Default::default()
        })
    })
    .await
}

async fn raw_groups(env: &Env, groups: usize, size: usize) -> Res<Sample> {
    env.with_stream(|layout, _client| async move {
        let stream = env.consume.get_stream(&layout.stream).await?;
        let consumer: PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("raw-{QUEUE}")),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                filter_subject: layout.subject.clone(),
                max_ack_pending: 128,
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await?;
        let headers = |task: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(natasks::wire::HEADER_TASK, task);
            headers.insert(natasks::wire::HEADER_QUEUE, QUEUE);
            headers
        };
        let (called, mut callbacks) = mpsc::unbounded_channel::<()>();
        let publisher = env.consume.clone();
        let subject = layout.subject.clone();
        let callback_headers = headers(CALLBACK);
        let consuming = tokio::spawn(async move {
            let mut messages = consumer.messages().await?;
            let mut count = 0usize;
            while let Some(message) = messages.next().await {
                let message = message?;
                let is_callback = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(natasks::wire::HEADER_TASK))
                    .is_some_and(|v| v.as_str() == CALLBACK);
                message.ack().await?;
                if is_callback {
                    let _ = called.send(());
                    continue;
                }
                count += 1;
                if count.is_multiple_of(size) {
                    publisher
                        .publish_with_headers(
                            subject.clone(),
                            callback_headers.clone(),
                            Bytes::new(),
                        )
                        .await?
                        .await?;
                }
            }
            Ok::<_, crate::BoxError>(())
        });
        let member_headers = Arc::new(headers(TASK_NAME));
        let start = Instant::now();
        for _ in 0..groups {
            let publishes = (0..size).map(|_| {
                let (js, subject, headers) =
                    (env.publish.clone(), layout.subject.clone(), member_headers.clone());
                async move {
                    js.publish_with_headers(
                        subject,
                        (*headers).clone(),
                        Bytes::from_static(PAYLOAD),
                    )
                    .await?
                    .await?;
                    Ok::<_, crate::BoxError>(())
                }
            });
            futures_util::future::try_join_all(publishes).await?;
            tokio::time::timeout(GROUP_LIMIT, callbacks.recv())
                .await
                .map_err(|_| "no raw callback in time")?
                .ok_or("raw consumer gone")?;
        }
        let elapsed = start.elapsed();
        consuming.abort();
        let tasks = (groups * size) as f64;
        Ok(Sample {
            per_s: tasks / elapsed.as_secs_f64(),
            extra: vec![("group_ms".into(), elapsed.as_secs_f64() * 1e3 / groups as f64)],
            ..Default::default()
        })
    })
    .await
}
