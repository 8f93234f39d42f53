//! Placeholder until the operations API lands.

use axum::http::StatusCode;
use axum::response::Response;

use crate::page::Ctx;

/// Not yet available.
pub(crate) async fn page(ctx: Ctx) -> Response {
    ctx.error_page(StatusCode::NOT_IMPLEMENTED, "Not yet", "not yet")
}
