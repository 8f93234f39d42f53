//! Requeue and purge against a real server: one copy per dead letter however late a rerun
//! comes, the task's id and headers kept, settings that could do harm refused, messages
//! written by other clients read as they are or skipped.

mod common;

use std::time::Duration;

use futures_util::StreamExt as _;

use async_nats::jetstream;
use common::*;
use natasks::admin::{Admin, AdminErrorKind, Filter, Selection, TaskState};
use natasks::{Client, HandlerError, Task, Worker};
use serde_json::json;

async fn setup(server: &NatsServer) -> (jetstream::Context, Client, Admin) {
    let js = server.jetstream().await;
    let client = Client::builder(js.clone()).build().await.unwrap();
    (js.clone(), client, Admin::new(js))
}

/// A worker of `queue` whose handler of `name` reports each task it runs and fails it for
/// good (no retries: every run dead-letters the task).
async fn failing_worker(js: &jetstream::Context, queue: &str, name: &str) -> (Running, Seen<Task>) {
    let seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), queue)
        .max_retries(0)
        .handle(name, move |task: Task| {
            let _ = tx.send(task);
            std::future::ready(Err::<(), _>(HandlerError::msg("boom")))
        })
        .build()
        .await
        .unwrap();
    (spawn(worker), seen)
}

/// Requeues the one dead letter of queue `orders`, by its sequence (a worker that fails
/// the copy again makes a new dead letter, which this requeue must not pick up).
async fn requeue_the_dead_letter(admin: &Admin) {
    let dead = admin.tasks("orders", TaskState::Dead, None, 10).await.unwrap();
    assert_eq!(dead.items.len(), 1, "{dead:?}");
    let outcome = admin.requeue("orders", &Selection::One(dead.items[0].sequence)).await.unwrap();
    assert_eq!(outcome.done, 1, "{outcome:?}");
}

#[tokio::test]
async fn a_requeue_run_again_after_the_duplicate_window_stores_no_second_copy() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    let dead = dead_letters(&js, "orders", "orders.charge", 1).await;
    // A short duplicate window, and deletes refused: the requeue stores its copy and then
    // cannot delete the dead letter, as a run killed between the two steps leaves it.
    let mut stream = js.get_stream("NATASKS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.duplicate_window = Duration::from_secs(1);
    config.deny_delete = true;
    js.update_stream(config).await.unwrap();

    let first = admin.requeue("orders", &Selection::One(dead[0])).await.unwrap();
    assert_eq!(first.failed.len(), 1, "the dead letter cannot be deleted: {first:?}");
    assert_eq!(stored(&js, "natasks.orders").await, 1, "the copy is stored");
    let marker = format!("natasks.__natasks_mark.requeue.{}", dead[0]);
    assert_eq!(stored(&js, &marker).await, 1, "with its marker");

    // A worker runs the copy and acknowledges it.
    let seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(js.clone(), "orders")
        .handle("orders.charge", move |task: Task| {
            let _ = tx.send(task.payload().to_vec());
            std::future::ready(Ok::<(), HandlerError>(()))
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    let mut seen = seen;
    seen.recv().await;
    eventually(DEADLINE, "the copy is acknowledged", || async {
        stored(&js, "natasks.orders").await == 0
    })
    .await;
    running.stop().await.unwrap();

    // Past the duplicate window the message id protects nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = admin.requeue("orders", &Selection::One(dead[0])).await.unwrap();
    assert_eq!(stored(&js, "natasks.orders").await, 0, "no second copy: {again:?}");
}

#[tokio::test]
async fn a_task_requeued_twice_keeps_its_id() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    let task =
        Task::json("orders.charge", &json!({"order": 42})).unwrap().with_message_id("order-42");
    client.dispatch(task, "orders").await.unwrap();
    let (running, mut seen) = failing_worker(&js, "orders", "orders.charge").await;
    let mut ids = Vec::new();
    for run in 0..3 {
        ids.push(seen.recv().await.id().map(str::to_owned));
        if run < 2 {
            eventually(DEADLINE, "the task is dead-lettered", || async {
                stored(&js, "natasks.orders-dlq").await == 1
            })
            .await;
            requeue_the_dead_letter(&admin).await;
        }
    }
    running.stop().await.unwrap();
    assert!(ids.iter().all(|id| id.as_deref() == Some("order-42")), "{ids:?}");
}

/// A copy requeued with a message id of its own (as on a stream without atomic batches)
/// that fails again keeps the task's id in its dead letter.
#[tokio::test]
async fn the_dead_letter_of_a_requeued_copy_keeps_the_task_id() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", "orders.charge");
    headers.insert("Natasks-Queue", "orders");
    headers.insert("Natasks-Message-Id", "order-42");
    headers.insert("Nats-Msg-Id", natasks::admin::requeue_id("NATASKS", 7).as_str());
    js.publish_with_headers("natasks.orders", headers, "{}".into()).await.unwrap().await.unwrap();
    let (running, mut seen) = failing_worker(&js, "orders", "orders.charge").await;
    assert_eq!(seen.recv().await.id(), Some("order-42"));
    eventually(DEADLINE, "the task is dead-lettered", || async {
        stored(&js, "natasks.orders-dlq").await == 1
    })
    .await;
    running.stop().await.unwrap();
    let dead = admin.tasks("orders", TaskState::Dead, None, 10).await.unwrap();
    let detail = admin.task(dead.items[0].sequence).await.unwrap();
    assert!(
        detail.headers.contains(&("Natasks-Message-Id".to_owned(), "order-42".to_owned())),
        "{:?}",
        detail.headers
    );
}

