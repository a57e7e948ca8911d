//! What crosses to the peer sidecar: no hop-by-hop headers, no caller-supplied identity or mirror
//! header (only the callee's sidecar says who called, only this one which copy is a mirror's), the app's protocol noted when it was HTTP/1.x
//! (every request rides HTTP/2 between sidecars), and an absolute URI naming the destination by
//! the name the caller used. (The observe layer already made the request a hop of its trace.)

use std::task::{Context, Poll};

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, MIRROR, ORIG_PROTO, PROXY_ERROR, XFCC, strip_hop_by_hop};
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use tower::{Layer, Service};

use super::ctx::{BoxFuture, route_ctx};

/// The host the caller named (`Host` or the URI's authority), kept for the peer.
#[derive(Clone, Debug)]
pub(crate) struct CallerHost(pub String);

/// Marks a request as a route mirror's copy: it crosses with `fedmesh-mirror: 1`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mirrored;

#[derive(Clone, Default)]
pub(crate) struct ForwardLayer;

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Forward { inner }
    }
}

#[derive(Clone)]
pub(crate) struct Forward<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Forward<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match prepare(req) {
            Ok(req) => Box::pin(self.inner.call(req)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

fn prepare(req: Request<Body>) -> Result<Request<Body>, ProxyError> {
    let ctx = route_ctx(&req)?;
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(XFCC);
    parts.headers.remove(ORIG_PROTO);
    parts.headers.remove(PROXY_ERROR);
    // Only this sidecar says whether a request is a mirror's copy.
    parts.headers.remove(MIRROR);
    if parts.extensions.get::<Mirrored>().is_some() {
        parts.headers.insert(MIRROR, HeaderValue::from_static("1"));
    }
    if parts.version < Version::HTTP_2 {
        parts
            .headers
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    let authority = match parts.extensions.get::<CallerHost>() {
        Some(h) => h.0.clone(),
        None => format!(
            "{}.{}.svc.{}.local:{}",
            ctx.dest.service.name,
            ctx.dest.service.namespace,
            if ctx.local_only {
                "cluster"
            } else {
                "clusterset"
            },
            ctx.dest.port
        ),
    };
    // The path as it came (already parsed: kept, not parsed again), under the new authority.
    let mut target = http::uri::Parts::default();
    target.scheme = Some(http::uri::Scheme::HTTP);
    target.authority = Some(
        http::uri::Authority::try_from(authority)
            .map_err(|e| ProxyError::BadRequest(format!("bad request target: {e}")))?,
    );
    target.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    parts.uri = Uri::from_parts(target)
        .map_err(|e| ProxyError::BadRequest(format!("bad request target: {e}")))?;
    parts.headers.remove(header::HOST);
    parts.version = Version::HTTP_2;
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;

    #[test]
    fn callers_cannot_pass_identity_or_hop_headers_and_the_peer_learns_the_protocol() {
        let table = table_with_policy(pb::TrafficPolicy::default());
        let mut req = routed_request(&table, "shop/web");
        *req.version_mut() = Version::HTTP_11;
        for (k, v) in [
            (XFCC, "URI=spiffe://evil.example/x"),
            (MIRROR, "1"),
            ("connection", "x-private"),
            ("x-private", "1"),
            ("te", "gzip"),
            (ORIG_PROTO, "HTTP/2"),
            ("host", "web.shop"),
        ] {
            req.headers_mut().insert(k, HeaderValue::from_static(v));
        }
        req.extensions_mut()
            .insert(CallerHost("web.shop.svc.clusterset.local".into()));
        let out = prepare(req).unwrap();
        let h = out.headers();
        assert!(h.get(XFCC).is_none() && h.get("x-private").is_none() && h.get("te").is_none());
        assert!(
            h.get(MIRROR).is_none(),
            "a caller cannot pass its request off as a mirror's"
        );
        assert_eq!(h.get(ORIG_PROTO).unwrap(), "HTTP/1.1");
        assert_eq!(out.version(), Version::HTTP_2);
        assert_eq!(
            out.uri().to_string(),
            "http://web.shop.svc.clusterset.local/x?y=1"
        );
        assert!(h.get("host").is_none());
    }
}
