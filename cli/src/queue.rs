//! `natasks queue pause|resume|limit|rate`: queue control, through `natasks::admin`.

use clap::{Args, Subcommand};
use natasks::admin::{QueueInfo, Rate, RateLimit};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::output::say;
use crate::{conn, output, Error, Global, Result};

/// Queue control.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Pause a queue: no worker (Go ones included) starts its tasks until it is resumed (or
    /// until --until / --for); running tasks finish; nothing is retried.
    Pause(PauseArgs),
    /// Resume a paused queue: its workers start its tasks again at once.
    Resume(QueueArg),
    /// Set (or with --clear, remove) the most tasks of a queue in flight across every
    /// worker.
    Limit(LimitArgs),
    /// Set (or with --clear, remove) a rate limit: at most COUNT/PERIOD task starts across
    /// every worker (e.g. 10/s, 600/1m), for the queue or one task name (--task).
    Rate(RateArgs),
}

/// A queue name.
#[derive(Debug, Args)]
pub struct QueueArg {
    /// The queue.
    queue: String,
}

/// `queue pause`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// The queue.
    queue: String,
    /// Resume by itself at this time (RFC 3339, e.g. 2030-01-02T03:04:05Z).
    #[arg(long, conflicts_with = "duration")]
    until: Option<String>,
    /// Resume by itself after this long (e.g. 90s, 15m, 2h).
    #[arg(long = "for", value_name = "DURATION")]
    duration: Option<String>,
}

/// `queue limit`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// The queue.
    queue: String,
    /// The most tasks in flight at once, at least 1.
    #[arg(required_unless_present = "clear", allow_negative_numbers = true)]
    limit: Option<i64>,
    /// Give the limit back to the workers' default.
    #[arg(long, conflicts_with = "limit")]
    clear: bool,
}

/// `queue rate`.
#[derive(Debug, Args)]
pub struct RateArgs {
    /// The queue.
    queue: String,
    /// COUNT/PERIOD, e.g. 10/s, 600/1m, 5/2h.
    #[arg(required_unless_present = "clear")]
    rate: Option<String>,
    /// Only tasks of this name.
    #[arg(long)]
    task: Option<String>,
    /// Remove the rate.
    #[arg(long, conflicts_with = "rate")]
    clear: bool,
}

pub async fn run(g: &Global, cmd: QueueCommand) -> Result<()> {
    // Everything given on the command line is checked before connecting.
    let (queue, change) = match cmd {
        QueueCommand::Pause(args) => {
            let until = match (&args.until, &args.duration) {
                (Some(at), _) => Some(OffsetDateTime::parse(at, &Rfc3339).map_err(|err| {
                    Error::msg(format!("invalid --until {at:?}: {err} (use RFC 3339)"))
                })?),
                (None, Some(d)) => {
                    let d = time::Duration::try_from(output::parse_duration(d)?)
                        .map_err(|err| Error::msg(format!("invalid --for {d:?}: {err}")))?;
                    Some(OffsetDateTime::now_utc().checked_add(d).ok_or_else(|| {
                        Error::msg(format!(
                            "invalid --for {:?}: too long",
                            args.duration.as_deref().unwrap_or_default()
                        ))
                    })?)
                }
                (None, None) => None,
            };
            (args.queue, Change::Pause(until))
        }
        QueueCommand::Resume(args) => (args.queue, Change::Resume),
        QueueCommand::Limit(args) => {
            (args.queue, Change::Limit(args.limit.filter(|_| !args.clear)))
        }
        QueueCommand::Rate(args) => {
            let rate = match (&args.rate, args.clear) {
                (Some(rate), false) => {
                    Some(rate.parse::<Rate>().map_err(|err| Error::msg(err.to_string()))?)
                }
                _ => None,
            };
            (args.queue, Change::Rate(args.task, rate))
        }
    };
    conn::valid_queue(&queue)?;
    let admin = conn::admin(g).await?;
    let info = match &change {
        Change::Pause(until) => admin.pause(&queue, *until).await,
        Change::Resume => admin.resume(&queue).await,
        Change::Limit(limit) => admin.set_limit(&queue, *limit).await,
        Change::Rate(task, rate) => admin.set_rate(&queue, task.as_deref(), *rate).await,
    }
    .map_err(|err| conn::admin_error(g, &err))?;
    if g.json {
        output::json(&queue_json(&info));
        return Ok(());
    }
    match change {
        Change::Pause(_) => say!("queue {queue} paused {}", paused_text(info.paused_until)),
        Change::Resume => say!("queue {queue} resumed"),
        Change::Limit(Some(limit)) => {
            say!("queue {queue}: at most {limit} tasks in flight across every worker")
        }
        Change::Limit(None) => say!(
            "queue {queue}: no operator limit; {} until a worker sets its own default when it starts",
            info.limit.map_or_else(|| "-".to_owned(), |l| l.to_string())
        ),
        Change::Rate(task, rate) => {
            let what = task.map_or_else(|| "every task".to_owned(), |t| format!("task {t}"));
            match rate {
                Some(rate) => say!("queue {queue}, {what}: at most {rate}"),
                None => say!("queue {queue}, {what}: no rate limit"),
            }
        }
    }
    Ok(())
}

enum Change {
    Pause(Option<OffsetDateTime>),
    Resume,
    Limit(Option<i64>),
    Rate(Option<String>, Option<Rate>),
}

/// `until <time>`, `indefinitely` (a pause a century long), or `-`.
pub fn paused_text(until: Option<OffsetDateTime>) -> String {
    match until {
        None => "-".to_owned(),
        Some(at) if at - OffsetDateTime::now_utc() > time::Duration::days(50 * 365) => {
            "indefinitely".to_owned()
        }
        Some(at) => format!("until {}", output::time(at)),
    }
}

/// `10/1s, render=1/5s`, or `-`.
pub fn rates_text(rates: &[RateLimit]) -> String {
    if rates.is_empty() {
        return "-".to_owned();
    }
    let parts: Vec<String> = rates
        .iter()
        .map(|r| match &r.task {
            None => r.rate.to_string(),
            Some(task) => format!("{task}={}", r.rate),
        })
        .collect();
    parts.join(", ")
}

fn queue_json(info: &QueueInfo) -> serde_json::Value {
    json!({
        "queue": info.name,
        "paused_until": info.paused_until.map(output::time),
        "limit": info.limit,
        "limit_set": info.limit_set,
        "rates": info.rates.iter().map(|r| json!({"task": r.task, "rate": r.rate.to_string()})).collect::<Vec<_>>(),
    })
}
