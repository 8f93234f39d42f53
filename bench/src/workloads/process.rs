//! Workloads with the worker in a process of its own, where a service runs it, measuring
//! what the worker process costs: its CPU time per task, its allocations per task, and its
//! throughput, for natasks, a raw async-nats worker and (with `--peer apalis`) an apalis
//! worker, each on a fresh stream of the same server in the same run.
//!
//! * `drain_c8`, `drain_c64`: the queue is pre-filled with `N` tasks (raw publishes with
//!   natasks' headers: the messages a natasks `Client` sends), then the worker process is
//!   started; tasks/s from its start of consuming to its `N`-th processed task (timed by the
//!   worker process itself), CPU over the same interval.
//! * `e2e_process_c8`, `e2e_process_c64`: the worker process runs and is warm (it has
//!   processed warm-up tasks); this process dispatches `N` tasks with 64 dispatches in
//!   flight (natasks with its `Client`, raw and apalis with raw publishes that await each
//!   ack); the clock runs from the first dispatch to the worker's report of its `N`-th
//!   processed task.
//!
//! The worker's CPU time is read from `/proc/<pid>/task/*/schedstat` (every thread's time
//! on a CPU, user and system, in nanoseconds) just before it is told to start and just
//! after it reports its `N`-th task. Allocations are counted in a separate run of each
//! drain (counting makes every allocation dearer, so the timed runs do not count).
//!
//! The worker protocol is described in `child.rs`.
//!
//! Knobs for breaking the cost down: `RAW_TASK_ID=1` gives the raw publishes the
//! `Natasks-Id` a natasks dispatch carries; `RAW_FETCH_BATCH=n` gives the raw worker pull batches of
//! `n` instead of the natasks worker's `fetch_batch` (natasks asks only for as many tasks
//! as it has free slots, whatever its `fetch_batch`; the raw worker keeps a full batch
//! coming).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout, Command};

use super::{
    check_stored, limit_for, threads_cpu_ns, Allocs, Dispatcher, Env, Impl, Layout, Res, Sample,
    PUBLISH_IN_FLIGHT, QUEUE,
};

/// Dispatches in flight in the e2e_process workloads.
const DISPATCH_IN_FLIGHT: usize = 64;
/// Tasks the worker processes before an e2e_process clock starts.
const WARMUP: usize = 1_000;
/// Longest wait for a worker process to be set up.
const SETUP_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for a worker process to stop once told to.
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for the server to have every processed task acked.
const ACK_LIMIT: Duration = Duration::from_secs(30);

/// How the worker of a process workload is set up.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub concurrency: usize,
}

impl Shape {
    /// The natasks worker's `fetch_batch`, and the raw worker's batch size.
    pub fn fetch_batch(self) -> usize {
        (2 * self.concurrency).max(64)
    }

    /// The raw worker's pull batch: `RAW_FETCH_BATCH` if set, else [`fetch_batch`](Self::fetch_batch).
    pub fn raw_fetch_batch(self) -> Res<usize> {
        match std::env::var("RAW_FETCH_BATCH") {
            Ok(value) => match value.parse() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("RAW_FETCH_BATCH={value:?} is not a positive number").into()),
            },
            Err(_) => Ok(self.fetch_batch()),
        }
    }

    /// The consumer's `max_ack_pending`: the natasks default for this concurrency and
    /// fetch batch, given to the raw and apalis consumers too.
    pub fn max_ack_pending(self) -> i64 {
        natasks::DEFAULT_MAX_ACK_PENDING.max((self.concurrency + self.fetch_batch()) as i64)
    }
}

/// Where the apalis peer binary is, if it was built (`scripts/bench --peer apalis` builds
/// it): `NATASKS_BENCH_APALIS`, else next to this binary.
pub fn locate_apalis() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("NATASKS_BENCH_APALIS").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("NATASKS_BENCH_APALIS={} is not a file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let beside = exe.with_file_name("natasks-bench-apalis");
    if beside.is_file() {
        return Ok(beside);
    }
    Err(format!(
        "the apalis peer is not built (looked for {}): run scripts/bench --peer apalis, which \
         builds bench/peers/apalis, or set NATASKS_BENCH_APALIS to its binary",
        beside.display()
    ))
}

