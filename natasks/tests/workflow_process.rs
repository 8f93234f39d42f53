//! A group's callback runs once even when the workers of its members are killed with
//! SIGKILL mid-way and its members fail and retry at random: 200 members, three worker
//! processes, two of them killed and restarted while the members run. A chain whose
//! worker is killed while a step runs completes, each step's effect once.
//!
//! The worker processes are this test binary itself: the ignored test
//! `workflow_worker_process` is the child program. It needs `NATASKS_WF_URL` and fails
//! without it; the scenario starts it with `--exact --ignored` and reads the lines it
//! prints after `@wf-proc: ` on stdout.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher as _;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use common::*;
use futures_util::StreamExt as _;
use natasks::workflow::{Chain, Group, GroupResults, WorkflowState};
use natasks::{Attempt, Client, HandlerError, Json, Task, Worker};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const URL_ENV: &str = "NATASKS_WF_URL";
const MARKER: &str = "@wf-proc: ";
const QUEUE: &str = "wfproc";
const MEMBERS: u64 = 200;
/// Where every run of the callback is recorded, one message per run (stream `RUNS`).
const RUNS_SUBJECT: &str = "runs.callback";
/// Where each chain step records its effect: `runs.effect.<step>` (stream `RUNS`).
const EFFECT_SUBJECT: &str = "runs.effect";
/// How long a chain step works before its effect.
const STEP_WORK: Duration = Duration::from_millis(1500);
/// Lease of the child workers: the tasks of a killed worker come back after it.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// Longest life of a child, should its parent never stop it.
const LIFETIME: Duration = Duration::from_secs(120);
/// How long the whole scenario may take.
const SCENARIO: Duration = Duration::from_secs(90);

/// What the callback records of each of its runs.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Run {
    /// The callback task's stream sequence: one dispatched callback has one.
    sequence: u64,
    attempt: u64,
    members: usize,
    distinct: usize,
    succeeded: usize,
    sum: u64,
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARKER}{line}").expect("write to stdout");
    out.flush().expect("flush stdout");
}

/// The worker program: `member` squares its number after a short while, failing about a
/// third of its attempts (retried); `collect` records its run in stream `RUNS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the worker program of workflow_process, started by it as a child"]
async fn workflow_worker_process() {
    let url = std::env::var(URL_ENV)
        .unwrap_or_else(|_| panic!("{URL_ENV} is not set: this is a child process"));
    let nats = async_nats::connect(&url).await.expect("child worker connects");
    let js = jetstream::new(nats);
    let random = std::collections::hash_map::RandomState::new();
    let member = move |Json(n): Json<u64>, Attempt(attempt): Attempt| {
        let roll = random.hash_one((n, attempt)) % 100;
        async move {
            tokio::time::sleep(Duration::from_millis(40 + roll % 80)).await;
            if roll < 33 {
                return Err(HandlerError::msg(format!("member {n} fails attempt {attempt}")));
            }
            Ok::<_, HandlerError>(n * n)
        }
    };
    let runs = js.clone();
    let collect =
        move |Json(results): Json<GroupResults>, Attempt(attempt): Attempt, task: Task| {
            let js = runs.clone();
            async move {
                let ids: BTreeSet<&str> = results.members.iter().map(|m| m.id.as_str()).collect();
                let run = Run {
                    sequence: task.delivery().map_or(0, |d| d.stream_sequence),
                    attempt,
                    members: results.members.len(),
                    distinct: ids.len(),
                    succeeded: results.members.iter().filter(|m| m.succeeded()).count(),
                    sum: results.members.iter().filter_map(|m| m.result.as_ref()?.as_u64()).sum(),
                };
                let record = serde_json::to_vec(&run)?;
                js.publish(RUNS_SUBJECT, record.into()).await?.await?;
                Ok::<_, HandlerError>(())
            }
        };
    let effects = js.clone();
    // A chain's step: says it started, works a while, then has its effect (a message in
    // stream `RUNS`) and passes its number on, plus one.
    let chain_step = move |Json(n): Json<u64>| {
        let js = effects.clone();
        async move {
            emit(&format!("step {n} started"));
            tokio::time::sleep(STEP_WORK).await;
            js.publish(format!("{EFFECT_SUBJECT}.{n}"), Bytes::new()).await?.await?;
            Ok::<_, HandlerError>(n + 1)
        }
    };
    let worker = Worker::builder(js, QUEUE)
        .ack_wait(ACK_WAIT)
        .concurrency(8)
        .max_retries(60)
        .retry_backoff([Duration::from_millis(20)])
        .handle("member", member)
        .handle("collect", collect)
        .handle("chain_step", chain_step)
        .build()
        .await
        .expect("child worker builds");
    emit("ready");
    worker.run_until(tokio::time::sleep(LIFETIME)).await.expect("child worker runs");
}

