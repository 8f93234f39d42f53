//! Dispatches that must neither vanish nor panic: a received task dispatched again, header
//! names async-nats cannot carry, and due times the server cannot hold.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, UNIX_EPOCH};

use async_nats::jetstream;
use common::*;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt as _, StreamExt as _};
use natasks::{Client, DispatchError, DispatchErrorKind, Task, Worker};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// What a handler received, and how dispatching it again went.
type Redispatched = (Task, Result<(), DispatchError>);

/// A handler that dispatches every task it receives with `redispatch`, reports the task and
/// the outcome, and returns `Ok` (so the original is acknowledged).
fn redispatcher<F, Fut, R>(
    tx: mpsc::UnboundedSender<Redispatched>,
    redispatch: F,
) -> impl Fn(Task) -> BoxFuture<'static, Result<(), Infallible>> + Clone + Send + Sync + 'static
where
    F: Fn(Task) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R, DispatchError>> + Send + 'static,
    R: Send + 'static,
{
    move |task: Task| {
        let tx = tx.clone();
        let outcome = redispatch(task.clone());
        async move {
            let _ = tx.send((task, outcome.await.map(drop)));
            Ok(())
        }
        .boxed()
    }
}

/// Messages stored on subjects matching `filter` (wildcards allowed).
async fn stored_matching(js: &jetstream::Context, filter: &str) -> u64 {
    let stream = js.get_stream("NATASKS").await.expect("stream exists");
    let info = stream.info_with_subjects(filter).await.expect("stream info");
    let counts: HashMap<String, usize> =
        info.filter_map(|entry| async { entry.ok() }).collect().await;
    counts.values().sum::<usize>() as u64
}

const SCHEDULES: &str = "natasks.__natasks_schedule.>";

fn header<'a>(message: &'a jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

/// Asserts that a re-dispatched message carries none of the headers the server (or natasks'
/// delayed dispatch) wrote on the message it was received from.
fn assert_no_received_server_headers(message: &jetstream::message::StreamMessage) {
    for (name, _) in message.headers.iter() {
        let name: &str = name.as_ref();
        assert!(
            !name.starts_with("Nats-") && name != "Natasks-Message-Id",
            "the re-dispatch kept header {name}: {:?}",
            message.headers
        );
    }
}

#[tokio::test]
async fn forwarded_task_with_a_message_id_is_stored_in_the_other_queue() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let forward = {
        let client = client.clone();
        move |task: Task| {
            let client = client.clone();
            async move { client.dispatch(task, "outbox").await }
        }
    };
    let worker = Worker::builder(js.clone(), "inbox")
        .handle("orders.route", redispatcher(seen.tx.clone(), forward))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let task = Task::new("orders.route", "order 7")
        .with_header("X-Tenant", "t1")
        .with_message_id("order-7");
    client.dispatch(task, "inbox").await.unwrap();

    let (received, forwarded) = seen.recv().await;
    forwarded.expect("the forward is accepted");
    assert_eq!(received.message_id(), Some("order-7"), "the id the task was dispatched with");
    assert_eq!(
        stored(&js, "natasks.outbox").await,
        1,
        "the forwarded task is stored, not dropped as a duplicate of the original"
    );
    let raw = first_on(&js, "natasks.outbox").await;
    assert_eq!(raw.payload.as_ref(), b"order 7");
    assert_eq!(header(&raw, "Natasks-Task"), Some("orders.route"));
    assert_eq!(header(&raw, "Natasks-Queue"), Some("outbox"));
    assert_eq!(header(&raw, "X-Tenant"), Some("t1"), "the task's own headers travel on");
    assert_no_received_server_headers(&raw);
    running.stop().await.unwrap();
    eventually(DEADLINE, "the original is acknowledged", || async {
        stored(&js, "natasks.inbox").await == 0
    })
    .await;
}

#[tokio::test]
async fn dispatch_in_to_the_same_queue_delivers_the_task_again() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    // Polls once more: the first delivery puts the task back for later, with a round header.
    let check_later = {
        let client = client.clone();
        move |task: Task| {
            let client = client.clone();
            async move {
                if task.header("X-Round").is_some() {
                    return Ok(());
                }
                let again = task.with_header("X-Round", "1");
                client.dispatch_in(again, "jobs", Duration::from_millis(500)).await.map(drop)
            }
        }
    };
    let worker = Worker::builder(js.clone(), "jobs")
        .handle("export.poll", redispatcher(seen.tx.clone(), check_later))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let task = Task::new("export.poll", "export 3").with_message_id("export-3");
    client.dispatch(task, "jobs").await.unwrap();

    let (first, put_back) = seen.recv().await;
    put_back.expect("the delayed re-dispatch is accepted");
    assert_eq!(first.header("X-Round"), None);
    assert_eq!(first.message_id(), Some("export-3"));
    let (second, _) = seen.recv().await;
    assert_eq!(second.header("X-Round"), Some("1"), "the task came back");
    assert_eq!(second.payload().as_ref(), b"export 3");
    assert_eq!(second.message_id(), None, "the re-dispatch was a new message, without an id");
    running.stop().await.unwrap();
    eventually(DEADLINE, "both deliveries acknowledged, no schedule left", || async {
        stream_messages(&js).await == 0
    })
    .await;
}

