//! Security: TLS, authentication (user/password, token, nkey) and least-privilege
//! permissions for dispatchers and workers (see `docs/permissions.md`).

mod common;

use std::time::Duration;

use async_nats::jetstream::stream;
use async_nats::{jetstream, ConnectErrorKind, ConnectOptions};
use common::*;
use natasks::{Client, DispatchErrorKind, HandlerError, SetupError, SetupErrorKind, Task, Worker};
use natasks_test_support::TlsCerts;

/// Dispatches a task to `queue` and checks a worker on another connection processes it.
async fn round_trip(dispatch_js: jetstream::Context, worker_js: jetstream::Context, queue: &str) {
    let client = Client::new(dispatch_js).await.expect("client set-up");
    let mut seen = Seen::new();
    let worker = Worker::builder(worker_js, queue)
        .ack_wait(Duration::from_secs(2))
        .handle("secure.task", reporter(seen.tx.clone()))
        .build()
        .await
        .expect("worker set-up");
    let running = spawn(worker);
    client.dispatch(Task::new("secure.task", "payload"), queue).await.expect("dispatch");
    let task = seen.recv().await;
    assert_eq!(task.payload().as_ref(), b"payload");
    running.stop().await.unwrap();
}

async fn connect(options: ConnectOptions, url: &str) -> jetstream::Context {
    jetstream::new(options.connect(url).await.expect("connect"))
}

#[tokio::test]
async fn tls_round_trip_works_and_an_untrusted_server_is_refused() {
    let certs = TlsCerts::generate();
    let server = NatsServer::builder().tls(&certs).start().await;
    let tls = || {
        ConnectOptions::new().add_root_certificates(certs.ca_file().to_path_buf()).require_tls(true)
    };
    let dispatch_js = connect(tls(), &server.url()).await;
    assert!(dispatch_js.client().server_info().tls_required);
    round_trip(dispatch_js, connect(tls(), &server.url()).await, "tls").await;

    // A client that does not trust the CA is refused.
    let err = ConnectOptions::new().connect(server.url()).await.expect_err("untrusted CA");
    assert!(err.to_string().contains("certificate"), "unclear error: {err}");
}

#[tokio::test]
async fn user_and_password_authentication() {
    let server = NatsServer::builder()
        .config_file("authorization { user: \"app\", password: \"s3cret\" }\n")
        .start()
        .await;
    let good = || ConnectOptions::with_user_and_password("app".into(), "s3cret".into());
    round_trip(connect(good(), &server.url()).await, connect(good(), &server.url()).await, "up")
        .await;

    for (user, password) in [("app", "wrong"), ("nobody", "s3cret")] {
        let err = ConnectOptions::with_user_and_password(user.into(), password.into())
            .connect(server.url())
            .await
            .expect_err("wrong credentials must be refused");
        assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation, "{err}");
        assert!(err.to_string().contains("authorization violation"), "{err}");
    }
    let err = ConnectOptions::new().connect(server.url()).await.expect_err("no credentials");
    assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation, "{err}");
}

#[tokio::test]
async fn token_authentication() {
    let server =
        NatsServer::builder().config_file("authorization { token: \"t0ken-42\" }\n").start().await;
    let good = || ConnectOptions::with_token("t0ken-42".into());
    round_trip(connect(good(), &server.url()).await, connect(good(), &server.url()).await, "tok")
        .await;
    let err = ConnectOptions::with_token("t0ken-43".into())
        .connect(server.url())
        .await
        .expect_err("a wrong token must be refused");
    assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation, "{err}");
}

#[tokio::test]
async fn nkey_authentication() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::builder()
        .config_file(format!(
            "authorization {{ users: [ {{ nkey: {:?} }} ] }}\n",
            user.public_key()
        ))
        .start()
        .await;
    let seed = user.seed().unwrap();
    let good = || ConnectOptions::with_nkey(seed.clone());
    round_trip(connect(good(), &server.url()).await, connect(good(), &server.url()).await, "nk")
        .await;
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let err = ConnectOptions::with_nkey(stranger)
        .connect(server.url())
        .await
        .expect_err("an unknown nkey must be refused");
    assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation, "{err}");
}