#[tokio::test]
async fn a_requeue_keeps_every_value_of_a_repeated_header() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    let mut task = Task::json("orders.charge", &json!({})).unwrap();
    task.add_header("X-Tag", "a").add_header("X-Tag", "b");
    client.dispatch(task, "orders").await.unwrap();
    let (running, mut seen) = failing_worker(&js, "orders", "orders.charge").await;
    let tags = |task: &Task| -> Vec<String> {
        task.headers()
            .iter()
            .filter(|(name, _)| name.as_ref() as &str == "X-Tag")
            .flat_map(|(_, values)| values.iter().map(|v| v.as_str().to_owned()))
            .collect()
    };
    assert_eq!(tags(&seen.recv().await), ["a", "b"]);
    eventually(DEADLINE, "the task is dead-lettered", || async {
        stored(&js, "natasks.orders-dlq").await == 1
    })
    .await;
    requeue_the_dead_letter(&admin).await;
    assert_eq!(tags(&seen.recv().await), ["a", "b"], "the requeued task has both values");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn an_empty_dead_letter_suffix_is_refused_and_purges_nothing() {
    let server = NatsServer::start().await;
    let (js, client, _admin) = setup(&server).await;
    for n in 0..3 {
        client
            .dispatch(Task::json("orders.charge", &json!({"n": n})).unwrap(), "orders")
            .await
            .unwrap();
    }
    let admin = Admin::new(js.clone()).dlq_suffix("");
    let err = admin.purge("orders", TaskState::Dead).await.unwrap_err();
    assert_eq!(err.kind(), AdminErrorKind::InvalidInput, "{err}");
    assert_eq!(stored(&js, "natasks.orders").await, 3, "the pending tasks are untouched");
    let err = admin.requeue("orders", &Selection::Matching(Filter::default())).await.unwrap_err();
    assert_eq!(err.kind(), AdminErrorKind::InvalidInput, "{err}");
}

/// Publishes over plain NATS a message whose header name is not ASCII, as a client of
/// another language may.
async fn publish_unreadable(server: &NatsServer, subject: &str) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap(); // INFO
    let headers = "NATS/1.0\r\nX-\u{dc}: 1\r\nNatasks-Task: orders.charge\r\n\r\n";
    let payload = "{}";
    let frame = format!(
        "CONNECT {{\"headers\":true,\"verbose\":false,\"pedantic\":false}}\r\nHPUB {subject} {} {}\r\n{headers}{payload}\r\nPING\r\n",
        headers.len(),
        headers.len() + payload.len()
    );
    stream.get_mut().write_all(frame.as_bytes()).await.unwrap();
    loop {
        line.clear();
        stream.read_line(&mut line).await.unwrap();
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            break;
        }
    }
}

#[tokio::test]
async fn a_message_with_unreadable_headers_does_not_stop_a_scan() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    dead_letters(&js, "orders", "orders.charge", 1).await;
    publish_unreadable(&server, "natasks.orders-dlq").await;
    dead_letters(&js, "orders", "orders.charge", 1).await;
    eventually(DEADLINE, "three dead letters are stored", || async {
        stored(&js, "natasks.orders-dlq").await == 3
    })
    .await;
    let page = admin.tasks("orders", TaskState::Dead, None, 10).await.unwrap();
    assert_eq!(page.items.len(), 2, "{page:?}");
    // Search reads a dead-letter queue no worker consumes through a consumer of its own,
    // whose client cannot decode the odd message either.
    let options = natasks::admin::SearchOptions {
        queue: Some("orders".into()),
        states: vec![TaskState::Dead],
        ..Default::default()
    };
    let found = tokio::time::timeout(
        DEADLINE,
        admin.search(&Filter::new().name("orders.charge"), &options, |_| {}),
    )
    .await
    .expect("the search ended")
    .unwrap();
    assert_eq!(found.items.len(), 2, "{found:?}");
    let outcome = admin.requeue("orders", &Selection::Matching(Filter::default())).await.unwrap();
    assert_eq!(outcome.done, 2, "{outcome:?}");
    assert_eq!(stored(&js, "natasks.orders").await, 2);
}

