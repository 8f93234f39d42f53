//! Dispatch and process middleware, and propagators: queue rewrites, short-circuits,
//! headers, extensions, ordering and context carried from dispatch to handler.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use natasks::{
    Client, Dispatch, DispatchError, DispatchErrorKind, DispatchNext, HandlerError, Next,
    Propagator, Task, Worker,
};

/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(700);

/// A value process middleware hands to the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
struct User(String);

#[tokio::test]
async fn dispatch_middleware_rewrites_the_queue() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::builder(js.clone())
        .middleware(|mut dispatch: Dispatch, next: DispatchNext| async move {
            if dispatch.task.name() == "reroute" {
                dispatch.queue = "other".into();
            }
            next.run(dispatch).await
        })
        .build()
        .await
        .unwrap();

    client.dispatch(Task::new("reroute", "x"), "original").await.unwrap();
    client.dispatch(Task::new("stay", "y"), "original").await.unwrap();

    assert_eq!(stored(&js, "natasks.other").await, 1);
    assert_eq!(stored(&js, "natasks.original").await, 1, "only the untouched task stays");
    let raw = first_on(&js, "natasks.other").await;
    assert_eq!(raw.payload.as_ref(), b"x");
    assert_eq!(raw.headers.get("Natasks-Task").map(|v| v.as_str()), Some("reroute"));
    assert_eq!(raw.headers.get("Natasks-Queue").map(|v| v.as_str()), Some("other"));
}

#[tokio::test]
async fn dispatch_middleware_can_swallow_or_refuse_a_task() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::builder(js.clone())
        .middleware(|dispatch: Dispatch, next: DispatchNext| async move {
            match dispatch.task.name() {
                "swallowed" => Ok(()),
                "refused" => Err(DispatchError::middleware("refused")),
                _ => next.run(dispatch).await,
            }
        })
        .build()
        .await
        .unwrap();

    client.dispatch(Task::new("swallowed", "x"), "q").await.expect("short-circuit is Ok");
    client
        .dispatch_in(Task::new("swallowed", "x"), "q", Duration::from_secs(1))
        .await
        .expect("short-circuit of a delayed dispatch is Ok");
    assert_eq!(stream_messages(&js).await, 0, "a swallowed task is not stored");

    let err = client.dispatch(Task::new("refused", "x"), "q").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Middleware);
    assert_eq!(err.to_string(), "refused");
    let err = client
        .dispatch_in(Task::new("refused", "x"), "q", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Middleware);
    assert_eq!(stream_messages(&js).await, 0, "a refused task is not stored");

    client.dispatch(Task::new("passed", "x"), "q").await.unwrap();
    assert_eq!(stream_messages(&js).await, 1, "other tasks still go through");
}

/// Appends `step` to the comma-separated header `X-Order`.
fn append_order(task: &mut Task, step: &str) {
    let order = match task.header("X-Order") {
        Some(before) => format!("{before},{step}"),
        None => step.to_owned(),
    };
    task.set_header("X-Order", order);
}

