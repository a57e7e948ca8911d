use super::*;
use opentelemetry_proto::tonic::common::v1::AnyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn span(trace: u8, id: u8, parent: Option<u8>, start: u64, attrs: Vec<KeyValue>) -> Span {
    Span {
        trace_id: vec![trace; 16],
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: "GET".into(),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 1_000_000,
        attributes: attrs,
        ..Default::default()
    }
}

fn export(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", service),
                    kv("fedmesh.cluster", "claimed"),
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
}

#[test]
fn spans_are_kept_by_trace_stamped_with_the_sending_cluster_and_searchable() {
    let w = TraceWindow::new(TraceLimits::default());
    let got = w.insert(
        "east",
        export(
            "frontend",
            vec![span(
                1,
                1,
                None,
                100,
                vec![kv("http.request.method", "GET")],
            )],
        ),
    );
    assert_eq!((got.accepted, got.rejected), (1, 0));
    let mut failed = span(
        1,
        2,
        Some(1),
        200,
        vec![kv("error.type", "app-unreachable")],
    );
    failed.kind = SpanKind::Server as i32;
    w.insert("west", export("api", vec![failed]));
    let trace = hex::encode([1u8; 16]);
    let spans = w.get(&trace).unwrap();
    assert_eq!(spans.len(), 2);
    assert_eq!(
        spans[0].cluster, "east",
        "the sender's cluster, not the claimed one"
    );
    assert_eq!(spans[0].resource["fedmesh.cluster"], "claimed");
    assert_eq!(spans[1].parent_span_id, spans[0].span_id);
    assert_eq!(spans[1].kind, "server");
    assert_eq!(spans[1].error.as_deref(), Some("app-unreachable"));
    let all = w.search(&TraceQuery::default());
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].clusters, ["east", "west"]);
    assert_eq!(all[0].services, ["api", "frontend"]);
    assert_eq!(all[0].root, "frontend: GET");
    assert!(all[0].error);
    let q = |service: &str, error: Option<bool>| TraceQuery {
        service: Some(service.into()),
        error,
        ..Default::default()
    };
    assert_eq!(w.search(&q("api", Some(true))).len(), 1);
    assert_eq!(w.search(&q("api", Some(false))).len(), 0);
    assert_eq!(w.search(&q("nobody", None)).len(), 0);
    assert!(w.get(&hex::encode([9u8; 16])).is_none());
}

#[test]
fn invalid_spans_are_refused_one_by_one_with_the_reason() {
    let w = TraceWindow::new(TraceLimits::default());
    let mut short = span(1, 1, None, 0, vec![]);
    short.trace_id = vec![1, 2, 3];
    let mut zero = span(2, 1, None, 0, vec![]);
    zero.span_id = vec![0; 8];
    let mut backwards = span(3, 1, None, 10, vec![]);
    backwards.end_time_unix_nano = 5;
    let mut status_only = span(4, 1, None, 0, vec![]);
    status_only.status = Some(Status {
        message: "deadline".into(),
        code: StatusCode::Error as i32,
    });
    let got = w.insert(
        "east",
        export("x", vec![short, zero, backwards, status_only]),
    );
    assert_eq!((got.accepted, got.rejected), (1, 3));
    let e = got.error.unwrap();
    assert!(
        e.contains("trace_id must be 16 bytes") && e.contains("got 3"),
        "{e}"
    );
    let kept = w.get(&hex::encode([4u8; 16])).unwrap();
    assert_eq!(kept[0].error.as_deref(), Some("deadline"));
}

#[test]
fn the_window_stays_within_its_limits_dropping_the_oldest_traces_and_counting_them() {
    let w = TraceWindow::new(TraceLimits {
        max_spans: 10,
        max_spans_per_trace: 4,
        ..TraceLimits::default()
    });
    for t in 1..=8u8 {
        w.insert(
            "east",
            export("x", vec![span(t, 1, None, u64::from(t), vec![])]),
        );
    }
    assert_eq!(w.sizes(), (8, 0));
    let got = w.insert(
        "east",
        export(
            "x",
            (1..=6).map(|i| span(100, i, None, 1000, vec![])).collect(),
        ),
    );
    // One trace may hold 4; the window 10: the two oldest traces went.
    assert_eq!((got.accepted, got.rejected, got.dropped), (4, 2, 2));
    assert!(got.error.unwrap().contains("the most one trace may"));
    assert_eq!(w.sizes(), (10, 2));
    assert!(w.get(&hex::encode([1u8; 16])).is_none());
    assert!(w.get(&hex::encode([3u8; 16])).is_some());

    let aged = TraceWindow::new(TraceLimits {
        max_age: Duration::ZERO,
        ..TraceLimits::default()
    });
    aged.insert("east", export("x", vec![span(1, 1, None, 0, vec![])]));
    std::thread::sleep(Duration::from_millis(2));
    assert!(aged.get(&hex::encode([1u8; 16])).is_none(), "aged out");
    assert!(aged.search(&TraceQuery::default()).is_empty());
    let got = aged.insert("east", export("x", vec![span(2, 1, None, 0, vec![])]));
    assert_eq!(got.dropped, 1, "the aged trace is dropped and counted");
}

#[test]
fn large_spans_are_bounded_by_the_windows_memory_not_only_its_span_count() {
    let limits = TraceLimits {
        max_spans: 1_000,
        max_bytes: 256 << 10,
        ..TraceLimits::default()
    };
    let w = TraceWindow::new(limits);
    // Each span carries ~20 KiB of attributes: 1,000 of them would take 20 MiB.
    let big = || {
        (0..10)
            .map(|i| kv(&format!("blob.{i}"), &"x".repeat(2_000)))
            .collect::<Vec<_>>()
    };
    for t in 1..=100u8 {
        w.insert(
            "east",
            export("frontend", vec![span(t, 1, None, 100, big())]),
        );
    }
    let (held, dropped) = w.sizes();
    assert!(w.bytes() <= 256 << 10, "{} bytes held", w.bytes());
    assert!(held < 20 && held > 5, "{held} spans held");
    assert_eq!(
        held as u64 + dropped,
        100,
        "every span kept or counted as dropped"
    );
    assert!(
        w.get(&hex::encode([100u8; 16])).is_some(),
        "the newest stays"
    );
    assert!(w.get(&hex::encode([1u8; 16])).is_none(), "the oldest went");
    // The estimate is on the high side of what the strings alone take.
    let one = &w.get(&hex::encode([100u8; 16])).unwrap()[0];
    assert!(one.heap_bytes() > 20_000, "{}", one.heap_bytes());
}
