//! The end-to-end demo: an immediate task, a delayed task and a failing task that is
//! retried and dead-lettered, printed as it happens.
//!
//! Without `NATS_URL` it starts a throw-away local nats-server (installed by
//! `scripts/install-nats-server`); with `NATS_URL` it uses that server and touches only
//! queues named `demo-*`. Run it with `scripts/demo` or
//! `cargo run -p natasks --example demo`.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use natasks::{Client, DispatchErrorKind, HandlerError, Json, Task, Worker};
use natasks_test_support::NatsServer;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

const EMAILS: &str = "demo-emails";
const REPORTS: &str = "demo-reports";
const REPORTS_DLQ: &str = "demo-reports-dlq";
const REMINDER_DELAY: Duration = Duration::from_secs(3);
const MAX_RETRIES: i64 = 2;
const BACKOFF: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(15);
/// Marks this run's tasks; tasks left in `demo-*` queues by an interrupted run are
/// processed too but not counted.
const RUN_HEADER: &str = "X-Demo-Run";

static START: OnceLock<Instant> = OnceLock::new();

/// Prints a line prefixed with the time since start.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("[{:>7.3}s] {}", START.get().map_or(0.0, |s| s.elapsed().as_secs_f64()), format!($($arg)*))
    };
}

#[derive(Serialize, Deserialize)]
struct Email {
    to: String,
    subject: String,
}

#[derive(Serialize, Deserialize)]
struct Reminder {
    text: String,
    /// Due time, in milliseconds since the Unix epoch.
    due_unix_ms: i64,
    /// Due time, in milliseconds since the demo started.
    due_offset_ms: i64,
}

/// What the handlers report back to `main`.
#[derive(Debug)]
enum Event {
    Sent,
    Reminded { late_ms: i64 },
    Failed,
    DeadLettered { attempts: String },
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The reporting channel, for this run's tasks only.
fn reporter(task: &Task, run: &str, tx: &mpsc::UnboundedSender<Event>) -> Reporter {
    let mine = task.header(RUN_HEADER) == Some(run);
    Reporter { tx: mine.then(|| tx.clone()) }
}

struct Reporter {
    tx: Option<mpsc::UnboundedSender<Event>>,
}

impl Reporter {
    fn note(&self) -> &'static str {
        if self.tx.is_some() {
            ""
        } else {
            " [left over from an earlier run]"
        }
    }

    fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event);
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    START.get_or_init(Instant::now);

    // Kept alive until the end of `main`.
    let mut local_server = None;
    let url = match std::env::var("NATS_URL") {
        Ok(url) if !url.is_empty() => {
            say!("using NATS_URL={url} (only queues named demo-* are used)");
            url
        }
        _ => {
            let server = NatsServer::start().await;
            let url = server.url();
            say!("NATS_URL not set: started a local nats-server at {url} (removed on exit)");
            local_server = Some(server);
            url
        }
    };
    let nats = async_nats::connect(&url).await?;
    say!("connected to nats-server {}", nats.server_info().version);
    let js = async_nats::jetstream::new(nats);
    let client = Client::new(js.clone()).await?;
    let run = nuid::next().to_string();
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();

    // Worker 1: emails, immediate and delayed.
    let (r, tx) = (run.clone(), events_tx.clone());
    let (r2, tx2) = (run.clone(), events_tx.clone());
    let emails = Worker::builder(js.clone(), EMAILS)
        .handle("emails.send", move |Json(email): Json<Email>, task: Task| {
            let report = reporter(&task, &r, &tx);
            async move {
                say!("processed emails.send: {:?} to {}{}", email.subject, email.to, report.note());
                report.send(Event::Sent);
                Ok::<(), HandlerError>(())
            }
        })
        .handle("emails.reminder", move |Json(reminder): Json<Reminder>, task: Task| {
            let report = reporter(&task, &r2, &tx2);
            async move {
                let late_ms = unix_ms(SystemTime::now()) - reminder.due_unix_ms;
                say!(
                    "processed emails.reminder {:?} (due +{:.3}s, {late_ms} ms late){}",
                    reminder.text,
                    reminder.due_offset_ms as f64 / 1000.0,
                    report.note()
                );
                report.send(Event::Reminded { late_ms });
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await?;

    // Worker 2: reports, whose handler always fails.
    let (r, tx) = (run.clone(), events_tx.clone());
    let reports = Worker::builder(js.clone(), REPORTS)
        .max_retries(MAX_RETRIES)
        .retry_backoff([BACKOFF])
        .handle("reports.render", move |task: Task| {
            let report = reporter(&task, &r, &tx);
            async move {
                let attempt = task.delivery().map_or(0, |d| d.attempt);
                let error = "renderer out of memory";
                let then = if attempt as i64 > MAX_RETRIES {
                    "retries used up".to_owned()
                } else {
                    format!("retry in {BACKOFF:?}")
                };
                say!(
                    "attempt {attempt} of {} failed: {error} ({then}){}",
                    MAX_RETRIES + 1,
                    report.note()
                );
                report.send(Event::Failed);
                Err::<(), _>(HandlerError::msg(error))
            }
        })
        .build()
        .await?;

    // Worker 3: the reports dead-letter queue. Dead letters keep their task name.
    let (r, tx) = (run.clone(), events_tx.clone());
    let dead_letters = Worker::builder(js.clone(), REPORTS_DLQ)
        .handle("reports.render", move |task: Task| {
            let report = reporter(&task, &r, &tx);
            async move {
                let header = |name: &str| task.header(name).unwrap_or("?").to_owned();
                let attempts = header("Natasks-Attempts");
                say!(
                    "dead-lettered: attempts={attempts} reason={} last error={:?} (from queue {:?} into {REPORTS_DLQ:?}){}",
                    header("Natasks-Dead-Letter-Reason"),
                    header("Natasks-Last-Error"),
                    header("Natasks-Original-Queue"),
                    report.note()
                );
                report.send(Event::DeadLettered { attempts });
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await?;
    drop(events_tx);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let drive = async {
        let outcome = drive(&client, &run, &mut events_rx).await;
        let _ = stop_tx.send(true);
        outcome
    };
    let (a, b, c, outcome) = tokio::join!(
        emails.run_until(stopped(stop_rx.clone())),
        reports.run_until(stopped(stop_rx.clone())),
        dead_letters.run_until(stopped(stop_rx)),
        drive
    );
    a?;
    b?;
    c?;
    let summary = outcome?;
    say!("workers stopped");
    println!();
    println!("summary:");
    for line in summary {
        println!("  {line}");
    }
    // Stops the local server, if the demo started one, and removes its store.
    drop(local_server);
    Ok(())
}

/// Dispatches the three tasks and waits until each has reached its end.
async fn drive(
    client: &Client,
    run: &str,
    events: &mut mpsc::UnboundedReceiver<Event>,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let email = Email { to: "ada@example.com".into(), subject: "Welcome!".into() };
    client
        .dispatch(Task::json("emails.send", &email)?.with_header(RUN_HEADER, run), EMAILS)
        .await?;
    say!("dispatched emails.send to queue {EMAILS:?}");

    let due = SystemTime::now() + REMINDER_DELAY;
    let start = START.get().expect("set in main");
    let reminder = Reminder {
        text: "finish your profile".into(),
        due_unix_ms: unix_ms(due),
        due_offset_ms: (start.elapsed() + REMINDER_DELAY).as_millis() as i64,
    };
    let task = Task::json("emails.reminder", &reminder)?.with_header(RUN_HEADER, run);
    let mut expect_reminder = true;
    match client.dispatch_at(task, EMAILS, due).await {
        Ok(_) => say!(
            "dispatched emails.reminder to queue {EMAILS:?}, due in {REMINDER_DELAY:?} (+{:.3}s)",
            reminder.due_offset_ms as f64 / 1000.0
        ),
        Err(err) if err.kind() == DispatchErrorKind::SchedulesUnsupported => {
            say!("skipping the delayed task: {err}");
            expect_reminder = false;
        }
        Err(err) => return Err(err.into()),
    }

    let task = Task::new("reports.render", r#"{"report":"q3-sales"}"#).with_header(RUN_HEADER, run);
    client.dispatch(task, REPORTS).await?;
    say!(
        "dispatched reports.render to queue {REPORTS:?} (fails every time; max_retries {MAX_RETRIES}, backoff {BACKOFF:?})"
    );

    let (mut sent, mut failures) = (false, 0);
    let mut reminded = None;
    let mut dead = None;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !(sent && (reminded.is_some() || !expect_reminder) && dead.is_some()) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Sent)) => sent = true,
            Ok(Some(Event::Reminded { late_ms })) => reminded = Some(late_ms),
            Ok(Some(Event::Failed)) => failures += 1,
            Ok(Some(Event::DeadLettered { attempts })) => dead = Some(attempts),
            Ok(None) | Err(_) => {
                return Err(format!(
                    "the demo did not finish within {TIMEOUT:?} (email sent: {sent}, reminder: {reminded:?}, dead letter: {dead:?})"
                )
                .into())
            }
        }
    }

    let total = START.get().map_or(0.0, |s| s.elapsed().as_secs_f64());
    let mut summary = vec!["emails.send      processed at once".to_owned()];
    summary.push(match reminded {
        Some(late_ms) => format!(
            "emails.reminder  processed {late_ms} ms after its due time ({REMINDER_DELAY:?} delay)"
        ),
        None => "emails.reminder  skipped (server without message schedules)".to_owned(),
    });
    summary.push(format!(
        "reports.render   failed {failures} times, dead-lettered after {} attempts into {REPORTS_DLQ:?}",
        dead.unwrap_or_default()
    ));
    summary.push(format!("finished in {total:.3}s"));
    Ok(summary)
}
