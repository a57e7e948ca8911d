//! A real OpenTelemetry collector for the trace tests: rotel (a Rust OTLP collector, from PyPI;
//! `scripts/test` installs it and sets `FEDMESH_ROTEL`), logging every span it receives, and a
//! reader of that log.

use std::collections::BTreeMap;

/// The rotel binary: `$FEDMESH_ROTEL`, or a clear failure saying how to get it.
pub fn rotel_bin() -> String {
    match std::env::var("FEDMESH_ROTEL") {
        Ok(p) if std::path::Path::new(&p).is_file() => p,
        _ => panic!(
            "the trace tests need a real OTLP collector: run them with scripts/test, which \
             installs rotel from PyPI and sets FEDMESH_ROTEL to its rotel-agent binary"
        ),
    }
}

/// The arguments that start rotel with an OTLP/gRPC receiver on `grpc`, logging each span in
/// detail and exporting nowhere else.
pub fn rotel_args(grpc: &str) -> Vec<String> {
    [
        "start",
        "--otlp-grpc-endpoint",
        grpc,
        "--otlp-http-endpoint",
        "127.0.0.1:0",
        "--exporter",
        "blackhole",
        "--debug-log",
        "traces",
        "--debug-log-verbosity",
        "detailed",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One span as the collector received it.
#[derive(Clone, Debug, Default)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: String,
    pub name: String,
    pub kind: String,
    pub attributes: BTreeMap<String, String>,
    pub resource: BTreeMap<String, String>,
}

impl Span {
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attributes.get(k).map(String::as_str)
    }
    pub fn res(&self, k: &str) -> Option<&str> {
        self.resource.get(k).map(String::as_str)
    }
}

/// Reads rotel's detailed debug log: resource blocks, then their spans with their fields and
/// attributes (values without their type: `Str(x)` is `x`, `Int(3)` is `3`).
pub fn parse(log: &str) -> Vec<Span> {
    enum Into {
        Resource,
        Span,
        Nothing,
    }
    let mut spans: Vec<Span> = Vec::new();
    let mut resource = BTreeMap::new();
    let mut into = Into::Nothing;
    for line in log.lines() {
        let t = line.trim();
        if t.starts_with("ResourceSpans #") {
            resource = BTreeMap::new();
            into = Into::Nothing;
        } else if t == "Resource attributes:" {
            into = Into::Resource;
        } else if t.starts_with("Span #") {
            spans.push(Span {
                resource: resource.clone(),
                ..Span::default()
            });
            into = Into::Nothing;
        } else if t == "Attributes:" && !spans.is_empty() {
            into = Into::Span;
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            let v = match v.split_once('(') {
                Some((_, rest)) => rest.strip_suffix(')').unwrap_or(rest),
                None => v,
            };
            match into {
                Into::Resource => {
                    resource.insert(k.to_string(), v.to_string());
                }
                Into::Span => {
                    if let Some(s) = spans.last_mut() {
                        s.attributes.insert(k.to_string(), v.to_string());
                    }
                }
                Into::Nothing => {}
            }
        } else if let Some((k, v)) = t.split_once(':') {
            let Some(s) = spans.last_mut() else { continue };
            let v = v.trim().to_string();
            match k.trim() {
                "Trace ID" => s.trace_id = v,
                "ID" => s.span_id = v,
                "Parent ID" => s.parent_id = v,
                "Name" => s.name = v,
                "Kind" => s.kind = v,
                _ => into = Into::Nothing,
            }
        } else if !t.is_empty() {
            into = Into::Nothing;
        }
    }
    spans
}

/// Exports one span as an app would, with the OpenTelemetry SDK's OTLP/gRPC exporter, to
/// `endpoint` (a sidecar's `--app-otlp` port): a root span `span_id` of trace `trace_id`, from
/// service `service`, that started `ago` before now and lasted `ago`.
pub fn export_app_span(
    endpoint: &str,
    trace_id: &str,
    span_id: &str,
    service: &str,
    ago: std::time::Duration,
) -> Result<(), String> {
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| e.to_string())?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(service.to_string())
                .build(),
        );
        let now = std::time::SystemTime::now();
        let span = SpanData {
            span_context: SpanContext::new(
                TraceId::from_hex(trace_id).map_err(|e| e.to_string())?,
                SpanId::from_hex(span_id).map_err(|e| e.to_string())?,
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "checkout".into(),
            start_time: now - ago,
            end_time: now,
            attributes: vec![opentelemetry::KeyValue::new("app.step", "checkout")],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: opentelemetry::InstrumentationScope::builder("app").build(),
        };
        exporter
            .export(vec![span])
            .await
            .map_err(|e| format!("the app's export failed: {e}"))
    })
}
