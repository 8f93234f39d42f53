//! The paths where a task could be lost, dead-lettered unrun or run twice, each proven on a
//! real server: what a worker holds, what a graceful stop or a dropped `run_until` costs a
//! task, lease renewal of tasks that wait, dead letters that cannot be published at once,
//! panicking propagators, and metric labels from the wire.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use natasks::observe::{Finished, Observer, Started};
use natasks::{Client, HandlerError, Propagator, Task, Unroutable, Worker};

/// Every run of a handler: (payload, attempt, worker label).
type Runs = Arc<Mutex<Vec<(String, u64, &'static str)>>>;

fn runs() -> Runs {
    Arc::new(Mutex::new(Vec::new()))
}

/// A handler that records each run and takes `work` to finish.
fn recording(
    runs: Runs,
    label: &'static str,
    work: Duration,
) -> impl Fn(Task) -> futures_util::future::BoxFuture<'static, Result<(), HandlerError>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |task: Task| {
        let runs = runs.clone();
        Box::pin(async move {
            let attempt = task.delivery().map(|d| d.attempt).unwrap_or_default();
            let id = String::from_utf8_lossy(task.payload()).into_owned();
            runs.lock().unwrap().push((id, attempt, label));
            tokio::time::sleep(work).await;
            Ok(())
        })
    }
}

async fn consumer_info(js: &jetstream::Context, queue: &str) -> jetstream::consumer::Info {
    let stream = js.get_stream("NATASKS").await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&format!("natasks-{queue}")).await.unwrap();
    consumer.info().await.unwrap().clone()
}

async fn dispatch_all(client: &Client, queue: &str, n: usize) {
    for i in 0..n {
        client.dispatch(Task::new("t", format!("{i}")), queue).await.unwrap();
    }
}

/// Asserts every task ran exactly once, on its first delivery.
fn assert_each_once_first_attempt(runs: &Runs, n: usize) {
    let runs = runs.lock().unwrap();
    let mut by_task: HashMap<&str, Vec<u64>> = HashMap::new();
    for (id, attempt, _) in runs.iter() {
        by_task.entry(id).or_default().push(*attempt);
    }
    for i in 0..n {
        let attempts = by_task.get(i.to_string().as_str());
        assert_eq!(attempts, Some(&vec![1]), "task {i}: runs {attempts:?} (all runs: {runs:?})");
    }
    assert_eq!(runs.len(), n, "runs: {runs:?}");
}

/// Issue item 2: with `fetch_batch(20)` a worker used to hold 20 tasks while running one;
/// a graceful stop handed 19 back with a delivery spent, and with `max_retries(0)` the next
/// worker dead-lettered them as "no outcome" without running them. A rolling deploy (three
/// workers stopped one after another) must cost a task nothing.
#[tokio::test]
async fn rolling_restart_costs_no_attempt() {
    const TASKS: usize = 20;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    // Without prefetch the next workers take what the stopped one never started; with the
    // issue's `fetch_batch(20)` the stopping worker runs its prefetched tasks first.
    for (queue, fetch_batch) in [("roll", 1), ("roll-pre", TASKS)] {
        dispatch_all(&client, queue, TASKS).await;
        let runs = runs();
        let build = |label: &'static str| {
            Worker::builder(js.clone(), queue)
                .concurrency(1)
                .fetch_batch(fetch_batch)
                .max_retries(0)
                .handle("t", recording(runs.clone(), label, Duration::from_millis(300)))
                .build()
        };
        for (label, after) in [("a", 1), ("b", 4)] {
            let worker = spawn(build(label).await.unwrap());
            eventually(DEADLINE, "the worker to start its tasks", || async {
                runs.lock().unwrap().len() >= after
            })
            .await;
            worker.stop().await.unwrap();
        }
        let last = spawn(build("c").await.unwrap());
        eventually(DEADLINE, "every task to run", || async { runs.lock().unwrap().len() >= TASKS })
            .await;
        let subject = format!("natasks.{queue}");
        eventually(DEADLINE, "the queue to empty", || async { stored(&js, &subject).await == 0 })
            .await;
        last.stop().await.unwrap();
        let dlq = format!("natasks.{queue}-dlq");
        assert_eq!(stored(&js, &dlq).await, 0, "fetch_batch({fetch_batch}): dead letters");
        assert_each_once_first_attempt(&runs, TASKS);
        if fetch_batch == 1 {
            let by: Vec<&str> = runs.lock().unwrap().iter().map(|(_, _, w)| *w).collect();
            assert!(by.contains(&"b") && by.contains(&"c"), "not a rolling deploy: {by:?}");
        }
    }
}