/// Drains `n` pre-filled tasks with a worker process; with `count_allocs`, the worker
/// counts its allocations (and the sample's timings are not representative).
pub async fn drain(
    env: &Env,
    imp: Impl,
    apalis: Option<&Path>,
    n: usize,
    shape: Shape,
    count_allocs: bool,
) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        Dispatcher::new(Impl::Raw, env, &layout, &client).many(n, PUBLISH_IN_FLIGHT, None).await?;
        check_stored(env, &layout, n).await?;

        let job = Job { mode: "drain", tasks: n, warmup: 0, count_allocs };
        let mut worker = WorkerProcess::spawn(env, imp, apalis, &layout, shape, job)?;
        worker.expect("ready", SETUP_LIMIT).await?;
        let cpu = ChildCpu::now(worker.pid)?;
        let server = env.server_pid.map(ChildCpu::now).transpose()?;
        worker.send("go").await?;
        let done = worker.expect("done", limit_for(n)).await?;
        let cpu_us_per_task = cpu.us_per_task(n)?;
        let mut extra = Vec::new();
        if let Some(server) = server {
            extra.push(("server_cpu_us_per_task".to_owned(), server.us_per_task(n)?));
        }
        worker.all_acked(env, &layout).await?;
        worker.stop().await?;

        let elapsed_ns = done.number("elapsed_ns")?;
        let allocs = if count_allocs {
            Some(Allocs {
                process_allocs: done.number("allocs")? / n as f64,
                process_bytes: done.number("bytes")? / n as f64,
                dispatch_allocs: 0.0,
            })
        } else {
            None
        };
        Ok(Sample {
            per_s: n as f64 / (elapsed_ns / 1e9),
            cpu_us_per_task: Some(cpu_us_per_task),
            allocs,
            extra,
            ..Default::default()
        })
    })
    .await
}

/// A warm worker process; `n` tasks dispatched from this process with 64 in flight.
pub async fn e2e(
    env: &Env,
    imp: Impl,
    apalis: Option<&Path>,
    n: usize,
    shape: Shape,
) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        // natasks dispatches with its client; the others with raw publishes awaiting acks.
        let dispatch = if imp == Impl::Natasks { Impl::Natasks } else { Impl::Raw };
        let dispatcher = Dispatcher::new(dispatch, env, &layout, &client);
        let warmup = WARMUP.min(n);
        let job = Job { mode: "e2e", tasks: n, warmup, count_allocs: false };
        let mut worker = WorkerProcess::spawn(env, imp, apalis, &layout, shape, job)?;
        dispatcher.many(warmup, DISPATCH_IN_FLIGHT, None).await?;
        worker.expect("ready", SETUP_LIMIT + limit_for(warmup)).await?;

        let cpu = ChildCpu::now(worker.pid)?;
        let dispatching = ChildCpu::now(std::process::id())?;
        let server = env.server_pid.map(ChildCpu::now).transpose()?;
        let start = Instant::now();
        let publishing =
            tokio::spawn(async move { dispatcher.many(n, DISPATCH_IN_FLIGHT, None).await });
        let done = worker.expect("done", limit_for(n)).await;
        let elapsed = start.elapsed();
        let cpu_us_per_task = cpu.us_per_task(n);
        let dispatch_cpu = dispatching.us_per_task(n);
        let server_cpu = server.map(|server| server.us_per_task(n)).transpose();
        if done.is_err() {
            publishing.abort();
        }
        done?;
        publishing.await??;
        let cpu_us_per_task = cpu_us_per_task?;
        let mut extra = vec![("dispatcher_cpu_us_per_task".to_owned(), dispatch_cpu?)];
        if let Some(server_cpu) = server_cpu? {
            extra.push(("server_cpu_us_per_task".to_owned(), server_cpu));
        }
        worker.all_acked(env, &layout).await?;
        worker.stop().await?;
        Ok(Sample {
            per_s: n as f64 / elapsed.as_secs_f64(),
            cpu_us_per_task: Some(cpu_us_per_task),
            extra,
            ..Default::default()
        })
    })
    .await
}

/// A worker in a child process, killed if dropped before it stopped.
struct WorkerProcess {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// The durable consumer the worker creates.
    consumer: String,
}

/// What a worker process is asked to do.
struct Job {
    /// `drain` or `e2e`.
    mode: &'static str,
    /// Tasks measured.
    tasks: usize,
    /// Tasks processed before the measured ones (e2e).
    warmup: usize,
    /// Count allocations over the measured interval (natasks and raw workers).
    count_allocs: bool,
}

/// A protocol line's `key=value` fields.
struct Fields(HashMap<String, String>);

impl Fields {
    fn number(&self, key: &str) -> Res<f64> {
        let value = self.0.get(key).ok_or_else(|| format!("no {key} in the worker's report"))?;
        Ok(value.parse().map_err(|_| format!("{key}={value} is not a number"))?)
    }
}