#[tokio::test]
async fn dispatch_middleware_headers_reach_the_handler_in_order() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (first, second) = (calls.clone(), calls.clone());
    let client = Client::builder(js.clone())
        .middleware(move |mut dispatch: Dispatch, next: DispatchNext| {
            first.lock().unwrap().push("first");
            async move {
                dispatch.task.set_header("X-Request-Id", "req-7");
                append_order(&mut dispatch.task, "first");
                next.run(dispatch).await
            }
        })
        .middleware(move |mut dispatch: Dispatch, next: DispatchNext| {
            second.lock().unwrap().push("second");
            async move {
                append_order(&mut dispatch.task, "second");
                next.run(dispatch).await
            }
        })
        .build()
        .await
        .unwrap();
    let mut seen = Seen::new();
    let worker =
        Worker::builder(js, "q").handle("t", reporter(seen.tx.clone())).build().await.unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("t", "x").with_header("X-Order", "caller"), "q").await.unwrap();

    let got = seen.recv().await;
    assert_eq!(got.header("X-Request-Id"), Some("req-7"));
    assert_eq!(got.header("X-Order"), Some("caller,first,second"));
    assert_eq!(*calls.lock().unwrap(), ["first", "second"]);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn process_middleware_passes_extensions_and_headers_to_the_handler() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js, "q")
        .middleware(|mut task: Task, next: Next| async move {
            let user = task.header("X-User").unwrap_or("anonymous").to_owned();
            task.extensions_mut().insert(User(user.clone()));
            task.set_header("X-Seen-By", format!("auth:{user}"));
            append_order(&mut task, "first");
            next.run(task).await
        })
        .middleware(|mut task: Task, next: Next| async move {
            // Sees what the first middleware did.
            let user = task.extensions().get::<User>().cloned();
            task.extensions_mut().insert(user.map(|u| u.0.len()).unwrap_or(0));
            append_order(&mut task, "second");
            next.run(task).await
        })
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("t", "x").with_header("X-User", "alice"), "q").await.unwrap();
    let got = seen.recv().await;
    assert_eq!(got.extensions().get::<User>(), Some(&User("alice".into())));
    assert_eq!(got.extensions().get::<usize>(), Some(&5));
    assert_eq!(got.header("X-Seen-By"), Some("auth:alice"));
    assert_eq!(got.header("X-Order"), Some("first,second"));
    assert_eq!(got.header("X-User"), Some("alice"), "original headers are kept");

    client.dispatch(Task::new("t", "y"), "q").await.unwrap();
    let got = seen.recv().await;
    assert_eq!(got.extensions().get::<User>(), Some(&User("anonymous".into())));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn process_middleware_short_circuit_acks_without_calling_the_handler() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let mut skipped = Seen::new();
    let skipped_tx = skipped.tx.clone();
    let worker = Worker::builder(js.clone(), "q")
        .ack_wait(Duration::from_secs(2))
        .middleware(move |task: Task, next: Next| {
            let skipped_tx = skipped_tx.clone();
            async move {
                if task.header("X-Skip").is_some() {
                    let _ = skipped_tx.send(task.delivery().map(|d| d.attempt));
                    return Ok(());
                }
                next.run(task).await
            }
        })
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("t", "skip").with_header("X-Skip", "1"), "q").await.unwrap();
    assert_eq!(skipped.recv().await, Some(1));
    eventually(DEADLINE, "the skipped task is acked", || async {
        stored(&js, "natasks.q").await == 0
    })
    .await;
    assert!(seen.recv_within(QUIET).await.is_none(), "the handler must not run");
    // Ack wait is 2 s: an unacked task would come back by then.
    assert_eq!(
        skipped.recv_within(Duration::from_millis(2500)).await,
        None,
        "the skipped task must not be redelivered"
    );
    assert_eq!(stored(&js, "natasks.q-dlq").await, 0);

    client.dispatch(Task::new("t", "run"), "q").await.unwrap();
    assert_eq!(seen.recv().await.payload().as_ref(), b"run", "other tasks reach the handler");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn process_middleware_error_takes_the_retry_and_dead_letter_path() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let mut attempts = Seen::new();
    let attempts_tx = attempts.tx.clone();
    let worker = Worker::builder(js.clone(), "q")
        .max_retries(1)
        .retry_backoff([Duration::from_millis(100)])
        .middleware(move |task: Task, _next: Next| {
            let attempts_tx = attempts_tx.clone();
            async move {
                let attempt = task.delivery().map(|d| d.attempt).unwrap_or(0);
                let _ = attempts_tx.send(attempt);
                Err(HandlerError::msg(format!("middleware says no (attempt {attempt})")))
            }
        })
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("t", "x").with_header("X-Tenant", "t1"), "q").await.unwrap();
    assert_eq!(attempts.take(2, DEADLINE).await, [1, 2], "one retry after the first failure");

    let dead = first_on(&js, "natasks.q-dlq").await;
    let h = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(h("Natasks-Dead-Letter-Reason").as_deref(), Some("retries-exhausted"));
    assert_eq!(h("Natasks-Attempts").as_deref(), Some("2"));
    assert_eq!(h("Natasks-Last-Error").as_deref(), Some("middleware says no (attempt 2)"));
    assert_eq!(h("Natasks-Original-Queue").as_deref(), Some("q"));
    assert_eq!(h("X-Tenant").as_deref(), Some("t1"));
    assert_eq!(dead.payload.as_ref(), b"x");
    eventually(DEADLINE, "the failed task leaves its queue", || async {
        stored(&js, "natasks.q").await == 0
    })
    .await;
    assert!(attempts.recv_within(QUIET).await.is_none(), "no attempt after the dead letter");
    assert!(seen.recv_within(Duration::ZERO).await.is_none(), "the handler never ran");
    assert_eq!(stored(&js, "natasks.q-dlq").await, 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn process_middleware_error_with_no_retries_dead_letters_at_once() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "q")
        .max_retries(0)
        .middleware(|_task: Task, _next: Next| async move {
            Err::<(), _>(HandlerError::msg("quota exceeded"))
        })
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    client.dispatch(Task::new("t", "x"), "q").await.unwrap();
    let dead = first_on(&js, "natasks.q-dlq").await;
    let h = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(h("Natasks-Dead-Letter-Reason").as_deref(), Some("retries-exhausted"));
    assert_eq!(h("Natasks-Attempts").as_deref(), Some("1"));
    assert_eq!(h("Natasks-Last-Error").as_deref(), Some("quota exceeded"));
    assert!(seen.recv_within(QUIET).await.is_none(), "the handler never ran");
    running.stop().await.unwrap();
}