/// A dead letter deleted while a requeue runs (read ahead in its chunk) is not brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_deleted_during_a_requeue_is_not_brought_back() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    let dead = dead_letters(&js, "orders", "orders.charge", 3).await;
    let stream = js.get_stream("NATASKS").await.unwrap();
    let runtime = tokio::runtime::Handle::current();
    let all = Selection::Matching(Filter::default());
    let outcome = admin
        .requeue_with("orders", &all, |step| {
            if step.done == 1 {
                // Someone else deletes the last dead letter meanwhile.
                tokio::task::block_in_place(|| {
                    runtime.block_on(stream.delete_message(dead[2])).unwrap();
                });
            }
            std::ops::ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!((outcome.done, outcome.skipped), (2, 1), "{outcome:?}");
    assert_eq!(stored(&js, "natasks.orders").await, 2, "the deleted dead letter stays deleted");
}

/// Pause, resume and a limit read no schedule messages: their cost does not grow with the
/// delayed tasks stored.
#[tokio::test]
async fn queue_control_reads_no_delayed_task() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    for n in 0..20 {
        let task = Task::json("orders.charge", &json!({"n": n})).unwrap();
        client.dispatch_in(task, "orders", Duration::from_secs(3600)).await.unwrap();
    }
    let worker = Worker::builder(js.clone(), "orders")
        .handle("orders.charge", |_task: Task| std::future::ready(Ok::<(), HandlerError>(())))
        .build()
        .await
        .unwrap();
    // Every message get on the stream, as the server receives it.
    let watcher = async_nats::connect(server.url()).await.unwrap();
    let mut gets = watcher.subscribe("$JS.API.STREAM.MSG.GET.>").await.unwrap();
    watcher.flush().await.unwrap();
    admin.pause("orders", None).await.unwrap();
    admin.set_limit("orders", Some(4)).await.unwrap();
    admin.resume("orders").await.unwrap();
    watcher.flush().await.unwrap();
    let mut seen = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), gets.next()).await {
        seen += 1;
    }
    assert!(seen < 20, "{seen} message gets for three control commands");
    assert_eq!(admin.queue("orders").await.unwrap().scheduled, 20, "the overview counts them");
    drop(worker);
}

/// A purge of pending tasks that runs while a worker takes one leaves that one alone: which
/// tasks are pending is read again for every chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_pending_tasks_spares_one_taken_meanwhile() {
    let server = NatsServer::start().await;
    let (js, client, admin) = setup(&server).await;
    for n in 0..300 {
        client
            .dispatch(Task::json("orders.charge", &json!({"n": n})).unwrap(), "orders")
            .await
            .unwrap();
    }
    let worker = Worker::builder(js.clone(), "orders")
        .handle("orders.charge", |_task: Task| std::future::ready(Ok::<(), HandlerError>(())))
        .build()
        .await
        .unwrap();
    let stream = js.get_stream("NATASKS").await.unwrap();
    let consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer("natasks-orders").await.unwrap();
    let runtime = tokio::runtime::Handle::current();
    let mut taken = None;
    let all = Selection::Matching(Filter::default());
    let outcome = admin
        .delete_with("orders", TaskState::Pending, &all, |step| {
            if step.done == 256 {
                // A worker takes the next task, after the first chunk was read.
                let message = tokio::task::block_in_place(|| {
                    runtime.block_on(async {
                        let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
                        batch.next().await.unwrap().unwrap()
                    })
                });
                taken = Some(message);
            }
            std::ops::ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert!(taken.is_some());
    assert_eq!(outcome.done, 299, "{outcome:?}");
    assert_eq!(stored(&js, "natasks.orders").await, 1, "the task taken meanwhile stays");
    drop(worker);
}

/// "Requeue every dead letter" while a worker fails every copy at once: the copies that
/// come back dead are new dead letters, not the ones the operator asked to requeue, and a
/// requeue that picked them up again would never end.
#[tokio::test]
async fn a_requeue_of_all_ends_with_the_dead_letters_there_when_it_began() {
    let server = NatsServer::start().await;
    let (js, _client, admin) = setup(&server).await;
    dead_letters(&js, "orders", "orders.charge", 600).await;
    let (running, _seen) = failing_worker(&js, "orders", "orders.charge").await;
    let all = Selection::Matching(Filter::default());
    let outcome = tokio::time::timeout(DEADLINE, admin.requeue("orders", &all))
        .await
        .expect("the requeue ended")
        .unwrap();
    running.stop().await.unwrap();
    assert_eq!(outcome.done, 600, "{outcome:?}");
}
