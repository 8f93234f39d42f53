//! How often each admin operation reads the stream's subjects and its consumers, counted
//! on a real server: a core NATS subscription on `$JS.API.>` sees every JetStream API
//! request the admin's connection makes. Each is read once per call.

mod common;

use common::*;
use natasks::admin::{Admin, Filter, SearchOptions, Selection, TaskState};
use natasks::{Client, HandlerError, Task, Worker};
use natasks_test_support::api::{count, ApiRequest, ApiRequests};

/// STREAM.INFO requests on the task stream (the tracking bucket's are other streams).
fn stream_infos(requests: &[ApiRequest]) -> usize {
    count(requests, "STREAM.INFO.NATASKS") - count(requests, "STREAM.INFO.NATASKS_")
}

/// Consumer listings, by info or by name.
fn consumer_lists(requests: &[ApiRequest]) -> usize {
    count(requests, "CONSUMER.LIST.") + count(requests, "CONSUMER.NAMES.")
}

/// A stream with queue `orders` (three pending tasks, a dead letter, a delayed task and a
/// worker consumer) and queue `idle` (only a worker consumer).
async fn setup(server: &NatsServer) -> (Admin, ApiRequests) {
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    for name in ["a", "b", "c"] {
        client.dispatch(Task::new(name, "x"), "orders").await.unwrap();
    }
    dead_letters(&js, "orders", "charge", 1).await;
    let later = std::time::Duration::from_secs(3600);
    client.dispatch_in(Task::new("later", "x"), "orders", later).await.unwrap();
    for queue in ["orders", "idle"] {
        // Built, not run: the consumer exists, nothing is taken.
        Worker::builder(js.clone(), queue)
            .handle("a", |_: Task| async { Ok::<(), HandlerError>(()) })
            .build()
            .await
            .unwrap();
    }
    let requests = ApiRequests::watch(&server.url()).await;
    (Admin::new(js), requests)
}

#[track_caller]
fn once_each(what: &str, requests: &[ApiRequest], infos: usize) {
    let seen: Vec<String> = requests.iter().map(|r| format!("{} {}", r.api, r.body)).collect();
    assert_eq!(stream_infos(requests), infos, "{what}: stream reads {seen:?}");
    assert_eq!(consumer_lists(requests), 1, "{what}: consumer listings {seen:?}");
}

#[tokio::test]
async fn tasks_read_the_subjects_and_the_consumers_once() {
    let server = NatsServer::start().await;
    let (admin, mut requests) = setup(&server).await;
    for queue in ["orders", "idle"] {
        for state in TaskState::ALL {
            admin.tasks(queue, state, None, 10).await.unwrap();
            // The stream once when opened, its subjects once.
            once_each(&format!("tasks {queue} {state}"), &requests.take().await, 2);
        }
    }
}

#[tokio::test]
async fn search_reads_the_subjects_and_the_consumers_once() {
    let server = NatsServer::start().await;
    let (admin, mut requests) = setup(&server).await;
    for queue in [Some("orders".to_owned()), Some("idle".to_owned()), None] {
        let options = SearchOptions { queue: queue.clone(), ..SearchOptions::default() };
        admin.search(&Filter::new().name("b"), &options, |_| {}).await.unwrap();
        // The stream, its queue subjects, its delayed tasks' subjects.
        once_each(&format!("search {queue:?}"), &requests.take().await, 3);
    }
}

#[tokio::test]
async fn bulk_operations_read_the_subjects_and_the_consumers_once() {
    let server = NatsServer::start().await;
    let (admin, mut requests) = setup(&server).await;
    let none = Selection::Matching(Filter::new().name("nothing"));
    for state in [TaskState::Pending, TaskState::InFlight, TaskState::Dead] {
        let outcome = admin.delete("orders", state, &none).await.unwrap();
        assert_eq!(outcome.done, 0);
        once_each(&format!("delete {state} matching"), &requests.take().await, 2);
    }
    let pending = admin.tasks("orders", TaskState::Pending, None, 1).await.unwrap();
    requests.take().await;
    let one = Selection::One(pending.items[0].sequence);
    let outcome = admin.delete("orders", TaskState::Pending, &one).await.unwrap();
    assert_eq!(outcome.done, 1);
    once_each("delete one", &requests.take().await, 2);
    let outcome = admin.requeue("orders", &Selection::Matching(Filter::default())).await.unwrap();
    assert_eq!(outcome.done, 1);
    once_each("requeue matching", &requests.take().await, 2);
}
