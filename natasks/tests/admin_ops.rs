//! The operations API: tasks by state with paging, one task in full, requeue, delete and
//! purge, search and schedules, against a real server.

mod common;

use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use futures_util::TryStreamExt as _;
use natasks::admin::{
    Admin, AdminErrorKind, Filter, ScheduleKind, SearchOptions, Selection, TaskState,
};
use natasks::{Client, Every, Task, Worker};
use serde_json::json;

async fn setup(server: &NatsServer) -> (jetstream::Context, Client, Admin) {
    let js = server.jetstream().await;
    let client = Client::builder(js.clone()).build().await.unwrap();
    (js.clone(), client, Admin::new(js))
}

fn payload(detail: &natasks::admin::TaskDetail) -> serde_json::Value {
    serde_json::from_slice(&detail.payload).unwrap()
}

#[tokio::test]
async fn tasks_are_listed_by_state_with_paging_and_read_in_full() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    for i in 0..5 {
        client
            .dispatch(Task::json("emails.send", &json!({"n": i})).unwrap(), "emails")
            .await
            .unwrap();
    }
    let later = Task::json("emails.send", &json!({"n": "later"})).unwrap();
    client.dispatch_in(later, "emails", Duration::from_secs(3600)).await.unwrap();
    let dead = dead_letters(&js, "emails", "emails.send", 3).await;

    // Nothing consumed: everything pending.
    let page = admin.tasks("emails", TaskState::Pending, None, 2).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let mut all = page.items.clone();
    let mut next = page.next;
    while let Some(after) = next {
        let page = admin.tasks("emails", TaskState::Pending, Some(after), 2).await.unwrap();
        all.extend(page.items);
        next = page.next;
    }
    assert_eq!(all.len(), 5, "{all:?}");
    assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence), "oldest first");
    assert!(all.iter().all(|t| t.name == "emails.send" && t.queue == "emails"));

    let scheduled = admin.tasks("emails", TaskState::Scheduled, None, 10).await.unwrap();
    assert_eq!(scheduled.items.len(), 1);
    assert!(scheduled.items[0].due.is_some());
    assert_eq!(scheduled.next, None);

    let dead_page = admin.tasks("emails", TaskState::Dead, None, 10).await.unwrap();
    assert_eq!(dead_page.items.iter().map(|t| t.sequence).collect::<Vec<_>>(), dead);
    assert_eq!(dead_page.items[0].attempts, Some(3));
    assert_eq!(dead_page.items[0].last_error.as_deref(), Some("SMTP timeout #0"));

    let detail = admin.task(dead[1]).await.unwrap();
    assert_eq!(detail.summary.state, TaskState::Dead);
    assert_eq!(payload(&detail)["i"], 1);
    assert!(detail.headers.contains(&("X-Tenant".to_owned(), "t1".to_owned())));

    // A worker holding one task: it is in flight, the rest pending.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "emails")
        .concurrency(1)
        .fetch_batch(1)
        .handle("emails.send", move |task: Task| {
            let _ = tx.send(task.payload().to_vec());
            let mut release = release_rx.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                Ok::<(), natasks::HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    seen.recv().await;
    let in_flight = admin.tasks("emails", TaskState::InFlight, None, 10).await.unwrap();
    let pending = admin.tasks("emails", TaskState::Pending, None, 10).await.unwrap();
    assert!(!in_flight.items.is_empty(), "one task is in flight");
    assert_eq!(in_flight.items.len() + pending.items.len(), 5);
    assert_eq!(in_flight.items[0].sequence, all[0].sequence);
    assert_eq!(admin.task(all[0].sequence).await.unwrap().summary.state, TaskState::InFlight);
    release_tx.send(true).unwrap();
    eventually(DEADLINE, "the queue drains", || async { stored(&js, "natasks.emails").await == 0 })
        .await;
    running.stop().await.unwrap();

    // Gone: not found.
    let err = admin.task(all[0].sequence).await.unwrap_err();
    assert_eq!(err.kind(), AdminErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    dead_letters(&js, "emails", "emails.send", 2).await;
    fn kind<T: std::fmt::Debug>(r: Result<T, natasks::admin::AdminError>) -> AdminErrorKind {
        r.unwrap_err().kind()
    }

    assert_eq!(
        kind(admin.tasks("nosuch", TaskState::Dead, None, 10).await),
        AdminErrorKind::UnknownQueue
    );
    assert_eq!(
        kind(admin.tasks("emails", TaskState::Dead, None, 0).await),
        AdminErrorKind::InvalidInput
    );
    assert_eq!(
        kind(admin.tasks("bad queue", TaskState::Dead, None, 1).await),
        AdminErrorKind::InvalidInput
    );
    let all = Selection::Matching(Filter::default());
    assert_eq!(kind(admin.requeue("nosuch", &all).await), AdminErrorKind::UnknownQueue);
    let bad_path = Selection::Matching(Filter::new().json_field("user..id", json!(1)));
    assert_eq!(kind(admin.requeue("emails", &bad_path).await), AdminErrorKind::InvalidInput);
    let options = SearchOptions { limit: 0, ..Default::default() };
    assert_eq!(
        kind(admin.search(&Filter::new(), &options, |_| {}).await),
        AdminErrorKind::InvalidInput
    );
    let options = SearchOptions { max_scan: 0, ..Default::default() };
    assert_eq!(
        kind(admin.search(&Filter::new(), &options, |_| {}).await),
        AdminErrorKind::InvalidInput
    );
    let options = SearchOptions { queue: Some("nosuch".into()), ..Default::default() };
    assert_eq!(
        kind(admin.search(&Filter::new(), &options, |_| {}).await),
        AdminErrorKind::UnknownQueue
    );
    assert_eq!(kind(admin.cancel_schedule("a.b").await), AdminErrorKind::InvalidInput);
    assert_eq!(kind(admin.cancel_schedule("nosuch").await), AdminErrorKind::NotFound);
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 2, "nothing was changed");
    assert_eq!(stored(&js, "natasks.emails").await, 0, "nothing was published");
}

#[tokio::test]
async fn dead_letters_are_requeued_one_some_or_matching_and_processed() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    let seqs = dead_letters(&js, "emails", "emails.send", 20).await;

    let one = admin.requeue("emails", &Selection::One(seqs[0])).await.unwrap();
    assert_eq!((one.done, one.skipped, one.failed.len()), (1, 0, 0));
    let some =
        admin.requeue("emails", &Selection::Many(vec![seqs[1], seqs[2], seqs[0]])).await.unwrap();
    assert_eq!(some.done, 2);
    assert_eq!(some.failed.len(), 1, "the first one is gone: {some:?}");
    assert!(some.failed[0].1.contains("no dead letter"), "{some:?}");
    // Tenant t1: i = 1, 5, 9, 13, 17; 1 is requeued already.
    let tenant = Selection::Matching(Filter::new().header("x-tenant", "t1"));
    let mut steps = Vec::new();
    let matching = admin
        .requeue_with("emails", &tenant, |step| {
            steps.push(step.sequence);
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(matching.done, 4, "{matching:?}");
    assert_eq!(steps, [seqs[5], seqs[9], seqs[13], seqs[17]]);
    assert_eq!(stored(&js, "natasks.emails").await, 7);
    let rest = admin.requeue("emails", &Selection::Matching(Filter::default())).await.unwrap();
    assert_eq!(rest.done, 13);
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 0);

    // Requeued tasks lost their failure headers, and a worker processes each once.
    let first = admin.tasks("emails", TaskState::Pending, None, 1).await.unwrap().items;
    let detail = admin.task(first[0].sequence).await.unwrap();
    assert!(detail.headers.iter().all(|(k, _)| k != "Natasks-Last-Error"), "{detail:?}");
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "emails")
        .handle("emails.send", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let tasks = seen.take(20, DEADLINE).await;
    let mut ids: Vec<u64> = tasks
        .iter()
        .map(|t| {
            serde_json::from_slice::<serde_json::Value>(t.payload()).unwrap()["i"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    assert!(seen.recv_within(Duration::from_millis(300)).await.is_none(), "none twice");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn tasks_are_deleted_and_purged_by_state() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    for i in 0..6 {
        let task = Task::json("reports.build", &json!({"n": i})).unwrap();
        client.dispatch(task, "reports").await.unwrap();
    }
    let task = Task::json("reports.build", &json!({"n": "later"})).unwrap();
    client.dispatch_in(task, "reports", Duration::from_secs(3600)).await.unwrap();
    dead_letters(&js, "reports", "reports.build", 5).await;

    let pending = admin.tasks("reports", TaskState::Pending, None, 10).await.unwrap().items;
    let outcome = admin
        .delete("reports", TaskState::Pending, &Selection::One(pending[0].sequence))
        .await
        .unwrap();
    assert_eq!(outcome.done, 1);
    // A dead letter's sequence is no pending task: refused, nothing deleted.
    let dead = admin.tasks("reports", TaskState::Dead, None, 10).await.unwrap().items;
    let wrong = admin
        .delete("reports", TaskState::Pending, &Selection::One(dead[0].sequence))
        .await
        .unwrap();
    assert_eq!((wrong.done, wrong.failed.len()), (0, 1));
    let even = Selection::Matching(Filter::new().json_field("n", json!(2)));
    assert_eq!(admin.delete("reports", TaskState::Pending, &even).await.unwrap().done, 1);
    assert_eq!(stored(&js, "natasks.reports").await, 4);
    assert_eq!(admin.purge("reports", TaskState::Pending).await.unwrap(), 4);
    assert_eq!(admin.purge("reports", TaskState::Scheduled).await.unwrap(), 1);
    assert!(admin.schedules(Some("reports")).await.unwrap().is_empty());
    assert_eq!(admin.purge("reports", TaskState::Dead).await.unwrap(), 5);
    assert_eq!(stream_messages(&js).await, 0);
}

#[tokio::test]
async fn search_finds_tasks_by_each_filter_within_its_bounds() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    const N: u64 = 12_000;
    dead_letters(&js, "emails", "emails.send", N).await;
    let task = Task::json("emails.digest", &json!({"user": {"id": 4242}}))
        .unwrap()
        .with_header("X-Tenant", "vip");
    client.dispatch(task, "emails").await.unwrap();
    let later = Task::json("reports.build", &json!({"kind": "weekly"})).unwrap();
    client.dispatch_in(later, "reports", Duration::from_secs(3600)).await.unwrap();

    let everything = SearchOptions { limit: 10_000, ..Default::default() };
    let search = |filter: Filter, options: SearchOptions| {
        let admin = admin.clone();
        async move { admin.search(&filter, &options, |_| {}).await.unwrap() }
    };
    let by_name = search(Filter::new().name("emails.digest"), everything.clone()).await;
    assert_eq!(by_name.items.len(), 1);
    assert_eq!(by_name.items[0].state, TaskState::Pending);
    assert_eq!(by_name.scanned, N + 2, "every task read once");
    assert!(!by_name.truncated);
    let prefix = search(Filter::new().name("reports.*"), everything.clone()).await;
    assert_eq!(prefix.items[0].state, TaskState::Scheduled);
    let header = search(Filter::new().header("X-Tenant", "vip"), everything.clone()).await;
    assert_eq!(header.items.len(), 1);
    let text = search(Filter::new().payload_contains("weekly"), everything.clone()).await;
    assert_eq!(text.items[0].queue, "reports");
    let field = search(Filter::new().json_field("user.id", json!(4242)), everything.clone()).await;
    assert_eq!(field.items.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["emails.digest"]);
    let field = search(Filter::new().json_field("user.id", json!(7)), everything.clone()).await;
    assert_eq!(field.items.len() as u64, N / 100, "one dead letter in 100 has user 7");
    let error = search(Filter::new().error_contains("smtp TIMEOUT #3"), everything.clone()).await;
    assert_eq!(error.items.len() as u64, N / 10);
    assert!(error.items.iter().all(|t| t.state == TaskState::Dead));
    let dead_only = SearchOptions { states: vec![TaskState::Dead], ..everything.clone() };
    assert!(search(Filter::new().name("emails.digest"), dead_only).await.items.is_empty());
    let pending_only = SearchOptions {
        queue: Some("emails".into()),
        states: vec![TaskState::Pending],
        ..everything.clone()
    };
    let one = search(Filter::new(), pending_only).await;
    assert_eq!((one.items.len(), one.scanned), (1, 1), "reads only the queue's subject");

    // Bounded: at most `max_scan` read, at most `limit` returned, progress along the way.
    let mut reports = Vec::new();
    let bounded = SearchOptions { max_scan: 5_000, ..everything.clone() };
    let result = admin
        .search(&Filter::new().error_contains("timeout"), &bounded, |p| reports.push(p))
        .await
        .unwrap();
    assert_eq!(result.scanned, 5_000);
    assert!(result.truncated);
    assert_eq!(reports.len(), 6, "every thousand, and at the end: {reports:?}");
    assert!(reports.iter().all(|p| p.total == N + 2));
    assert_eq!(reports.last().unwrap().matched, result.items.len() as u64);
    let limited = SearchOptions { limit: 3, ..everything.clone() };
    let result = search(Filter::new(), limited).await;
    assert_eq!(result.items.len(), 3);
    assert!(result.truncated);
    let stream = js.get_stream("NATASKS").await.unwrap();
    let consumers: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    assert!(consumers.is_empty(), "searching left consumers behind: {consumers:?}");

    // A consumer on the dead-letter queue (a worker of it): the server refuses an
    // overlapping one, and search reads message by message instead.
    let dlq_consumer = jetstream::consumer::pull::Config {
        durable_name: Some("dlq-worker".into()),
        filter_subject: "natasks.emails-dlq".into(),
        ..Default::default()
    };
    stream.create_consumer(dlq_consumer).await.unwrap();
    let error = search(Filter::new().error_contains("smtp TIMEOUT #3"), everything).await;
    assert_eq!((error.items.len() as u64, error.scanned), (N / 10, N + 2));
    assert_eq!(stored(&js, "natasks.emails-dlq").await, N, "nothing consumed");
}

#[tokio::test]
async fn schedules_are_listed_and_cancelled() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    let soon = Task::new("reports.build", "x");
    client.dispatch_in(soon, "reports", Duration::from_secs(3600)).await.unwrap();
    let later = Task::new("emails.send", "y");
    client.dispatch_in(later, "emails", Duration::from_secs(7200)).await.unwrap();
    let every = Every::interval(Duration::from_secs(600));
    client.schedule("digest", every, Task::new("emails.digest", "z"), "emails").await.unwrap();

    let all = admin.schedules(None).await.unwrap();
    let kinds: Vec<(ScheduleKind, &str)> = all.iter().map(|s| (s.kind, s.name.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (ScheduleKind::Delayed, "reports.build"),
            (ScheduleKind::Delayed, "emails.send"),
            (ScheduleKind::Periodic, "emails.digest")
        ]
    );
    assert!(all[0].spec.starts_with("@at "), "{:?}", all[0]);
    assert_eq!(all[2].id, "digest");
    let emails = admin.schedules(Some("emails")).await.unwrap();
    assert_eq!(emails.len(), 2);
    let overview = admin.queues().await.unwrap();
    let counts: Vec<(&str, u64)> =
        overview.iter().map(|q| (q.name.as_str(), q.scheduled)).collect();
    assert_eq!(counts, [("emails", 1), ("reports", 1)], "periodic schedules not counted");

    admin.cancel_schedule(&all[0].id).await.unwrap();
    admin.cancel_schedule("digest").await.unwrap();
    let left = admin.schedules(None).await.unwrap();
    assert_eq!(left.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["emails.send"]);
    let again = admin.cancel_schedule(&all[0].id).await.unwrap_err();
    assert_eq!(again.kind(), AdminErrorKind::NotFound);
    assert_eq!(stored(&js, "natasks.reports").await, 0, "a cancelled task never becomes due");
}

/// An earlier run stored the copy of a dead letter and died before deleting it: the next
/// run stores no second copy.
#[tokio::test]
async fn a_requeue_after_a_crash_between_copy_and_delete_stores_one_copy() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    let seqs = dead_letters(&js, "emails", "emails.send", 2).await;
    // What the earlier run stored, in one atomic batch: the copy and the dead letter's
    // requeue marker.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", "emails.send");
    js.publish_with_headers("natasks.emails", headers, "copy".into()).await.unwrap().await.unwrap();
    let marker = format!("natasks.__natasks_mark.requeue.{}", seqs[0]);
    js.publish(marker, "".into()).await.unwrap().await.unwrap();

    let outcome = admin.requeue("emails", &Selection::Matching(Filter::default())).await.unwrap();
    assert_eq!((outcome.done, outcome.duplicates), (2, 1), "{outcome:?}");
    assert_eq!(stored(&js, "natasks.emails").await, 2, "one copy each");
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 0);
}

