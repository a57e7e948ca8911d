//! Spans of proxy hops, exported over OTLP.
//!
//! A proxy records a hop's span when the request (or connection) ends, with everything it knows
//! by then: the route that matched, the backend drawn, the targets tried, the status, the
//! proxy's error reason. The span is kept when its trace is sampled (the caller's decision,
//! or, for a trace that starts here, a ratio of new traces), and always when it failed or was
//! slower than a threshold, so the requests an operator looks for are there even at 1%.
//!
//! Recording never waits: kept spans go into a bounded queue, and one task batches them and
//! exports them with `opentelemetry-otlp` (gRPC or HTTP/protobuf). When the collector is slow
//! or down, the queue fills and further spans are dropped and counted
//! (`fedmesh_*_spans{reason="dropped"}`), never the request delayed.

mod connection;
mod export;
pub mod relay;
mod request;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, ShouldSample, SpanData, SpanEvents, SpanLinks,
};
use tokio::sync::mpsc;

pub use connection::ConnectionSpan;
pub use export::{ExportConfig, Exporting, OtlpProtocol, SamplerArg, collector_named, start};
pub use request::{RequestSpan, SpanLink};

use crate::metrics::ProxyMetrics;
use crate::trace::HopSpan;

/// The handle proxies record spans through; cheap to clone, and a no-op when tracing is off.
#[derive(Clone, Default)]
pub struct Spans(Option<Arc<Inner>>);

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.enabled() {
            "Spans(on)"
        } else {
            "Spans(off)"
        })
    }
}

struct Inner {
    queue: mpsc::Sender<SpanData>,
    /// Decides for traces that start here; a caller's decision is always kept.
    root: Sampler,
    /// The ratio `root` keeps: what a sampled span stands for (see [`adjusted_count`]).
    ratio: f64,
    slow: Duration,
    scope: InstrumentationScope,
    metrics: Arc<ProxyMetrics>,
}

/// One finished hop.
pub struct SpanRecord {
    pub hop: HopSpan,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub duration: Duration,
    pub attributes: Vec<KeyValue>,
    /// Why it failed (`error.type`), if it did.
    pub error: Option<String>,
    /// Spans this one is tied to without being their child: `(trace ID, span ID)`.
    pub links: Vec<SpanLink>,
    /// When it is kept.
    pub keep: Keep,
}

/// When a finished hop's span is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// A request's: when its trace is sampled, it failed, or it was slow.
    Request,
    /// A connection's: when sampled or failed; its length says how long the connection lived,
    /// not that anything was slow.
    Connection,
    /// Always: a gateway's admission of a connection (one per connection, and every sampled
    /// request that rides the connection links to it, whichever request opened it).
    Always,
}