/// The permissions of `docs/permissions.md` for queue `jobs` (dead letters to `jobs-dlq`),
/// plus an admin that creates the stream and a user that may not publish tasks.
const LEAST_PRIVILEGE: &str = r#"
authorization {
  users: [
    { user: admin, password: admin }
    {
      user: dispatcher, password: dispatcher
      permissions: {
        publish: { allow: [
          "$JS.API.STREAM.INFO.NATASKS",
          "natasks.jobs",
          "natasks.__natasks_schedule.>"
        ] }
        subscribe: { allow: ["_INBOX.>"] }
      }
    }
    {
      user: worker, password: worker
      permissions: {
        publish: { allow: [
          "$JS.API.STREAM.INFO.NATASKS",
          "$JS.API.CONSUMER.CREATE.NATASKS.natasks-jobs.natasks.jobs",
          "$JS.API.CONSUMER.INFO.NATASKS.natasks-jobs",
          "$JS.API.CONSUMER.MSG.NEXT.NATASKS.natasks-jobs",
          "$JS.ACK.NATASKS.natasks-jobs.>",
          "natasks.jobs-dlq"
        ] }
        subscribe: { allow: ["_INBOX.>"] }
      }
    }
    {
      user: reader, password: reader
      permissions: {
        publish: { allow: ["$JS.API.STREAM.INFO.NATASKS"] }
        subscribe: { allow: ["_INBOX.>"] }
      }
    }
  ]
}
"#;

async fn user(server: &NatsServer, name: &str) -> jetstream::Context {
    let options = ConnectOptions::with_user_and_password(name.into(), name.into());
    let mut js = connect(options, &server.url()).await;
    js.set_timeout(Duration::from_secs(2));
    js
}

