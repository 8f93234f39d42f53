//! `natasks dispatch`: publish a task with the library's client.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::output::say;
use crate::{conn, output, Context as _, Error, Global, Result};

#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// The queue to dispatch to.
    queue: String,
    /// The task name (selects the handler).
    task: String,
    /// The payload and headers.
    #[command(flatten)]
    content: ContentArgs,
    /// Message id: JetStream drops a repeated dispatch with the same id within the stream's
    /// duplicate window.
    #[arg(long)]
    message_id: Option<String>,
    /// Deliver after this delay, e.g. 90s, 5m, 2h, 1h30m (needs nats-server 2.12+).
    #[arg(long = "in", value_name = "DURATION", conflicts_with = "at")]
    delay: Option<String>,
    /// Deliver at this RFC 3339 time, e.g. 2030-01-02T03:04:05Z (needs nats-server 2.12+).
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Track the task: its status, result and events are recorded (see `natasks task` and
    /// `natasks events`), and it can be cancelled. Needs nats-server 2.11+.
    #[arg(long)]
    track: bool,
    /// How long the tracked task's record is kept after its last change, in whole seconds,
    /// e.g. 1h, 7d (default: the worker's result retention, a day unless configured).
    #[arg(long, value_name = "DURATION", requires = "track")]
    retention: Option<String>,
    /// Make the task unique in its queue by KEY: refused (naming the task that holds the
    /// key) while a task with the key is pending, scheduled or running. Needs nats-server
    /// 2.12+.
    #[arg(long, value_name = "KEY", conflicts_with_all = ["throttle", "debounce"])]
    unique: Option<String>,
    /// How long the unique key is held at most, should no worker end the task, e.g. 1h.
    #[arg(long, value_name = "DURATION", default_value = "24h", requires = "unique")]
    unique_ttl: String,
    /// Throttle by KEY: at most one task with the key per --window in the queue.
    #[arg(long, value_name = "KEY", requires = "window", conflicts_with = "debounce")]
    throttle: Option<String>,
    /// The throttle window, e.g. 30s, 1h (whole seconds).
    #[arg(long, value_name = "DURATION", requires = "throttle")]
    window: Option<String>,
    /// Debounce by KEY: replaces the pending task with the key and restarts the delay
    /// (needs --in or --at).
    #[arg(long, value_name = "KEY")]
    debounce: Option<String>,
    /// With --unique or --throttle: when the key is held, print the receipt of the task
    /// that holds it instead of failing.
    #[arg(long)]
    return_existing: bool,
}

pub async fn run(g: &Global, args: DispatchArgs) -> Result<()> {
    // Check everything given on the command line before connecting.
    let mut task = args.content.task(&args.task)?;
    if let Some(id) = &args.message_id {
        if args.track {
            crate::task::check_id(id).map_err(|err| Error::msg(format!("--message-id: {err}")))?;
        }
        task = task.with_message_id(id.clone());
    }
    task = guarded(task, &args)?;
    if args.track {
        task = match args.retention.as_deref() {
            Some(text) => task.tracked_for(retention(text)?),
            None => task.tracked(),
        };
    }
    let due = match (&args.delay, &args.at) {
        (Some(delay), _) => Due::In(output::parse_duration(delay)?),
        (None, Some(at)) => Due::At(OffsetDateTime::parse(at, &Rfc3339).map_err(|err| {
            Error::msg(format!(
                "invalid --at {at:?}: {err} (use RFC 3339, e.g. 2030-01-02T03:04:05Z)"
            ))
        })?),
        (None, None) => Due::Now,
    };

    let client = conn::client(g).await?;
    let queue = natasks::wire::validate_queue(&args.queue).unwrap_or(&args.queue).to_owned();
    let what = || format!("cannot dispatch {:?} to queue {queue:?}", args.task);
    // The library checks the due time (the server cannot keep one after the year 2261).
    let dispatched = match due {
        Due::Now => client.dispatch(task, &args.queue).await,
        Due::In(delay) => client.dispatch_in(task, &args.queue, delay).await,
        Due::At(at) => client.dispatch_at(task, &args.queue, at).await,
    };
    let receipt = match dispatched {
        Err(err) if err.kind() == natasks::DispatchErrorKind::InvalidDueTime => {
            let flag = match (&args.delay, &args.at) {
                (Some(delay), _) => format!("--in {delay:?}"),
                (None, at) => format!("--at {:?}", at.as_deref().unwrap_or_default()),
            };
            return Err(Error::msg(format!("invalid {flag}: {}", crate::one_line(&err))));
        }
        dispatched => dispatched.context(what)?,
    };
    let due = match due {
        Due::Now => None,
        Due::In(delay) => time::Duration::try_from(delay)
            .ok()
            .and_then(|delay| OffsetDateTime::now_utc().checked_add(delay)),
        Due::At(at) => Some(at),
    };
    let due = due.filter(|at| *at > OffsetDateTime::now_utc());
    if g.json {
        output::json(&json!({
            "queue": queue,
            "task": args.task,
            "message_id": args.message_id,
            "id": receipt.id,
            "sequence": receipt.sequence,
            "duplicate": receipt.duplicate,
            "due": due.map(output::time),
            "tracked": args.track,
            "unique_key": args.unique,
        }));
    } else if receipt.duplicate && (args.unique.is_some() || args.throttle.is_some()) {
        say!("already queued: task {} on queue {queue} holds the key", receipt.id);
    } else {
        let tracked = if args.track { ", tracked" } else { "" };
        match due {
            Some(at) => say!(
                "scheduled {} on queue {queue} for {} (id {}{tracked})",
                args.task,
                output::time(at),
                receipt.id
            ),
            None => {
                say!("dispatched {} to queue {queue} (id {}{tracked})", args.task, receipt.id)
            }
        }
    }
    Ok(())
}

