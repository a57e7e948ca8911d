use super::*;
use crate::trace::HopSpan;

fn spans(ratio: f64, queue: usize) -> (Spans, mpsc::Receiver<SpanData>, Arc<ProxyMetrics>) {
    let (tx, rx) = mpsc::channel(queue);
    let metrics = Arc::new(ProxyMetrics::new("test"));
    let s = Spans(Some(Arc::new(Inner {
        queue: tx,
        root: Sampler::TraceIdRatioBased(ratio),
        ratio,
        slow: Duration::from_millis(500),
        scope: InstrumentationScope::builder("fedmesh").build(),
        metrics: metrics.clone(),
    })));
    (s, rx, metrics)
}

fn record(sampled: bool, error: Option<&str>, millis: u64) -> SpanRecord {
    SpanRecord {
        hop: HopSpan {
            trace_id: [7; 16],
            span_id: [2; 8],
            parent_span_id: Some([1; 8]),
            sampled,
        },
        name: "GET".into(),
        kind: SpanKind::Client,
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
        duration: Duration::from_millis(millis),
        attributes: vec![KeyValue::new("url.path", "/")],
        error: error.map(str::to_string),
        links: vec![([9; 16], [8; 8])],
        keep: Keep::Request,
    }
}

#[test]
fn sampled_failed_and_slow_spans_are_kept_others_not() {
    let (s, mut rx, _) = spans(0.0, 16);
    s.finish(record(true, None, 5));
    s.finish(record(false, None, 5));
    s.finish(record(false, Some("no-endpoints"), 5));
    s.finish(record(false, None, 600));
    // A connection that lived long was not slow: unsampled, it is not kept.
    s.finish(SpanRecord {
        keep: Keep::Connection,
        ..record(false, None, 60_000)
    });
    let mut kept = Vec::new();
    while let Ok(d) = rx.try_recv() {
        kept.push(d);
    }
    assert_eq!(kept.len(), 3);
    let first = &kept[0];
    assert_eq!(first.span_context.trace_id(), TraceId::from_bytes([7; 16]));
    assert_eq!(first.span_context.span_id(), SpanId::from_bytes([2; 8]));
    assert_eq!(first.parent_span_id, SpanId::from_bytes([1; 8]));
    assert!(first.parent_span_is_remote);
    assert_eq!(first.end_time - Duration::from_millis(5), first.start_time);
    assert_eq!(first.links.len(), 1);
    assert_eq!(first.status, Status::Unset);
    let failed = &kept[1];
    assert_eq!(failed.status, Status::error("no-endpoints"));
    assert!(
        failed
            .attributes
            .contains(&KeyValue::new("error.type", "no-endpoints"))
    );
}

#[test]
fn a_kept_span_says_how_many_hops_it_stands_for() {
    let count = |d: &SpanData| {
        d.attributes
            .iter()
            .find(|kv| kv.key.as_str() == ADJUSTED_COUNT)
            .map(|kv| kv.value.to_string())
    };
    let (s, mut rx, _) = spans(0.25, 16);
    // Sampled at 25%: one of four; failed or slow: every one is kept, so itself only.
    s.finish(record(true, None, 5));
    s.finish(record(true, Some("no-endpoints"), 5));
    s.finish(record(false, None, 600));
    let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|d| count(&d))
        .collect();
    assert_eq!(
        got,
        [Some("4".to_string()), Some("1".into()), Some("1".into())]
    );
    // At ratio 0 a sampled span was the caller's decision, at a ratio unknown here.
    let (s, mut rx, _) = spans(0.0, 16);
    s.finish(record(true, None, 5));
    assert_eq!(rx.try_recv().map(|d| count(&d)).ok(), Some(None));
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let (s, _rx, metrics) = spans(1.0, 2);
    for _ in 0..5 {
        s.finish(record(true, None, 1));
    }
    assert!(
        metrics
            .encode()
            .contains("spans_total{reason=\"dropped\"} 3"),
        "{}",
        metrics.encode()
    );
}

#[test]
fn new_traces_are_sampled_by_ratio_and_always_when_tracing_is_off() {
    assert!(Spans::off().sample_new([1; 16]));
    let (none, _, _) = spans(0.0, 1);
    let (all, _, _) = spans(1.0, 1);
    let (some, _, _) = spans(0.25, 1);
    let mut kept = 0;
    for i in 0..4000u32 {
        let mut id = [0u8; 16];
        id[8..12].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
        id[12..].copy_from_slice(&i.to_be_bytes());
        assert!(!none.sample_new(id));
        assert!(all.sample_new(id));
        kept += u32::from(some.sample_new(id));
    }
    // 25% of 4,000 is 1,000; 4σ is ±110.
    assert!((890..=1110).contains(&kept), "{kept}");
}

#[test]
fn the_standard_sampler_variables_are_read_and_bad_values_named() {
    let r = |s, a| SamplerArg::from_env_values(s, a);
    assert_eq!(r(None, None), Ok(None));
    assert_eq!(r(Some("always_off"), None), Ok(Some(SamplerArg(0.0))));
    assert_eq!(
        r(Some("parentbased_always_on"), None),
        Ok(Some(SamplerArg(1.0)))
    );
    assert_eq!(
        r(Some("parentbased_traceidratio"), Some("0.1")),
        Ok(Some(SamplerArg(0.1)))
    );
    let e = r(Some("traceidratio"), Some("2")).unwrap_err();
    assert!(
        e.contains("OTEL_TRACES_SAMPLER_ARG") && e.contains("between 0 and 1"),
        "{e}"
    );
    let e = r(Some("jaeger_remote"), None).unwrap_err();
    assert!(
        e.contains("jaeger_remote") && e.contains("traceidratio"),
        "{e}"
    );
    assert!(
        "http/json"
            .parse::<OtlpProtocol>()
            .unwrap_err()
            .contains("grpc or http/protobuf")
    );
}

#[test]
fn grpc_requests_are_named_by_service_and_method() {
    let uri: http::Uri = "/shop.Cart/Add".parse().unwrap();
    let (name, a) = grpc_call(true, &uri).unwrap();
    assert_eq!(name, "shop.Cart/Add");
    assert!(a.contains(&KeyValue::new("rpc.service", "shop.Cart")));
    assert!(a.contains(&KeyValue::new("rpc.method", "Add")));
    assert!(grpc_call(false, &uri).is_none());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "14".parse().unwrap());
    assert_eq!(grpc_status(&trailers), Some(14));
}

#[test]
fn error_type_follows_the_conventions_for_each_side() {
    use http::StatusCode as S;
    let (c, s) = (&SpanKind::Client, &SpanKind::Server);
    assert_eq!(
        error_type(c, S::BAD_GATEWAY, None, None).as_deref(),
        Some("502")
    );
    assert_eq!(
        error_type(c, S::NOT_FOUND, None, None).as_deref(),
        Some("404")
    );
    assert_eq!(error_type(s, S::NOT_FOUND, None, None), None);
    assert_eq!(error_type(s, S::OK, None, None), None);
    assert_eq!(
        error_type(s, S::SERVICE_UNAVAILABLE, None, Some("no-endpoints")).as_deref(),
        Some("no-endpoints")
    );
    // gRPC answers 200 and says how it went in grpc-status.
    assert_eq!(error_type(c, S::OK, Some(5), None).as_deref(), Some("5"));
    assert_eq!(error_type(s, S::OK, Some(5), None), None);
    assert_eq!(error_type(s, S::OK, Some(14), None).as_deref(), Some("14"));
    assert_eq!(error_type(c, S::OK, Some(0), None), None);
}
