//! Periodic tasks: recurring JetStream message schedules (nats-server 2.14+) behind
//! `Client::schedule`, fired by the server once per tick.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::StreamMessage};
use common::*;
use futures_util::StreamExt;
use natasks::{Client, Declared, Every, ScheduleErrorKind, Task, Worker};
use natasks_test_support::NatsCluster;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const SECOND: Duration = Duration::from_secs(1);

/// Every message stored on `subject`, oldest first; retried until `DEADLINE` while the
/// stream cannot answer (a cluster electing a leader).
async fn messages_on(js: &jetstream::Context, subject: &str) -> Vec<StreamMessage> {
    let start = Instant::now();
    'again: loop {
        let stream = match js.get_stream("NATASKS").await {
            Ok(stream) => stream,
            Err(err) => {
                assert!(start.elapsed() < DEADLINE, "stream unreadable: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut out = Vec::new();
        let mut seq = 1;
        loop {
            match stream.get_first_raw_message_by_subject(subject, seq).await {
                Ok(message) => {
                    seq = message.sequence + 1;
                    out.push(message);
                }
                Err(err)
                    if err.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                {
                    return out
                }
                Err(err) => {
                    assert!(start.elapsed() < DEADLINE, "messages unreadable: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'again;
                }
            }
        }
    }
}

fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

/// The `Nats-Schedule-Next` times of the produced messages, which must all differ.
fn distinct_ticks(messages: &[StreamMessage]) -> BTreeSet<String> {
    let ticks: BTreeSet<String> = messages
        .iter()
        .map(|m| {
            header(m, "Nats-Schedule-Next").expect("a produced task names the next tick").to_owned()
        })
        .collect();
    assert_eq!(ticks.len(), messages.len(), "two tasks for one tick: {ticks:?}");
    ticks
}

/// The smallest gap between the store times of consecutive messages.
fn smallest_gap(messages: &[StreamMessage]) -> Duration {
    messages
        .windows(2)
        .map(|pair| (pair[1].time - pair[0].time).try_into().unwrap_or_default())
        .min()
        .unwrap_or(Duration::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_declaring_at_once_fire_once_per_tick() {
    let server = NatsServer::start().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        // Three instances: each its own connection and client.
        clients.push(Client::new(server.jetstream().await).await.unwrap());
    }
    let declare = |client: &Client| {
        let client = client.clone();
        async move {
            let task = Task::new("tick", "{}").with_header("X-Team", "ops");
            client.schedule("heartbeat", Every::interval(SECOND), task, "q").await.unwrap()
        }
    };
    let (a, b, c) = tokio::join!(declare(&clients[0]), declare(&clients[1]), declare(&clients[2]));
    let mut outcomes = vec![a, b, c];
    outcomes.sort_by_key(|d| format!("{d:?}"));
    assert_eq!(outcomes, [Declared::Created, Declared::Unchanged, Declared::Unchanged]);

    let js = server.jetstream().await;
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("tick", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let window = Instant::now();
    let mut ticks = Vec::new();
    while window.elapsed() < Duration::from_secs(10) {
        if let Some(task) = seen.recv_within(Duration::from_millis(200)).await {
            ticks.push(task);
        }
    }
    assert!(clients[1].unschedule("heartbeat").await.unwrap());
    running.stop().await.unwrap();
    while let Some(task) = seen.recv_within(Duration::from_millis(300)).await {
        ticks.push(task);
    }

    let times: Vec<OffsetDateTime> = ticks
        .iter()
        .map(|task| {
            let tick = task.periodic().expect("a periodic task");
            assert_eq!(tick.schedule, "heartbeat");
            assert_eq!(tick.next - tick.at, time::Duration::SECOND);
            assert_eq!(task.header("X-Team"), Some("ops"));
            tick.at
        })
        .collect();
    let distinct: BTreeSet<OffsetDateTime> = times.iter().copied().collect();
    println!(
        "{} tasks in 10 s: {:?}",
        ticks.len(),
        distinct.iter().map(|t| t.time()).collect::<Vec<_>>()
    );
    assert_eq!(distinct.len(), ticks.len(), "two tasks for one tick: {times:?}");
    assert!((8..=11).contains(&ticks.len()), "{} ticks in 10 s", ticks.len());
    let distinct: Vec<OffsetDateTime> = distinct.into_iter().collect();
    for pair in distinct.windows(2) {
        assert_eq!(pair[1] - pair[0], time::Duration::SECOND, "a tick missing: {distinct:?}");
    }
}

/// A task the server's message-get API cannot give back as it was declared: it keeps the
/// last value of a repeated header and trims the spaces around a value.
fn task_with_repeated_and_padded_headers() -> Task {
    let mut task = Task::new("report", r#"{"kind":"full"}"#);
    task.add_header("X-Tag", "a").add_header("X-Tag", "b").set_header("X-Note", "  padded  ");
    task
}

#[tokio::test]
async fn the_same_definition_with_repeated_and_padded_headers_is_unchanged() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let hourly = Every::interval(Duration::from_secs(3600));
    let declare = |task: Task| client.schedule("report", hourly.clone(), task, "q");
    assert_eq!(declare(task_with_repeated_and_padded_headers()).await.unwrap(), Declared::Created);
    assert_eq!(
        declare(task_with_repeated_and_padded_headers()).await.unwrap(),
        Declared::Unchanged,
        "the same definition again"
    );
    assert_eq!(stream_messages(&js).await, 1, "declaring it again published nothing");

    // Any difference in the headers' values or their order is a new definition.
    let mut third_value = task_with_repeated_and_padded_headers();
    third_value.add_header("X-Tag", "c");
    let mut reordered = Task::new("report", r#"{"kind":"full"}"#);
    reordered.add_header("X-Tag", "b").add_header("X-Tag", "a").set_header("X-Note", "  padded  ");
    let mut unpadded = task_with_repeated_and_padded_headers();
    unpadded.set_header("X-Note", "padded");
    for task in [third_value, reordered, unpadded] {
        assert_eq!(
            declare(task.clone()).await.unwrap(),
            Declared::Replaced,
            "{:?}",
            task.headers()
        );
        assert_eq!(declare(task).await.unwrap(), Declared::Unchanged);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_instances_declaring_at_once_all_succeed() {
    let server = NatsServer::start().await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(Client::new(server.jetstream().await).await.unwrap());
    }
    let declared = futures_util::future::join_all(clients.iter().map(|client| {
        let task = task_with_repeated_and_padded_headers();
        client.schedule("report", Every::interval(Duration::from_secs(3600)), task, "q")
    }))
    .await;
    let mut outcomes: Vec<Declared> = declared
        .into_iter()
        .map(|outcome| outcome.expect("every instance declares its schedule"))
        .collect();
    outcomes.sort_by_key(|d| format!("{d:?}"));
    let mut expected = vec![Declared::Created];
    expected.extend([Declared::Unchanged; 7]);
    assert_eq!(outcomes, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_declares_a_schedule_from_the_task_it_received() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let declare = {
        let client = client.clone();
        let tx = seen.tx.clone();
        move |task: Task| {
            let client = client.clone();
            let tx = tx.clone();
            async move {
                let declared =
                    client.schedule("from-handler", Every::interval(SECOND), task.clone(), "ticks");
                let _ = tx.send((task, declared.await));
                Ok::<(), std::convert::Infallible>(())
            }
        }
    };
    let worker =
        Worker::builder(js.clone(), "setup").handle("setup", declare).build().await.unwrap();
    let running = spawn(worker);
    // A delayed task arrives with what its schedule wrote: `Nats-Scheduler`,
    // `Nats-Schedule-Next`, `Natasks-Message-Id`.
    let task =
        Task::new("setup", "the payload").with_header("X-Kept", "yes").with_message_id("s-1");
    client.dispatch_in(task, "setup", Duration::from_millis(300)).await.unwrap();

    let (received, declared) = seen.recv().await;
    assert!(received.header("Nats-Scheduler").is_some(), "{:?}", received.headers());
    assert_eq!(declared.expect("a received task can be declared"), Declared::Created);
    let tick = first_on(&js, "natasks.ticks").await;
    assert_eq!(tick.payload.as_ref(), b"the payload");
    assert_eq!(header(&tick, "Natasks-Task"), Some("setup"));
    assert_eq!(header(&tick, "X-Kept"), Some("yes"));
    assert_eq!(header(&tick, "Natasks-Periodic"), Some("from-handler"));
    assert_eq!(header(&tick, "Natasks-Message-Id"), None, "the received task's id stays behind");
    assert_eq!(
        header(&tick, "Nats-Scheduler"),
        Some("natasks.__natasks_schedule.periodic.from-handler")
    );
    running.stop().await.unwrap();
    assert!(client.unschedule("from-handler").await.unwrap());
}

#[tokio::test]
async fn ticks_are_ordinary_tasks_that_know_their_tick() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let task = Task::new("reports.render", r#"{"kind":"pulse"}"#).with_header("X-Tenant", "t1");
    let declared_at = OffsetDateTime::now_utc();
    assert_eq!(
        client.schedule("pulse", Every::interval(SECOND), task, "reports").await.unwrap(),
        Declared::Created
    );

    // What any consumer of the queue (a Go worker) sees: an ordinary task.
    let produced = first_on(&js, "natasks.reports").await;
    assert_eq!(header(&produced, "Natasks-Task"), Some("reports.render"));
    assert_eq!(header(&produced, "Natasks-Queue"), Some("reports"));
    assert_eq!(header(&produced, "X-Tenant"), Some("t1"));
    assert_eq!(header(&produced, "Natasks-Periodic"), Some("pulse"));
    assert_eq!(header(&produced, "Natasks-Periodic-Schedule"), Some("@every 1s"));
    let digest = header(&produced, "Natasks-Periodic-Digest").expect("the definition's digest");
    assert!(digest.len() == 16 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{digest}");
    assert_eq!(
        header(&produced, "Nats-Scheduler"),
        Some("natasks.__natasks_schedule.periodic.pulse")
    );
    let next = header(&produced, "Nats-Schedule-Next").expect("the server writes the next tick");
    let next = OffsetDateTime::parse(next, &Rfc3339).expect("an RFC 3339 time");
    assert_eq!(header(&produced, "Nats-Schedule"), None, "the schedule headers are stripped");
    assert_eq!(produced.payload.as_ref(), br#"{"kind":"pulse"}"#);
    println!("first tick stored {}, next {next}", produced.time);

    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "reports")
        .handle("reports.render", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let got = seen.recv().await;
    let tick = got.periodic().expect("a periodic task");
    assert_eq!(tick.schedule, "pulse");
    assert_eq!(tick.next, next);
    assert_eq!(tick.at, next - time::Duration::SECOND);
    assert!(tick.at > declared_at, "the first tick is an interval after declaring");
    let stored_at = produced.time - tick.at;
    assert!(stored_at < time::Duration::milliseconds(900), "stored {stored_at} after its tick");
    assert!(Task::new("reports.render", "").periodic().is_none(), "an ordinary task");
    running.stop().await.unwrap();
    assert!(client.unschedule("pulse").await.unwrap());

    // Published again with every header it has (as a Go handler copying `msg.Header` would),
    // a tick is refused: `Nats-Schedule-Next` and `Nats-Scheduler` are the server's.
    let err = js
        .publish_with_headers("natasks.elsewhere", produced.headers.clone(), produced.payload)
        .await
        .unwrap()
        .await
        .expect_err("the server refuses its own schedule headers");
    assert!(err.to_string().contains("10212"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_an_interval_restarts_its_countdown_and_removing_stops_it() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .handle("job", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let v1 = || Task::new("job", "v1");
    assert_eq!(
        client.schedule("job", Every::interval(SECOND), v1(), "q").await.unwrap(),
        Declared::Created
    );
    let first = seen.recv().await;
    assert_eq!(first.payload().as_ref(), b"v1");
    let listed = client.scheduled("job").await.unwrap().expect("declared");
    assert_eq!(listed.every, Every::interval(SECOND));
    let next = listed.next.expect("an interval's next tick is known");
    assert!(next > OffsetDateTime::now_utc() - time::Duration::SECOND, "next {next}");

    // A different payload or a different interval replaces the schedule; the same again
    // changes nothing.
    let two = Every::interval(2 * SECOND);
    let replaced = client.schedule("job", two.clone(), Task::new("job", "v2"), "q").await.unwrap();
    let replaced_at = OffsetDateTime::now_utc();
    assert_eq!(replaced, Declared::Replaced);
    assert_eq!(
        client.schedule("job", two.clone(), Task::new("job", "v2"), "q").await.unwrap(),
        Declared::Unchanged
    );
    let stored = client.scheduled("job").await.unwrap().expect("still declared");
    assert_eq!(stored.every, two);
    assert_eq!(stored.task.payload().as_ref(), b"v2");

    let mut v2_ticks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while v2_ticks.len() < 2 {
        assert!(Instant::now() < deadline, "the new definition never fired twice");
        let task = seen.recv().await;
        let tick = task.periodic().unwrap();
        match task.payload().as_ref() {
            b"v1" => assert!(tick.at <= replaced_at, "a v1 tick at {} after replacing", tick.at),
            b"v2" => v2_ticks.push(tick),
            other => panic!("unexpected payload {other:?}"),
        }
    }
    // The 2 s countdown starts at the replacement (rounded to the second by the server).
    let first_v2 = &v2_ticks[0];
    let countdown = first_v2.at - replaced_at;
    assert!(
        countdown > time::Duration::SECOND && countdown <= time::Duration::milliseconds(2500),
        "the first tick of the new interval came {countdown} after replacing"
    );
    assert_eq!(v2_ticks[1].at - first_v2.at, time::Duration::seconds(2), "ticks 2 s apart now");

    assert!(client.unschedule("job").await.unwrap());
    let removed_at = OffsetDateTime::now_utc();
    assert!(!client.unschedule("job").await.unwrap(), "already removed");
    assert!(client.scheduled("job").await.unwrap().is_none());
    // Two intervals after removing, nothing more has fired.
    while let Some(task) = seen.recv_within(Duration::from_millis(4500)).await {
        let tick = task.periodic().unwrap();
        assert!(tick.at <= removed_at, "a tick at {} after removing", tick.at);
    }
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_schedules_are_stored_and_listed() {
    const SCHEDULES: usize = 1_000;
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let start = Instant::now();
    let declared: Vec<_> = futures_util::stream::iter(0..SCHEDULES)
        .map(|i| {
            let client = client.clone();
            async move {
                let task = Task::new("tick", format!("{i}"));
                client.schedule(&format!("s-{i:04}"), Every::interval(SECOND), task, "many").await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    println!("declared {SCHEDULES} schedules in {:?}", start.elapsed());
    for outcome in declared {
        assert_eq!(outcome.unwrap(), Declared::Created);
    }

    let start = Instant::now();
    let listed = client.schedules().await.unwrap();
    println!("listed {} schedules in {:?}", listed.len(), start.elapsed());
    assert_eq!(listed.len(), SCHEDULES);
    for (i, scheduled) in listed.iter().enumerate() {
        assert_eq!(scheduled.id, format!("s-{i:04}"));
        assert_eq!(scheduled.queue, "many");
        assert_eq!(scheduled.task.name(), "tick");
        assert_eq!(scheduled.task.payload().as_ref(), format!("{i}").as_bytes());
        assert!(scheduled.next.is_some());
    }
    // They all fire: every schedule's tasks reach the queue.
    eventually(DEADLINE, "a tick of every schedule", || async {
        stored(&js, "natasks.many").await >= SCHEDULES as u64
    })
    .await;
}

/// Produced tasks stored on `natasks.q` from `from` on.
async fn ticks_since(js: &jetstream::Context, from: OffsetDateTime) -> Vec<StreamMessage> {
    messages_on(js, "natasks.q").await.into_iter().filter(|m| m.time >= from).collect()
}

/// Kills the server (SIGKILL) for seven seconds, two ticks of a 3 s schedule, restarts it,
/// and returns a connection and the time it was ready again.
async fn down_for_two_ticks(server: &mut NatsServer) -> (jetstream::Context, OffsetDateTime) {
    server.kill().await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    server.restart().await;
    (server.jetstream().await, OffsetDateTime::now_utc())
}

#[tokio::test]
async fn a_server_down_across_ticks_fires_one_catch_up_tick_then_carries_on() {
    let mut server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    client
        .schedule("pulse", Every::interval(3 * SECOND), Task::new("tick", ""), "q")
        .await
        .unwrap();
    eventually(DEADLINE, "a tick", || async { stored(&js, "natasks.q").await >= 1 }).await;
    // The server writes the schedule's state into its store when it stops cleanly (and
    // every 2 to 2.5 minutes while it runs); after a kill, that state tells it ticks were
    // missed.
    server.stop().await;
    server.restart().await;

    let (js, restarted_at) = down_for_two_ticks(&mut server).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = ticks_since(&js, restarted_at).await;
    distinct_ticks(&after);
    let times: Vec<_> = after.iter().map(|m| (m.time - restarted_at).as_seconds_f32()).collect();
    println!("seconds from restart to each tick: {times:?}");
    // One catch-up tick right after the restart for the two missed, then one every 3 s.
    assert_eq!(after.len(), 2, "{times:?}");
    assert!(times[0] < 1.0, "no catch-up tick: {times:?}");
    assert!(times[1] - times[0] >= 2.0, "a burst after the restart: {times:?}");
}

#[tokio::test]
async fn a_server_killed_before_it_wrote_the_schedule_state_resumes_at_the_next_tick() {
    let mut server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    client
        .schedule("pulse", Every::interval(3 * SECOND), Task::new("tick", ""), "q")
        .await
        .unwrap();
    eventually(DEADLINE, "a tick", || async { stored(&js, "natasks.q").await >= 1 }).await;

    // Killed within two minutes of declaring, the server never wrote the schedule's state:
    // it recomputes the schedule from the stored definition, skipping the missed ticks.
    let (js, restarted_at) = down_for_two_ticks(&mut server).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = ticks_since(&js, restarted_at).await;
    let times: Vec<_> = after.iter().map(|m| (m.time - restarted_at).as_seconds_f32()).collect();
    println!("seconds from restart to each tick: {times:?}");
    assert_eq!(after.len(), 1, "{times:?}");
    assert!(times[0] >= 2.0, "a catch-up tick: {times:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_survives_the_loss_of_the_stream_leader() {
    let mut cluster = NatsCluster::start(3).await;
    let js = cluster.jetstream().await;
    let client = Client::builder(js.clone()).replicas(3).build().await.unwrap();
    client.schedule("pulse", Every::interval(SECOND), Task::new("tick", ""), "q").await.unwrap();
    eventually(DEADLINE, "two ticks", || async { messages_on(&js, "natasks.q").await.len() >= 2 })
        .await;

    let leader = cluster.stream_leader(&js, "NATASKS").await;
    cluster.kill(leader).await;
    let killed_at = OffsetDateTime::now_utc();
    let js = cluster.jetstream().await;
    eventually(Duration::from_secs(30), "three ticks after the leader was lost", || async {
        messages_on(&js, "natasks.q").await.iter().filter(|m| m.time > killed_at).count() >= 3
    })
    .await;

    let messages = messages_on(&js, "natasks.q").await;
    distinct_ticks(&messages);
    let times: Vec<_> = messages.iter().map(|m| m.time.time()).collect();
    println!("leader n{leader} killed at {killed_at}; ticks stored at {times:?}");
    assert!(smallest_gap(&messages) >= Duration::from_millis(300), "a tick fired twice: {times:?}");
    let survivor = Client::builder(js.clone()).replicas(3).build().await.unwrap();
    assert!(survivor.scheduled("pulse").await.unwrap().is_some(), "the schedule is still stored");
}

#[tokio::test]
async fn server_2_12_refuses_recurring_schedules_and_runs_delayed_tasks() {
    let binary = at_only_server_binary()
        .expect("nats-server 2.12 is not installed; run scripts/install-nats-server to install it");
    let server = NatsServer::builder().binary(binary).start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.expect("the client works against 2.12");
    for every in [Every::interval(SECOND), Every::cron("0 30 2 * * *").unwrap(), Every::daily()] {
        let err = client.schedule("nightly", every, Task::new("t", ""), "q").await.unwrap_err();
        assert_eq!(err.kind(), ScheduleErrorKind::Unsupported, "{err}");
        let message = err.to_string();
        assert!(message.contains("2.12.8") && message.contains("2.14"), "{message}");
    }
    assert_eq!(stream_messages(&js).await, 0, "nothing was published");

    client.dispatch_in(Task::new("t", "later"), "q", Duration::from_millis(500)).await.unwrap();
    eventually(DEADLINE, "the delayed task is due", || async {
        stored(&js, "natasks.q").await == 1
    })
    .await;
}

#[tokio::test]
async fn server_2_11_refuses_periodic_schedules() {
    let binary = old_server_binary().expect(
        "the old nats-server (2.11) is not installed; run scripts/install-nats-server to install it",
    );
    let server = NatsServer::builder().binary(binary).start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let err =
        client.schedule("nightly", Every::hourly(), Task::new("t", ""), "q").await.unwrap_err();
    assert_eq!(err.kind(), ScheduleErrorKind::Unsupported, "{err}");
    let message = err.to_string();
    assert!(message.contains("2.11.11") && message.contains("2.14"), "{message}");
    assert!(message.contains("no message schedules"), "{message}");
    assert_eq!(stream_messages(&js).await, 0);
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_stored() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let task = || Task::new("t", "");
    let every = Every::interval(SECOND);
    use ScheduleErrorKind::*;

    // Refused by the constructor.
    for (expr, expected) in [
        ("* * * *", "has 4 fields"),
        ("0 61 * * * *", "minute field `61`"),
        ("0 0 0 * smarch *", "month field `smarch`"),
        ("0 0 0 * * 8", "day-of-week field `8`"),
        ("0 0 0 30 feb *", "matches no time"),
    ] {
        let err = Every::cron(expr).unwrap_err();
        assert_eq!(err.kind(), InvalidSchedule, "{expr}: {err}");
        assert!(err.to_string().contains(expected), "{expr}: {err}");
    }

    // Refused by `schedule`, before publishing.
    let cases: Vec<(&str, Every, Task, &str, ScheduleErrorKind, &str)> = vec![
        ("", every.clone(), task(), "q", InvalidId, "schedule id \"\" is empty"),
        ("a.b", every.clone(), task(), "q", InvalidId, "schedule id \"a.b\""),
        ("nightly report", every.clone(), task(), "q", InvalidId, "schedule id"),
        (
            "s",
            Every::interval(Duration::from_millis(500)),
            task(),
            "q",
            InvalidSchedule,
            "invalid interval 500ms",
        ),
        (
            "s",
            Every::interval(Duration::from_millis(1400)),
            task(),
            "q",
            InvalidSchedule,
            "invalid interval 1.4s: must be a whole number of seconds",
        ),
        (
            "s",
            Every::interval(Duration::from_secs(101 * 365 * 86_400)),
            task(),
            "q",
            InvalidSchedule,
            "the longest is 100 years",
        ),
        (
            "s",
            every.clone().time_zone("Europe/Berlin"),
            task(),
            "q",
            InvalidSchedule,
            "time zone \"Europe/Berlin\"",
        ),
        (
            "s",
            Every::daily().time_zone("Local"),
            task(),
            "q",
            InvalidTimeZone,
            "invalid time zone \"Local\"",
        ),
        ("s", Every::daily().time_zone(""), task(), "q", InvalidTimeZone, "invalid time zone \"\""),
        ("s", every.clone(), task(), "a.b", InvalidTask, "queue name \"a.b\""),
        ("s", every.clone(), task(), "__natasks_schedule", InvalidTask, "reserved"),
        ("s", every.clone(), Task::new("", ""), "q", InvalidTask, "task name \"\" is empty"),
        ("s", every.clone(), task().tracked(), "q", InvalidTask, "ticks cannot be tracked"),
        (
            "s",
            every.clone(),
            task().with_header("Bad Name", "v"),
            "q",
            InvalidTask,
            "header name \"Bad Name\"",
        ),
        (
            "s",
            every.clone(),
            task().with_header("Nats-TTL", "1h"),
            "q",
            InvalidTask,
            "header name \"Nats-TTL\"",
        ),
        ("s", every.clone(), task().with_message_id("m"), "q", InvalidTask, "message id"),
    ];
    for (id, every, task, queue, kind, expected) in cases {
        let err = client.schedule(id, every, task, queue).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{id:?} {queue:?}: {err}");
        assert!(err.to_string().contains(expected), "{id:?} {queue:?}: {err}");
    }
    assert_eq!(stream_messages(&js).await, 0, "nothing was published");

    // An unknown time zone: the server refuses it, and stores nothing.
    let berlin = Every::cron("0 30 2 * * *").unwrap().time_zone("Europe/Berlin");
    client.schedule("nightly", berlin.clone(), task(), "q").await.unwrap();
    let mars = Every::cron("0 30 2 * * *").unwrap().time_zone("Mars/Olympus_Mons");
    let err = client.schedule("nightly", mars, task(), "q").await.unwrap_err();
    assert_eq!(err.kind(), InvalidTimeZone, "{err}");
    assert!(err.to_string().contains("\"Mars/Olympus_Mons\""), "{err}");
    assert_eq!(stream_messages(&js).await, 1, "only the first schedule is stored");
    let stored = client.scheduled("nightly").await.unwrap().unwrap();
    assert_eq!(stored.every, berlin, "the schedule is unchanged");
    assert_eq!(stored.next, None, "natasks ships no time zone rules");
    for id in ["", "a.b"] {
        assert_eq!(client.unschedule(id).await.unwrap_err().kind(), InvalidId);
        assert_eq!(client.scheduled(id).await.unwrap_err().kind(), InvalidId);
    }
}
