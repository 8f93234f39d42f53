//! `natasks-bench`: measures natasks against a raw async-nats implementation of the same
//! work, on the same server, in the same run, back to back.
//!
//! ```text
//! natasks-bench [--rounds N] [--tasks N] [--drain-tasks N] [--workload NAME]... [--peer apalis] [--smoke]
//! ```
//!
//! Starts its own nats-server unless `NATS_URL` is set. Every run gets a stream of its own
//! (created by natasks: work-queue retention, file storage) that is deleted afterwards.
//! Progress goes to stderr; the result table and one `workload=... key=value` line per
//! workload go to stdout.
//!
//! The process workloads (`drain_*`, `e2e_process_*`) run each worker in a child process:
//! this binary again, started with the hidden first argument `--child-worker` (see
//! `child.rs`), or the apalis peer binary.

mod alloc_count;
mod child;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use natasks_test_support::NatsServer;

use workloads::{Allocs, Env, Impl, Sample, Setup, Shape};

#[global_allocator]
static GLOBAL: alloc_count::Counting = alloc_count::Counting;

/// Every workload, in the order they run.
const WORKLOADS: &[&str] = &[
    "dispatch_serial",
    "dispatch_concurrent_64",
    "dispatch_concurrent_256",
    "dispatch_tracked_64",
    "dispatch_batch_64",
    "dispatch_unique_64",
    "e2e_c1",
    "e2e_c8",
    "e2e_c64",
    "e2e_tracked_c64",
    "group_64",
    "e2e_c64_observed",
    "e2e_c64_observed_all",
    "e2e_c64_observed_lean",
    "e2e_c64_traceparent",
    "e2e_io_c64",
    "drain_c8",
    "drain_c64",
    "e2e_process_c8",
    "e2e_process_c64",
    "delayed_burst",
    "periodic_1000",
    "search_dead_100k",
    "starvation",
    "rate_limit_overhead",
    "many_queues_500",
    "dashboard_overview",
    "alloc_c64",
    "memory",
];

/// Workloads whose worker runs in a process of its own.
const PROCESS_WORKLOADS: &[&str] = &["drain_c8", "drain_c64", "e2e_process_c8", "e2e_process_c64"];

/// Workloads `--smoke` leaves out unless named: the c8 process workloads cover the same code,
/// and setting up 500 queues twice takes longer than the rest of a smoke run's workloads.
const SMOKE_SKIPS: &[&str] = &["drain_c64", "e2e_process_c64", "many_queues_500"];

/// Throughput of e2e_io_c64 if every slot were always busy: 64 slots / 5 ms.
const IDEAL_IO_C64: f64 = 64.0 / 0.005;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    tasks: usize,
    drain_tasks: usize,
    delayed_tasks: usize,
    delayed_lead: Duration,
    periodic_schedules: usize,
    /// Dead letters searched by `search_dead_100k`.
    search_dead: u64,
    periodic_window: Duration,
    memory_checkpoints: (usize, usize),
    starvation: workloads::Starvation,
    workloads: Vec<String>,
    smoke: bool,
    /// The apalis peer binary, with `--peer apalis`.
    apalis: Option<PathBuf>,
}

const USAGE: &str = "usage: natasks-bench [--rounds N] [--tasks N] [--drain-tasks N] [--workload NAME]... [--peer apalis] [--smoke]

  --rounds N         rounds per workload (default 3)
  --tasks N          tasks per dispatch/e2e/alloc/e2e_process run (default 20000)
  --drain-tasks N    tasks per drain run (default 100000)
  --workload NAME    run only this workload (repeatable)
  --peer apalis      also run an apalis worker in the process workloads (drain_*,
                     e2e_process_*); scripts/bench builds it (bench/peers/apalis)
  --smoke            quick pass: 500 tasks (2000 per drain), 1 round, small memory run,
                     every workload but drain_c64, e2e_process_c64 and many_queues_500

Starts its own nats-server unless NATS_URL is set.";

