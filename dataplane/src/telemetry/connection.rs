//! A connection's span, from accept (or connect) to close: for the hops that see bytes, not
//! requests — the gateway, and a sidecar's opaque TCP. Kept when sampled or failed, never for
//! its length alone ([`Keep::Connection`]).

use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use super::{Keep, SpanRecord, Spans};
use crate::relay::Moved;
use crate::trace::HopSpan;

pub struct ConnectionSpan {
    spans: Spans,
    hop: HopSpan,
    kind: SpanKind,
    wall: SystemTime,
    start: Instant,
    name: String,
    attributes: Vec<KeyValue>,
    error: Option<String>,
}

impl ConnectionSpan {
    /// A span that started at `(wall, start)`; `None` when tracing is off (and `hop` is not
    /// called).
    pub fn start(
        spans: &Spans,
        hop: impl FnOnce() -> HopSpan,
        kind: SpanKind,
        name: String,
        (wall, start): (SystemTime, Instant),
    ) -> Option<Self> {
        if !spans.enabled() {
            return None;
        }
        Some(Self {
            spans: spans.clone(),
            hop: hop(),
            kind,
            wall,
            start,
            name,
            attributes: vec![KeyValue::new("network.transport", "tcp")],
            error: None,
        })
    }

    pub fn hop(&self) -> HopSpan {
        self.hop
    }

    pub fn set_name(&mut self, name: String) {
        self.name = name;
    }

    pub fn push(&mut self, kv: KeyValue) {
        self.attributes.push(kv);
    }

    /// Why the connection failed (`error.type`).
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.error = Some(reason.into());
    }

    /// The bytes the relay moved: `received` from the side that opened the connection.
    pub fn moved(&mut self, m: &Moved, received_before: u64) {
        self.attributes.extend([
            KeyValue::new(
                "fedmesh.bytes.received",
                (m.a_to_b + received_before) as i64,
            ),
            KeyValue::new("fedmesh.bytes.sent", m.b_to_a as i64),
        ]);
        if m.idle_timeout {
            self.attributes
                .push(KeyValue::new("fedmesh.closed", "idle_timeout"));
        }
    }

    /// Exports what the span holds so far as a span of its own, named `done`, and goes on as
    /// its child named `next`, from now. The first span keeps the span ID others name and link
    /// to (a gateway's connection ID), so a long-lived connection's admission is in its trace
    /// at once, not only when the connection closes, and is kept whatever the sampling
    /// ([`Keep::Always`]); the child then records how it ended.
    pub fn checkpoint(&mut self, done: String, next: String) {
        let child = HopSpan::child_of(self.hop.context());
        self.spans.finish(SpanRecord {
            hop: self.hop,
            name: done,
            kind: self.kind.clone(),
            start: self.wall,
            duration: self.start.elapsed(),
            attributes: self.attributes.clone(),
            error: self.error.clone(),
            links: Vec::new(),
            keep: Keep::Always,
        });
        self.hop = child;
        self.name = next;
        self.kind = SpanKind::Internal;
        self.wall = SystemTime::now();
        self.start = Instant::now();
    }

    /// Ends the span of a connection that failed before it carried anything.
    pub fn finish_failed(mut self, reason: impl Into<String>) {
        self.fail(reason);
        self.finish();
    }

    pub fn finish(self) {
        self.spans.finish(SpanRecord {
            hop: self.hop,
            name: self.name,
            kind: self.kind,
            start: self.wall,
            duration: self.start.elapsed(),
            attributes: self.attributes,
            error: self.error,
            links: Vec::new(),
            keep: Keep::Connection,
        });
    }
}
