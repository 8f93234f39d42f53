//! `natasks tasks`: a queue's tasks by state, one task in full, and deleting tasks, through
//! `natasks::admin`. (`natasks task` follows one tracked task by its id.)

use clap::Subcommand;
use natasks::admin::TaskState;
use serde_json::json;

use crate::dlq::{finish, print_detail, run_bulk, Bulk};
use crate::filter::{parse_state, Which};
use crate::output::say;
use crate::search::{summary_json, summary_row};
use crate::{conn, output, Global, Result};

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List a queue's tasks in one state, oldest first, without consuming them.
    List {
        /// The queue.
        queue: String,
        /// pending, in_flight, scheduled or dead.
        #[arg(long, default_value = "pending", value_parser = parse_state)]
        state: TaskState,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this sequence (the last one of the previous page).
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
    },
    /// Show one task by its stream sequence: state, headers and payload.
    Show {
        /// The task's stream sequence.
        seq: u64,
    },
    /// Delete a queue's tasks in one state: by sequence, --all, or those matching the
    /// filter flags. Scheduled tasks deleted never become due.
    #[command(mut_arg("all", |a| a.help("Every task of the queue in this state")))]
    Delete {
        /// The queue.
        queue: String,
        /// pending, in_flight, scheduled or dead.
        #[arg(long, value_parser = parse_state)]
        state: TaskState,
        /// By sequence, every one, or those matching the filter flags.
        #[command(flatten)]
        which: Which,
    },
}

pub async fn run(g: &Global, cmd: TasksCommand) -> Result<()> {
    match cmd {
        TasksCommand::List { queue, state, limit, after } => {
            conn::valid_queue(&queue)?;
            let admin = conn::admin(g).await?;
            let page = admin
                .tasks(&queue, state, after, limit)
                .await
                .map_err(|err| conn::admin_error(g, &err))?;
            if g.json {
                let items: Vec<_> = page.items.iter().map(summary_json).collect();
                output::json(&json!({ "tasks": items, "next": page.next }));
                return Ok(());
            }
            if page.items.is_empty() {
                say!("no {state} tasks on queue {queue}");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = page.items.iter().map(summary_row).collect();
            output::table(&["SEQ", "QUEUE", "STATE", "TASK", "STORED", "LAST ERROR"], &rows);
            if let Some(next) = page.next {
                say!("... more (see --after {next})");
            }
            Ok(())
        }
        TasksCommand::Show { seq } => {
            let admin = conn::admin(g).await?;
            let detail = admin.task(seq).await.map_err(|err| conn::admin_error(g, &err))?;
            print_detail(g, &detail);
            Ok(())
        }
        TasksCommand::Delete { queue, state, which } => {
            conn::valid_queue(&queue)?;
            let selection = which.selection()?;
            let admin = conn::admin(g).await?;
            let outcome = run_bulk(g, &queue, state, &selection, Bulk::Delete, &admin).await?;
            if !g.json {
                say!("deleted {} {state} task(s) from queue {queue}", outcome.done);
            }
            finish(&outcome, "deleting")
        }
    }
}