/// A child worker process.
struct Proc {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Proc {
    async fn start(url: &str) -> Proc {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut child = Command::new(exe)
            .args(["workflow_worker_process", "--exact", "--ignored", "--nocapture"])
            .env(URL_ENV, url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a worker process");
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
        let mut proc = Proc { child, lines };
        let ready = tokio::time::timeout(DEADLINE, proc.lines.recv()).await;
        assert_eq!(ready.ok().flatten().as_deref(), Some("ready"), "the worker did not start");
        proc
    }

    async fn kill(&mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the worker dies")
            .expect("wait for the worker");
        assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status:?}");
    }
}

/// Waits until fewer than `left` members are waiting or running in the queue.
async fn until_fewer(js: &jetstream::Context, left: u64) {
    let subject = format!("natasks.{QUEUE}");
    eventually(SCENARIO, &format!("fewer than {left} tasks left"), || async {
        stored(js, &subject).await < left
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_200_calls_back_once_through_retries_and_killed_workers() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    js.create_stream(stream::Config {
        name: "RUNS".into(),
        subjects: vec!["runs.>".into()],
        ..Default::default()
    })
    .await
    .expect("runs stream");
    let client = Client::new(js.clone()).await.expect("client");

    let mut group = Group::new("two-hundred");
    for n in 1..=MEMBERS {
        group = group.add(Task::json("member", &n).unwrap(), QUEUE);
    }
    let receipt =
        client.dispatch_workflow(group.then(Task::new("collect", ""), QUEUE)).await.unwrap();

    let mut workers =
        vec![Proc::start(&url).await, Proc::start(&url).await, Proc::start(&url).await];
    // Kill two workers while members run (their held tasks come back after the lease),
    // and start fresh ones in their place.
    until_fewer(&js, 150).await;
    workers[0].kill().await;
    workers[0] = Proc::start(&url).await;
    until_fewer(&js, 80).await;
    workers[1].kill().await;
    workers[1] = Proc::start(&url).await;

    // Every task, the callback included, is acknowledged once the queue is empty: the
    // stream keeps a task until its ack.
    let callback = receipt.steps.last().unwrap().clone();
    let _: () = client.wait(&callback, SCENARIO).await.expect("the callback succeeds");
    until_fewer(&js, 1).await;
    let status = client.workflow_status(&receipt.id).await.unwrap();
    assert_eq!(status.state, WorkflowState::Succeeded, "{status:#?}");
    // A callback dispatched twice would show by now: it is stored before the member that
    // dispatched it is acknowledged.
    for worker in &mut workers {
        worker.kill().await;
    }

    let mut runs_stream = js.get_stream("RUNS").await.unwrap();
    let count = runs_stream.info().await.unwrap().state.messages;
    let consumer =
        runs_stream.create_consumer(jetstream::consumer::pull::Config::default()).await.unwrap();
    let mut messages = consumer.fetch().max_messages(100).messages().await.unwrap();
    let mut runs = Vec::new();
    while let Some(message) = messages.next().await {
        runs.push(serde_json::from_slice::<Run>(&message.unwrap().payload).unwrap());
    }
    assert_eq!(runs.len() as u64, count);
    assert!(!runs.is_empty(), "the callback never ran");
    // Every run is an attempt of one dispatched callback task; each saw every member.
    let sequences: HashMap<u64, usize> = runs.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.sequence).or_default() += 1;
        m
    });
    assert_eq!(sequences.len(), 1, "the callback was dispatched more than once: {runs:?}");
    let expected_sum: u64 = (1..=MEMBERS).map(|n| n * n).sum();
    for run in &runs {
        assert_eq!(run.members, MEMBERS as usize, "{run:?}");
        assert_eq!(run.distinct, MEMBERS as usize, "{run:?}");
        assert_eq!(run.succeeded, MEMBERS as usize, "{run:?}");
        assert_eq!(run.sum, expected_sum, "{run:?}");
    }
    // Runs are attempts of the callback: a run per attempt, never more.
    let attempts: BTreeSet<u64> = runs.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts.len(), runs.len(), "two runs of one attempt: {runs:?}");
    eprintln!("callback runs: {runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_completes_once_when_its_worker_is_killed_mid_step() {
    let server = NatsServer::start().await;
    let url = server.url();
    let js = server.jetstream().await;
    js.create_stream(stream::Config {
        name: "RUNS".into(),
        subjects: vec!["runs.>".into()],
        ..Default::default()
    })
    .await
    .expect("runs stream");
    let client = Client::new(js.clone()).await.expect("client");
    let chain = Chain::new("killed")
        .then(Task::json("chain_step", &0u64).unwrap(), QUEUE)
        .then(Task::new("chain_step", ""), QUEUE)
        .then(Task::new("chain_step", ""), QUEUE);
    let receipt = client.dispatch_workflow(chain).await.unwrap();

    let mut worker = Proc::start(&url).await;
    let started = |line: Option<String>| line.expect("the worker reports its steps");
    assert_eq!(started(worker.lines.recv().await), "step 0 started");
    assert_eq!(started(worker.lines.recv().await), "step 1 started");
    // The second step works: its worker dies before its effect; the step comes back to
    // another worker after the lease.
    worker.kill().await;
    let mut worker = Proc::start(&url).await;
    let last: u64 = client.wait(&receipt.steps[2], SCENARIO).await.expect("the chain completes");
    assert_eq!(last, 3);
    let status = client.workflow_status(&receipt.id).await.unwrap();
    assert_eq!(status.state, WorkflowState::Succeeded, "{status:#?}");
    worker.kill().await;

    let runs = js.get_stream("RUNS").await.unwrap();
    for step in 0..3 {
        let subject = format!("{EFFECT_SUBJECT}.{step}");
        let info = runs.info_with_subjects(subject.clone()).await.unwrap();
        let effects: Vec<u64> = futures_util::TryStreamExt::try_collect::<Vec<_>>(info)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, count)| count as u64)
            .collect();
        assert_eq!(effects, [1], "the effects of step {step}");
    }
}
