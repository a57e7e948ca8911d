//! The gateway's spans of a connection ([`ConnectionSpan`]): from accept to admission, what it
//! was asked for (SNI), whether it was admitted and why not, the endpoint it goes to (exported
//! at once); then, as its child, from admission to close, the bytes it carried.
//!
//! The gateway cannot read the requests inside TLS. A fedmesh sidecar tells it, before the TLS
//! bytes, the connection's ID and the request that opened it ([`fedmesh_dataplane::hop`]): the
//! span takes the ID as its own and becomes that request's child, so it sits in the trace
//! between the calling and the called sidecar; later requests on the pooled connection name the
//! ID and link to the span. A connection without that header starts a trace of its own.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use fedmesh_dataplane::hop::HopHeader;
use fedmesh_dataplane::telemetry::{ConnectionSpan, Spans};
use fedmesh_dataplane::trace::HopSpan;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

/// The span of a connection accepted at `started`; `None` when tracing is off.
pub(crate) fn start(
    spans: &Spans,
    header: Option<&HopHeader>,
    peer: SocketAddr,
    started: (SystemTime, Instant),
) -> Option<ConnectionSpan> {
    let hop = || match header {
        Some(HopHeader {
            connection_id,
            trigger: Some(t),
        }) => HopSpan {
            trace_id: t.trace_id,
            span_id: *connection_id,
            parent_span_id: Some(t.span_id),
            sampled: t.sampled,
        },
        Some(HopHeader {
            connection_id,
            trigger: None,
        }) => HopSpan {
            span_id: *connection_id,
            ..HopSpan::root(|id| spans.sample_new(id))
        },
        None => HopSpan::root(|id| spans.sample_new(id)),
    };
    let mut span = ConnectionSpan::start(spans, hop, SpanKind::Server, "relay".into(), started)?;
    span.push(KeyValue::new("network.peer.address", peer.ip().to_string()));
    span.push(KeyValue::new("network.peer.port", i64::from(peer.port())));
    if let Some(h) = header {
        span.push(KeyValue::new("fedmesh.connection.id", h.id_hex()));
    }
    Some(span)
}

/// The connection was admitted to `service`: its span (`admit SERVICE`, with the connection's
/// ID) is exported now, and a child (`relay SERVICE`) records the rest of the connection —
/// bytes, how it ended — when it closes. Pooled connections live for hours; their hop must be
/// in the trace while the requests riding them are looked at.
pub(crate) fn admitted(
    span: &mut ConnectionSpan,
    sni: String,
    service: String,
    cluster: String,
    endpoint: String,
) {
    for kv in [
        KeyValue::new("fedmesh.admitted", true),
        KeyValue::new("tls.client.server_name", sni),
        KeyValue::new("fedmesh.service", service.clone()),
        KeyValue::new("fedmesh.destination.cluster", cluster),
        KeyValue::new("fedmesh.endpoint", endpoint),
    ] {
        span.push(kv);
    }
    span.checkpoint(format!("admit {service}"), format!("relay {service}"));
}

/// The connection was refused: the reason's label is the span's `error.type`.
pub(crate) fn refused(span: &mut ConnectionSpan, label: &str, reason: String) {
    span.push(KeyValue::new("fedmesh.admitted", false));
    span.push(KeyValue::new("fedmesh.refusal", reason));
    span.fail(label);
}
