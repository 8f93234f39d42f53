//! `search_dead_100k`: 100,000 dead letters, searched for a payload text that few contain.
//!
//! natasks runs `Admin::search`. A work-queue stream refuses consumers without
//! acknowledgements (so no ordered consumer), so raw async-nats reads the same subject the
//! fastest way it allows: an ephemeral pull consumer with explicit acks on the dead-letter
//! subject, fetching in batches and acknowledging nothing (nothing is consumed), checking
//! each payload. Both report messages read per second. The natasks run then searches again
//! with a worker consumer on the dead-letter queue, where the server refuses search's own
//! consumer and it reads message by message (`natasks_message_gets_per_s`).

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use natasks::admin::{Admin, Filter, SearchOptions};

use super::{Env, Impl, Res, Sample, QUEUE};

/// Publishes in flight while filling the dead-letter queue.
const FILL_IN_FLIGHT: usize = 4_096;
/// One dead letter in this many carries the text searched for.
const NEEDLE_EVERY: u64 = 10_000;
/// The text searched for.
const NEEDLE: &str = "needle-7f3a";

/// Fills a dead-letter queue with `n` dead letters, then times one search over it.
pub async fn search_dead(env: &Env, imp: Impl, n: u64) -> Res<Sample> {
    if imp == Impl::Apalis {
        return Err("apalis runs only in the worker-process workloads".into());
    }
    env.with_stream(|layout, _client| async move {
        let subject = format!("{}.{QUEUE}-dlq", layout.prefix);
        fill(env, &subject, n).await?;
        let expected = n.div_ceil(NEEDLE_EVERY);
        let admin = Admin::new(env.publish.clone())
            .stream_name(layout.stream.clone())
            .subject_prefix(layout.prefix.clone());
        let search = || async {
            let options = SearchOptions { queue: Some(QUEUE.to_owned()), ..Default::default() };
            let filter = Filter::new().payload_contains(NEEDLE);
            let result = admin.search(&filter, &options, |_| {}).await?;
            Res::Ok((result.scanned, result.items.len() as u64))
        };
        let check = |(scanned, matched): (u64, u64)| -> Res<()> {
            if scanned != n || matched != expected {
                return Err(format!("read {scanned} of {n}, found {matched} of {expected}").into());
            }
            Ok(())
        };
        let start = Instant::now();
        check(match imp {
            Impl::Natasks => search().await?,
            _ => raw_scan(env, &layout.stream, &subject, n).await?,
        })?;
        let elapsed = start.elapsed().as_secs_f64();
        let mut extra = vec![("seconds".to_owned(), elapsed)];
        if imp == Impl::Natasks {
            // A worker consuming the dead-letter queue: search reads message by message.
            let stream = env.publish.get_stream(&layout.stream).await?;
            stream
                .create_consumer(pull::Config {
                    durable_name: Some("dlq-worker".to_owned()),
                    filter_subject: subject.clone(),
                    ..Default::default()
                })
                .await?;
            let start = Instant::now();
            check(search().await?)?;
            extra.push(("message_gets_per_s".to_owned(), n as f64 / start.elapsed().as_secs_f64()));
        }
        Ok(Sample { per_s: n as f64 / elapsed, extra, ..Default::default() })
    })
    .await
}

async fn fill(env: &Env, subject: &str, n: u64) -> Res<()> {
    let mut acks = Vec::with_capacity(FILL_IN_FLIGHT);
    for i in 0..n {
        let mut headers = HeaderMap::new();
        headers.insert(natasks::wire::HEADER_TASK, super::TASK_NAME);
        headers.insert(natasks::wire::HEADER_LAST_ERROR, "handler failed: timeout");
        let text = if i % NEEDLE_EVERY == 0 { NEEDLE } else { "haystack" };
        let payload = format!(r#"{{"user_id":{i},"note":"{text}","tags":["a","b","c"]}}"#);
        acks.push(
            env.publish.publish_with_headers(subject.to_owned(), headers, payload.into()).await?,
        );
        if acks.len() == FILL_IN_FLIGHT {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

/// Reads every message on `subject` through an ephemeral pull consumer that acknowledges
/// nothing; returns messages read and those containing the needle.
async fn raw_scan(env: &Env, stream: &str, subject: &str, n: u64) -> Res<(u64, u64)> {
    let stream = env.consume.get_stream(stream).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: -1,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.stream().max_messages_per_batch(1_000).messages().await?;
    let (mut scanned, mut matched) = (0, 0);
    while scanned < n {
        let message = messages.next().await.ok_or("the consumer ended early")??;
        scanned += 1;
        if message.payload.windows(NEEDLE.len()).any(|w| w == NEEDLE.as_bytes()) {
            matched += 1;
        }
    }
    drop(messages);
    let name = consumer.cached_info().name.clone();
    stream.delete_consumer(&name).await?;
    Ok((scanned, matched))
}
