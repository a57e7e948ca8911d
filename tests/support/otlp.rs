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
