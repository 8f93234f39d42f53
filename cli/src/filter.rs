//! Filter flags shared by `search` and the bulk forms of `dlq requeue|delete` and
//! `tasks delete`, and the selection of those bulk forms.

use clap::{ArgGroup, Args};
use natasks::admin::{Filter, Selection, TaskState};

use crate::{Error, Result};

/// What a task must contain; every flag given must hold.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Filter")]
pub struct FilterArgs {
    /// Task name (a trailing `*` matches names starting with the rest, e.g. `emails.*`).
    #[arg(long, value_name = "TASK")]
    pub name: Option<String>,
    /// A header and its value, as KEY=VALUE.
    #[arg(long, value_name = "KEY=VALUE")]
    pub header: Option<String>,
    /// Text the payload contains.
    #[arg(long, value_name = "TEXT")]
    pub contains: Option<String>,
    /// A JSON payload field by dotted path and the JSON value it equals, as PATH=VALUE
    /// (`user.id=42`, `kind="weekly"`; a value that is not JSON is taken as a string).
    #[arg(long, value_name = "PATH=VALUE")]
    pub field: Option<String>,
    /// Text the last error contains, in any case.
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
}

impl FilterArgs {
    /// The library's filter, checked (before connecting).
    pub fn filter(&self) -> Result<Filter> {
        let mut filter = Filter::new();
        if let Some(name) = &self.name {
            filter = filter.name(name.clone());
        }
        if let Some(pair) = &self.header {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| Error::msg(format!("invalid --header {pair:?}: use KEY=VALUE")))?;
            filter = filter.header(key, value);
        }
        if let Some(text) = &self.contains {
            filter = filter.payload_contains(text.clone());
        }
        if let Some(pair) = &self.field {
            let (path, value) = pair
                .split_once('=')
                .ok_or_else(|| Error::msg(format!("invalid --field {pair:?}: use PATH=VALUE")))?;
            let value = serde_json::from_str(value)
                .unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
            filter = filter.json_field(path, value);
        }
        if let Some(text) = &self.error {
            filter = filter.error_contains(text.clone());
        }
        filter.validate().map_err(|err| Error::msg(err.to_string()))?;
        Ok(filter)
    }
}

/// Which tasks of a queue a bulk command acts on: by sequence, `--all`, or those matching
/// the filter flags; one of them is required. A command words `--all` and the sequences for
/// what it acts on with `mut_arg`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).multiple(true)
    .args(["all", "seqs", "name", "header", "contains", "field", "error"])))]
pub struct Which {
    /// Every task of the queue the command acts on.
    #[arg(long, conflicts_with_all = ["seqs", "name", "header", "contains", "field", "error"])]
    pub all: bool,
    /// Sequences of the tasks.
    #[arg(conflicts_with_all = ["name", "header", "contains", "field", "error"])]
    pub seqs: Vec<u64>,
    /// Only the tasks matching these.
    #[command(flatten)]
    pub filter: FilterArgs,
}

impl Which {
    /// The selection, checked before connecting.
    pub fn selection(&self) -> Result<Selection> {
        Ok(match self.seqs.as_slice() {
            [] => Selection::Matching(self.filter.filter()?),
            [seq] => Selection::One(*seq),
            seqs => Selection::Many(seqs.to_vec()),
        })
    }
}

/// Parses `--state` (pending, in-flight, scheduled, dead) for clap.
pub fn parse_state(text: &str) -> Result<TaskState, String> {
    text.parse().map_err(|err: natasks::admin::AdminError| err.to_string())
}
