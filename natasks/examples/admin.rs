//! The operations API: a failing handler dead-letters ten tasks; the example lists them by
//! state, reads one in full, searches them by payload field and last error, requeues the
//! ones of one customer and deletes the rest, lists and cancels a delayed task, and prints
//! the queue overview along the way.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run -p natasks --example admin`.

use std::time::Duration;

use natasks::admin::{Admin, Filter, SearchOptions, Selection, TaskState};
use natasks::{Client, HandlerError, Task, Worker};
use serde_json::json;

const QUEUE: &str = "example-admin";
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let client = Client::new(js.clone()).await?;
    let admin = Admin::new(js.clone());

    // Ten invoices fail for good and are dead-lettered.
    for i in 0..10 {
        let customer = if i % 2 == 0 { "acme" } else { "globex" };
        let task = Task::json("invoice.send", &json!({"invoice": i, "customer": customer}))?;
        client.dispatch(task, QUEUE).await?;
    }
    let failing = Worker::builder(js.clone(), QUEUE)
        .handle("invoice.send", |_task: Task| async {
            Err::<(), _>(HandlerError::dead_letter("smtp: mailbox unavailable"))
        })
        .build()
        .await?;
    let stop = failing.shutdown_handle();
    let run = tokio::spawn(async move { failing.run().await });
    tokio::time::timeout(TIMEOUT, async {
        while admin.queue(QUEUE).await?.dead_letters < 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<(), natasks::admin::AdminError>(())
    })
    .await??;
    stop.shutdown();
    run.await??;
    overview(&admin).await?;

    // Dead letters, a page of four at a time, then one in full.
    let mut after = None;
    loop {
        let page = admin.tasks(QUEUE, TaskState::Dead, after, 4).await?;
        let seqs: Vec<u64> = page.items.iter().map(|t| t.sequence).collect();
        println!("dead letters page: {seqs:?}");
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let first = admin.tasks(QUEUE, TaskState::Dead, None, 1).await?.items.remove(0);
    let detail = admin.task(first.sequence).await?;
    println!(
        "task {}: {} attempt(s), last error {:?}, payload {}",
        first.sequence,
        first.attempts.unwrap_or_default(),
        first.last_error.unwrap_or_default(),
        String::from_utf8_lossy(&detail.payload)
    );

    // Search: by a JSON field, and by the last error.
    let options = SearchOptions { queue: Some(QUEUE.into()), ..Default::default() };
    let acme = Filter::new().json_field("customer", json!("acme"));
    let found = admin.search(&acme, &options, |_| {}).await?;
    println!("customer acme: {} task(s) ({} read)", found.items.len(), found.scanned);
    let smtp = Filter::new().error_contains("MAILBOX");
    let found = admin.search(&smtp, &options, |_| {}).await?;
    println!("last error mentions a mailbox: {} task(s)", found.items.len());

    // Requeue acme's invoices, delete the rest.
    let requeued = admin.requeue(QUEUE, &Selection::Matching(acme)).await?;
    println!("requeued {} dead letter(s)", requeued.done);
    let deleted = admin.delete(QUEUE, TaskState::Dead, &Selection::Matching(Filter::new())).await?;
    println!("deleted {} dead letter(s)", deleted.done);

    // A delayed task, listed and cancelled.
    let later = Task::new("invoice.remind", "tomorrow");
    client.dispatch_in(later, QUEUE, Duration::from_secs(86_400)).await?;
    for schedule in admin.schedules(Some(QUEUE)).await? {
        println!(
            "schedule {} ({:?}): {} due {:?}",
            schedule.id, schedule.kind, schedule.name, schedule.next
        );
        admin.cancel_schedule(&schedule.id).await?;
    }
    overview(&admin).await?;

    // Leave the queue empty for the next run.
    let purged = admin.purge(QUEUE, TaskState::Pending).await?;
    println!("purged {purged} pending task(s)");
    Ok(())
}

async fn overview(admin: &Admin) -> Result<(), natasks::admin::AdminError> {
    let q = admin.queue(QUEUE).await?;
    println!(
        "{}: {} pending, {} in flight, {} scheduled, {} dead",
        q.name, q.pending, q.in_flight, q.scheduled, q.dead_letters
    );
    Ok(())
}
