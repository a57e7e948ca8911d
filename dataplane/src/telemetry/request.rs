//! A request's span, from the moment a proxy has the request to the end of the response body
//! (a streaming answer's span lasts as long as the stream; a gRPC status in the trailers is
//! read there).
//!
//! Most requests' spans are not kept (sampled out, fast, successful), and that is only known
//! at the end: until then a span holds only what it cannot get later (the request's method,
//! URI, version, whether it is gRPC, the start time); its attributes are built when, and only
//! when, it is kept.

use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use super::{Keep, SpanRecord, Spans, error_type, grpc_call, grpc_status, request_attributes};

/// A span another is tied to without being its child: `(trace ID, span ID)`.
pub type SpanLink = ([u8; 16], [u8; 8]);
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
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    grpc: bool,
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
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        Some(Self {
            spans: spans.clone(),
            hop,
            kind,
            wall: SystemTime::now(),
            start: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            grpc,
        })
    }

    /// Ends the span with the response: at the body's end (its timing, a gRPC status in the
    /// trailers), when it is kept, its attributes are built — the HTTP and gRPC ones, and
    /// those `more` adds (what the proxy knows of the request: clusters, identities, route),
    /// with any links.
    pub fn end_with(
        self,
        resp: http::Response<Body>,
        more: impl FnOnce(&mut Vec<KeyValue>, &mut Vec<SpanLink>) + Send + Sync + 'static,
    ) -> http::Response<Body> {
        let status = resp.status();
        let proxy_error = resp
            .headers()
            .get(PROXY_ERROR)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header_status = if self.grpc {
            grpc_status(resp.headers())
        } else {
            None
        };
        resp.map(|body| {
            on_end(body, move |trailers| {
                let grpc = match header_status {
                    Some(c) => Some(c),
                    None if self.grpc => trailers.and_then(grpc_status),
                    None => None,
                };
                let error = error_type(&self.kind, status, grpc, proxy_error.as_deref());
                let duration = self.start.elapsed();
                if !self
                    .spans
                    .keeps(self.hop.sampled, error.is_some(), duration, Keep::Request)
                {
                    return;
                }
                let mut attributes = request_attributes(&self.method, &self.uri, self.version);
                let name = match grpc_call(self.grpc, &self.uri) {
                    Some((name, a)) => {
                        attributes.extend(a);
                        name
                    }
                    None => self.method.to_string(),
                };
                attributes.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if let Some(code) = grpc {
                    attributes.push(KeyValue::new("rpc.grpc.status_code", code));
                }
                if let Some(reason) = proxy_error {
                    attributes.push(KeyValue::new("fedmesh.proxy_error", reason));
                }
                let mut links = Vec::new();
                more(&mut attributes, &mut links);
                self.spans.finish(SpanRecord {
                    hop: self.hop,
                    name,
                    kind: self.kind,
                    start: self.wall,
                    duration,
                    attributes,
                    error,
                    links,
                    keep: Keep::Request,
                });
            })
        })
    }
}
