//! The hub's recent traces: the spans the clusters' proxies send over OTLP ([`intake`]), kept
//! in a bounded window (a span count and an age; the oldest traces go first, counted) so a
//! clusterset's requests can be followed across clusters without running a trace store, and
//! searched and read through the admin API ([`api`]).
//!
//! Each span is stamped with the cluster that sent it, as its mTLS identity proves it — not as
//! its resource claims. Each hub replica keeps its own window: with several replicas, a trace
//! is complete on the replica its clusters send to.

pub mod api;
pub mod forward;
pub mod graph;
pub mod intake;
pub mod listener;
pub mod skew;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How much the window keeps.
#[derive(Clone, Debug)]
pub struct TraceLimits {
    /// Spans in the window; beyond it, the oldest traces are dropped.
    pub max_spans: usize,
    /// Traces older than this (since their first span arrived) are dropped.
    pub max_age: Duration,
    /// Spans one trace may hold; more are refused (a runaway trace cannot take the window).
    pub max_spans_per_trace: usize,
    /// Memory the window's spans may take (as [`SpanView::heap_bytes`] estimates it, on the
    /// high side); beyond it, the oldest traces are dropped. Whichever bound is reached first
    /// applies: a few large spans cannot take more memory than many small ones.
    pub max_bytes: usize,
}

impl Default for TraceLimits {
    fn default() -> Self {
        Self {
            max_spans: 100_000,
            max_age: Duration::from_secs(3600),
            max_spans_per_trace: 2_000,
            max_bytes: 128 << 20,
        }
    }
}

/// Attributes kept per span, and the longest value kept (longer ones are cut).
const MAX_ATTRIBUTES: usize = 128;
const MAX_VALUE: usize = 2048;

/// What a trace's bookkeeping takes beyond its spans (see [`SpanView::heap_bytes`]).
const TRACE_BYTES: usize = 384;

/// One span as the hub keeps and shows it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct SpanView {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent_span_id: String,
    pub name: String,
    /// `client`, `server`, `internal`, `producer` or `consumer`.
    pub kind: String,
    /// The sending process's `service.name`.
    pub service: String,
    /// The cluster that sent the span (its authenticated identity).
    pub cluster: String,
    pub start_unix_nano: u64,
    pub duration_ns: u64,
    /// Why it failed (`error.type`, else the status message), if it did.
    pub error: Option<String>,
    pub attributes: BTreeMap<String, String>,
    /// Shared by the spans of one export (a proxy sends the same resource with every span).
    #[schema(value_type = BTreeMap<String, String>)]
    pub resource: Arc<BTreeMap<String, String>>,
    /// Spans it is tied to without being their child, `TRACE_ID-SPAN_ID`.
    pub links: Vec<String>,
}

impl SpanView {
    /// The memory one kept span takes, estimated on the high side: the struct (twice: a trace's
    /// span list grows by doubling), each string's buffer with the allocator's overhead, and the
    /// attribute map's B-tree nodes (11 slots each, about half full when filled one by one). The
    /// resource is shared by the spans of one export and is counted once per export.
    pub fn heap_bytes(&self) -> usize {
        const ALLOC: usize = 16;
        const SLOT: usize = 2 * std::mem::size_of::<String>();
        const NODE: usize = 11 * SLOT + 32 + ALLOC;
        let text = |s: &String| if s.is_empty() { 0 } else { s.len() + ALLOC };
        let n = self.attributes.len();
        // Plus 256 for the allocator's rounding and the page slack it keeps.
        2 * std::mem::size_of::<Self>()
            + 256
            + [
                &self.trace_id,
                &self.span_id,
                &self.parent_span_id,
                &self.name,
                &self.kind,
                &self.service,
                &self.cluster,
            ]
            .into_iter()
            .map(text)
            .sum::<usize>()
            + self.error.as_ref().map_or(0, text)
            + n.div_ceil(5) * NODE
            + self
                .attributes
                .iter()
                .map(|(k, v)| text(k) + text(v))
                .sum::<usize>()
            + self
                .links
                .iter()
                .map(|l| text(l) + std::mem::size_of::<String>())
                .sum::<usize>()
    }

    /// The memory of a resource shared by an export's spans, counted once per export.
    fn resource_bytes(resource: &BTreeMap<String, String>) -> usize {
        resource
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * std::mem::size_of::<String>() + 96)
            .sum::<usize>()
            + 64
    }

    /// The fedmesh proxy that recorded the span (`sidecar`, `gateway`), as its resource says;
    /// `None` for an app's own span.
    pub fn proxy(&self) -> Option<&str> {
        self.resource.get("fedmesh.proxy").map(String::as_str)
    }
}

