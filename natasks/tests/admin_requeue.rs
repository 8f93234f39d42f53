//! Requeue and purge against a real server: one copy per dead letter however late a rerun
//! comes.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use natasks::admin::{Admin, Selection};
use natasks::{Client, HandlerError, Task, Worker};

async fn setup(server: &NatsServer) -> (jetstream::Context, Client, Admin) {
    let js = server.jetstream().await;
    let client = Client::builder(js.clone()).build().await.unwrap();
    (js.clone(), client, Admin::new(js))
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
