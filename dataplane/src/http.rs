//! HTTP plumbing both directions of the sidecar share: the body type that crosses every layer,
//! fedmesh's own headers, and the headers that never cross a proxy.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
/// A request or response body of any origin (hyper's, a buffered copy, a proxy's own answer).
pub type Body = BoxBody<Bytes, BoxError>;

/// On a response the proxy generated itself (the app never saw the request): why.
pub const PROXY_ERROR: &str = "fedmesh-proxy-error";
/// Between sidecars: the protocol the app spoke (`HTTP/1.1`), so the far side speaks it too.
pub const ORIG_PROTO: &str = "fedmesh-orig-proto";
/// On a mirrored copy of a request (`1`), so the mirror's app can tell it from live traffic.
pub const MIRROR: &str = "fedmesh-mirror";
/// Who called, as the callee's sidecar verified it (`By=<callee>;URI=<caller>`).
pub const XFCC: &str = "x-forwarded-client-cert";

/// Any body as a [`Body`].
pub fn body<B>(b: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// A body with these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed()
}

/// Whether a request is gRPC (`content-type: application/grpc*`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A trailers-only gRPC answer: HTTP 200 with `grpc-status` `code` and `grpc-message`, marked as
/// the proxy's own (`fedmesh-proxy-error: kind`), as a gRPC client expects an error.
pub fn grpc_error(code: u32, kind: &'static str, message: &str) -> http::Response<Body> {
    use http::header::HeaderValue;
    let mut r = http::Response::new(full(""));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    // grpc-message is percent-encoded: '%' and bytes outside printable ASCII.
    let encoded: String = message
        .bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    h.insert(PROXY_ERROR, HeaderValue::from_static(kind));
    r
}

/// Headers that belong to one connection and never cross a proxy (RFC 9110 §7.6.1), plus those
/// named in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    // gRPC needs `te: trailers`, the one TE value HTTP/2 allows.
    if !h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

/// A request body read whole because it is known to be small, or left streaming.
pub enum Buffered {
    Whole(Bytes),
    Streaming(Body),
}

/// Reads `body` whole when it is empty or declares an exact length of at most `limit` bytes, so
/// it can be sent more than once (a retry, a mirror); any other body is left streaming. Boxed,
/// so awaiting it inside a generic layer's future does not trip rustc's higher-ranked
/// Send/From checks.
pub fn buffer_small(
    body: Body,
    limit: usize,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Buffered, crate::error::ProxyError>> + Send>,
> {
    use hyper::body::Body as _;
    Box::pin(async move {
        let small =
            body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= limit as u64);
        if !small {
            return Ok(Buffered::Streaming(body));
        }
        // Collected frame by frame (http_body_util::Limited's error conversion trips rustc's
        // higher-ranked checks in async code over boxed bodies).
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| crate::error::ProxyError::RequestBody(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(crate::error::ProxyError::RequestBody(format!(
                        "the body is larger than its declared {limit} bytes"
                    )));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Buffered::Whole(buf.freeze()))
    })
}

/// `body`, calling `done` once when it ends: with its trailers when it ended with some, `None`
/// when it ended without or was dropped before its end (the caller went away).
pub fn on_end(body: Body, done: impl FnOnce(Option<&HeaderMap>) + Send + Sync + 'static) -> Body {
    OnEnd {
        inner: body,
        done: Some(Box::new(done)),
    }
    .boxed()
}

type Done = Box<dyn FnOnce(Option<&HeaderMap>) + Send + Sync>;

struct OnEnd {
    inner: Body,
    done: Option<Done>,
}

impl OnEnd {
    fn end(&mut self, trailers: Option<&HeaderMap>) {
        if let Some(done) = self.done.take() {
            done(trailers);
        }
    }
}

impl hyper::body::Body for OnEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    self.end(Some(t));
                } else if self.inner.is_end_stream() {
                    self.end(None);
                }
            }
            std::task::Poll::Ready(_) => self.end(None),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        self.end(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn on_end_fires_once_at_the_end_with_the_trailers() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames = vec![
            Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"x"))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let b = body(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let b = on_end(b, move |t| {
            s.lock()
                .unwrap()
                .push(t.and_then(|t| t.get("grpc-status")).cloned())
        });
        let collected = b.collect().await.unwrap();
        assert_eq!(collected.to_bytes(), "x");
        assert_eq!(*seen.lock().unwrap(), [Some("14".parse().unwrap())]);

        // A body dropped before its end (the caller went away) ends the span too.
        let s = seen.clone();
        let b = on_end(full("abc"), move |t| s.lock().unwrap().push(t.and(None)));
        drop(b);
        assert_eq!(seen.lock().unwrap().len(), 2);
        // An empty body ends at its first poll.
        let s = seen.clone();
        let b = on_end(full(""), move |_| s.lock().unwrap().push(None));
        let _ = b.collect().await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 3);
    }
}