/// One trace in a search result.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct TraceSummary {
    pub trace_id: String,
    /// The earliest span's service and name (`frontend: GET`).
    pub root: String,
    pub services: Vec<String>,
    pub clusters: Vec<String>,
    pub spans: usize,
    pub start_unix_nano: u64,
    pub duration_ns: u64,
    /// Whether any span failed.
    pub error: bool,
}

/// A search of the window; every field narrows it.
#[derive(Deserialize, utoipa::IntoParams, Default, Debug)]
#[into_params(parameter_in = Query)]
pub struct TraceQuery {
    /// Traces with a span of this service (`service.name`).
    pub service: Option<String>,
    /// Traces with a span from this cluster.
    pub cluster: Option<String>,
    /// `true`: traces with a failed span; `false`: traces without.
    pub error: Option<bool>,
    /// Traces lasting at least this long (at most a day).
    #[param(minimum = 0, maximum = 86400000)]
    pub min_duration_ms: Option<u64>,
    /// Traces that started at or after this time (Unix milliseconds).
    #[param(minimum = 0, maximum = 1000000000000000_u64)]
    pub since_unix_ms: Option<u64>,
    /// At most this many, newest first (default 20, 1 to 1,000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

impl TraceQuery {
    /// The answer to a query the schema does not allow, if it is one.
    pub fn refusal(&self) -> Option<axum::response::Response> {
        use crate::hub::api_json::out_of_range;
        if let Some(v) = self.min_duration_ms.filter(|v| *v > 86_400_000) {
            return Some(out_of_range("min_duration_ms", v, 0, 86_400_000));
        }
        if let Some(v) = self.since_unix_ms.filter(|v| *v > 1_000_000_000_000_000) {
            return Some(out_of_range("since_unix_ms", v, 0, 1_000_000_000_000_000));
        }
        if let Some(v) = self.limit.filter(|v| !(1..=1000).contains(v)) {
            return Some(out_of_range("limit", v, 1, 1000));
        }
        None
    }
}

/// What an export did: spans accepted and refused (with the first reason).
#[derive(Debug, Default, PartialEq)]
pub struct Accepted {
    pub accepted: usize,
    pub rejected: usize,
    pub error: Option<String>,
    /// Older spans dropped to make room (or aged out).
    pub dropped: usize,
    /// Spans the window holds now.
    pub held: usize,
    /// The memory they take ([`TraceWindow::bytes`]).
    pub held_bytes: usize,
}

struct Trace {
    spans: Vec<SpanView>,
    /// What its spans take ([`SpanView::heap_bytes`], and the resources they brought).
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    traces: HashMap<String, Trace>,
    /// Trace IDs in the order their first span arrived, with that time.
    order: VecDeque<(String, Instant)>,
    spans: usize,
    bytes: usize,
}

/// The hub's window of recent traces.
pub struct TraceWindow {
    limits: TraceLimits,
    inner: Mutex<Inner>,
    /// Spans dropped to keep the window within its limits (counted, never silent).
    dropped: AtomicU64,
}

impl TraceWindow {
    pub fn new(limits: TraceLimits) -> Self {
        Self {
            limits,
            inner: Mutex::default(),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spans in the window and spans dropped from it so far.
    pub fn sizes(&self) -> (usize, u64) {
        (self.lock().spans, self.dropped.load(Ordering::Relaxed))
    }

    /// The memory the window's spans take, as estimated against [`TraceLimits::max_bytes`].
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Takes an export from `cluster`: every valid span is kept, each invalid one refused (the
    /// first reason is returned, as OTLP's partial success reports it).
    pub fn insert(&self, cluster: &str, req: ExportTraceServiceRequest) -> Accepted {
        let mut out = Accepted::default();
        let refuse = |out: &mut Accepted, why: String| {
            out.rejected += 1;
            out.error.get_or_insert(why);
        };
        let mut views = Vec::new();
        for rs in req.resource_spans {
            let resource = Arc::new(
                rs.resource
                    .map(|r| flatten(r.attributes))
                    .unwrap_or_default(),
            );
            let service = resource.get("service.name").cloned().unwrap_or_default();
            // The first span kept from this resource carries its memory.
            let mut shared = SpanView::resource_bytes(&resource);
            for ss in rs.scope_spans {
                for span in ss.spans {
                    match view(span, &resource, &service, cluster) {
                        Ok(v) => {
                            let bytes = v.heap_bytes() + std::mem::take(&mut shared);
                            views.push((v, bytes));
                        }
                        Err(e) => refuse(&mut out, e),
                    }
                }
            }
        }
        let now = Instant::now();
        let mut inner = self.lock();
        out.dropped += self.expire(&mut inner, now);
        for (v, bytes) in views {
            let known = inner.traces.contains_key(&v.trace_id);
            // A new trace's bookkeeping: its map entry and ID (the map's slack included) and
            // its place in the age order.
            let mut bytes = bytes;
            if !known {
                inner.order.push_back((v.trace_id.clone(), now));
                bytes += TRACE_BYTES;
            }
            let trace = inner
                .traces
                .entry(v.trace_id.clone())
                .or_insert_with(|| Trace {
                    spans: Vec::new(),
                    bytes: 0,
                });
            if trace.spans.len() >= self.limits.max_spans_per_trace {
                let id = v.trace_id.clone();
                refuse(
                    &mut out,
                    format!(
                        "trace {id} already holds {} spans, the most one trace may",
                        self.limits.max_spans_per_trace
                    ),
                );
                continue;
            }
            trace.spans.push(v);
            trace.bytes += bytes;
            inner.spans += 1;
            inner.bytes += bytes;
            out.accepted += 1;
        }
        // Oldest traces out until the window fits.
        while inner.spans > self.limits.max_spans || inner.bytes > self.limits.max_bytes {
            match self.drop_oldest(&mut inner) {
                Some(n) => out.dropped += n,
                None => break,
            }
        }
        out.held = inner.spans;
        out.held_bytes = inner.bytes;
        out
    }

    /// Drops the oldest trace: how many spans it held (`None`: the window is empty).
    fn drop_oldest(&self, inner: &mut Inner) -> Option<usize> {
        let (id, _) = inner.order.pop_front()?;
        let (n, bytes) = inner
            .traces
            .remove(&id)
            .map_or((0, 0), |t| (t.spans.len(), t.bytes));
        inner.spans -= n;
        inner.bytes -= bytes;
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        Some(n)
    }

    /// Drops the traces older than the window keeps: how many spans went.
    fn expire(&self, inner: &mut Inner, now: Instant) -> usize {
        let mut n = 0;
        while inner
            .order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > self.limits.max_age)
        {
            n += self.drop_oldest(inner).unwrap_or(0);
        }
        n
    }

    /// Whether a trace is older than the window keeps (it goes at the next export).
    fn aged(&self, inner: &Inner, id: &str, now: Instant) -> bool {
        inner
            .order
            .iter()
            .take_while(|(_, at)| now.duration_since(*at) > self.limits.max_age)
            .any(|(i, _)| i == id)
    }

    /// The traces `q` asks for, newest first.
    pub fn search(&self, q: &TraceQuery) -> Vec<TraceSummary> {
        let limit = q.limit.unwrap_or(20).clamp(1, 1000);
        let inner = self.lock();
        let now = Instant::now();
        let mut found: Vec<TraceSummary> = inner
            .traces
            .iter()
            .filter(|(id, _)| !self.aged(&inner, id, now))
            .filter(|(_, t)| {
                q.service
                    .as_ref()
                    .is_none_or(|s| t.spans.iter().any(|v| &v.service == s))
                    && q.cluster
                        .as_ref()
                        .is_none_or(|c| t.spans.iter().any(|v| &v.cluster == c))
            })
            .map(|(id, t)| summary(id, &t.spans))
            .filter(|s| q.error.is_none_or(|e| s.error == e))
            .filter(|s| {
                q.min_duration_ms
                    .is_none_or(|m| s.duration_ns >= m.saturating_mul(1_000_000))
            })
            .filter(|s| {
                q.since_unix_ms
                    .is_none_or(|m| s.start_unix_nano >= m.saturating_mul(1_000_000))
            })
            .collect();
        found.sort_by_key(|s| std::cmp::Reverse(s.start_unix_nano));
        found.truncate(limit);
        found
    }

    /// The service graph of the client spans that started within `window` of now.
    pub fn graph(&self, window: Duration) -> graph::Graph {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let since = now.saturating_sub(window).as_nanos() as u64;
        let mut g = graph::GraphBuilder::new(since, window.as_secs());
        for t in self.lock().traces.values() {
            g.add_trace(&t.spans);
        }
        g.finish()
    }

    /// One trace's spans in start order, if the window holds it.
    pub fn get(&self, trace_id: &str) -> Option<Vec<SpanView>> {
        let inner = self.lock();
        if self.aged(&inner, trace_id, Instant::now()) {
            return None;
        }
        let mut spans = inner.traces.get(trace_id)?.spans.clone();
        // The spans this trace links to in other traces (a gateway's admission of a pooled
        // connection, opened by an earlier request) come along: they are its hops too.
        let linked: Vec<SpanView> = spans
            .iter()
            .flat_map(|s| &s.links)
            .filter_map(|l| l.split_once('-'))
            .filter(|(t, _)| *t != trace_id)
            .filter_map(|(t, id)| {
                inner
                    .traces
                    .get(t)?
                    .spans
                    .iter()
                    .find(|s| s.span_id == id)
                    .cloned()
            })
            .collect();
        for l in linked {
            if !spans.iter().any(|s| s.span_id == l.span_id) {
                spans.push(l);
            }
        }
        spans.sort_by_key(|s| s.start_unix_nano);
        Some(spans)
    }
}

/// When a trace's first span starts and its last one ends (Unix nanoseconds).
pub fn bounds(spans: &[SpanView]) -> (u64, u64) {
    let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.start_unix_nano + s.duration_ns)
        .max()
        .unwrap_or(start);
    (start, end)
}

fn summary(id: &str, spans: &[SpanView]) -> TraceSummary {
    let (start, end) = bounds(spans);
    let first = spans.iter().min_by_key(|s| s.start_unix_nano);
    let set = |f: fn(&SpanView) -> &String| -> Vec<String> {
        spans
            .iter()
            .map(f)
            .filter(|v| !v.is_empty())
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    TraceSummary {
        trace_id: id.to_string(),
        root: first
            .map(|s| format!("{}: {}", s.service, s.name))
            .unwrap_or_default(),
        services: set(|s| &s.service),
        clusters: set(|s| &s.cluster),
        spans: spans.len(),
        start_unix_nano: start,
        duration_ns: end - start,
        error: spans.iter().any(|s| s.error.is_some()),
    }
}

fn id_hex(bytes: &[u8], len: usize, what: &str, span: &str) -> Result<String, String> {
    if bytes.len() != len || bytes.iter().all(|b| *b == 0) {
        return Err(format!(
            "span {span:?}: {what} must be {len} bytes, not all zero (got {})",
            bytes.len()
        ));
    }
    Ok(hex::encode(bytes))
}

/// A span's trace, own and parent IDs in hex, or why the window refuses it.
fn ids(span: &Span) -> Result<(String, String, String), String> {
    let trace_id = id_hex(&span.trace_id, 16, "trace_id", &span.name)?;
    let span_id = id_hex(&span.span_id, 8, "span_id", &span.name)?;
    let parent_span_id = if span.parent_span_id.is_empty() {
        String::new()
    } else {
        id_hex(&span.parent_span_id, 8, "parent_span_id", &span.name)?
    };
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err(format!("span {:?}: it ends before it starts", span.name));
    }
    Ok((trace_id, span_id, parent_span_id))
}

fn view(
    span: Span,
    resource: &Arc<BTreeMap<String, String>>,
    service: &str,
    cluster: &str,
) -> Result<SpanView, String> {
    let (trace_id, span_id, parent_span_id) = ids(&span)?;
    let attributes = flatten(span.attributes);
    let failed = span
        .status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32);
    let error = match (attributes.get("error.type"), failed) {
        (Some(e), _) => Some(e.clone()),
        (None, true) => Some(
            span.status
                .as_ref()
                .map(|s| s.message.clone())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "error".into()),
        ),
        (None, false) => None,
    };
    let kind = match SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified) {
        SpanKind::Client => "client",
        SpanKind::Server => "server",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        _ => "internal",
    };
    Ok(SpanView {
        trace_id,
        span_id,
        parent_span_id,
        name: cut(span.name),
        kind: kind.into(),
        service: service.to_string(),
        cluster: cluster.to_string(),
        start_unix_nano: span.start_time_unix_nano,
        duration_ns: span.end_time_unix_nano - span.start_time_unix_nano,
        error,
        attributes,
        resource: resource.clone(),
        links: span
            .links
            .iter()
            .filter(|l| l.trace_id.len() == 16 && l.span_id.len() == 8)
            .map(|l| format!("{}-{}", hex::encode(&l.trace_id), hex::encode(&l.span_id)))
            .collect(),
    })
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn flatten(kvs: Vec<KeyValue>) -> BTreeMap<String, String> {
    kvs.into_iter()
        .take(MAX_ATTRIBUTES)
        .map(|kv| (cut(kv.key), cut(value(kv.value))))
        .collect()
}

fn value(v: Option<AnyValue>) -> String {
    match v.and_then(|v| v.value) {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s,
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex::encode(b),
        Some(any_value::Value::ArrayValue(a)) => a
            .values
            .into_iter()
            .map(|v| value(Some(v)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(any_value::Value::KvlistValue(l)) => flatten(l.values)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
        #[allow(unreachable_patterns)]
        Some(_) => String::new(),
    }
}

/// A span of one test trace, for the window's readers' unit tests.
#[cfg(test)]
pub(crate) fn test_span(id: &str, parent: &str, kind: &str, cluster: &str) -> SpanView {
    SpanView {
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        span_id: id.into(),
        parent_span_id: parent.into(),
        name: "GET".into(),
        kind: kind.into(),
        service: String::new(),
        cluster: cluster.into(),
        start_unix_nano: 0,
        duration_ns: 0,
        error: None,
        attributes: BTreeMap::new(),
        resource: Arc::default(),
        links: vec![],
    }
}

#[cfg(test)]
mod tests;