/// Issue item 6: the worker asks for no more tasks than it has free slots plus the prefetch
/// asked for (`fetch_batch` above `concurrency`), so no task waits in it uninvited.
#[tokio::test]
async fn worker_holds_its_free_slots_and_prefetch_at_most() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for (queue, fetch_batch, most) in [("held", 1, 2), ("held-pre", 6, 6)] {
        dispatch_all(&client, queue, 12).await;
        let runs = runs();
        let worker = Worker::builder(js.clone(), queue)
            .concurrency(2)
            .fetch_batch(fetch_batch)
            .handle("t", recording(runs.clone(), "a", Duration::from_millis(300)))
            .build()
            .await
            .unwrap();
        let worker = spawn(worker);
        let mut most_held = 0;
        let start = Instant::now();
        while runs.lock().unwrap().len() < 12 {
            assert!(start.elapsed() < DEADLINE, "tasks did not all run");
            most_held = most_held.max(consumer_info(&js, queue).await.num_ack_pending);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker.stop().await.unwrap();
        assert!(most_held <= most, "fetch_batch({fetch_batch}): held {most_held} tasks");
        assert!(most_held >= most.min(2), "fetch_batch({fetch_batch}): held only {most_held}");
        assert_each_once_first_attempt(&runs, 12);
    }
}

/// Issue item 5: two workers, one slot each, `fetch_batch(6)`, a 3 s ack wait renewed every
/// 2 s (a valid setting), 8 tasks of 1.5 s. Tasks waiting in a worker were renewed late and
/// ran out their lease: 15 runs for 8 tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_valid_setting_lets_a_task_outlive_its_lease() {
    const TASKS: usize = 8;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    dispatch_all(&client, "lease", TASKS).await;
    let runs = runs();
    let build = |label: &'static str| {
        Worker::builder(js.clone(), "lease")
            .concurrency(1)
            .fetch_batch(6)
            .ack_wait(Duration::from_secs(3))
            .progress_interval(Duration::from_secs(2))
            .handle("t", recording(runs.clone(), label, Duration::from_millis(1500)))
            .build()
    };
    let a = spawn(build("a").await.unwrap());
    let b = spawn(build("b").await.unwrap());
    eventually(Duration::from_secs(40), "every task to run", || async {
        runs.lock().unwrap().len() >= TASKS
    })
    .await;
    eventually(DEADLINE, "the queue to empty", || async {
        stored(&js, "natasks.lease").await == 0
    })
    .await;
    // A task that ran out its lease would be delivered again within the ack wait.
    tokio::time::sleep(Duration::from_secs(4)).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_each_once_first_attempt(&runs, TASKS);
}