/// Applies `--unique`, `--throttle`, `--debounce` and `--return-existing`.
fn guarded(mut task: natasks::Task, args: &DispatchArgs) -> Result<natasks::Task> {
    let duration = |flag: &str, text: &str| {
        output::parse_duration(text).map_err(|err| Error::msg(format!("invalid {flag}: {err}")))
    };
    if let Some(key) = &args.unique {
        task = task.unique(key.clone(), duration("--unique-ttl", &args.unique_ttl)?);
    }
    if let (Some(key), Some(window)) = (&args.throttle, &args.window) {
        task = task.throttle(key.clone(), duration("--window", window)?);
    }
    if let Some(key) = &args.debounce {
        if args.delay.is_none() && args.at.is_none() {
            return Err(Error::msg("--debounce needs --in or --at: the quiet period"));
        }
        task = task.debounce(key.clone());
    }
    if args.return_existing {
        if args.unique.is_none() && args.throttle.is_none() {
            return Err(Error::msg("--return-existing needs --unique or --throttle"));
        }
        task = task.return_existing();
    }
    Ok(task)
}

/// The `--retention` of a tracked task: whole seconds, at least one.
fn retention(text: &str) -> Result<Duration> {
    let retention = output::parse_duration(text)
        .map_err(|err| Error::msg(format!("invalid --retention: {err}")))?;
    if retention < Duration::from_secs(1) || retention.subsec_nanos() != 0 {
        return Err(Error::msg(format!(
            "invalid --retention {text:?}: a tracked task's retention is whole seconds, at least 1s"
        )));
    }
    Ok(retention)
}

/// When the task is due, as given on the command line.
enum Due {
    Now,
    In(Duration),
    At(OffsetDateTime),
}

/// The payload and headers of a task, as `dispatch` and `schedules add` take them.
#[derive(Debug, Args)]
pub struct ContentArgs {
    /// The payload, as JSON. Without --payload or --payload-file the payload is empty.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the JSON payload from a file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    payload_file: Option<PathBuf>,
    /// A header to add, as KEY=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_name = "KEY=VALUE")]
    headers: Vec<String>,
}

impl ContentArgs {
    /// The task `name` with this payload and these headers, checked before connecting.
    pub fn task(&self, name: &str) -> Result<natasks::Task> {
        let payload = payload(self.payload.as_deref(), self.payload_file.as_deref())?;
        with_headers(natasks::Task::new(name.to_owned(), payload), &self.headers)
    }
}

/// Adds `KEY=VALUE` headers given with `--header`.
fn with_headers(mut task: natasks::Task, headers: &[String]) -> Result<natasks::Task> {
    for header in headers {
        let Some((key, value)) = header.split_once('=') else {
            return Err(Error::msg(format!("invalid --header {header:?}: use KEY=VALUE")));
        };
        task = task.with_header(key.trim(), value);
    }
    Ok(task)
}

/// The JSON payload of `--payload` or `--payload-file`; empty without either.
fn payload(payload: Option<&str>, payload_file: Option<&std::path::Path>) -> Result<Vec<u8>> {
    let (bytes, flag) = match (payload, payload_file) {
        (Some(text), _) => (text.as_bytes().to_vec(), "--payload".to_owned()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context(|| "cannot read the payload from stdin".to_owned())?;
            (buf, "--payload-file -".to_owned())
        }
        (None, Some(path)) => (
            std::fs::read(path).context(|| format!("cannot read {}", path.display()))?,
            format!("--payload-file {}", path.display()),
        ),
        (None, None) => return Ok(Vec::new()),
    };
    if let Err(err) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        return Err(Error::msg(format!("invalid {flag}: not valid JSON: {err}")));
    }
    Ok(bytes)
}
