//! One worker serving several queues: weighted shares, strict priority, no starvation,
//! graceful shutdown and bad input, against a real server.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use natasks::admin::Admin;
use natasks::{Client, Delivery, HandlerError, Task, Worker};

/// Start order of tasks, by queue.
type Starts = Arc<Mutex<Vec<String>>>;

fn recorder(
    starts: Starts,
    work: Duration,
) -> impl Fn(Task) -> futures_util::future::BoxFuture<'static, Result<(), HandlerError>>
       + Clone
       + Send
       + Sync {
    use futures_util::FutureExt;
    move |task: Task| {
        let queue = task.delivery().map(|d: &Delivery| d.queue.to_string()).unwrap_or_default();
        starts.lock().unwrap().push(queue);
        async move {
            tokio::time::sleep(work).await;
            Ok(())
        }
        .boxed()
    }
}

async fn fill(client: &Client, queue: &str, n: usize) {
    for i in 0..n {
        client.dispatch(Task::new("job", format!("{i}")), queue).await.unwrap();
    }
}

#[tokio::test]
async fn weighted_shares_follow_the_weights_under_load() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let starts: Starts = Arc::default();
    // The consumers exist before the tasks, so that every queue has a backlog from the start.
    let worker = Worker::builder(js.clone(), "critical")
        .weight(6)
        .queue("default", 3)
        .queue("low", 1)
        .concurrency(4)
        .handle("job", recorder(starts.clone(), Duration::from_millis(2)))
        .build()
        .await
        .unwrap();
    assert_eq!(worker.queues(), [("critical", 6), ("default", 3), ("low", 1)]);
    for queue in ["critical", "default", "low"] {
        fill(&client, queue, 250).await;
    }
    let running = spawn(worker);
    eventually(DEADLINE, "400 tasks to start", || async { starts.lock().unwrap().len() >= 400 })
        .await;
    running.stop().await.unwrap();
    // While every queue still had work (critical runs out after 250 of its tasks).
    let starts = starts.lock().unwrap();
    let window = &starts[..400];
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for queue in window {
        *counts.entry(queue.as_str()).or_default() += 1;
    }
    println!("shares of the first 400 starts: {counts:?}");
    for (queue, weight) in [("critical", 6.0), ("default", 3.0), ("low", 1.0)] {
        let share = counts.get(queue).copied().unwrap_or(0) as f64 / window.len() as f64;
        let expected = weight / 10.0;
        assert!(
            (share - expected).abs() <= expected * 0.1,
            "{queue}: share {share:.3}, weight share {expected:.3}: {counts:?}"
        );
    }
}

#[tokio::test]
async fn strict_priority_serves_lower_queues_only_when_higher_ones_are_empty() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let starts: Starts = Arc::default();
    let worker = Worker::builder(js.clone(), "low")
        .queue("critical", 10)
        .strict_priority()
        .concurrency(2)
        .handle("job", recorder(starts.clone(), Duration::from_millis(5)))
        .build()
        .await
        .unwrap();
    fill(&client, "low", 50).await;
    fill(&client, "critical", 50).await;
    let running = spawn(worker);
    eventually(DEADLINE, "every task to start", || async { starts.lock().unwrap().len() == 100 })
        .await;
    running.stop().await.unwrap();
    let starts = starts.lock().unwrap();
    let last_critical = starts.iter().rposition(|q| q == "critical").unwrap();
    let low_before = starts[..last_critical].iter().filter(|q| *q == "low").count();
    println!("low tasks started before the last critical one: {low_before}");
    // The worker's one waiting low task may start while critical's next delivery is on
    // its way; no more.
    assert!(low_before <= 2, "strict priority: {starts:?}");
}