/// Issue item 9: dropping `run_until`'s future (here by a timeout) left the worker marked
/// running for good and stranded the tasks it held until their ack wait. Now it shuts down
/// in the background: the running task finishes, nothing waits for the ack wait, and a
/// later `run_until` returns `Ok` instead of `AlreadyRunning`.
#[tokio::test]
async fn dropping_run_until_shuts_down_gracefully() {
    const TASKS: usize = 10;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    dispatch_all(&client, "drop", TASKS).await;
    let runs = runs();
    let build = |label: &'static str| {
        Worker::builder(js.clone(), "drop")
            .concurrency(1)
            .fetch_batch(TASKS)
            .ack_wait(Duration::from_secs(60))
            .handle("t", recording(runs.clone(), label, Duration::from_millis(300)))
            .build()
    };
    let a = build("a").await.unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(450), a.run()).await;
    assert!(dropped.is_err(), "run returned on its own: {dropped:?}");
    let b = spawn(build("b").await.unwrap());
    eventually(DEADLINE, "every task to run (none may wait for the 60 s ack wait)", || async {
        runs.lock().unwrap().len() >= TASKS
    })
    .await;
    let start = Instant::now();
    let again = loop {
        match tokio::time::timeout(DEADLINE, a.run_until(async {})).await {
            Ok(Err(err)) if err.kind() == natasks::RunErrorKind::AlreadyRunning => {
                assert!(start.elapsed() < DEADLINE, "the dropped run never finished");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert!(matches!(again, Ok(Ok(()))), "a later run_until: {again:?}");
    eventually(DEADLINE, "the queue to empty", || async { stored(&js, "natasks.drop").await == 0 })
        .await;
    b.stop().await.unwrap();
    assert!(runs.lock().unwrap().iter().any(|(_, _, label)| *label == "a"), "A ran nothing");
    assert_each_once_first_attempt(&runs, TASKS);
}

/// Issue item 2, last part: a dead letter that cannot be published at once used to be handed
/// back; its redelivery was then past the allowed attempts and was dead-lettered as "no
/// outcome", losing the handler's error (or, with retries left, ran again). The worker now
/// keeps the task, renewing its lease, and tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_publish_failure_keeps_the_reason_and_error() {
    let deny = r#"
authorization {
  users: [
    { user: admin, password: admin }
    { user: worker, password: worker, permissions: { publish: { allow: [">"], deny: ["natasks.fail-dlq"] } } }
  ]
}
"#;
    let allow = r#"
authorization {
  users: [
    { user: admin, password: admin }
    { user: worker, password: worker }
  ]
}
"#;
    let server = NatsServer::builder().config_file(deny).start().await;
    let connect = |user: &'static str| {
        let url = server.url();
        async move {
            async_nats::ConnectOptions::with_user_and_password(user.into(), user.into())
                .connect(url)
                .await
                .unwrap()
        }
    };
    let admin = jetstream::new(connect("admin").await);
    let client = Client::new(admin.clone()).await.unwrap();
    // The default publish timeout (5 s) is longer than the ack wait (3 s): the lease must be
    // renewed while the first dead-letter publish waits for its acknowledgement too.
    let worker_js = jetstream::new(connect("worker").await);
    let runs = runs();
    let handler = {
        let runs = runs.clone();
        move |task: Task| {
            let runs = runs.clone();
            async move {
                let attempt = task.delivery().map(|d| d.attempt).unwrap_or_default();
                runs.lock().unwrap().push(("0".to_owned(), attempt, "w"));
                Err::<(), _>(HandlerError::dead_letter(std::io::Error::other(
                    "the mail server said no",
                )))
            }
        }
    };
    // Unlimited retries and a free second slot: a lease that lapsed while the dead letter
    // waited would show as a second run.
    let worker = Worker::builder(worker_js, "fail")
        .concurrency(2)
        .ack_wait(Duration::from_secs(3))
        .handle("t", handler)
        .build()
        .await
        .unwrap();
    let worker = spawn(worker);
    client.dispatch(Task::new("t", "0"), "fail").await.unwrap();
    eventually(DEADLINE, "a refused dead-letter publish", || async {
        let log = server.log_tail(200);
        log.contains("Publish Violation") && log.contains("natasks.fail-dlq")
    })
    .await;
    // Longer than the ack wait: the worker must keep the task's lease meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let config = server.temp_dir().join("server.conf");
    std::fs::write(&config, allow).unwrap();
    let pid = server.pid().expect("server runs").to_string();
    let status = std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(status.success(), "could not ask the server to reload");
    let dead = first_on(&admin, "natasks.fail-dlq").await;
    worker.stop().await.unwrap();
    let header = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(header("Natasks-Dead-Letter-Reason").as_deref(), Some("rejected"));
    assert_eq!(header("Natasks-Last-Error").as_deref(), Some("the mail server said no"));
    assert_eq!(header("Natasks-Attempts").as_deref(), Some("1"));
    assert_eq!(*runs.lock().unwrap(), vec![("0".to_owned(), 1, "w")], "the handler ran once");
    assert_eq!(stored(&admin, "natasks.fail").await, 0, "the task is still queued");
    assert_eq!(stored(&admin, "natasks.fail-dlq").await, 1, "one dead letter");
}

struct PanickingPropagator;

impl Propagator for PanickingPropagator {
    fn inject(&self, _task: &mut Task) {}
    fn extract(&self, _task: &mut Task) {
        panic!("bad trace header");
    }
}

#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<String>>>);

impl Observer for Events {
    fn started(&self, event: &Started<'_>) {
        self.0.lock().unwrap().push(format!("started {} {}", event.task, event.attempt));
    }
    fn finished(&self, event: &Finished<'_>) {
        self.0.lock().unwrap().push(format!(
            "finished {} {} {}",
            event.task,
            event.attempt,
            event.outcome.as_str()
        ));
    }
}

