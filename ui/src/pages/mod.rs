//! The dashboard's pages, one module each.

pub(crate) mod dispatch;
pub(crate) mod list;
pub(crate) mod overview;
pub(crate) mod queue;
pub(crate) mod schedules;
pub(crate) mod search;
pub(crate) mod task;