#[tokio::test]
async fn a_flooded_low_queue_does_not_starve_critical() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let waits: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let handler = {
        let waits = waits.clone();
        move |task: Task| {
            let waits = waits.clone();
            async move {
                if task.name() == "ping" {
                    let sent: u128 = String::from_utf8_lossy(task.payload()).parse().unwrap();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_micros();
                    waits.lock().unwrap().push(Duration::from_micros((now - sent) as u64));
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "critical")
        .weight(9)
        .queue("low", 1)
        .concurrency(4)
        .handle("ping", handler.clone())
        .handle("slow", handler)
        .build()
        .await
        .unwrap();
    for i in 0..200 {
        client.dispatch(Task::new("slow", format!("{i}")), "low").await.unwrap();
    }
    let running = spawn(worker);
    let started = Instant::now();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        client.dispatch(Task::new("ping", now.as_micros().to_string()), "critical").await.unwrap();
    }
    eventually(DEADLINE, "every ping to run", || async { waits.lock().unwrap().len() == 20 }).await;
    println!("20 pings in {:?}", started.elapsed());
    running.stop().await.unwrap();
    let mut waits = waits.lock().unwrap().clone();
    waits.sort();
    println!("critical waits: p50 {:?}, max {:?}", waits[10], waits[19]);
    // At most one slow task (200 ms) ahead of a ping, with margin for a loaded machine.
    assert!(waits[19] < Duration::from_millis(1500), "critical starved: {waits:?}");
}

#[tokio::test]
async fn bad_input_is_refused_at_build() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let ok = |_: Task| async { Ok::<(), HandlerError>(()) };
    let cases: Vec<(natasks::WorkerBuilder, &str)> = vec![
        (Worker::builder(js.clone(), "a").queue("b", 0), "weight 0 of queue \"b\""),
        (Worker::builder(js.clone(), "a").weight(0).queue("b", 1), "weight 0 of queue \"a\""),
        (Worker::builder(js.clone(), "a").queue("a", 2), "served twice"),
        (Worker::builder(js.clone(), "").queue("default", 2), "served twice"),
        (Worker::builder(js.clone(), "a").queue("b.c", 2), "queue name \"b.c\""),
        (Worker::builder(js.clone(), "a").durable("d").queue("b", 2), "durable"),
    ];
    for (builder, expected) in cases {
        let err = builder.handle("t", ok).build().await.err().expect("refused");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}

#[tokio::test]
async fn every_queue_is_served_again_after_a_server_restart() {
    let mut server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let starts: Starts = Arc::default();
    let worker = Worker::builder(js.clone(), "a")
        .queue("b", 1)
        .concurrency(2)
        .handle("job", recorder(starts.clone(), Duration::ZERO))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    fill(&client, "a", 1).await;
    fill(&client, "b", 1).await;
    eventually(DEADLINE, "both tasks to start", || async { starts.lock().unwrap().len() == 2 })
        .await;
    // The server forgets the open pull requests; the worker must notice and ask again.
    server.restart().await;
    let client = Client::new(server.jetstream().await).await.unwrap();
    fill(&client, "a", 1).await;
    fill(&client, "b", 1).await;
    eventually(Duration::from_secs(30), "both queues to be served after the restart", || async {
        starts.lock().unwrap().len() == 4
    })
    .await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_graceful_stop_keeps_the_leases_of_every_queues_waiting_tasks() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let runs: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let handler = |runs: Arc<Mutex<Vec<(String, u64)>>>| {
        move |natasks::Attempt(attempt): natasks::Attempt, task: Task| {
            let payload = String::from_utf8_lossy(task.payload()).into_owned();
            runs.lock().unwrap().push((payload.clone(), attempt));
            async move {
                if payload == "long" {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "a")
        .queue("b", 1)
        .concurrency(1)
        .ack_wait(Duration::from_secs(2))
        .drain_timeout(Duration::from_secs(20))
        .handle("t", handler(runs.clone()))
        .build()
        .await
        .unwrap();
    client.dispatch(Task::new("t", "long"), "a").await.unwrap();
    let running = spawn(worker);
    eventually(DEADLINE, "the long task to start", || async { !runs.lock().unwrap().is_empty() })
        .await;
    for i in 0..2 {
        client.dispatch(Task::new("t", format!("b{i}")), "b").await.unwrap();
    }
    // Wait until the b tasks are held by the busy worker (in flight on the server).
    eventually(DEADLINE, "the b tasks to be delivered", || async {
        Admin::new(js.clone()).queue("b").await.unwrap().in_flight == 2
    })
    .await;
    // A second worker of b is ready to take any task whose lease runs out.
    let other = spawn(
        Worker::builder(js.clone(), "b")
            .ack_wait(Duration::from_secs(2))
            .handle("t", handler(runs.clone()))
            .build()
            .await
            .unwrap(),
    );
    // The stop waits for the long task (6 s, three ack waits) while b's tasks wait.
    running.stop().await.unwrap();
    eventually(DEADLINE, "every task to run", || async { runs.lock().unwrap().len() >= 3 }).await;
    other.stop().await.unwrap();
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 3, "each task ran once: {runs:?}");
    assert!(runs.iter().all(|(_, attempt)| *attempt == 1), "{runs:?}");
}

#[tokio::test]
async fn tasks_already_held_wait_while_their_queue_is_paused() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let starts: Starts = Arc::default();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let handler = {
        let starts = starts.clone();
        move |task: Task| {
            let starts = starts.clone();
            let mut release = release_rx.clone();
            async move {
                let payload = String::from_utf8_lossy(task.payload()).into_owned();
                starts.lock().unwrap().push(payload.clone());
                if payload == "busy" {
                    let _ = release.wait_for(|r| *r).await;
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    // One slot, busy with a task of `other`; `held` gets its tasks delivered and waiting.
    let worker = Worker::builder(js.clone(), "other")
        .queue("held", 1)
        .concurrency(1)
        .handle("job", handler)
        .build()
        .await
        .unwrap();
    client.dispatch(Task::new("job", "busy"), "other").await.unwrap();
    let running = spawn(worker);
    eventually(DEADLINE, "the busy task to start", || async { starts.lock().unwrap().len() == 1 })
        .await;
    for i in 0..2 {
        client.dispatch(Task::new("job", format!("held-{i}")), "held").await.unwrap();
    }
    let admin = Admin::new(js.clone());
    eventually(DEADLINE, "held's tasks to be delivered", || async {
        admin.queue("held").await.unwrap().in_flight == 2
    })
    .await;
    admin.pause("held", None).await.unwrap();
    // The slot frees; the held tasks must not start while the queue is paused.
    release_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(starts.lock().unwrap().len(), 1, "{:?}", starts.lock().unwrap());
    admin.resume("held").await.unwrap();
    eventually(DEADLINE, "the held tasks to start after the resume", || async {
        starts.lock().unwrap().len() == 3
    })
    .await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn one_queues_error_costs_the_other_queues_waiting_tasks_nothing() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let runs: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let seen = runs.clone();
    // No retries: a waiting task handed back would be dead-lettered without running.
    let worker = Worker::builder(js.clone(), "a")
        .queue("b", 1)
        .concurrency(1)
        .max_retries(0)
        .handle("t", move |natasks::Attempt(attempt): natasks::Attempt, task: Task| {
            seen.lock()
                .unwrap()
                .push((String::from_utf8_lossy(task.payload()).into_owned(), attempt));
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    for i in 0..4 {
        client.dispatch(Task::new("t", format!("a{i}")), "a").await.unwrap();
    }
    let running = spawn(worker);
    eventually(DEADLINE, "a's tasks to wait in the worker", || async {
        Admin::new(js.clone()).queue("a").await.unwrap().in_flight >= 2
    })
    .await;
    // Queue b's consumer disappears: the worker re-creates its pullers.
    let stream = js.get_stream("NATASKS").await.unwrap();
    stream.delete_consumer("natasks-b").await.unwrap();
    eventually(DEADLINE, "every task of a to run", || async { runs.lock().unwrap().len() == 4 })
        .await;
    running.stop().await.unwrap();
    let runs = runs.lock().unwrap().clone();
    assert!(runs.iter().all(|(_, attempt)| *attempt == 1), "{runs:?}");
    assert_eq!(stored(&js, "natasks.a-dlq").await, 0, "nothing dead-lettered unrun");
}

#[tokio::test]
async fn weighted_shares_hold_with_handlers_that_finish_at_once() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let starts: Starts = Arc::default();
    let worker = Worker::builder(js.clone(), "critical")
        .weight(6)
        .queue("default", 3)
        .queue("low", 1)
        .concurrency(4)
        .handle("job", {
            // Finishes on its first poll, never yielding.
            let starts = starts.clone();
            move |task: Task| {
                let queue = task.delivery().map(|d: &Delivery| d.queue.to_string());
                starts.lock().unwrap().push(queue.unwrap_or_default());
                std::future::ready(Ok::<(), HandlerError>(()))
            }
        })
        .build()
        .await
        .unwrap();
    for queue in ["critical", "default", "low"] {
        fill(&client, queue, 300).await;
    }
    let running = spawn(worker);
    eventually(DEADLINE, "400 tasks to start", || async { starts.lock().unwrap().len() >= 400 })
        .await;
    running.stop().await.unwrap();
    let starts = starts.lock().unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for queue in &starts[..400] {
        *counts.entry(queue.as_str()).or_default() += 1;
    }
    println!("shares of the first 400 starts, instant handlers: {counts:?}");
    for (queue, weight) in [("critical", 6.0), ("default", 3.0), ("low", 1.0)] {
        let share = counts.get(queue).copied().unwrap_or(0) as f64 / 400.0;
        let expected = weight / 10.0;
        assert!(
            (share - expected).abs() <= expected * 0.1,
            "{queue}: share {share:.3}, weight share {expected:.3}: {counts:?}"
        );
    }
}

/// A graceful stop of an idle worker serving several queues waits for the pull requests it
/// already sent to end; meanwhile it wakes for what the server sends (heartbeats, the
/// requests' end) and for the requests' expiry, not on a timer of its own. The worker runs
/// on a runtime of one thread whose parks count its wakeups.
#[tokio::test]
async fn an_idle_stop_waits_for_its_requests_without_polling() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    Client::new(js.clone()).await.unwrap();
    let mut requests = js.client().subscribe("$JS.API.CONSUMER.MSG.NEXT.>").await.unwrap();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let url = server.url();
    let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
    let run = runtime.spawn(async move {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let worker = Worker::builder(js, "high")
            .queue("low", 1)
            .fetch_timeout(Duration::from_secs(4))
            .handle("job", |_: Task| async { Ok::<_, HandlerError>(()) })
            .build()
            .await
            .unwrap();
        handle_tx.send(worker.shutdown_handle()).unwrap();
        worker.run().await
    });
    let handle = tokio::time::timeout(DEADLINE, handle_rx).await.unwrap().unwrap();
    // Stopped as soon as both queues' first requests are out: the stop lasts about as
    // long as a request (4 s).
    let mut asked = std::collections::HashSet::new();
    while asked.len() < 2 {
        let request = tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(&mut requests))
            .await
            .expect("a pull request from each queue")
            .unwrap();
        asked.insert(request.subject.to_string());
    }
    let parks = || runtime.metrics().worker_park_count(0);
    let (before, stopping) = (parks(), Instant::now());
    handle.shutdown();
    tokio::time::timeout(DEADLINE, run).await.expect("stopped in time").unwrap().unwrap();
    let (wakeups, took) = (parks() - before, stopping.elapsed());
    runtime.shutdown_background();
    println!("idle stop: {wakeups} wakeups in {took:?}");
    assert!(took > Duration::from_secs(2), "the stop waited for the requests: {took:?}");
    // Heartbeats (a second apart) of two requests, and a few more; a timer every 100 ms
    // makes over a hundred.
    assert!(wakeups <= 20, "{wakeups} wakeups in {took:?}");
}