impl WorkerProcess {
    fn spawn(
        env: &Env,
        imp: Impl,
        apalis: Option<&Path>,
        layout: &Layout,
        shape: Shape,
        job: Job,
    ) -> Res<Self> {
        let (mut command, consumer) = match imp {
            Impl::Natasks | Impl::Raw => {
                let mut command = Command::new(std::env::current_exe()?);
                command.args([crate::child::FLAG, imp.name()]);
                let prefix = if imp == Impl::Natasks { "natasks" } else { "raw" };
                (command, format!("{prefix}-{QUEUE}"))
            }
            Impl::Apalis => {
                let path = apalis.ok_or("the apalis peer binary was not located")?;
                // apalis-nats names its durable consumer after the stream.
                (Command::new(path), format!("{}-queue", layout.stream))
            }
        };
        command
            .args(["--mode", job.mode, "--url", env.url(), "--stream", &layout.stream])
            .args(["--prefix", &layout.prefix, "--queue", QUEUE])
            .args(["--concurrency", &shape.concurrency.to_string()])
            .args(["--max-ack-pending", &shape.max_ack_pending().to_string()])
            .args(["--tasks", &job.tasks.to_string(), "--warmup", &job.warmup.to_string()]);
        if imp != Impl::Apalis {
            let batch =
                if imp == Impl::Raw { shape.raw_fetch_batch()? } else { shape.fetch_batch() };
            command.args(["--fetch-batch", &batch.to_string()]);
            if job.count_allocs {
                command.args(["--count-allocs", "1"]);
            }
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the {} worker process: {e}", imp.name()))?;
        let pid = child.id().ok_or("the worker process exited at once")?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        Ok(Self {
            name: imp.name(),
            child,
            pid,
            stdin,
            lines: BufReader::new(stdout).lines(),
            consumer,
        })
    }

    /// Waits up to `limit` for the line starting with `word`; its `key=value` fields.
    async fn expect(&mut self, word: &str, limit: Duration) -> Res<Fields> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line()).await.map_err(
                |_| format!("the {} worker said no {word:?} within {limit:?}", self.name),
            )??;
            let Some(line) = line else {
                let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                return Err(format!(
                    "the {} worker exited before {word:?} ({status:?})",
                    self.name
                )
                .into());
            };
            let mut parts = line.split_whitespace();
            match parts.next() {
                Some(first) if first == word => {
                    let fields = parts
                        .filter_map(|p| p.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect();
                    return Ok(Fields(fields));
                }
                Some("error") => {
                    return Err(format!("the {} worker failed: {line}", self.name).into())
                }
                _ => eprintln!("natasks-bench: {} worker: {line}", self.name),
            }
        }
    }

    async fn send(&mut self, line: &str) -> Res<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Waits until the server holds no undelivered and no unacknowledged task for the
    /// worker's consumer: every processed task was acked.
    async fn all_acked(&self, env: &Env, layout: &Layout) -> Res<()> {
        let stream = env.publish.get_stream(&layout.stream).await?;
        let deadline = Instant::now() + ACK_LIMIT;
        loop {
            let info = stream.consumer_info(&self.consumer).await?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the {} worker's consumer still has {} undelivered and {} unacked tasks after {ACK_LIMIT:?}",
                    self.name, info.num_pending, info.num_ack_pending
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the worker gracefully and checks it exited cleanly.
    async fn stop(mut self) -> Res<()> {
        self.send("stop").await?;
        self.expect("stopped", STOP_LIMIT).await?;
        let status =
            tokio::time::timeout(STOP_LIMIT, self.child.wait()).await.map_err(|_| {
                format!("the {} worker did not exit within {STOP_LIMIT:?}", self.name)
            })??;
        if !status.success() {
            return Err(format!("the {} worker exited with {status}", self.name).into());
        }
        Ok(())
    }
}

/// CPU time of a child process's threads at some point.
struct ChildCpu {
    pid: u32,
    ns: u64,
}

impl ChildCpu {
    fn now(pid: u32) -> Res<Self> {
        let ns = threads_cpu_ns(&format!("/proc/{pid}/task"))
            .ok_or_else(|| format!("cannot read the CPU time of process {pid}"))?;
        Ok(Self { pid, ns })
    }

    fn us_per_task(&self, tasks: usize) -> Res<f64> {
        let now = Self::now(self.pid)?;
        Ok(now.ns.saturating_sub(self.ns) as f64 / 1e3 / tasks.max(1) as f64)
    }
}
