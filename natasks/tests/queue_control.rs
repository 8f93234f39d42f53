//! Queue control against a real server: pause and resume, the queue's limit of tasks in
//! flight across workers, rate limits, and what survives restarts.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use natasks::admin::{Admin, AdminErrorKind, Rate};
use natasks::{Attempt, Client, HandlerError, Task, Worker};

/// A handler reporting `(payload, attempt)` of every task it starts.
fn starts(
    tx: tokio::sync::mpsc::UnboundedSender<(String, u64)>,
) -> impl Fn(Attempt, Task) -> std::future::Ready<Result<(), HandlerError>> + Clone + Send + Sync {
    move |Attempt(attempt): Attempt, task: Task| {
        let _ = tx.send((String::from_utf8_lossy(task.payload()).into_owned(), attempt));
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn a_paused_queue_starts_nothing_until_resumed() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "mail")
        .concurrency(4)
        .handle("send", starts(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("send", "before"), "mail").await.unwrap();
    assert_eq!(seen.recv().await.0, "before");

    let info = admin.pause("mail", None).await.unwrap();
    assert!(info.paused_until.is_some(), "{info:?}");
    for i in 0..5 {
        client.dispatch(Task::new("send", format!("paused-{i}")), "mail").await.unwrap();
    }
    assert_eq!(
        seen.recv_within(Duration::from_secs(2)).await,
        None,
        "a paused queue starts nothing"
    );
    assert_eq!(admin.queue("mail").await.unwrap().pending, 5);

    let resumed = std::time::Instant::now();
    let info = admin.resume("mail").await.unwrap();
    assert_eq!(info.paused_until, None);
    let got = seen.take(5, DEADLINE).await;
    println!("resume to 5 tasks started: {:?}", resumed.elapsed());
    assert!(got.iter().all(|(_, attempt)| *attempt == 1), "nothing was retried: {got:?}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_pause_survives_worker_and_server_restarts() {
    let mut server = NatsServer::start().await;
    let js = server.jetstream().await;
    let admin = Admin::new(js.clone());
    let mut seen = Seen::new();
    let build = |js: async_nats::jetstream::Context, tx| async move {
        Worker::builder(js, "mail").handle("send", starts(tx)).build().await.unwrap()
    };
    // The queue gets its consumer from a first worker, which is then stopped.
    spawn(build(js.clone(), seen.tx.clone()).await).stop().await.unwrap();
    admin.pause("mail", None).await.unwrap();
    server.restart().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let running = spawn(build(js.clone(), seen.tx.clone()).await);
    client.dispatch(Task::new("send", "x"), "mail").await.unwrap();
    assert_eq!(seen.recv_within(Duration::from_secs(2)).await, None, "still paused");
    let admin = Admin::new(js);
    assert!(admin.queue("mail").await.unwrap().paused_until.is_some());
    admin.resume("mail").await.unwrap();
    assert_eq!(seen.recv().await, ("x".to_owned(), 1));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_pause_until_a_time_ends_by_itself() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker =
        Worker::builder(js.clone(), "mail").handle("send", starts(seen.tx.clone())).build().await;
    let running = spawn(worker.unwrap());
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    Admin::new(js).pause("mail", Some(until)).await.unwrap();
    client.dispatch(Task::new("send", "x"), "mail").await.unwrap();
    assert_eq!(seen.recv_within(Duration::from_secs(1)).await, None);
    assert_eq!(seen.recv().await.0, "x", "the pause ended on its own");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn the_queue_limit_holds_across_workers_and_their_restarts() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let running_now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (running_now, most, done) = (running_now.clone(), most.clone(), done.clone());
        move |_: Task| {
            let (running_now, most, done) = (running_now.clone(), most.clone(), done.clone());
            async move {
                let now = running_now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                running_now.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        }
    };
    let build = || async {
        let js = async_nats::jetstream::new(server.client().await);
        Worker::builder(js, "reports")
            .concurrency(4)
            .handle("render", handler.clone())
            .build()
            .await
    };
    // A first worker creates the consumer; the limit is set; then three workers run.
    let first = build().await.unwrap();
    let info = Admin::new(js.clone()).set_limit("reports", Some(2)).await.unwrap();
    assert_eq!((info.limit, info.limit_set), (Some(2), true));
    let workers = vec![spawn(first), spawn(build().await.unwrap()), spawn(build().await.unwrap())];
    for i in 0..30 {
        client.dispatch(Task::new("render", format!("{i}")), "reports").await.unwrap();
    }
    eventually(DEADLINE, "every task to be processed", || async {
        done.load(Ordering::SeqCst) == 30
    })
    .await;
    assert_eq!(most.load(Ordering::SeqCst), 2, "12 slots, 2 in flight at most");
    for worker in workers {
        worker.stop().await.unwrap();
    }
    let info = Admin::new(js.clone()).queue("reports").await.unwrap();
    assert_eq!(info.limit, Some(2), "workers that restart keep the operator's limit");
    let info = Admin::new(js).set_limit("reports", None).await.unwrap();
    assert!(!info.limit_set);
}

/// Seconds since 1970 of now.
fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn a_rate_limit_holds_across_workers_without_spending_attempts() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let starts_at: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let handler = {
        let starts_at = starts_at.clone();
        move |Attempt(attempt): Attempt| {
            starts_at.lock().unwrap().push((unix_secs(), attempt));
            std::future::ready(Ok::<(), HandlerError>(()))
        }
    };
    let build = || async {
        let js = async_nats::jetstream::new(server.client().await);
        Worker::builder(js, "api")
            .concurrency(4)
            .ack_wait(Duration::from_secs(2))
            .handle("call", handler.clone())
            .build()
            .await
            .unwrap()
    };
    let first = build().await;
    let admin = Admin::new(js.clone());
    let info = admin.set_rate("api", None, Some("5/s".parse().unwrap())).await.unwrap();
    assert_eq!(info.rates.len(), 1);
    let workers = vec![spawn(first), spawn(build().await), spawn(build().await)];
    for i in 0..25 {
        client.dispatch(Task::new("call", format!("{i}")), "api").await.unwrap();
    }
    eventually(Duration::from_secs(30), "every task to start", || async {
        starts_at.lock().unwrap().len() == 25
    })
    .await;
    let starts = starts_at.lock().unwrap().clone();
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for (second, _) in &starts {
        *per_second.entry(*second).or_default() += 1;
    }
    println!("starts per second: {per_second:?}");
    assert!(per_second.values().all(|&n| n <= 5), "at most 5 a second: {per_second:?}");
    assert!(per_second.len() >= 5, "25 tasks at 5/s take 5 seconds: {per_second:?}");
    assert!(starts.iter().all(|(_, attempt)| *attempt == 1), "waiting spends no attempt");
    for worker in workers {
        worker.stop().await.unwrap();
    }
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let admin = Admin::new(js.clone());
    Client::new(js.clone()).await.unwrap();
    let kind = |r: Result<natasks::admin::QueueInfo, natasks::admin::AdminError>| {
        r.expect_err("refused").kind()
    };
    assert_eq!(kind(admin.pause("nobody", None).await), AdminErrorKind::UnknownQueue);
    assert_eq!(kind(admin.set_limit("nobody", Some(3)).await), AdminErrorKind::UnknownQueue);
    let worker =
        Worker::builder(js, "q").handle("t", |_: Task| async { Ok::<(), HandlerError>(()) });
    let running = spawn(worker.build().await.unwrap());
    assert_eq!(kind(admin.set_limit("q", Some(0)).await), AdminErrorKind::InvalidInput);
    assert_eq!(kind(admin.set_limit("q", Some(-4)).await), AdminErrorKind::InvalidInput);
    assert_eq!(kind(admin.pause("a.b", None).await), AdminErrorKind::InvalidInput);
    let past = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    assert_eq!(kind(admin.pause("q", Some(past)).await), AdminErrorKind::InvalidInput);
    assert!(Rate::new(0, Duration::from_secs(1)).is_err());
    assert!("3/0s".parse::<Rate>().is_err());
    let rate = Rate::per_second(3).unwrap();
    assert_eq!(
        kind(admin.set_rate("q", Some("bad name*"), Some(rate)).await),
        AdminErrorKind::InvalidInput
    );
    let info = admin.queue("q").await.unwrap();
    assert_eq!((info.paused_until, info.limit_set, info.rates.len()), (None, false, 0));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_rate_limited_task_name_does_not_hold_the_other_tasks_back() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "api")
        .concurrency(4)
        .handle("slow.api", starts(seen.tx.clone()))
        .handle("local", starts(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    Admin::new(js).set_rate("api", Some("slow.api"), Some("1/s".parse().unwrap())).await.unwrap();
    let running = spawn(worker);
    for i in 0..10 {
        client.dispatch(Task::new("slow.api", format!("api-{i}")), "api").await.unwrap();
    }
    for i in 0..20 {
        client.dispatch(Task::new("local", format!("local-{i}")), "api").await.unwrap();
    }
    // The 20 local tasks run while the rate-limited ones wait for their periods.
    let started = std::time::Instant::now();
    let mut locals = 0;
    let mut apis = 0;
    while locals < 20 {
        let (what, attempt) = seen.recv().await;
        assert_eq!(attempt, 1, "waiting spends no attempt");
        if what.starts_with("local") {
            locals += 1;
        } else {
            apis += 1;
        }
    }
    println!("20 local tasks in {:?}, {apis} rate-limited ones meanwhile", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "local tasks were held back");
    assert!(apis <= 6, "at most one rate-limited start a second: {apis}");
    running.stop().await.unwrap();
}

/// Tasks a worker already held when its queue was paused wait with their leases renewed
/// once per `progress_interval`, not at every look at whether the pause ended, and start
/// on their first attempt once the queue is resumed.
#[tokio::test]
async fn held_tasks_of_a_paused_queue_renew_their_leases_once_per_interval() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    // The worker's replies come under a prefix of their own: the test hears when the
    // worker has read the pause.
    let worker_client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_WORKER")
        .connect(server.url())
        .await
        .unwrap();
    let mut worker_replies = js.client().subscribe("_WORKER.>").await.unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut seen = Seen::new();
    let interval = Duration::from_secs(1);
    let worker = Worker::builder(async_nats::jetstream::new(worker_client), "mail")
        .concurrency(2)
        .fetch_batch(6)
        .ack_wait(Duration::from_secs(3))
        .progress_interval(interval)
        .handle("block", {
            let gate = gate.clone();
            move |_: Task| {
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    Ok::<_, HandlerError>(())
                }
            }
        })
        .handle("send", starts(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    // Two tasks take both slots; four more wait in the worker, prefetched.
    for _ in 0..2 {
        client.dispatch(Task::new("block", ""), "mail").await.unwrap();
    }
    for i in 0..4 {
        client.dispatch(Task::new("send", format!("held-{i}")), "mail").await.unwrap();
    }
    eventually(DEADLINE, "the worker to hold all six tasks", || async {
        admin.queue("mail").await.unwrap().in_flight == 6
    })
    .await;
    admin.pause("mail", None).await.unwrap();
    let heard = tokio::time::timeout(DEADLINE, async {
        while let Some(reply) = futures_util::StreamExt::next(&mut worker_replies).await {
            if reply.payload.windows(13).any(|w| w == b"\"paused\":true") {
                return;
            }
        }
    });
    heard.await.expect("the worker did not read the pause");

    // The held tasks get the slots and wait for the resume; their acks are counted.
    let mut acks = js.client().subscribe("$JS.ACK.>").await.unwrap();
    gate.add_permits(2);
    let window = Duration::from_secs(3);
    let counting = tokio::time::Instant::now();
    let mut renewals: BTreeMap<String, usize> = BTreeMap::new();
    while let Ok(Some(ack)) =
        tokio::time::timeout_at(counting + window, futures_util::StreamExt::next(&mut acks)).await
    {
        if &ack.payload[..] == b"+WPI" {
            *renewals.entry(ack.subject.to_string()).or_default() += 1;
        }
    }
    println!("lease renewals per held task over {window:?}: {:?}", renewals.values());
    assert_eq!(seen.recv_within(Duration::ZERO).await, None, "a paused queue starts nothing");
    let most = (window.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1;
    assert!(
        renewals.values().all(|&n| n <= most),
        "at most {most} renewals per task in {window:?}: {renewals:?}"
    );

    admin.resume("mail").await.unwrap();
    let got = seen.take(4, DEADLINE).await;
    assert!(got.iter().all(|(_, attempt)| *attempt == 1), "no lease lapsed: {got:?}");
    running.stop().await.unwrap();
}
