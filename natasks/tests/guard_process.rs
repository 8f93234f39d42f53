//! Batches and unique keys across processes killed with SIGKILL: a dispatcher killed in the
//! middle of a batch stores all of it or none, and a worker that dies between a unique
//! task's ack and the release of its key leaves a key the next dispatch can take.
//!
//! The child processes are this test binary itself: the ignored tests `guard_worker_process`
//! and `guard_batch_process` are the child programs, started with `--exact --ignored`; they
//! print lines after `@guard-proc: ` on stdout and fail without `NATASKS_GUARD_URL`.

mod common;

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use natasks::{Batch, Client, DispatchErrorKind, Task, Worker};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const URL_ENV: &str = "NATASKS_GUARD_URL";
const MARKER: &str = "@guard-proc: ";
const LIFETIME: Duration = Duration::from_secs(60);
/// Tasks per batch of the dispatcher child: each unique, so 2 messages each (the limit).
const BATCH: usize = 500;
const HOUR: Duration = Duration::from_secs(3600);

/// The user a child connects as (its password is the same), when the server has users.
const USER_ENV: &str = "NATASKS_GUARD_USER";

/// The child's connection to the parent's server.
async fn child_connect() -> async_nats::Client {
    let url =
        std::env::var(URL_ENV).unwrap_or_else(|_| panic!("{URL_ENV} is not set: this is a child"));
    let options = match std::env::var(USER_ENV) {
        Ok(user) => async_nats::ConnectOptions::with_user_and_password(user.clone(), user),
        Err(_) => async_nats::ConnectOptions::new(),
    };
    options.connect(url).await.expect("child connects")
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER}{line}").expect("write to stdout");
    out.flush().expect("flush stdout");
}

/// The worker program: runs `job` tasks of queue `jobs`, printing `done <payload>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker program of guard_process scenarios, started by them as a child"]
async fn guard_worker_process() {
    let nats = child_connect().await;
    let worker = Worker::builder(jetstream::new(nats), "jobs")
        .handle("job", |task: Task| async move {
            emit(&format!("done {}", String::from_utf8_lossy(task.payload())));
            Ok::<(), natasks::HandlerError>(())
        })
        .build()
        .await
        .expect("child worker builds");
    emit("ready");
    worker.run_until(tokio::time::sleep(LIFETIME)).await.expect("child worker runs");
}

/// The dispatcher program: dispatches batches of unique tasks back to back, each key used
/// once, printing `stored <batch>` after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the dispatcher program of guard_process scenarios, started by them as a child"]
async fn guard_batch_process() {
    let nats = child_connect().await;
    let client = Client::new(jetstream::new(nats)).await.expect("client");
    for round in 0.. {
        let batch: Batch = (0..BATCH)
            .map(|i| {
                (
                    Task::new("job", format!("{round}-{i}")).unique(format!("{round}-{i}"), HOUR),
                    "bulk",
                )
            })
            .collect();
        client.dispatch_batch(batch).await.expect("batch stored");
        emit(&format!("stored {round}"));
    }
}

/// A child process and the lines it printed.
struct Proc {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Proc {
    fn spawn(role: &str, url: &str, user: Option<&str>) -> Proc {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut command = Command::new(exe);
        if let Some(user) = user {
            command.env(USER_ENV, user);
        }
        let mut child = command
            .args([role, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(URL_ENV, url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("start {role}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(at) = line.find(MARKER) {
                    let _ = tx.send(line[at + MARKER.len()..].to_owned());
                }
            }
        });
        Proc { child, lines }
    }

