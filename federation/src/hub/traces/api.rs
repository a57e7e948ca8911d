//! The admin API's trace endpoints: search the window, read one trace.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{SpanView, TraceQuery, TraceSummary};
use crate::hub::admin::{AdminState, ErrorBody, error};

/// Recent traces, newest first.
#[utoipa::path(get, path = "/api/v1/traces", params(TraceQuery),
    responses((status = 200, description = "The traces the window holds that match, newest first", body = [TraceSummary]),
        (status = 400, description = "A malformed parameter", body = ErrorBody)))]
pub async fn list_traces(
    State(s): State<AdminState>,
    Query(q): Query<TraceQuery>,
) -> Json<Vec<TraceSummary>> {
    Json(s.hub.traces.search(&q))
}

/// One trace's spans, in start order.
#[utoipa::path(get, path = "/api/v1/traces/{id}", params(("id" = String, Path, description = "32 hex digits")),
    responses((status = 200, description = "The trace's spans", body = [SpanView]),
        (status = 400, description = "Not a trace ID", body = ErrorBody),
        (status = 404, description = "Not in the window (never seen, or aged out)", body = ErrorBody)))]
pub async fn get_trace(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    let id = id.to_ascii_lowercase();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a trace ID (32 hex digits)"),
        );
    }
    match s.hub.traces.get(&id) {
        Some(spans) => Json(spans).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "trace {id} is not in the hub's window (never received here, or older than the window keeps)"
            ),
        ),
    }
}