#[tokio::test]
async fn least_privilege_dispatcher_and_worker_run() {
    let server = NatsServer::builder().config_file(LEAST_PRIVILEGE).start().await;
    let admin = user(&server, "admin").await;
    // Only the admin may create the stream; the error names the permission.
    let err = Client::new(user(&server, "dispatcher").await)
        .await
        .err()
        .expect("the dispatcher must not be able to create the stream");
    assert_eq!(err.kind(), SetupErrorKind::JetStream, "{err}");
    assert!(err.to_string().contains("`$JS.API.STREAM.CREATE.NATASKS`"), "unclear error: {err}");
    assert!(admin.get_stream("NATASKS").await.is_err(), "the dispatcher created the stream");
    Client::new(admin.clone()).await.expect("admin creates the stream");

    let client = Client::new(user(&server, "dispatcher").await).await.expect("dispatcher");
    let mut seen = Seen::new();
    let tx = seen.tx.clone();
    let worker = Worker::builder(user(&server, "worker").await, "jobs")
        .ack_wait(Duration::from_secs(2))
        .max_retries(0)
        .handle("jobs.ok", reporter(seen.tx.clone()))
        .handle("jobs.fail", move |task: Task| {
            let _ = tx.send(task);
            std::future::ready(Err::<(), _>(HandlerError::msg("always fails")))
        })
        .build()
        .await
        .expect("worker with least privilege builds");
    let running = spawn(worker);

    client.dispatch(Task::new("jobs.ok", "now"), "jobs").await.expect("dispatch");
    client
        .dispatch_in(Task::new("jobs.ok", "later"), "jobs", Duration::from_secs(1))
        .await
        .expect("delayed dispatch");
    client.dispatch(Task::new("jobs.fail", "dead"), "jobs").await.expect("dispatch");
    let mut payloads: Vec<String> = seen
        .take(3, DEADLINE)
        .await
        .iter()
        .map(|t| String::from_utf8_lossy(t.payload()).into_owned())
        .collect();
    payloads.sort();
    assert_eq!(payloads, ["dead", "later", "now"]);
    // The worker may publish its dead letters.
    let dead = first_on(&admin, "natasks.jobs-dlq").await;
    assert_eq!(dead.payload.as_ref(), b"dead");
    // Acks went through: the queue drains, and nothing is redelivered after the ack wait.
    eventually(DEADLINE, "the queue to drain", || async {
        stored(&admin, "natasks.jobs").await == 0
    })
    .await;
    assert!(seen.recv_within(Duration::from_millis(2500)).await.is_none(), "a task came back");

    // The dispatcher may not use other queues.
    let err = client.dispatch(Task::new("t", "x"), "other").await.expect_err("other queue");
    assert_eq!(stored(&admin, "natasks.other").await, 0, "{err}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn dispatch_without_publish_permission_fails_and_stores_nothing() {
    let server = NatsServer::builder().config_file(LEAST_PRIVILEGE).start().await;
    let admin = user(&server, "admin").await;
    Client::new(admin.clone()).await.unwrap();
    let client = Client::new(user(&server, "reader").await).await.expect("stream info allowed");
    let err = client.dispatch(Task::new("jobs.ok", "x"), "jobs").await.expect_err("no permission");
    println!("dispatch without publish permission: kind {:?}: {err}", err.kind());
    assert_eq!(stored(&admin, "natasks.jobs").await, 0);
}

/// The error must point at the cause. The server reports a permission violation only
/// asynchronously on the connection (to its event callback), so `dispatch` sees a timeout;
/// its message names missing publish permission as one of the causes.
#[tokio::test]
async fn dispatch_without_publish_permission_names_the_permission() {
    let server = NatsServer::builder().config_file(LEAST_PRIVILEGE).start().await;
    Client::new(user(&server, "admin").await).await.unwrap();
    let client = Client::new(user(&server, "reader").await).await.unwrap();
    let err = client.dispatch(Task::new("jobs.ok", "x"), "jobs").await.expect_err("no permission");
    assert_eq!(err.kind(), DispatchErrorKind::Timeout, "{err}");
    assert!(err.to_string().to_lowercase().contains("permission"), "unclear error: {err}");
}

/// A stream as an operator (or natasks on nats-server 2.11) makes it: the queue subjects, no
/// schedule subjects, no schedules flag.
async fn stream_without_schedules(admin: &jetstream::Context) {
    admin
        .create_stream(stream::Config {
            name: "NATASKS".into(),
            subjects: vec!["natasks.*".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .expect("admin creates the stream");
}

/// What a least-privilege dispatcher and worker can do on a server without message schedules:
/// start, dispatch and process a task; a delayed dispatch is refused, publishing nothing.
async fn least_privilege_without_schedules(server: &NatsServer, admin: &jetstream::Context) {
    let before = admin.get_stream("NATASKS").await.unwrap().cached_info().config.clone();
    let client = Client::new(user(server, "dispatcher").await)
        .await
        .expect("the dispatcher starts without STREAM.UPDATE permission");
    let mut seen = Seen::new();
    let worker = Worker::builder(user(server, "worker").await, "jobs")
        .handle("jobs.ok", reporter(seen.tx.clone()))
        .build()
        .await
        .expect("the worker builds without STREAM.UPDATE permission");
    let running = spawn(worker);

    client.dispatch(Task::new("jobs.ok", "now"), "jobs").await.expect("immediate dispatch");
    assert_eq!(seen.recv().await.payload().as_ref(), b"now");
    eventually(DEADLINE, "the task to be acked", || async { stream_messages(admin).await == 0 })
        .await;

    let err = client
        .dispatch_in(Task::new("jobs.ok", "later"), "jobs", Duration::from_secs(1))
        .await
        .expect_err("delayed dispatch needs schedules");
    assert_eq!(err.kind(), DispatchErrorKind::SchedulesUnsupported, "{err}");
    assert!(err.to_string().contains("2.11"), "the error names the server version: {err}");
    assert_eq!(stream_messages(admin).await, 0, "the refused dispatch published nothing");
    running.stop().await.unwrap();

    let after = admin.get_stream("NATASKS").await.unwrap().cached_info().config.clone();
    assert_eq!(after.subjects, before.subjects, "the stream was changed");
}

fn old_server() -> std::path::PathBuf {
    old_server_binary().expect(
        "the old nats-server (2.11) is not installed; run scripts/install-nats-server to install it",
    )
}

/// nats-server 2.11 never echoes the schedules flag: natasks must not try to update the
/// stream on every start, which least-privilege users may not do.
#[tokio::test]
async fn least_privilege_runs_on_a_server_without_schedules() {
    let server =
        NatsServer::builder().binary(old_server()).config_file(LEAST_PRIVILEGE).start().await;
    let admin = user(&server, "admin").await;
    Client::new(admin.clone()).await.expect("admin creates the stream");
    least_privilege_without_schedules(&server, &admin).await;
}

#[tokio::test]
async fn least_privilege_adopts_a_stream_without_schedule_subjects_on_an_old_server() {
    let server =
        NatsServer::builder().binary(old_server()).config_file(LEAST_PRIVILEGE).start().await;
    let admin = user(&server, "admin").await;
    stream_without_schedules(&admin).await;
    least_privilege_without_schedules(&server, &admin).await;
}

/// On a server with schedules, a stream without them must be updated once, which needs
/// STREAM.UPDATE: a least-privilege user's error says so.
#[tokio::test]
async fn missing_schedules_name_the_update_permission() {
    let server = NatsServer::builder().config_file(LEAST_PRIVILEGE).start().await;
    let admin = user(&server, "admin").await;
    stream_without_schedules(&admin).await;

    let check = |who: &str, err: SetupError| {
        assert_eq!(err.kind(), SetupErrorKind::JetStream, "{who}: {err}");
        let text = err.to_string();
        assert!(text.contains("`$JS.API.STREAM.UPDATE.NATASKS`"), "{who}: unclear error: {text}");
        assert!(text.contains("schedules"), "{who}: the error names the action: {text}");
    };
    let err = Client::new(user(&server, "dispatcher").await).await.err().expect("no update right");
    check("dispatcher", err);
    let err = Worker::builder(user(&server, "worker").await, "jobs")
        .handle("jobs.ok", |_t: Task| async { Ok::<_, HandlerError>(()) })
        .build()
        .await
        .err()
        .expect("no update right");
    check("worker", err);
    let config = admin.get_stream("NATASKS").await.unwrap().cached_info().config.clone();
    assert!(!config.allow_message_schedules, "nothing was changed");

    // Once the administrator added them, both start and delayed dispatch works.
    Client::new(admin.clone()).await.expect("admin adds schedules");
    let client = Client::new(user(&server, "dispatcher").await).await.expect("dispatcher");
    let mut seen = Seen::new();
    let worker = Worker::builder(user(&server, "worker").await, "jobs")
        .handle("jobs.ok", reporter(seen.tx.clone()))
        .build()
        .await
        .expect("worker");
    let running = spawn(worker);
    client
        .dispatch_in(Task::new("jobs.ok", "later"), "jobs", Duration::from_millis(500))
        .await
        .expect("delayed dispatch");
    assert_eq!(seen.recv().await.payload().as_ref(), b"later");
    running.stop().await.unwrap();
}

/// A stream made before unique tasks existed (schedules, no markers) serves a dispatcher and
/// a worker that may not update it; only guarded dispatches are refused, saying what to do.
#[tokio::test]
async fn least_privilege_uses_a_stream_without_markers_and_guards_say_why_not() {
    let server = NatsServer::builder().config_file(LEAST_PRIVILEGE).start().await;
    let admin = user(&server, "admin").await;
    admin
        .create_stream(stream::Config {
            name: "NATASKS".into(),
            subjects: vec!["natasks.*".into(), "natasks.__natasks_schedule.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            allow_message_schedules: true,
            ..Default::default()
        })
        .await
        .expect("admin creates the stream");
    let client = Client::new(user(&server, "dispatcher").await).await.expect("dispatcher starts");
    client.dispatch(Task::new("jobs.ok", "plain"), "jobs").await.expect("plain dispatch");
    let unique = Task::new("jobs.ok", "unique").unique("k", Duration::from_secs(60));
    let err = client.dispatch(unique, "jobs").await.unwrap_err();
    assert_eq!(err.kind(), natasks::DispatchErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("STREAM.UPDATE"), "{err}");
    let config = admin.get_stream("NATASKS").await.unwrap().cached_info().config.clone();
    assert!(!config.allow_atomic_publish, "nothing was changed");

    // A client allowed to update the stream adds them when it starts.
    let admin_client = Client::new(admin.clone()).await.expect("admin adds markers");
    let unique = Task::new("jobs.ok", "unique").unique("k", Duration::from_secs(60));
    admin_client.dispatch(unique, "jobs").await.expect("unique dispatch");
}