tokio::task_local! {
    /// The trace id of the current request, as an application would keep it.
    static TRACE_ID: String;
}

/// The trace id a handler receives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TraceId(String);

/// Carries [`TRACE_ID`] in the `X-Trace` header.
struct TracePropagator;

impl Propagator for TracePropagator {
    fn inject(&self, task: &mut Task) {
        if let Ok(id) = TRACE_ID.try_with(Clone::clone) {
            task.set_header("X-Trace", id);
        }
    }

    fn extract(&self, task: &mut Task) {
        if let Some(id) = task.header("X-Trace").map(str::to_owned) {
            task.extensions_mut().insert(TraceId(id));
        }
    }
}

#[tokio::test]
async fn propagator_carries_context_from_dispatch_to_handler() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::builder(js.clone()).propagator(TracePropagator).build().await.unwrap();

    TRACE_ID
        .scope("trace-123".to_owned(), client.dispatch(Task::new("t", "traced"), "q"))
        .await
        .unwrap();
    client.dispatch(Task::new("t", "untraced"), "q").await.unwrap();
    let raw = first_on(&js, "natasks.q").await;
    assert_eq!(raw.headers.get("X-Trace").map(|v| v.as_str()), Some("trace-123"));

    let mut seen = Seen::new();
    let mut in_middleware = Seen::new();
    let middleware_tx = in_middleware.tx.clone();
    let worker = Worker::builder(js, "q")
        .propagator(TracePropagator)
        .middleware(move |task: Task, next: Next| {
            // The propagator runs before process middleware.
            let _ = middleware_tx.send(task.extensions().get::<TraceId>().cloned());
            next.run(task)
        })
        .handle("t", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    let mut got = seen.take(2, DEADLINE).await;
    got.sort_by(|a, b| a.payload().cmp(b.payload()));
    let (traced, untraced) = (&got[0], &got[1]);
    assert_eq!(traced.payload().as_ref(), b"traced");
    assert_eq!(traced.extensions().get::<TraceId>(), Some(&TraceId("trace-123".into())));
    assert_eq!(untraced.payload().as_ref(), b"untraced");
    assert_eq!(untraced.extensions().get::<TraceId>(), None);
    assert_eq!(untraced.header("X-Trace"), None);
    let mut early = in_middleware.take(2, DEADLINE).await;
    early.sort();
    assert_eq!(early, [None, Some(TraceId("trace-123".into()))]);
    running.stop().await.unwrap();
}
