//! A request's span, from the moment a proxy has the request to the end of the response body
//! (a streaming answer's span lasts as long as the stream; a gRPC status in the trailers is
//! read there).

use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use super::{SpanRecord, Spans, error_type, grpc_call, grpc_status, request_attributes};
use crate::http::{Body, PROXY_ERROR, on_end};
use crate::trace::HopSpan;

/// A request's span in the making. `None` from [`RequestSpan::start`] when tracing is off, so a
/// proxy without a collector does no work for spans.
pub struct RequestSpan {
    spans: Spans,
    hop: HopSpan,
    kind: SpanKind,
    wall: SystemTime,
    start: Instant,
    name: String,
    grpc: bool,
    attributes: Vec<KeyValue>,
    links: Vec<([u8; 16], [u8; 8])>,
}

impl RequestSpan {
    pub fn start<B>(
        spans: &Spans,
        hop: HopSpan,
        kind: SpanKind,
        req: &http::Request<B>,
    ) -> Option<Self> {
        if !spans.enabled() {
            return None;
        }
        let mut attributes = request_attributes(req.method(), req.uri(), req.version());
        let (name, grpc) = match grpc_call(req.headers(), req.uri()) {
            Some((name, a)) => {
                attributes.extend(a);
                (name, true)
            }
            None => (req.method().to_string(), false),
        };
        Some(Self {
            spans: spans.clone(),
            hop,
            kind,
            wall: SystemTime::now(),
            start: Instant::now(),
            name,
            grpc,
            attributes,
            links: Vec::new(),
        })
    }

    pub fn push(&mut self, kv: KeyValue) {
        self.attributes.push(kv);
    }

    /// Ties the span to another (`trace ID`, `span ID`) it is not a child of.
    pub fn link(&mut self, to: ([u8; 16], [u8; 8])) {
        self.links.push(to);
    }

    /// Ends the span with the response: now for its status, at the body's end for its timing
    /// and a gRPC status in the trailers.
    pub fn end_with(mut self, resp: http::Response<Body>) -> http::Response<Body> {
        let status = resp.status();
        self.attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        let proxy_error = resp
            .headers()
            .get(PROXY_ERROR)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(reason) = &proxy_error {
            self.attributes
                .push(KeyValue::new("fedmesh.proxy_error", reason.clone()));
        }
        let header_status = if self.grpc {
            grpc_status(resp.headers())
        } else {
            None
        };
        resp.map(|body| {
            on_end(body, move |trailers| {
                let grpc = header_status.or_else(|| trailers.and_then(grpc_status));
                if let Some(code) = grpc {
                    self.attributes
                        .push(KeyValue::new("rpc.grpc.status_code", code));
                }
                let error = error_type(&self.kind, status, grpc, proxy_error.as_deref());
                self.spans.finish(SpanRecord {
                    hop: self.hop,
                    name: self.name,
                    kind: self.kind,
                    start: self.wall,
                    duration: self.start.elapsed(),
                    attributes: self.attributes,
                    error,
                    links: self.links,
                    connection: false,
                });
            })
        })
    }
}