/// A dead letter naming a dead-letter queue as its original queue goes back to the queue
/// itself: a copy onto the dead-letter queue would be selected again, without end.
#[tokio::test]
async fn a_requeue_never_targets_a_dead_letter_queue() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", "emails.send");
    headers.insert("Natasks-Original-Queue", "emails-dlq");
    js.publish_with_headers("natasks.emails-dlq", headers, "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let all = Selection::Matching(Filter::default());
    let outcome = tokio::time::timeout(DEADLINE, admin.requeue("emails", &all))
        .await
        .expect("the requeue ends")
        .unwrap();
    assert_eq!(outcome.done, 1);
    assert_eq!(stored(&js, "natasks.emails").await, 1);
    assert_eq!(stored(&js, "natasks.emails-dlq").await, 0);
}

#[tokio::test]
async fn a_task_dispatched_with_a_message_id_lists_with_that_id() {
    let server = NatsServer::start().await;
    let (_js, client, admin) = setup(&server).await;
    let task =
        Task::json("orders.ship", &json!({"order": 42})).unwrap().with_message_id("order-42");
    client.dispatch(task, "orders").await.unwrap();
    let plain = Task::json("orders.ship", &json!({"order": 43})).unwrap();
    let receipt = client.dispatch(plain, "orders").await.unwrap();

    let pending = admin.tasks("orders", TaskState::Pending, None, 10).await.unwrap().items;
    let ids: Vec<_> = pending.iter().map(|t| t.id.as_deref()).collect();
    assert_eq!(ids, [Some("order-42"), Some(receipt.id.as_str())], "{pending:?}");
}
