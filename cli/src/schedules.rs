//! `natasks schedules`: periodic schedules and delayed tasks not yet due.
//!
//! A periodic schedule lives on `<prefix>.__natasks_schedule.periodic.<id>` and is read and
//! written through the library. A delayed task is a message schedule on its own subject
//! `<prefix>.__natasks_schedule.<id>`; the id is the subject's last token.
//!
//! Listing and cancelling go through `natasks::admin`. Only `add` builds a client, which sets the stream up (it may add the schedule subject
//! and turn on message schedules). Listing, removing and cancelling leave the stream's
//! configuration alone, and a missing stream is reported, not created.

use clap::{Args, Subcommand};
use natasks::admin::ScheduleKind;
use serde_json::json;
use time::OffsetDateTime;

use crate::output::say;
use crate::{conn, dispatch, output, Context as _, Error, Global, Result};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SchedulesArgs {
    #[command(subcommand)]
    command: Option<SchedulesCommand>,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only schedules targeting this queue.
    #[arg(long)]
    queue: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// List periodic schedules (by id) and pending delayed tasks (soonest first). The
    /// default.
    List(ListArgs),
    /// Declare or replace a periodic schedule (needs nats-server 2.14+). Declaring the same
    /// definition again changes nothing.
    Add(AddArgs),
    /// Remove a periodic schedule by its id.
    Remove {
        /// The schedule id.
        id: String,
    },
    /// Cancel a pending delayed task, or remove a periodic schedule, by its id (from
    /// `schedules list`).
    Cancel {
        /// The schedule id.
        id: String,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("when").required(true).args(["cron", "every"])))]
pub struct AddArgs {
    /// The schedule id: ASCII letters, digits, `-` and `_`.
    id: String,
    /// The queue the tasks go to.
    queue: String,
    /// The task name (selects the handler).
    task: String,
    /// A cron expression: 6 fields (second minute hour day-of-month month day-of-week), 5
    /// (at second 0), or @hourly, @daily, @weekly, @monthly, @yearly.
    #[arg(long, value_name = "EXPR")]
    cron: Option<String>,
    /// An interval, e.g. 30s, 5m, 1h (at least 1s).
    #[arg(long, value_name = "DURATION", conflicts_with = "time_zone")]
    every: Option<String>,
    /// The IANA time zone of a cron schedule, e.g. Europe/Berlin (default UTC).
    #[arg(long, value_name = "ZONE")]
    time_zone: Option<String>,
    /// The payload and headers of the tasks.
    #[command(flatten)]
    content: dispatch::ContentArgs,
}

pub async fn run(g: &Global, args: SchedulesArgs) -> Result<()> {
    match args.command {
        None => list(g, args.list.queue.as_deref()).await,
        Some(SchedulesCommand::List(list_args)) => list(g, list_args.queue.as_deref()).await,
        Some(SchedulesCommand::Add(add_args)) => add(g, add_args).await,
        Some(SchedulesCommand::Remove { id }) => remove(g, &id).await,
        Some(SchedulesCommand::Cancel { id }) => cancel(g, &id).await,
    }
}

/// The periodic schedules of the stream the global flags name, read and removed without
/// touching the stream's configuration.
fn periodic_schedules(g: &Global, js: &async_nats::jetstream::Context) -> natasks::Schedules {
    natasks::Schedules::new(js.clone())
        .stream_name(g.stream.clone())
        .subject_prefix(g.subject_prefix.clone())
}

