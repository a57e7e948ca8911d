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