/// Issue item 9, second part: a panicking propagator ran outside the panic guard: no
/// ack or nak, no finished event (the in-flight gauge leaked), the task stuck until its
/// ack wait. It now fails the attempt like a panicking handler.
#[tokio::test]
async fn panicking_propagator_fails_the_attempt() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let events = Events::default();
    let worker = Worker::builder(js.clone(), "prop")
        .max_retries(0)
        .ack_wait(Duration::from_secs(60))
        .propagator(PanickingPropagator)
        .observer(events.clone())
        .handle("t", |_task: Task| async { Ok::<(), HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let worker = spawn(worker);
    client.dispatch(Task::new("t", "x"), "prop").await.unwrap();
    let dead = first_on(&js, "natasks.prop-dlq").await;
    worker.stop().await.unwrap();
    let error = dead.headers.get("Natasks-Last-Error").map(|v| v.as_str().to_owned());
    assert!(
        error.as_deref().is_some_and(|e| e.contains("propagator panicked: bad trace header")),
        "{error:?}"
    );
    assert_eq!(
        *events.0.lock().unwrap(),
        vec!["started t 1".to_owned(), "finished t 1 dead-lettered".to_owned()]
    );
}

/// Issue item 7: task names come from the wire. Names no handler knows all go under one
/// label, so a producer putting ids into task names cannot grow the worker's metrics.
#[tokio::test]
async fn unknown_task_names_share_one_label() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let events = Events::default();
    let worker = Worker::builder(js.clone(), "names")
        .on_unroutable(Unroutable::Discard)
        .observer(events.clone())
        .concurrency(4)
        .handle("known", |_task: Task| async { Ok::<(), HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let worker = spawn(worker);
    for i in 0..20 {
        client.dispatch(Task::new(format!("user-{i}"), ""), "names").await.unwrap();
    }
    client.dispatch(Task::new("known", ""), "names").await.unwrap();
    eventually(DEADLINE, "every task settled", || async {
        events.0.lock().unwrap().iter().filter(|e| e.starts_with("finished")).count() >= 21
    })
    .await;
    worker.stop().await.unwrap();
    let events = events.0.lock().unwrap();
    let mut labels: Vec<&str> = events
        .iter()
        .filter(|e| e.starts_with("finished"))
        .map(|e| e.split(' ').nth(1).unwrap())
        .collect();
    labels.sort();
    labels.dedup();
    assert_eq!(labels, vec!["(unrouted)", "known"], "{events:?}");
}

/// A dead letter must fit the server's `max_payload`: for a task near the limit, the last
/// error is cut to fit. A dead letter that could never be stored used to be retried while
/// the worker kept the task, holding its slot for good.
#[tokio::test]
async fn dead_letter_of_a_task_near_max_payload_is_stored() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let max_payload = js.client().server_info().max_payload;
    let runs = runs();
    let handler = {
        let runs = runs.clone();
        move |task: Task| {
            let runs = runs.clone();
            async move {
                let attempt = task.delivery().map(|d| d.attempt).unwrap_or_default();
                runs.lock().unwrap().push((task.payload().len().to_string(), attempt, "w"));
                if task.payload().len() > 1000 {
                    return Err(HandlerError::dead_letter(std::io::Error::other("e".repeat(1500))));
                }
                Ok(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "big")
        .concurrency(1)
        .ack_wait(Duration::from_secs(60))
        .handle("t", handler)
        .build()
        .await
        .unwrap();
    let worker = spawn(worker);
    let big = vec![b'x'; max_payload - 300];
    client.dispatch(Task::new("t", big), "big").await.unwrap();
    client.dispatch(Task::new("t", "small"), "big").await.unwrap();
    let dead = first_on(&js, "natasks.big-dlq").await;
    eventually(DEADLINE, "the small task to run after the big one", || async {
        runs.lock().unwrap().len() >= 2
    })
    .await;
    worker.stop().await.unwrap();
    assert_eq!(dead.payload.len(), max_payload - 300);
    let header = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(header("Natasks-Dead-Letter-Reason").as_deref(), Some("rejected"));
    let error = header("Natasks-Last-Error").unwrap_or_default();
    assert!(error.len() < 1500 && error.chars().all(|c| c == 'e'), "last error {error:?}");
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 2, "each task ran once: {runs:?}");
}

/// Durations are added to clocks and sent to the server as signed nanoseconds: the builder
/// refuses values that would overflow either, naming the setting, instead of a panic at
/// shutdown ("wait forever" as `Duration::MAX`).
#[tokio::test]
async fn huge_durations_are_refused_at_build() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let builders = [
        ("drain_timeout", Worker::builder(js.clone(), "d").drain_timeout(Duration::MAX)),
        ("fetch_timeout", Worker::builder(js.clone(), "d").fetch_timeout(Duration::MAX)),
        ("ack_wait", Worker::builder(js.clone(), "d").ack_wait(Duration::MAX)),
        ("task_timeout", Worker::builder(js.clone(), "d").task_timeout(Duration::MAX)),
        ("idle_wait", Worker::builder(js.clone(), "d").idle_wait(Duration::MAX)),
    ];
    for (setting, builder) in builders {
        let result =
            builder.handle("t", |_t: Task| async { Ok::<(), HandlerError>(()) }).build().await;
        let err = result.err().unwrap_or_else(|| panic!("{setting}: Duration::MAX accepted"));
        assert_eq!(err.kind(), natasks::SetupErrorKind::InvalidOption, "{setting}: {err}");
        assert!(err.to_string().contains(setting), "{setting}: {err}");
    }
}

/// Handlers that compute without awaiting (here: block the thread) must still run in
/// parallel up to `concurrency`: a task's first poll happens in the pull loop, and one slow
/// first poll makes the worker give tasks their own task again. Run one at a time, these 8
/// half-second handlers would take 4 s and outlive the 3 s ack wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn handlers_that_compute_without_awaiting_run_in_parallel() {
    const TASKS: usize = 8;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    dispatch_all(&client, "cpu", TASKS).await;
    let runs = runs();
    let handler = {
        let runs = runs.clone();
        move |task: Task| {
            let runs = runs.clone();
            async move {
                let attempt = task.delivery().map(|d| d.attempt).unwrap_or_default();
                std::thread::sleep(Duration::from_millis(500));
                let id = String::from_utf8_lossy(task.payload()).into_owned();
                runs.lock().unwrap().push((id, attempt, "w"));
                Ok::<(), HandlerError>(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "cpu")
        .concurrency(TASKS)
        .ack_wait(Duration::from_secs(3))
        .handle("t", handler)
        .build()
        .await
        .unwrap();
    let start = Instant::now();
    let worker = spawn(worker);
    eventually(DEADLINE, "every task to run", || async { runs.lock().unwrap().len() >= TASKS })
        .await;
    let took = start.elapsed();
    eventually(DEADLINE, "the queue to empty", || async { stored(&js, "natasks.cpu").await == 0 })
        .await;
    worker.stop().await.unwrap();
    assert!(took < Duration::from_millis(2500), "8 blocking handlers took {took:?}");
    assert_each_once_first_attempt(&runs, TASKS);
}

/// The drain deadline holds for prefetched tasks too: a stop does not start them past it.
#[tokio::test]
async fn a_stop_with_prefetch_keeps_to_the_drain_timeout() {
    const TASKS: usize = 6;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    dispatch_all(&client, "dl", TASKS).await;
    let runs = runs();
    let build = |label: &'static str| {
        Worker::builder(js.clone(), "dl")
            .concurrency(1)
            .fetch_batch(TASKS)
            .drain_timeout(Duration::from_millis(1500))
            .handle("t", recording(runs.clone(), label, Duration::from_secs(1)))
            .build()
    };
    let a = spawn(build("a").await.unwrap());
    eventually(DEADLINE, "A to start a task", || async { !runs.lock().unwrap().is_empty() }).await;
    let stopping = Instant::now();
    a.stop().await.unwrap();
    let took = stopping.elapsed();
    assert!(took < Duration::from_millis(3000), "stop took {took:?} with a 1.5 s drain timeout");
    // What A handed back (and the task it was cut off from) runs on B; nothing is lost.
    let b = spawn(build("b").await.unwrap());
    eventually(DEADLINE, "the queue to empty", || async { stored(&js, "natasks.dl").await == 0 })
        .await;
    b.stop().await.unwrap();
    let runs = runs.lock().unwrap();
    for i in 0..TASKS {
        assert!(runs.iter().any(|(id, _, _)| *id == i.to_string()), "task {i} never ran: {runs:?}");
    }
}