#[tokio::test]
async fn received_delayed_task_dispatched_again_is_stored() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    // Forwards now to `now`, and once more later to `later`.
    let forward = {
        let client = client.clone();
        move |task: Task| {
            let client = client.clone();
            async move {
                client.dispatch(task.clone(), "now").await?;
                client.dispatch_in(task, "later", Duration::from_millis(300)).await
            }
        }
    };
    let worker = Worker::builder(js.clone(), "reminders")
        .handle("remind", redispatcher(seen.tx.clone(), forward))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let task =
        Task::new("remind", "call back").with_header("X-Kept", "yes").with_message_id("remind-1");
    client.dispatch_in(task, "reminders", Duration::from_millis(300)).await.unwrap();

    let (received, forwarded) = seen.recv().await;
    // What makes this case different: the delivery carries what the schedule wrote.
    assert_eq!(received.header("Natasks-Message-Id"), Some("remind-1"), "{:?}", received.headers());
    let scheduler = received.header("Nats-Scheduler").expect("the schedule that produced it");
    assert_eq!(received.message_id(), Some("remind-1"));
    forwarded.expect("both re-dispatches are accepted");
    assert_eq!(stored(&js, "natasks.now").await, 1, "the immediate re-dispatch is stored");
    let now = first_on(&js, "natasks.now").await;
    assert_eq!(header(&now, "X-Kept"), Some("yes"));
    assert_eq!(header(&now, "Natasks-Queue"), Some("now"));
    assert_no_received_server_headers(&now);
    let later = first_on(&js, "natasks.later").await;
    assert_eq!(later.payload.as_ref(), b"call back");
    assert_eq!(header(&later, "Natasks-Queue"), Some("later"));
    assert_eq!(header(&later, "X-Kept"), Some("yes"));
    // The server marks what a schedule produced: this is the new schedule, not the old one.
    let new_scheduler = header(&later, "Nats-Scheduler").expect("produced by a schedule");
    assert_ne!(new_scheduler, scheduler, "the old schedule header travelled on");
    assert_eq!(header(&later, "Natasks-Message-Id"), None);
    assert_eq!(header(&later, "Nats-Msg-Id"), None);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn redispatch_with_an_explicit_message_id_still_deduplicates() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    // Each re-dispatch twice, with an id set again: the second of each pair is a duplicate.
    let forward = {
        let client = client.clone();
        move |task: Task| {
            let client = client.clone();
            async move {
                for _ in 0..2 {
                    client.dispatch(task.clone().with_message_id("fwd-1"), "now").await?;
                }
                for _ in 0..2 {
                    let again = task.clone().with_message_id("fwd-2");
                    client.dispatch_in(again, "later", Duration::from_millis(300)).await?;
                }
                Ok(())
            }
        }
    };
    let worker = Worker::builder(js.clone(), "in")
        .handle("t", redispatcher(seen.tx.clone(), forward))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    // Dispatched delayed, so that the delivery carries the schedule's headers too.
    let task = Task::new("t", "x").with_message_id("original-1");
    client.dispatch_in(task, "in", Duration::from_millis(200)).await.unwrap();

    let (received, forwarded) = seen.recv().await;
    assert_eq!(received.message_id(), Some("original-1"));
    forwarded.expect("the re-dispatches are accepted");
    assert_eq!(stored(&js, "natasks.now").await, 1, "the second immediate one is a duplicate");
    let now = first_on(&js, "natasks.now").await;
    assert_eq!(header(&now, "Nats-Msg-Id"), Some("fwd-1"));
    eventually(DEADLINE, "the delayed re-dispatch fired", || async {
        stored_matching(&js, SCHEDULES).await == 0 && stored(&js, "natasks.later").await > 0
    })
    .await;
    assert_eq!(stored(&js, "natasks.later").await, 1, "the second delayed one is a duplicate");
    let later = first_on(&js, "natasks.later").await;
    assert_eq!(header(&later, "Natasks-Message-Id"), Some("fwd-2"));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn header_names_async_nats_cannot_carry_are_refused_without_panic() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let names = ["Größe", "Ä", "X-Tab\tName", "X-Del\u{7f}", "X:Colon", "X Space", ""];
    for name in names {
        let mut cases = vec![Task::new("t", "x").with_header(name, "1")];
        let mut set = Task::new("t", "x");
        set.set_header(name, "1");
        cases.push(set);
        let mut added = Task::new("t", "x").with_header("X-Fine", "1");
        added.add_header(name, "1");
        cases.push(added);
        for task in cases {
            assert_eq!(task.header(name), None, "{name:?} is never set");
            let err = client.dispatch(task, "q").await.expect_err("bad header name must fail");
            assert_eq!(err.kind(), DispatchErrorKind::InvalidTask, "{err}");
            assert!(
                err.to_string().contains(&format!("header name {name:?}")),
                "the error names the header: {err}"
            );
        }
    }
    // Looking up such a name finds nothing, on a task with and without headers.
    assert_eq!(Task::new("t", "x").header("Größe"), None);
    assert_eq!(Task::new("t", "x").with_header("X-A", "1").header("Größe"), None);
    let err = client
        .dispatch_in(Task::new("t", "x").with_header("Größe", "1"), "q", Duration::from_secs(60))
        .await
        .expect_err("bad header name must fail");
    assert!(err.to_string().contains("Größe"), "{err}");
    assert_eq!(stream_messages(&js).await, 0, "nothing may be published");
    // Printable ASCII names, and any value without CR or LF, go through.
    client
        .dispatch(Task::new("t", "x").with_header("X-Ok_1.~!", "Größe 1"), "q")
        .await
        .expect("a printable ASCII name is fine");
    let raw = first_on(&js, "natasks.q").await;
    assert_eq!(header(&raw, "X-Ok_1.~!"), Some("Größe 1"));
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