impl Spans {
    /// Tracing off: nothing is recorded, and traces that start here are marked sampled so the
    /// apps' own tracers decide.
    pub fn off() -> Self {
        Self(None)
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Whether a trace that starts at this hop is sampled.
    pub fn sample_new(&self, trace_id: [u8; 16]) -> bool {
        let Some(inner) = &self.0 else {
            return true;
        };
        let result = inner.root.should_sample(
            None,
            TraceId::from_bytes(trace_id),
            "",
            &SpanKind::Internal,
            &[],
            &[],
        );
        result.decision == SamplingDecision::RecordAndSample
    }

    /// Whether a finished hop's span is kept (see [`Keep`]). Spans that are not kept need not
    /// be built at all.
    pub fn keeps(&self, sampled: bool, failed: bool, duration: Duration, keep: Keep) -> bool {
        let Some(inner) = &self.0 else {
            return false;
        };
        match keep {
            Keep::Always => true,
            Keep::Connection => sampled || failed,
            Keep::Request => sampled || failed || duration >= inner.slow,
        }
    }

    /// Records a finished hop: queued for export when kept, dropped (and counted) when the
    /// queue is full.
    pub fn finish(&self, rec: SpanRecord) {
        let Some(inner) = &self.0 else {
            return;
        };
        if !self.keeps(rec.hop.sampled, rec.error.is_some(), rec.duration, rec.keep) {
            return;
        }
        let status = match &rec.error {
            Some(e) => Status::error(e.clone()),
            None => Status::Unset,
        };
        let mut attributes = rec.attributes;
        let always_kept = match rec.keep {
            Keep::Always => true,
            Keep::Connection => rec.error.is_some(),
            Keep::Request => rec.error.is_some() || rec.duration >= inner.slow,
        };
        if let Some(n) = adjusted_count(always_kept, inner.ratio) {
            attributes.push(KeyValue::new(ADJUSTED_COUNT, n));
        }
        if let Some(e) = rec.error {
            attributes.push(KeyValue::new("error.type", e));
        }
        let data = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(rec.hop.trace_id),
                SpanId::from_bytes(rec.hop.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: rec
                .hop
                .parent_span_id
                .map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: rec.hop.parent_span_id.is_some(),
            span_kind: rec.kind,
            name: Cow::Owned(rec.name),
            start_time: rec.start,
            end_time: rec.start + rec.duration,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: links(rec.links),
            status,
            instrumentation_scope: inner.scope.clone(),
        };
        if inner.queue.try_send(data).is_err() {
            inner.metrics.count_span("dropped");
        }
    }
}

/// The attribute saying how many hops a kept span stands for, so a reader of sampled spans
/// (the hub's service graph) can estimate all traffic from them.
pub const ADJUSTED_COUNT: &str = "fedmesh.sampling.adjusted_count";

/// How many hops a kept span stands for: 1 when it was kept whatever the sampling (it failed,
/// was slow, or is always kept), else 1/ratio — the ratio this proxy samples new traces at, taken
/// as the clusterset's (a caller's decision came from its own proxy's ratio). `None` when the
/// ratio is 0 (only a caller's decision keeps spans, at a ratio unknown here).
fn adjusted_count(always_kept: bool, ratio: f64) -> Option<f64> {
    if always_kept {
        Some(1.0)
    } else if ratio > 0.0 {
        Some(1.0 / ratio.min(1.0))
    } else {
        None
    }
}

fn links(to: Vec<([u8; 16], [u8; 8])>) -> SpanLinks {
    let mut l = SpanLinks::default();
    l.links = to
        .into_iter()
        .map(|(t, s)| {
            Link::with_context(SpanContext::new(
                TraceId::from_bytes(t),
                SpanId::from_bytes(s),
                TraceFlags::SAMPLED,
                true,
                TraceState::NONE,
            ))
        })
        .collect();
    l
}

/// The HTTP semantic-convention attributes of a request, client or server side.
pub fn request_attributes(
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(20);
    a.push(KeyValue::new(
        "http.request.method",
        method.as_str().to_string(),
    ));
    a.push(KeyValue::new("url.path", uri.path().to_string()));
    a.push(KeyValue::new(
        "network.protocol.version",
        match version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        },
    ));
    a
}

/// gRPC's name and attributes, when the request is gRPC (`content-type: application/grpc*`):
/// the span is named `service/method` and says both.
pub fn grpc_call(grpc: bool, uri: &http::Uri) -> Option<(String, Vec<KeyValue>)> {
    if !grpc {
        return None;
    }
    let full = uri.path().trim_start_matches('/');
    let (service, method) = full.split_once('/').unwrap_or((full, ""));
    let a = vec![
        KeyValue::new("rpc.system", "grpc"),
        KeyValue::new("rpc.service", service.to_string()),
        KeyValue::new("rpc.method", method.to_string()),
    ];
    Some((full.to_string(), a))
}

/// The `grpc-status` a response's headers (a trailers-only answer) or trailers carry.
pub fn grpc_status(h: &http::HeaderMap) -> Option<i64> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// What `error.type` says for an answer: the proxy's reason when the proxy answered, else the
/// status (the conventions count 4xx and 5xx as failed for a client, only 5xx for a server;
/// for gRPC, a client counts every status but OK, a server only the server-side ones).
pub fn error_type(
    kind: &SpanKind,
    status: http::StatusCode,
    grpc_status: Option<i64>,
    proxy_error: Option<&str>,
) -> Option<String> {
    if let Some(reason) = proxy_error {
        return Some(reason.to_string());
    }
    let server = matches!(kind, SpanKind::Server);
    if let Some(code) = grpc_status {
        // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        let failed = if server {
            matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
        } else {
            code != 0
        };
        return failed.then(|| code.to_string());
    }
    let failed = status.is_server_error() || (!server && status.is_client_error());
    failed.then(|| status.as_u16().to_string())
}

#[cfg(test)]
mod tests;