    /// The next line starting with `prefix`, within the deadline.
    async fn expect(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return line,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the child exited before printing {prefix:?}"),
                Err(_) => panic!("the child printed no {prefix:?} within {DEADLINE:?}"),
            }
        }
    }

    async fn kill(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the killed child exits")
            .expect("wait for the child");
        assert_eq!(status.signal(), Some(9), "died of {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_batch_stores_all_of_a_batch_or_none() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let mut dispatcher = Proc::spawn("guard_batch_process", &server.url(), None);
    // Killed while it sends the batch after the second: it dispatches back to back.
    dispatcher.expect("stored 1").await;
    dispatcher.kill().await;

    let tasks = stored(&js, "natasks.bulk").await;
    assert!(tasks >= 2 * BATCH as u64, "two batches were confirmed: {tasks}");
    assert_eq!(tasks % BATCH as u64, 0, "a partial batch was stored: {tasks} tasks");
    // Every stored task has its lock and every lock its task.
    let stream = js.get_stream("NATASKS").await.unwrap();
    let mut info = stream.info_with_subjects("natasks.__natasks_mark.unique.bulk.>").await.unwrap();
    let mut locks = 0;
    while let Some(entry) = futures_util::StreamExt::next(&mut info).await {
        locks += entry.unwrap().1 as u64;
    }
    assert_eq!(locks, tasks);

    // The stream takes new batches; the abandoned one never shows up.
    let client = Client::new(js.clone()).await.unwrap();
    let next: Batch = (0..3).map(|i| (Task::new("job", i.to_string()), "bulk")).collect();
    client.dispatch_batch(next).await.unwrap();
    assert_eq!(stored(&js, "natasks.bulk").await, tasks + 3);
}

/// The worker may not delete messages, so it cannot release a key: after the ack of a
/// unique task it is left exactly as a worker killed between that ack and the release
/// leaves it. It is then killed, too.
const WORKER_CANNOT_RELEASE: &str = r#"
authorization {
  users: [
    { user: admin, password: admin }
    { user: worker, password: worker, permissions: { publish: { allow: [">"], deny: ["$JS.API.STREAM.MSG.DELETE.>"] } } }
  ]
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_left_by_a_worker_killed_between_ack_and_release_is_taken_over() {
    let server = NatsServer::builder().config_file(WORKER_CANNOT_RELEASE).start().await;
    let admin = async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin".into())
        .connect(server.url())
        .await
        .unwrap();
    let js = jetstream::new(admin);
    let client = Client::new(js.clone()).await.unwrap();
    let lock = "natasks.__natasks_mark.unique.jobs.k";

    let first = client.dispatch(Task::new("job", "first").unique("k", HOUR), "jobs").await.unwrap();
    let mut worker = Proc::spawn("guard_worker_process", &server.url(), Some("worker"));
    worker.expect("ready").await;
    assert_eq!(worker.expect("done").await, "done first");
    eventually(DEADLINE, "the task is acked", || async { stored(&js, "natasks.jobs").await == 0 })
        .await;
    worker.kill().await;
    assert_eq!(stored(&js, lock).await, 1, "the key is still held, by a task that is gone");

    // The next dispatch sees the lock's task gone and takes the key over.
    let second = client.dispatch(Task::new("job", "second").unique("k", HOUR), "jobs").await;
    let second = second.expect("a stale key is taken over");
    assert_ne!(second.id, first.id);
    assert_eq!(stored(&js, lock).await, 1);
    assert_eq!(stored(&js, "natasks.jobs").await, 1);
    // And it is held again, by the new task.
    let err =
        client.dispatch(Task::new("job", "third").unique("k", HOUR), "jobs").await.unwrap_err();
    assert_eq!(err.kind(), DispatchErrorKind::Duplicate);
    assert_eq!(err.existing_id(), Some(second.id.as_str()));

    // A worker that may release runs the second task once and frees the key.
    let mut seen = Seen::new();
    let worker = Worker::builder(js.clone(), "jobs")
        .handle("job", reporter(seen.tx.clone()))
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    assert_eq!(seen.recv().await.payload().as_ref(), b"second");
    eventually(DEADLINE, "the key is released", || async { stored(&js, lock).await == 0 }).await;
    assert!(seen.recv_within(Duration::from_millis(500)).await.is_none(), "ran twice");
    running.stop().await.unwrap();
}