#[tokio::test]
async fn huge_delays_are_refused_without_panic() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for delay in [Duration::MAX, days(4_000_000_000), days(3_000_000), days(300 * 366)] {
        let err = client
            .dispatch_in(Task::new("t", "x"), "q", delay)
            .await
            .expect_err("a due time after the year 2261 must fail");
        assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime, "{err}");
        assert!(err.to_string().contains(&format!("{delay:?}")), "names the delay: {err}");
        assert!(err.to_string().contains("after the year 2261"), "names the limit: {err}");
    }
    assert_eq!(stream_messages(&js).await, 0, "nothing may be published");
    // Up to the limit, delays work.
    client.dispatch_in(Task::new("t", "x"), "q", days(365 * 200)).await.expect("200 years");
    assert_eq!(stored_matching(&js, SCHEDULES).await, 1);
}

#[tokio::test]
async fn a_due_time_in_2300_is_refused() {
    // nats-server holds a schedule's time in nanoseconds since 1970, which end on
    // 2262-04-11: a later time wraps, and the task would be delivered at once or at a wrong
    // time.
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let in_2300 = OffsetDateTime::parse("2300-01-01T00:00:00Z", &Rfc3339).unwrap();
    let err = client
        .dispatch_at(Task::new("t", "x"), "q", in_2300)
        .await
        .expect_err("a due time in 2300 must fail");
    assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime, "{err}");
    assert!(err.to_string().contains("2300-01-01T00:00:00Z"), "names the time: {err}");
    assert!(err.to_string().contains("after the year 2261"), "names the limit: {err}");
    assert_eq!(stream_messages(&js).await, 0, "nothing may be published");
}

#[tokio::test]
async fn due_times_after_year_2261_are_refused_without_panic() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let year = 365 * 86_400;
    let year_2262 = UNIX_EPOCH + Duration::from_secs(9_214_646_400);
    for at in [
        UNIX_EPOCH + Duration::from_secs(1_000_000_000 * year),
        UNIX_EPOCH + Duration::from_secs(i64::MAX as u64),
        UNIX_EPOCH + Duration::from_secs(253_402_300_800),
        year_2262,
    ] {
        let err = client
            .dispatch_at(Task::new("t", "x"), "q", at)
            .await
            .expect_err("a due time after the year 2261 must fail");
        assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime, "{err}");
        let secs = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(err.to_string().contains(&secs.to_string()), "names the time: {err}");
    }
    // Still 2261 at its own offset, but in UTC already 2262.
    let west = OffsetDateTime::parse("2261-12-31T23:30:00-01:00", &Rfc3339).unwrap();
    let err = client
        .dispatch_at(Task::new("t", "x"), "q", west)
        .await
        .expect_err("a due time after the year 2261 in UTC must fail");
    assert_eq!(err.kind(), DispatchErrorKind::InvalidDueTime, "{err}");
    assert!(err.to_string().contains("2261-12-31T23:30:00-01:00"), "names the time: {err}");
    assert_eq!(stream_messages(&js).await, 0, "nothing may be published");

    // The last second of 2261 is fine, as either type.
    let last = OffsetDateTime::parse("2261-12-31T23:59:59Z", &Rfc3339).unwrap();
    client.dispatch_at(Task::new("t", "x"), "q", last).await.expect("year 2261 is fine");
    let last_system = year_2262 - Duration::from_secs(1);
    client.dispatch_at(Task::new("t", "x"), "q", last_system).await.expect("as a SystemTime too");
    assert_eq!(stored_matching(&js, SCHEDULES).await, 2);
}
