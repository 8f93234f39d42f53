//! `natasks schedules`: delayed tasks not yet due.
//!
//! A delayed task is a message schedule on its own subject
//! `<prefix>.__natasks_schedule.<id>`; the id is the subject's last token.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::RawMessageErrorKind;
use clap::Subcommand;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::{conn, output, Context as _, Error, Global, Result};

const NATS_SCHEDULE: &str = "Nats-Schedule";
const NATS_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// List pending delayed tasks, soonest first.
    List {
        /// Only schedules targeting this queue.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Cancel a pending delayed task by its schedule id (from `schedules list`).
    Cancel {
        /// The schedule id.
        id: String,
    },
}

pub async fn run(g: &Global, cmd: SchedulesCommand) -> Result<()> {
    match cmd {
        SchedulesCommand::List { queue } => list(g, queue.as_deref()).await,
        SchedulesCommand::Cancel { id } => cancel(g, &id).await,
    }
}

fn prefix(g: &Global) -> String {
    format!("{}.{}.", g.subject_prefix, natasks::wire::SCHEDULE_TOKEN)
}

struct Schedule {
    id: String,
    seq: u64,
    task: Option<String>,
    queue: Option<String>,
    due: Option<OffsetDateTime>,
    created: OffsetDateTime,
}

fn parse(g: &Global, message: &StreamMessage) -> Schedule {
    let header = |name| message.headers.get(name).map(|v| v.as_str().to_owned());
    let queue_prefix = format!("{}.", g.subject_prefix);
    Schedule {
        id: message.subject.rsplit('.').next().unwrap_or_default().to_owned(),
        seq: message.sequence,
        task: header(natasks::wire::HEADER_TASK),
        queue: header(NATS_SCHEDULE_TARGET)
            .map(|t| t.strip_prefix(&queue_prefix).map(str::to_owned).unwrap_or(t)),
        due: header(NATS_SCHEDULE).and_then(|s| {
            let at = s.strip_prefix("@at ")?;
            OffsetDateTime::parse(at.trim(), &Rfc3339).ok()
        }),
        created: message.time,
    }
}

async fn list(g: &Global, queue: Option<&str>) -> Result<()> {
    let js = conn::connect(g).await?;
    let stream = conn::stream(g, &js).await?;
    let wildcard = format!("{}>", prefix(g));
    let mut schedules = Vec::new();
    let mut seq = 1;
    loop {
        let message = match stream.get_first_raw_message_by_subject(&wildcard, seq).await {
            Ok(message) => message,
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => break,
            Err(err) => return Err(err).context(|| "cannot read schedules".to_owned()),
        };
        seq = message.sequence + 1;
        let schedule = parse(g, &message);
        if queue.is_none_or(|q| schedule.queue.as_deref() == Some(q)) {
            schedules.push(schedule);
        }
    }
    schedules.sort_by_key(|s| (s.due, s.seq));
    if g.json {
        let list: Vec<_> = schedules
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "seq": s.seq,
                    "task": s.task,
                    "queue": s.queue,
                    "due": s.due.map(output::time),
                    "created": output::time(s.created),
                })
            })
            .collect();
        output::json(&json!(list));
        return Ok(());
    }
    if schedules.is_empty() {
        println!("no pending schedules");
        return Ok(());
    }
    let now = OffsetDateTime::now_utc();
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            let due_in = s.due.map_or_else(
                || "-".to_owned(),
                |due| {
                    let left: std::time::Duration = (due - now).try_into().unwrap_or_default();
                    output::age(left)
                },
            );
            vec![
                s.id.clone(),
                s.task.clone().unwrap_or_else(|| "-".to_owned()),
                s.queue.clone().unwrap_or_else(|| "-".to_owned()),
                s.due.map_or_else(|| "-".to_owned(), output::time),
                due_in,
            ]
        })
        .collect();
    output::table(&["ID", "TASK", "QUEUE", "DUE", "IN"], &rows);
    Ok(())
}

async fn cancel(g: &Global, id: &str) -> Result<()> {
    if id.is_empty() || id.contains(['.', '*', '>']) || id.chars().any(char::is_whitespace) {
        return Err(Error::msg(format!("invalid schedule id {id:?}")));
    }
    let js = conn::connect(g).await?;
    let stream = conn::stream(g, &js).await?;
    let subject = format!("{}{id}", prefix(g));
    let response =
        stream.purge().filter(&subject).await.context(|| format!("cannot cancel schedule {id}"))?;
    if response.purged == 0 {
        return Err(Error::msg(format!("no pending schedule {id:?} (already due, or cancelled?)")));
    }
    if g.json {
        output::json(&json!({ "id": id, "cancelled": true }));
    } else {
        println!("cancelled schedule {id}");
    }
    Ok(())
}
