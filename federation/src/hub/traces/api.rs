//! The admin API's trace endpoints: search the window, read one trace (and its clusters' clock
//! skew), and the service graph drawn from it.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::graph::Graph;
use super::skew::{self, ClockSkew};
use super::{SpanView, TraceQuery, TraceSummary};
use crate::hub::admin::{AdminState, ErrorBody, error};
use crate::hub::api_json::{ApiQuery, out_of_range};

/// Recent traces, newest first.
#[utoipa::path(get, path = "/api/v1/traces", params(TraceQuery),
    responses((status = 200, description = "The traces the window holds that match, newest first", body = [TraceSummary]),
        (status = 400, description = "A malformed parameter", body = ErrorBody)))]
pub async fn list_traces(
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<TraceQuery>,
) -> Response {
    if let Some(r) = q.refusal() {
        return r;
    }
    Json(s.hub.traces.search(&q)).into_response()
}

/// One trace's spans, in start order, as the clusters' clocks recorded them, with the spans of
/// other traces its spans link to (a pooled connection's gateway admission; its `trace_id`
/// says it belongs elsewhere).
#[utoipa::path(get, path = "/api/v1/traces/{id}", params(("id" = String, Path, description = "The trace ID: 32 hex digits", pattern = r"^[0-9a-fA-F]{32}$")),
    responses((status = 200, description = "The trace's spans", body = [SpanView]),
        (status = 400, description = "Not a trace ID", body = ErrorBody),
        (status = 404, description = "Not in the window (never seen, or aged out)", body = ErrorBody)))]
pub async fn get_trace(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    match spans(&s, id) {
        Ok(spans) => Json(spans).into_response(),
        Err((code, msg)) => error(code, msg),
    }
}

/// How far each cluster's clock runs ahead of the one where the trace started, estimated from
/// the trace's client/server span pairs that cross clusters. A span's start on the reference
/// clock is its start minus its cluster's offset.
#[utoipa::path(get, path = "/api/v1/traces/{id}/skew", params(("id" = String, Path, description = "The trace ID: 32 hex digits", pattern = r"^[0-9a-fA-F]{32}$")),
    responses((status = 200, description = "The clusters' estimated clock offsets", body = ClockSkew),
        (status = 400, description = "Not a trace ID", body = ErrorBody),
        (status = 404, description = "Not in the window (never seen, or aged out)", body = ErrorBody)))]
pub async fn get_skew(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    match spans(&s, id) {
        Ok(spans) => Json(skew::estimate(&spans)).into_response(),
        Err((code, msg)) => error(code, msg),
    }
}

fn spans(s: &AdminState, id: String) -> Result<Vec<SpanView>, (StatusCode, String)> {
    let id = id.to_ascii_lowercase();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a trace ID (32 hex digits)"),
        ));
    }
    s.hub.traces.get(&id).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!(
                "trace {id} is not in the hub's window (never received here, or older than the window keeps)"
            ),
        )
    })
}

/// The service graph's time window.
#[derive(Deserialize, utoipa::IntoParams, Default, Debug)]
#[into_params(parameter_in = Query)]
pub struct GraphQuery {
    /// Requests of the last this many minutes (default 15, 1 to 1440; the window keeps an
    /// hour by default).
    #[param(minimum = 1, maximum = 1440)]
    pub minutes: Option<u64>,
}

/// The clusterset's service graph: services grouped by cluster, and per pair of services the
/// requests per second, error share and p50/p99 latency their sidecars measured, with the
/// SPIFFE IDs on each side. Drawn from the window's spans, each weighted by the requests it
/// stands for (its sampling), so the figures estimate all traffic.
#[utoipa::path(get, path = "/api/v1/graph", params(GraphQuery),
    responses((status = 200, description = "Nodes and edges of the window", body = Graph),
        (status = 400, description = "A malformed parameter", body = ErrorBody)))]
pub async fn get_graph(State(s): State<AdminState>, ApiQuery(q): ApiQuery<GraphQuery>) -> Response {
    let minutes = q.minutes.unwrap_or(15);
    if !(1..=1440).contains(&minutes) {
        return out_of_range("minutes", minutes, 1, 1440);
    }
    Json(s.hub.traces.graph(Duration::from_secs(minutes * 60))).into_response()
}
