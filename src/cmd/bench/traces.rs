//! The hub's span intake on one core: OTLP exports shaped like a sidecar's (protobuf-encoded
//! batches of CLIENT/SERVER/gateway spans with the attributes our proxies record) decoded and
//! taken into the trace window, in spans per second, against decoding alone — the baseline, what
//! any OTLP receiver pays before it keeps anything — measured alternately in the same run. Then
//! the window's memory: anonymous RSS once it is full (its span count or its memory bound,
//! whichever comes first), against the bound and against the window's own estimate, and again
//! after twice as many more spans went through it (the oldest traces dropped), which must not grow.
//!
//! In process, on one thread: the figure is the hub's own work per span, without the gRPC and
//! TLS layers every OTLP receiver shares.

use std::time::{Duration, Instant};

use fedmesh_federation::hub::traces::{TraceLimits, TraceWindow};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind};
use prost::Message;

pub struct Params {
    /// Spans the window holds (the hub's default is 100,000).
    pub window: usize,
    /// Memory the window may take (the hub's default is 128 MiB).
    pub window_bytes: usize,
    /// Spans per export.
    pub batch: usize,
    /// Length of each measurement.
    pub duration: Duration,
    pub rounds: usize,
}

/// The intake goal: spans per second on one core.
const GOAL_SPANS_PER_SECOND: f64 = 50_000.0;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn int(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

/// One export of `batch` spans: traces of a client span, its gateway admission and the server
/// span, with the attributes a sidecar records.
fn export(seed: u64, batch: usize) -> Vec<u8> {
    let mut spans = Vec::with_capacity(batch);
    for i in 0..batch as u64 {
        let trace = (seed << 32) | (i / 3);
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&trace.to_be_bytes());
        trace_id[15] = 1;
        let span_id = (seed << 32 | i | 1 << 63).to_be_bytes().to_vec();
        let (kind, name) = match i % 3 {
            0 => (SpanKind::Client, "GET"),
            1 => (SpanKind::Server, "admit shop/reviews"),
            _ => (SpanKind::Server, "GET"),
        };
        let start = 1_764_000_000_000_000_000 + i * 1_000_000;
        spans.push(Span {
            trace_id: trace_id.to_vec(),
            span_id,
            parent_span_id: if i % 3 == 0 {
                Vec::new()
            } else {
                (seed << 32 | (i - i % 3) | 1 << 63).to_be_bytes().to_vec()
            },
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + 850_000,
            attributes: vec![
                kv("http.request.method", "GET"),
                kv("url.path", "/reviews/42"),
                kv("network.protocol.version", "1.1"),
                kv("server.address", "reviews.shop.svc.clusterset.local"),
                int("http.response.status_code", 200),
                kv("fedmesh.source.cluster", "east"),
                kv("fedmesh.destination.cluster", "west"),
                kv(
                    "fedmesh.caller",
                    "spiffe://east.fedmesh.test/ns/shop/sa/frontend",
                ),
                kv("fedmesh.route", "HTTPRoute shop/reviews rule-0"),
                kv("fedmesh.backend", "shop/reviews in west"),
                kv("fedmesh.locality", "other-region"),
                int("fedmesh.attempts", 1),
                kv("fedmesh.gateway", "10.250.0.12:15443"),
                kv("fedmesh.connection.id", "f699a7ed036541c1"),
                kv("fedmesh.sampling.adjusted_count", "100"),
            ],
            ..Default::default()
        });
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", "frontend"),
                    kv("service.namespace", "shop"),
                    kv("k8s.namespace.name", "shop"),
                    kv("fedmesh.proxy", "sidecar"),
                    kv("fedmesh.trust_domain", "east.fedmesh.test"),
                    kv(
                        "fedmesh.spiffe_id",
                        "spiffe://east.fedmesh.test/ns/shop/sa/frontend",
                    ),
                    kv("service.instance.id", "frontend-7d9f8-abcde"),
                    kv("fedmesh.cluster", "east"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// Decodes one export and gives its traces IDs no earlier export used (`n` counts exports), so
/// every export brings new traces, as live traffic does.
fn decode(bytes: &[u8], n: u64) -> anyhow::Result<ExportTraceServiceRequest> {
    let mut req = ExportTraceServiceRequest::decode(bytes)?;
    for rs in &mut req.resource_spans {
        for ss in &mut rs.scope_spans {
            for s in &mut ss.spans {
                s.trace_id[8..16].copy_from_slice(&(n << 8 | 1).to_be_bytes());
            }
        }
    }
    Ok(req)
}

/// Spans per second through `f` (one export per call) for `duration`.
fn spans_per_second(
    p: &Params,
    exports: &[Vec<u8>],
    mut f: impl FnMut(ExportTraceServiceRequest),
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < p.duration {
        let req = decode(&exports[n as usize % exports.len()], n)?;
        f(req);
        n += 1;
    }
    Ok((n as usize * p.batch) as f64 / start.elapsed().as_secs_f64())
}

fn rss_anon_kib() -> u64 {
    super::status_kib(std::process::id(), &["RssAnon:"])[0]
}

pub fn run(p: Params) -> anyhow::Result<()> {
    let exports: Vec<Vec<u8>> = (1..=16).map(|s| export(s, p.batch)).collect();
    println!(
        "hub span intake, one thread: exports of {} spans ({} bytes of OTLP each), window of {} spans or {} MiB",
        p.batch,
        exports[0].len(),
        p.window,
        p.window_bytes >> 20
    );
    let limits = TraceLimits {
        max_spans: p.window,
        max_bytes: p.window_bytes,
        ..TraceLimits::default()
    };
    // Memory first, before the rounds leave freed memory in the allocator that a fill would
    // reuse unseen: fill the window, then push twice as many more through it.
    let before = rss_anon_kib();
    let window = TraceWindow::new(limits.clone());
    let mut n = 1u64 << 40;
    let mut fill = |spans: usize| -> anyhow::Result<()> {
        let mut sent = 0;
        while sent < spans {
            let req = decode(&exports[n as usize % exports.len()], n)?;
            window.insert("east", req);
            sent += p.batch;
            n += 1;
        }
        Ok(())
    };
    fill(p.window)?;
    let full = rss_anon_kib().saturating_sub(before);
    let estimated = window.bytes();
    fill(2 * p.window)?;
    let after = rss_anon_kib().saturating_sub(before);
    let (held, dropped) = window.sizes();
    println!(
        "  memory: {:.1} MiB anonymous RSS with the window full ({held} spans, {:.0} bytes per span); \
         {:.1} MiB after {} more spans went through it ({dropped} dropped, oldest first)",
        full as f64 / 1024.0,
        full as f64 * 1024.0 / held.max(1) as f64,
        after as f64 / 1024.0,
        2 * p.window
    );
    println!(
        "  the window's own estimate: {:.1} MiB = {:.2}× the RSS it measures (≥ 1: on the high side)",
        estimated as f64 / f64::from(1 << 20),
        estimated as f64 / (full as f64 * 1024.0).max(1.0)
    );
    let mut decoded = Vec::new();
    let mut kept = Vec::new();
    for round in 0..p.rounds {
        let d = spans_per_second(&p, &exports, |req| drop(std::hint::black_box(req)))?;
        let window = TraceWindow::new(limits.clone());
        let k = spans_per_second(&p, &exports, |req| {
            std::hint::black_box(window.insert("east", req));
        })?;
        println!(
            "  round {}: decode only {:.0} spans/s, decode + window {:.0} spans/s",
            round + 1,
            d,
            k
        );
        decoded.push(d);
        kept.push(k);
    }
    let (d, k) = (super::median(decoded), super::median(kept));
    println!(
        "  median: {k:.0} spans/s into the window = {:.2}× decoding alone ({d:.0} spans/s)",
        k / d
    );

    let bounded = after as f64 <= full as f64 * 1.10 + 1024.0;
    let within = (full.max(after) as usize) << 10 <= p.window_bytes;
    println!("\ngoals:");
    println!(
        "  ≥ {GOAL_SPANS_PER_SECOND:.0} spans/s on one core: {} ({k:.0})",
        if k >= GOAL_SPANS_PER_SECOND {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  memory within the window's bound (no growth once full, ≤ 10%): {} ({:.1} → {:.1} MiB)",
        if bounded { "met" } else { "NOT met" },
        full as f64 / 1024.0,
        after as f64 / 1024.0
    );
    println!(
        "  memory within the configured bound ({} MiB): {} ({:.2}× of it)",
        p.window_bytes >> 20,
        if within { "met" } else { "NOT met" },
        (full.max(after) as f64 * 1024.0) / p.window_bytes as f64
    );
    Ok(())
}