/// Lists periodic schedules and pending delayed tasks, read without touching the stream.
async fn list(g: &Global, queue: Option<&str>) -> Result<()> {
    if let Some(queue) = queue {
        conn::valid_queue(queue)?;
    }
    let admin = conn::admin(g).await?;
    let all = admin.schedules(queue).await.map_err(|err| conn::admin_error(g, &err))?;
    if g.json {
        let list: Vec<_> = all
            .iter()
            .map(|s| match (s.kind, &s.every) {
                (ScheduleKind::Periodic, Some(every)) => json!({
                    "kind": "periodic",
                    "id": s.id,
                    "schedule": every.expression(),
                    "time_zone": every.zone(),
                    "task": s.name,
                    "queue": s.queue,
                    "next": s.next.map(output::time),
                    "declared": output::time(s.stored_at),
                }),
                _ => json!({
                    "kind": "delayed",
                    "id": s.id,
                    "seq": s.sequence,
                    "task": s.name,
                    "queue": s.queue,
                    "due": s.next.map(output::time),
                    "created": output::time(s.stored_at),
                }),
            })
            .collect();
        output::json(&json!(list));
        return Ok(());
    }
    if all.is_empty() {
        say!("no periodic schedules and no pending delayed tasks");
        return Ok(());
    }
    let now = OffsetDateTime::now_utc();
    let dash = || "-".to_owned();
    let until = |at: Option<OffsetDateTime>| {
        at.map_or_else(dash, |at| {
            let left: std::time::Duration = (at - now).try_into().unwrap_or_default();
            output::age(left)
        })
    };
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                if s.name.is_empty() { dash() } else { s.name.clone() },
                s.queue.clone(),
                s.every.as_ref().map_or_else(|| "once".to_owned(), ToString::to_string),
                s.next.map_or_else(dash, output::time),
                until(s.next),
            ]
        })
        .collect();
    output::table(&["ID", "TASK", "QUEUE", "EVERY", "NEXT", "IN"], &rows);
    Ok(())
}

async fn add(g: &Global, args: AddArgs) -> Result<()> {
    // Check everything given on the command line before connecting.
    let every = match (&args.cron, &args.every) {
        (Some(expr), _) => natasks::Every::cron(expr)
            .map_err(|err| Error::msg(format!("invalid --cron: {err}")))?,
        (None, Some(text)) => natasks::Every::interval(output::parse_duration(text)?),
        (None, None) => return Err(Error::msg("give --cron or --every")),
    };
    let every = match &args.time_zone {
        Some(zone) => every.time_zone(zone.clone()),
        None => every,
    };
    let task = args.content.task(&args.task)?;

    let client = conn::client(g).await?;
    let declared = client
        .schedule(&args.id, every.clone(), task, &args.queue)
        .await
        .context(|| format!("cannot declare periodic schedule {:?}", args.id))?;
    let outcome = match declared {
        natasks::Declared::Created => "created",
        natasks::Declared::Replaced => "replaced",
        _ => "unchanged",
    };
    let queue = natasks::wire::validate_queue(&args.queue).unwrap_or(&args.queue).to_owned();
    if g.json {
        output::json(&json!({
            "id": args.id,
            "outcome": outcome,
            "schedule": every.expression(),
            "time_zone": every.zone(),
            "queue": queue,
            "task": args.task,
        }));
    } else {
        say!("{outcome} periodic schedule {}: {} to queue {queue}, {every}", args.id, args.task);
    }
    Ok(())
}

async fn remove(g: &Global, id: &str) -> Result<()> {
    natasks::wire::validate_schedule_id(id).map_err(|err| Error::msg(err.to_string()))?;
    let js = conn::connect(g).await?;
    // A missing stream is reported, not created.
    conn::stream(g, &js).await?;
    let removed = periodic_schedules(g, &js)
        .remove(id)
        .await
        .context(|| format!("cannot remove periodic schedule {id:?}"))?;
    if !removed {
        return Err(Error::msg(format!("no periodic schedule {id:?}")));
    }
    if g.json {
        output::json(&json!({ "id": id, "removed": true }));
    } else {
        say!("removed periodic schedule {id}");
    }
    Ok(())
}

async fn cancel(g: &Global, id: &str) -> Result<()> {
    let admin = conn::admin(g).await?;
    admin.cancel_schedule(id).await.map_err(|err| conn::admin_error(g, &err))?;
    if g.json {
        output::json(&json!({ "id": id, "cancelled": true }));
    } else {
        say!("cancelled schedule {id}");
    }
    Ok(())
}