fn parse_args() -> Result<Option<Options>, BoxError> {
    let mut options = Options {
        rounds: 3,
        tasks: 20_000,
        drain_tasks: 100_000,
        delayed_tasks: 10_000,
        delayed_lead: Duration::from_secs(10),
        periodic_schedules: 1_000,
        search_dead: 100_000,
        periodic_window: Duration::from_secs(10),
        memory_checkpoints: (50_000, 500_000),
        starvation: workloads::Starvation { flood: 2_000, trickle: 200 },
        workloads: Vec::new(),
        smoke: false,
        apalis: None,
    };
    let mut rounds = None;
    let mut tasks = None;
    let mut drain_tasks = None;
    let mut args = std::env::args().skip(1);
    let number = |flag: &str, value: Option<String>| -> Result<usize, BoxError> {
        let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
        let n: usize = value.parse().map_err(|_| format!("{flag}: {value:?} is not a number"))?;
        if n == 0 {
            return Err(format!("{flag} must be at least 1").into());
        }
        Ok(n)
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = Some(number("--rounds", args.next())?),
            "--tasks" => tasks = Some(number("--tasks", args.next())?),
            "--drain-tasks" => drain_tasks = Some(number("--drain-tasks", args.next())?),
            "--peer" => match args.next().as_deref() {
                Some("apalis") => options.apalis = Some(workloads::locate_apalis()?),
                other => return Err(format!("--peer takes apalis, not {other:?}").into()),
            },
            "--workload" => {
                let name = args.next().ok_or("--workload needs a value")?;
                if !WORKLOADS.contains(&name.as_str()) {
                    return Err(format!(
                        "unknown workload {name:?}; known: {}",
                        WORKLOADS.join(", ")
                    )
                    .into());
                }
                if !options.workloads.contains(&name) {
                    options.workloads.push(name);
                }
            }
            "--smoke" => {
                options.rounds = 1;
                options.smoke = true;
                options.tasks = 500;
                options.drain_tasks = 2_000;
                options.delayed_tasks = 500;
                options.delayed_lead = Duration::from_secs(3);
                options.periodic_schedules = 100;
                options.search_dead = 10_000;
                options.periodic_window = Duration::from_secs(3);
                options.memory_checkpoints = (500, 2_000);
                options.starvation = workloads::Starvation { flood: 400, trickle: 50 };
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}").into()),
        }
    }
    if let Some(rounds) = rounds {
        options.rounds = rounds;
    }
    if let Some(tasks) = tasks {
        options.tasks = tasks;
    }
    if let Some(tasks) = drain_tasks {
        options.drain_tasks = tasks;
    }
    if options.workloads.is_empty() {
        options.workloads = WORKLOADS
            .iter()
            .filter(|w| !(options.smoke && SMOKE_SKIPS.contains(w)))
            .map(|w| (*w).to_owned())
            .collect();
    } else {
        // Keep the canonical order.
        options.workloads = WORKLOADS
            .iter()
            .filter(|w| options.workloads.iter().any(|s| s == *w))
            .map(|w| (*w).to_owned())
            .collect();
    }
    Ok(Some(options))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(child::FLAG) {
        return child::main(&args[1..]).await;
    }
    let options = match parse_args() {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("natasks-bench: {err}");
            return ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("natasks-bench: error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One workload's results over all rounds.
struct Row {
    workload: String,
    natasks: Vec<Sample>,
    raw: Vec<Sample>,
    /// The apalis peer (process workloads with `--peer apalis`).
    apalis: Vec<Sample>,
    /// Rounds the apalis peer failed (not counted in its figures).
    apalis_failed: usize,
    /// Allocations per task of the natasks and raw workers (drain workloads, own runs).
    allocs: Option<(Allocs, Allocs)>,
}

async fn run(options: Options) -> Result<(), BoxError> {
    let (server, url) = match std::env::var("NATS_URL") {
        Ok(url) if !url.is_empty() => (None, url),
        _ => {
            let server = NatsServer::start().await;
            let url = server.url();
            (Some(server), url)
        }
    };
    let env = Env::connect(&url, server.as_ref().and_then(NatsServer::pid)).await?;
    eprintln!(
        "natasks-bench: server {} at {url}; {} round(s), {} tasks per run, {} CPU(s), load average {}",
        env.server_version(),
        options.rounds,
        options.tasks,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );

    // Warm up connections, the server's store and the allocator; not measured.
    for imp in [Impl::Natasks, Impl::Raw] {
        workloads::dispatch_concurrent(&env, imp, 1_000, 64).await?;
    }

    let mut rows = Vec::new();
    let mut memory_line = None;
    for workload in &options.workloads {
        if workload == "memory" {
            let (a, b) = options.memory_checkpoints;
            let report = workloads::memory(&env, a, b).await?;
            memory_line = Some(report);
            continue;
        }
        let mut row = Row {
            workload: workload.clone(),
            natasks: Vec::new(),
            raw: Vec::new(),
            apalis: Vec::new(),
            apalis_failed: 0,
            allocs: None,
        };
        let process = PROCESS_WORKLOADS.contains(&workload.as_str());
        let mut implementations = vec![Impl::Natasks, Impl::Raw];
        if process && options.apalis.is_some() {
            implementations.push(Impl::Apalis);
        }
        for round in 1..=options.rounds {
            for &imp in &implementations {
                let sample = match run_one(&env, &options, workload, imp).await {
                    Ok(sample) => sample,
                    // A peer's failure is its own: reported, counted, and the run goes on
                    // (apalis-nats ends its worker on a missed heartbeat now and then).
                    Err(err) if imp == Impl::Apalis => {
                        eprintln!(
                            "round {round}/{} {workload} apalis: failed, round not counted: {}",
                            options.rounds,
                            natasks::one_line(&*err)
                        );
                        row.apalis_failed += 1;
                        continue;
                    }
                    Err(err) => {
                        return Err(format!(
                            "{workload} ({}) round {round}: {}",
                            imp.name(),
                            natasks::one_line(&*err)
                        )
                        .into())
                    }
                };
                let mut line = format!(
                    "round {round}/{} {workload} {}: {}/s",
                    options.rounds,
                    imp.name(),
                    thousands(sample.per_s)
                );
                if let Some(l) = &sample.lateness {
                    line.push_str(&format!(
                        " (lateness p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms)",
                        l.p50, l.p99, l.max
                    ));
                }
                if let Some(us) = sample.cpu_us_per_task {
                    let place = if process { "the worker process" } else { "this process" };
                    line.push_str(&format!(" ({us:.1} µs CPU/task in {place})"));
                }
                if let Some(untracked) = &sample.untracked {
                    line.push_str(&format!(" (untracked {}/s)", thousands(untracked.per_s)));
                }
                if let Some(ms) = sample.mean_sleep_ms {
                    line.push_str(&format!(" (a 5 ms sleep took {ms:.2} ms on average)"));
                }
                if let Some(a) = &sample.allocs {
                    line.push_str(&format!(
                        " ({:.1} allocs/task processing, {:.1} allocs/task dispatch)",
                        a.process_allocs, a.dispatch_allocs
                    ));
                }
                eprintln!("{line}");
                match imp {
                    Impl::Natasks => row.natasks.push(sample),
                    Impl::Raw => row.raw.push(sample),
                    Impl::Apalis => row.apalis.push(sample),
                }
            }
        }
        if workload.starts_with("drain_") {
            row.allocs = Some(count_drain_allocs(&env, &options, workload).await?);
        }
        rows.push(row);
    }

    print_report(&rows, memory_line.as_ref());
    eprintln!("natasks-bench: done; load average {}", load_average());
    Ok(())
}

/// Allocations per task of the natasks and raw drain workers, each in a run of its own
/// with counting on (its timings are not used).
async fn count_drain_allocs(
    env: &Env,
    options: &Options,
    workload: &str,
) -> Result<(Allocs, Allocs), BoxError> {
    let shape = process_shape(workload)?;
    let mut counted = Vec::new();
    for imp in [Impl::Natasks, Impl::Raw] {
        let sample = workloads::drain(env, imp, None, options.drain_tasks, shape, true)
            .await
            .map_err(|err| format!("{workload} ({}) counting allocations: {err}", imp.name()))?;
        let allocs = sample.allocs.ok_or("no allocation count")?;
        eprintln!(
            "allocations {workload} {}: {:.1} allocs/task, {:.0} bytes/task",
            imp.name(),
            allocs.process_allocs,
            allocs.process_bytes
        );
        counted.push(allocs);
    }
    let raw = counted.pop().ok_or("no raw count")?;
    let natasks = counted.pop().ok_or("no natasks count")?;
    Ok((natasks, raw))
}

/// The worker set-up of a process workload: its concurrency is the name's `_cN`.
fn process_shape(workload: &str) -> Result<Shape, BoxError> {
    let concurrency = workload
        .rsplit_once("_c")
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| format!("no concurrency in {workload:?}"))?;
    Ok(Shape { concurrency })
}

async fn run_one(
    env: &Env,
    options: &Options,
    workload: &str,
    imp: Impl,
) -> Result<Sample, BoxError> {
    let n = options.tasks;
    let apalis = options.apalis.as_deref();
    match workload {
        "dispatch_serial" => workloads::dispatch_serial(env, imp, n).await,
        "dispatch_concurrent_64" => workloads::dispatch_concurrent(env, imp, n, 64).await,
        "dispatch_concurrent_256" => workloads::dispatch_concurrent(env, imp, n, 256).await,
        "e2e_c1" => workloads::e2e(env, imp, n, 1, None).await,
        "e2e_c8" => workloads::e2e(env, imp, n, 8, None).await,
        "e2e_c64" => workloads::e2e(env, imp, n, 64, None).await,
        // "natasks" is the tracked run; the untracked run of the round rides in the sample.
        "dispatch_tracked_64" => workloads::dispatch_tracked(env, imp, n, 64).await,
        // "natasks" is the guarded run; the plain natasks run of the round is in `extra`.
        "dispatch_batch_64" => workloads::dispatch_batch(env, imp, n, 64).await,
        "dispatch_unique_64" => workloads::dispatch_unique(env, imp, n, 64).await,
        "e2e_tracked_c64" => workloads::e2e_tracked(env, imp, n, 64).await,
        // One group of 64 (or 64 plain tasks) after another: a tenth of the tasks.
        "group_64" => workloads::group(env, imp, (n / 640).max(1), 64).await,
        // Both columns run natasks: "natasks" with metrics and OpenTelemetry, "raw" without.
        "e2e_c64_observed" | "e2e_c64_observed_all" | "e2e_c64_observed_lean" => {
            let setup = match workload {
                "e2e_c64_observed_all" => Setup { sample: 1.0, sampled_only: false },
                "e2e_c64_observed_lean" => Setup { sample: 0.1, sampled_only: true },
                _ => Setup { sample: 0.1, sampled_only: false },
            };
            workloads::e2e_observed(env, imp == Impl::Natasks, setup, n, 64).await
        }
        // Both columns run raw async-nats: "natasks" with a traceparent header, "raw" without.
        "e2e_c64_traceparent" => workloads::e2e_traceparent(env, imp == Impl::Natasks, n, 64).await,
        "e2e_io_c64" => workloads::e2e(env, imp, n, 64, Some(Duration::from_millis(5))).await,
        "delayed_burst" => {
            workloads::delayed_burst(env, imp, options.delayed_tasks, options.delayed_lead).await
        }
        "periodic_1000" => {
            workloads::periodic(env, imp, options.periodic_schedules, options.periodic_window).await
        }
        "search_dead_100k" => workloads::search_dead(env, imp, options.search_dead).await,
        "starvation" => workloads::starvation(env, imp, options.starvation).await,
        "rate_limit_overhead" => workloads::rate_limit_overhead(env, imp, n).await,
        "many_queues_500" => workloads::many_queues(env, imp).await,
        "dashboard_overview" => workloads::dashboard_overview(env, imp, n).await,
        "alloc_c64" => workloads::alloc_c64(env, imp, n).await,
        "drain_c8" | "drain_c64" => {
            let shape = process_shape(workload)?;
            workloads::drain(env, imp, apalis, options.drain_tasks, shape, false).await
        }
        "e2e_process_c8" | "e2e_process_c64" => {
            workloads::e2e_process(env, imp, apalis, n, process_shape(workload)?).await
        }
        other => Err(format!("unknown workload {other:?}").into()),
    }
}

fn print_report(rows: &[Row], memory: Option<&workloads::MemoryReport>) {
    println!();
    println!(
        "{:<24} {:>10} {:>10} {:>10}   {:>10} {:>10} {:>10}   {:>6}",
        "workload (tasks/s)", "natasks", "min", "max", "raw", "min", "max", "ratio"
    );
    println!("{}", "-".repeat(100));
    let mut lines = Vec::new();
    for row in rows {
        let (nm, nmin, nmax) = spread(row.natasks.iter().map(|s| s.per_s));
        let (rm, rmin, rmax) = spread(row.raw.iter().map(|s| s.per_s));
        let ratio = if rm > 0.0 { nm / rm } else { 0.0 };
        println!(
            "{:<24} {:>10} {:>10} {:>10}   {:>10} {:>10} {:>10}   {:>6.3}",
            row.workload,
            thousands(nm),
            thousands(nmin),
            thousands(nmax),
            thousands(rm),
            thousands(rmin),
            thousands(rmax),
            ratio
        );
        if PROCESS_WORKLOADS.contains(&row.workload.as_str()) {
            lines.extend(process_lines(row, nm, rm));
            continue;
        }
        let mut line = format!(
            "workload={} natasks_per_s={nm:.0} raw_per_s={rm:.0} ratio={ratio:.3}",
            row.workload
        );
        let untracked: Vec<&Sample> =
            row.natasks.iter().filter_map(|s| s.untracked.as_deref()).collect();
        if !untracked.is_empty() {
            let um = median(untracked.iter().map(|s| s.per_s));
            line.push_str(&format!(
                " untracked_per_s={um:.0} tracked_vs_untracked={:.3}",
                crate::ratio(nm, um)
            ));
            let cpu: Vec<f64> = untracked.iter().filter_map(|s| s.cpu_us_per_task).collect();
            if !cpu.is_empty() {
                line.push_str(&format!(
                    " untracked_cpu_us_per_task={:.2}",
                    median(cpu.into_iter())
                ));
            }
        }
        if row.workload == "e2e_io_c64" {
            line.push_str(&format!(
                " ideal_per_s={IDEAL_IO_C64:.0} ideal_ratio={:.3} raw_ideal_ratio={:.3}",
                nm / IDEAL_IO_C64,
                rm / IDEAL_IO_C64
            ));
        }
        for (label, samples) in [("natasks", &row.natasks), ("raw", &row.raw)] {
            let cpu: Vec<f64> = samples.iter().filter_map(|s| s.cpu_us_per_task).collect();
            if !cpu.is_empty() {
                line.push_str(&format!(" {label}_cpu_us_per_task={:.2}", median(cpu.into_iter())));
            }
            let sleeps: Vec<f64> = samples.iter().filter_map(|s| s.mean_sleep_ms).collect();
            if !sleeps.is_empty() {
                let ms = median(sleeps.into_iter());
                line.push_str(&format!(
                    " {label}_mean_sleep_ms={ms:.2} {label}_effective_ideal_per_s={:.0}",
                    64.0 / (ms / 1e3)
                ));
            }
            let lateness: Vec<_> = samples.iter().filter_map(|s| s.lateness.as_ref()).collect();
            if !lateness.is_empty() {
                let p50 = median(lateness.iter().map(|l| l.p50));
                let p99 = median(lateness.iter().map(|l| l.p99));
                let max = lateness.iter().map(|l| l.max).fold(f64::MIN, f64::max);
                line.push_str(&format!(
                    " {label}_p50_ms={p50:.0} {label}_p99_ms={p99:.0} {label}_max_ms={max:.0}"
                ));
            }
            line.push_str(&extra_fields(label, samples));
            let allocs: Vec<_> = samples.iter().filter_map(|s| s.allocs.as_ref()).collect();
            if !allocs.is_empty() {
                line.push_str(&format!(
                    " {label}_allocs_per_task={:.1} {label}_bytes_per_task={:.0} {label}_dispatch_allocs_per_task={:.1}",
                    median(allocs.iter().map(|a| a.process_allocs)),
                    median(allocs.iter().map(|a| a.process_bytes)),
                    median(allocs.iter().map(|a| a.dispatch_allocs)),
                ));
            }
        }
        lines.push(line);
    }
    if rows.iter().any(|r| r.workload == "delayed_burst") {
        println!("  delayed_burst: tasks/s = tasks / (last processed - due); lateness in the line below (median p50/p99 over rounds, overall max)");
    }
    if rows.iter().any(|r| r.workload == "search_dead_100k") {
        println!("  search_dead_100k: messages read per second searching 100,000 dead letters for a payload text one in 10,000 contains; natasks: Admin::search; raw: a pull consumer over the dead-letter subject acknowledging nothing (a work-queue stream refuses ordered consumers); natasks_message_gets_per_s: Admin::search again with a worker consumer on the dead-letter queue, reading message by message");
    }
    if rows.iter().any(|r| r.workload == "periodic_1000") {
        println!("  periodic_1000: 1,000 schedules firing every second into one queue (64 slots); tasks/s = ticks processed per second over the window; lateness (processed - tick time) in the line below");
    }
    if rows.iter().any(|r| r.workload.starts_with("e2e_c64_observed")) {
        println!("  e2e_c64_observed*: both columns are natasks; \"natasks\" with the metrics observer, the OpenTelemetry propagator and a tracing subscriber with the OpenTelemetry layer, \"raw\" the same run without them; ratio = observed / plain. observed: 10% of traces sampled, every task carries trace context; _all: every trace sampled; _lean: 10% sampled, only sampled tasks carry trace context (sampled_only)");
    }
    if rows.iter().any(|r| r.workload == "e2e_c64_traceparent") {
        println!("  e2e_c64_traceparent: both columns are raw async-nats; \"natasks\" with a traceparent header on every message, \"raw\" without; ratio = what carrying the header costs, natasks aside");
    }
    if rows.iter().any(|r| r.workload.contains("tracked")) {
        println!("  *_tracked_*: \"natasks\" dispatches tracked tasks (Task::tracked); the untracked natasks run of the same round is in the line below (untracked_per_s, tracked_vs_untracked); e2e_tracked_c64's handler returns a small result, stored for tracked tasks");
    }
    if rows.iter().any(|r| r.workload == "group_64") {
        println!("  group_64: one group of 64 tracked members and a callback after another, member tasks/s from dispatch to callback; natasks_plain_per_s / natasks_tracked_per_s: 64 plain / tracked natasks tasks at a time in the same round; raw publishes 64 and its consumer publishes the callback at the 64th (no record, no marker)");
    }
    if rows.iter().any(|r| r.workload == "dispatch_batch_64") {
        println!("  dispatch_batch_64: \"natasks\" stores the tasks in atomic batches of 64 (dispatch_batch, one batch at a time); the natasks run of the same round dispatching them one by one with 64 in flight is in the line below (natasks_one_by_one_per_s, natasks_batch_vs_one_by_one), and a run with 8 batches in flight (natasks_batches_8_in_flight_per_s); raw publishes one by one with 64 in flight");
    }
    if rows.iter().any(|r| r.workload == "dispatch_unique_64") {
        println!("  dispatch_unique_64: \"natasks\" dispatches unique tasks (each its own key: lock and task in one atomic batch) with 64 in flight, at most 2,000 tasks a run; the plain natasks run of the same round is in the line below (natasks_plain_per_s, natasks_unique_vs_plain)");
    }
    if rows.iter().any(|r| r.workload == "starvation") {
        println!("  starvation: critical (weight 9) and low (weight 1), 8 slots; low flooded with 20 ms tasks, critical a trickle every 10 ms; tasks/s over both queues; critical's wait from dispatch to handler start in the line below (natasks weighted, natasks_strict_ with strict priority; raw: a raw consumer per queue sharing one semaphore, no priority)");
    }
    if rows.iter().any(|r| r.workload == "rate_limit_overhead") {
        println!("  rate_limit_overhead: e2e_c64 with a rate of 10,000,000/s (every start counted, none waits); natasks_norate_ fields: the same without a rate");
    }
    if rows.iter().any(|r| r.workload == "dashboard_overview") {
        println!("  dashboard_overview: e2e_c64 with the dashboard's live overview open (SSE, refresh 100 ms, ten times the default); natasks_nodash_ fields: the same without it; overview_ms_: the overview page over HTTP with 50 queues, beside the Admin::queues() call it is built on (queues_call_ms_p50)");
    }
    if rows.iter().any(|r| r.workload == "many_queues_500") {
        println!("  many_queues_500: one worker (64 slots) serving 500 queues, 20 tasks dispatched to each; raw: 500 raw pull consumers sharing one semaphore; RSS growth of this process and the server's consumer count in the line below");
    }
    if rows.iter().any(|r| r.workload == "alloc_c64") {
        println!("  alloc_c64: tasks/s = draining a pre-filled queue; allocations per task in the line below");
    }
    print_process_table(rows);
    if let Some(m) = memory {
        println!(
            "memory: after {}: VmRSS {} kB, VmHWM {} kB; after {}: VmRSS {} kB, VmHWM {} kB; growth RSS {} kB, HWM {} kB; {}/s",
            m.first,
            m.rss_first_kb,
            m.hwm_first_kb,
            m.second,
            m.rss_second_kb,
            m.hwm_second_kb,
            m.rss_second_kb as i64 - m.rss_first_kb as i64,
            m.hwm_second_kb as i64 - m.hwm_first_kb as i64,
            thousands(m.per_s)
        );
        lines.push(format!(
            "workload=memory natasks_per_s={:.0} tasks_first={} tasks_second={} rss_first_kb={} hwm_first_kb={} rss_second_kb={} hwm_second_kb={} rss_growth_kb={} hwm_growth_kb={}",
            m.per_s,
            m.first,
            m.second,
            m.rss_first_kb,
            m.hwm_first_kb,
            m.rss_second_kb,
            m.hwm_second_kb,
            m.rss_second_kb as i64 - m.rss_first_kb as i64,
            m.hwm_second_kb as i64 - m.hwm_first_kb as i64,
        ));
    }
    println!();
    for line in lines {
        println!("{line}");
    }
}

/// The samples' extra figures, each as ` <label>_<key>=<median>`, in first-seen order.
fn extra_fields(label: &str, samples: &[Sample]) -> String {
    let mut keys: Vec<&str> = Vec::new();
    for (key, _) in samples.iter().flat_map(|s| &s.extra) {
        if !keys.contains(&key.as_str()) {
            keys.push(key);
        }
    }
    let mut fields = String::new();
    for key in keys {
        fields.push_str(&format!(" {label}_{key}={}", decimals(extra_median(samples, key))));
    }
    fields
}

/// The median of the samples' extra figure `key` (0 when none has it).
fn extra_median(samples: &[Sample], key: &str) -> f64 {
    let values = samples.iter().flat_map(|s| &s.extra).filter(|(k, _)| k == key);
    median(values.map(|(_, v)| *v))
}

/// The `workload=` line of a process workload, and its `peer=` line if the peer ran.
fn process_lines(row: &Row, natasks_per_s: f64, raw_per_s: f64) -> Vec<String> {
    let cpu = |samples: &[Sample]| median(samples.iter().filter_map(|s| s.cpu_us_per_task));
    let (natasks_cpu, raw_cpu) = (cpu(&row.natasks), cpu(&row.raw));
    let mut line = format!(
        "workload={} natasks_per_s={natasks_per_s:.0} raw_per_s={raw_per_s:.0} ratio={:.3} \
         cpu_us_per_task={natasks_cpu:.2} raw_cpu_us_per_task={raw_cpu:.2} cpu_ratio={:.3}",
        row.workload,
        ratio(natasks_per_s, raw_per_s),
        ratio(natasks_cpu, raw_cpu),
    );
    if let Some((natasks, raw)) = &row.allocs {
        line.push_str(&format!(
            " allocs_per_task={:.1} raw_allocs_per_task={:.1} bytes_per_task={:.0} raw_bytes_per_task={:.0}",
            natasks.process_allocs, raw.process_allocs, natasks.process_bytes, raw.process_bytes
        ));
    }
    if let Ok(batch) = std::env::var("RAW_FETCH_BATCH") {
        line.push_str(&format!(" raw_fetch_batch={batch}"));
    }
    if std::env::var("RAW_TASK_ID").is_ok_and(|v| v == "1") {
        line.push_str(" raw_task_id=1");
    }
    line.push_str(&extra_fields("natasks", &row.natasks));
    line.push_str(&extra_fields("raw", &row.raw));
    let mut lines = vec![line];
    if !row.apalis.is_empty() || row.apalis_failed > 0 {
        lines.push(format!(
            "peer=apalis workload={} per_s={:.0} cpu_us_per_task={:.2}{} failed_rounds={}",
            row.workload,
            median(row.apalis.iter().map(|s| s.per_s)),
            cpu(&row.apalis),
            extra_fields("apalis", &row.apalis),
            row.apalis_failed
        ));
    }
    lines
}

/// The worker-process costs of the process workloads, and the peer's figures.
fn print_process_table(rows: &[Row]) {
    let rows: Vec<&Row> =
        rows.iter().filter(|r| PROCESS_WORKLOADS.contains(&r.workload.as_str())).collect();
    if rows.is_empty() {
        return;
    }
    let cpu = |samples: &[Sample]| median(samples.iter().filter_map(|s| s.cpu_us_per_task));
    println!();
    println!(
        "{:<24} {:>10} {:>10} {:>6}   {:>14} {:>10}",
        "worker process", "natasks", "raw", "ratio", "natasks", "raw"
    );
    println!(
        "{:<24} {:>28}   {:>25}",
        "(median of rounds)", "CPU µs/task", "allocs/task (own run)"
    );
    println!("{}", "-".repeat(82));
    for row in &rows {
        let (n, r) = (cpu(&row.natasks), cpu(&row.raw));
        let allocs = match &row.allocs {
            Some((n, r)) => format!("{:>14.1} {:>10.1}", n.process_allocs, r.process_allocs),
            None => format!("{:>14} {:>10}", "-", "-"),
        };
        println!("{:<24} {n:>10.2} {r:>10.2} {:>6.3}   {allocs}", row.workload, ratio(n, r));
    }
    println!("  drain_cN: N tasks pre-filled, then a worker process drains them with concurrency N; tasks/s from its start of consuming to its N-th task");
    println!("  e2e_process_cN: a warm worker process (concurrency N); this process dispatches with 64 in flight; tasks/s from the first dispatch to the worker's N-th task");
    let batch = match std::env::var("RAW_FETCH_BATCH") {
        Ok(batch) => format!("{batch} (RAW_FETCH_BATCH)"),
        Err(_) => "max(2N, 64), natasks' fetch_batch".to_owned(),
    };
    println!("  CPU = the worker process's threads (user+system), over the measured interval; raw = async-nats messages() + for_each_concurrent(N) in one task, pull batches of {batch}");
    print_system_costs(&rows);
    if rows.iter().all(|r| r.apalis.is_empty() && r.apalis_failed == 0) {
        return;
    }
    println!();
    println!(
        "{:<24} {:>10} {:>10} {:>10}   {:>11}   {:>13}   {:>6}",
        "peer apalis", "tasks/s", "min", "max", "CPU µs/task", "vs natasks", "failed"
    );
    println!("{}", "-".repeat(95));
    for row in rows.iter().filter(|r| !r.apalis.is_empty() || r.apalis_failed > 0) {
        let (m, min, max) = spread(row.apalis.iter().map(|s| s.per_s));
        let natasks = median(row.natasks.iter().map(|s| s.per_s));
        println!(
            "{:<24} {:>10} {:>10} {:>10}   {:>11.2}   {:>12.3}x   {:>6}",
            row.workload,
            thousands(m),
            thousands(min),
            thousands(max),
            cpu(&row.apalis),
            ratio(m, natasks),
            row.apalis_failed
        );
    }
    println!("  apalis 1.0 with apalis-nats 0.1 (async-nats 0.50), its own process: typed handler, .concurrency(N), reading the same stream and subject through its Config,");
    println!("  consumer settings as natasks'; it pulls batches of 200 (async-nats' messages() default; apalis-nats exposes no batch setting)");
    println!("  tasks reach it by raw publishes awaiting each ack: apalis-nats' own push does not await the broker's ack (and publishes to a subject named after the stream)");
}

/// Where the CPU of a process workload went, per task: the worker process, the
/// dispatching process (e2e) and the server (when this process started it). On a machine
/// whose cores they share, their sum is what bounds the throughput.
fn print_system_costs(rows: &[&Row]) {
    let server = "server_cpu_us_per_task";
    let dispatcher = "dispatcher_cpu_us_per_task";
    if !rows.iter().any(|r| r.natasks.iter().any(|s| s.extra.iter().any(|(k, _)| k == server))) {
        return;
    }
    println!();
    println!(
        "{:<24} {:<8} {:>8} {:>11} {:>8} {:>8}",
        "CPU µs per task", "", "worker", "dispatcher", "server", "total"
    );
    println!("{}", "-".repeat(72));
    for row in rows {
        for (label, samples) in
            [("natasks", &row.natasks), ("raw", &row.raw), ("apalis", &row.apalis)]
        {
            if samples.is_empty() {
                continue;
            }
            let worker = median(samples.iter().filter_map(|s| s.cpu_us_per_task));
            let (d, s) = (extra_median(samples, dispatcher), extra_median(samples, server));
            let shown = |v: f64| if v > 0.0 { format!("{v:.2}") } else { "-".to_owned() };
            println!(
                "{:<24} {label:<8} {worker:>8.2} {:>11} {:>8} {:>8.2}",
                row.workload,
                shown(d),
                shown(s),
                worker + d + s
            );
        }
    }
    println!("  dispatcher = this process while it dispatches (e2e_process_*: natasks Client, raw and apalis raw publishes); server = nats-server's threads");
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Median, min and max.
fn spread(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let values: Vec<f64> = values.collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(values.into_iter()), if min.is_finite() { min } else { 0.0 }, max.max(0.0))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// A figure with as many decimals as it needs: `1234`, `12.3`, `0.42`.
fn decimals(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// `41234.6` -> `41,235`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}
