//! The gateway's span of a connection: from accept to close, what it was asked for (SNI),
//! whether it was admitted and why not, the endpoint it went to and the bytes it carried.
//!
//! The gateway cannot read the requests inside TLS. A fedmesh sidecar tells it, before the TLS
//! bytes, the connection's ID and the request that opened it ([`fedmesh_dataplane::hop`]): the
//! span takes the ID as its own and becomes that request's child, so it sits in the trace
//! between the calling and the called sidecar; later requests on the pooled connection name the
//! ID and link to the span. A connection without that header starts a trace of its own.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use fedmesh_dataplane::hop::HopHeader;
use fedmesh_dataplane::telemetry::{SpanRecord, Spans};
use fedmesh_dataplane::trace::HopSpan;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

pub(crate) struct ConnSpan {
    spans: Spans,
    hop: HopSpan,
    wall: SystemTime,
    start: Instant,
    name: String,
    attributes: Vec<KeyValue>,
    error: Option<String>,
}

impl ConnSpan {
    /// `None` when tracing is off.
    pub fn start(
        spans: &Spans,
        header: Option<&HopHeader>,
        peer: SocketAddr,
        wall: SystemTime,
        start: Instant,
    ) -> Option<Self> {
        if !spans.enabled() {
            return None;
        }
        let hop = match header {
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
        let mut attributes = vec![
            KeyValue::new("network.peer.address", peer.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(peer.port())),
            KeyValue::new("network.transport", "tcp"),
        ];
        if header.is_some() {
            attributes.push(KeyValue::new("fedmesh.connection.id", hop.span_id_hex()));
        }
        Some(Self {
            spans: spans.clone(),
            hop,
            wall,
            start,
            name: "relay".into(),
            attributes,
            error: None,
        })
    }

    pub fn push(&mut self, kv: KeyValue) {
        self.attributes.push(kv);
    }

    /// The connection was admitted to `service` (named as the span is).
    pub fn admitted(&mut self, sni: String, service: String, cluster: String, endpoint: String) {
        self.name = format!("relay {service}");
        self.attributes.extend([
            KeyValue::new("fedmesh.admitted", true),
            KeyValue::new("tls.client.server_name", sni),
            KeyValue::new("fedmesh.service", service),
            KeyValue::new("fedmesh.destination.cluster", cluster),
            KeyValue::new("fedmesh.endpoint", endpoint),
        ]);
    }

    /// The connection was refused: the reason's label is the span's `error.type`.
    pub fn refused(&mut self, label: &str, reason: String) {
        self.attributes.extend([
            KeyValue::new("fedmesh.admitted", false),
            KeyValue::new("fedmesh.refusal", reason),
        ]);
        self.error = Some(label.to_string());
    }

    pub fn failed(&mut self, reason: String) {
        self.error = Some(reason);
    }

    pub fn finish(self) {
        self.spans.finish(SpanRecord {
            hop: self.hop,
            name: self.name,
            kind: SpanKind::Server,
            start: self.wall,
            duration: self.start.elapsed(),
            attributes: self.attributes,
            error: self.error,
            links: Vec::new(),
            connection: true,
        });
    }
}
