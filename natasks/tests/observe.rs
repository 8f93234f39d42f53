//! Observers see every dispatch and every settled delivery, with the right outcome.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use natasks::observe::{Dispatched, Finished, Observer, Outcome, Started};
use natasks::{Client, DeadLetterReason, HandlerError, Task, Worker};

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Observer for Recorder {
    fn dispatched(&self, e: &Dispatched<'_>) {
        let status = if e.error.is_some() { "error" } else { "ok" };
        self.0.lock().unwrap().push(format!("dispatched {} {} {status}", e.queue, e.task));
    }
    fn started(&self, e: &Started<'_>) {
        self.0.lock().unwrap().push(format!("started {} {} {}", e.queue, e.task, e.attempt));
    }
    fn finished(&self, e: &Finished<'_>) {
        let label = match e.outcome {
            Outcome::DeadLettered(reason) => format!("dead-lettered:{reason}"),
            other => other.as_str().to_owned(),
        };
        self.0
            .lock()
            .unwrap()
            .push(format!("finished {} {} {} {label}", e.queue, e.task, e.attempt));
    }
}

#[tokio::test]
async fn observers_see_dispatches_attempts_and_outcomes() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let recorder = Recorder::default();
    let client = Client::builder(js.clone()).observer(recorder.clone()).build().await.unwrap();
    let js_check = js.clone();
    let worker = Worker::builder(js, "q")
        .max_retries(1)
        .observer(recorder.clone())
        .handle("ok", |_t: Task| async { Ok::<_, HandlerError>(()) })
        .handle("bad", |_t: Task| async { Err::<(), _>(HandlerError::msg("boom")) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("ok", ""), "q").await.unwrap();
    client.dispatch(Task::new("bad", ""), "q").await.unwrap();
    assert!(client.dispatch(Task::new("", ""), "q").await.is_err());
    // Every delivery settled and acknowledged: nothing is left to deliver again, so the
    // events recorded until the worker stops are all there will be.
    eventually(DEADLINE, "every delivery settled", || {
        let recorder = recorder.clone();
        async move { recorder.events().iter().filter(|e| e.starts_with("finished")).count() >= 3 }
    })
    .await;
    eventually(DEADLINE, "the queue to drain", || async {
        stored(&js_check, "natasks.q").await == 0
    })
    .await;
    running.stop().await.unwrap();

    let events = recorder.events();
    let dead = format!("finished q bad 2 dead-lettered:{}", DeadLetterReason::RetriesExhausted);
    let expected = [
        "dispatched q ok ok",
        "dispatched q bad ok",
        "dispatched q  error",
        "started q ok 1",
        "finished q ok 1 succeeded",
        "started q bad 1",
        "finished q bad 1 retried",
        "started q bad 2",
        &dead,
    ];
    // Dispatches and the worker run concurrently, so only the multiset is fixed: each event
    // exactly once, nothing else.
    let mut sorted = events.clone();
    sorted.sort();
    let mut want: Vec<String> = expected.iter().map(|e| e.to_string()).collect();
    want.sort();
    assert_eq!(sorted, want, "events differ from the expected ones; in order: {events:#?}");
    // One task's attempts follow each other.
    let bad: Vec<&str> = events
        .iter()
        .map(String::as_str)
        .filter(|e| e.contains(" q bad ") && !e.starts_with("dispatched"))
        .collect();
    assert_eq!(bad, ["started q bad 1", "finished q bad 1 retried", "started q bad 2", &dead]);
    let ok: Vec<&str> = events
        .iter()
        .map(String::as_str)
        .filter(|e| e.contains(" q ok ") && !e.starts_with("dispatched"))
        .collect();
    assert_eq!(ok, ["started q ok 1", "finished q ok 1 succeeded"]);
}
