//! natasks-ui: the web dashboard of natasks queues.
//!
//! An axum [`Router`](axum::Router) to serve alone (`natasks ui`, or
//! [`Dashboard::serve`]) or to nest in your own axum app. It shows every queue with live
//! counts, a queue's tasks by state, a task's payload, headers and history, schedules and
//! search; it pauses and resumes queues, requeues and deletes tasks, cancels schedules and
//! dispatches tasks, each confirmed and reported. Pages are rendered on the server and work
//! without JavaScript; a small script keeps the overview's counts live over server-sent
//! events. Assets are embedded in the binary.
//!
//! # Security
//!
//! * **Authentication**: [`Auth::Token`] (a bearer token, or typed once into the login form,
//!   then a random session id kept in an HttpOnly cookie) or [`Auth::Basic`]. When set, every page needs it.
//! * **Read-only mode** ([`Dashboard::read_only`]) hides and refuses every action.
//! * [`Dashboard::serve`] refuses to listen beyond loopback without authentication, even
//!   read-only, since pages show payloads ([`DashboardErrorKind::Unprotected`]).
//! * It answers only to `localhost`, IP addresses and [`Dashboard::allowed_hosts`], so a
//!   page of another site whose name is rebound to a loopback address cannot use it.
//! * Every action is a POST carrying a random token bound to a cookie (CSRF), and is
//!   refused when the browser says it comes from another site or origin.
//! * Everything that comes from tasks (payloads, headers, errors, names) is escaped.
//!
//! # Embedding
//!
//! ```no_run
#![doc = include_str!("../examples/embed.rs")]
//! ```
#![warn(missing_docs)]

mod actions;
mod assets;
mod dashboard;
mod live;
mod page;
mod pages;
mod security;

pub use dashboard::{
    Auth, Dashboard, DashboardError, DashboardErrorKind, DEFAULT_REFRESH, MIN_SECRET_LEN,
};
