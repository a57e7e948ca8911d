//! The first inbound layer: the caller is who its mTLS handshake proved ([`InboundConn`], settled
//! once per connection). Requests on a connection whose destination is not served here are
//! answered with the reason; the others carry an [`InboundCtx`] for the layers below, and only
//! this sidecar says who called: identity headers the caller wrote are replaced by an
//! `x-forwarded-client-cert` naming the verified caller.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fedmesh_api::SpiffeId;
use fedmesh_dataplane::config::{ConfigHandle, ServiceEntry};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::policy::CallerRules;
use fedmesh_dataplane::sni::MeshSni;
use fedmesh_trust::tls::MeshIdentity;
use http::header::HeaderValue;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::outbound::BoxFuture;
use crate::{PROXY_ERROR, XFCC};

/// How a caller without an identity is named in metrics, access logs and spans: plain text to
/// a PERMISSIVE service.
pub(crate) const UNAUTHENTICATED: &str = "unauthenticated";

/// Who called and what for, settled once per connection.
pub(crate) struct InboundConn {
    /// The TCP peer: the caller's sidecar, or the gateway it came through.
    pub peer: SocketAddr,
    /// The verified caller; `None` for plain text (PERMISSIVE).
    pub caller: Option<SpiffeId>,
    pub caller_cluster: String,
    /// The service port named by the SNI and the app address, once checked to be served here.
    pub admitted: Result<(MeshSni, SocketAddr), ProxyError>,
    /// The rules of the service's AuthorizationPolicies this caller can match, under the
    /// configuration entry they were worked out for.
    pub authz_rules: Mutex<Option<(Arc<ServiceEntry>, Arc<CallerRules>)>>,
}

impl InboundConn {
    pub fn new(
        peer: SocketAddr,
        caller: Option<SpiffeId>,
        caller_cluster: String,
        admitted: Result<(MeshSni, SocketAddr), ProxyError>,
    ) -> Self {
        Self {
            peer,
            caller,
            caller_cluster,
            admitted,
            authz_rules: Mutex::default(),
        }
    }

    /// The rules of `entry`'s policies this caller can match: worked out on the connection's
    /// first request, again when the configuration changed.
    pub fn caller_rules(&self, entry: &Arc<ServiceEntry>) -> Arc<CallerRules> {
        let mut cached = self.authz_rules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((e, r)) = &*cached
            && Arc::ptr_eq(e, entry)
        {
            return r.clone();
        }
        let r = Arc::new(entry.policy.authz.caller_rules(self.caller.as_ref()));
        *cached = Some((entry.clone(), r.clone()));
        r
    }

    /// The caller's SPIFFE ID, or `unauthenticated`.
    pub fn caller_name(&self) -> String {
        caller_name(self.caller.as_ref())
    }
}

pub(crate) fn caller_name(caller: Option<&SpiffeId>) -> String {
    caller.map_or_else(|| UNAUTHENTICATED.to_string(), ToString::to_string)
}

/// What the layers below identity know of a request.
#[derive(Clone)]
pub(crate) struct InboundCtx {
    pub caller: Option<SpiffeId>,
    pub mesh: MeshSni,
    pub app: SocketAddr,
    /// The service's entry in the configuration the request arrived under.
    pub entry: Option<Arc<ServiceEntry>>,
    /// It came as HTTP/1 inside a tunnel, and goes to the app as HTTP/1 too.
    pub tunnel_h1: bool,
}

/// Marks a request that came as HTTP/1 inside an opaque tunnel.
#[derive(Clone, Copy)]
pub(crate) struct TunnelH1;

/// The [`InboundCtx`] the identity layer attached.
pub(crate) fn inbound_ctx(req: &Request<Body>) -> Result<&InboundCtx, ProxyError> {
    req.extensions()
        .get::<InboundCtx>()
        .ok_or_else(|| ProxyError::BadRequest("the request was not identified".into()))
}

#[derive(Clone)]
pub(crate) struct IdentityLayer {
    pub config: ConfigHandle,
    /// This workload's identity (its SPIFFE ID is the `By=` of the XFCC).
    pub identity: MeshIdentity,
    /// Where requests to PERMISSIVE services are counted, mTLS or plain text.
    pub permissive: super::plaintext::PermissiveTraffic,
}

impl<S> Layer<S> for IdentityLayer {
    type Service = Identity<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Identity {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Identity<S> {
    inner: S,
    layer: IdentityLayer,
}

impl<S> Service<Request<Body>> for Identity<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(conn) = req.extensions().get::<Arc<InboundConn>>().cloned() else {
            return Box::pin(std::future::ready(Err(ProxyError::BadRequest(
                "the request came on no mTLS connection".into(),
            ))));
        };
        let (mesh, app) = match &conn.admitted {
            Ok(x) => x.clone(),
            Err(e) => return Box::pin(std::future::ready(Err(e.clone()))),
        };
        let headers = req.headers_mut();
        headers.remove(PROXY_ERROR);
        headers.remove(XFCC);
        let own = self
            .layer
            .identity
            .spiffe_id()
            .map(|i| i.to_string())
            .unwrap_or_default();
        // Plain text carries no client certificate: no XFCC, and none the caller wrote.
        if let Some(caller) = &conn.caller
            && let Ok(v) = HeaderValue::from_str(&format!("By={own};URI={caller}"))
        {
            headers.insert(XFCC, v);
        }
        let entry = self.layer.config.table().service(&mesh.service).cloned();
        if let Some(e) = &entry
            && e.policy.permissive
        {
            self.layer.permissive.count(&e.key, conn.caller.is_none());
        }
        let tunnel_h1 = req.extensions().get::<TunnelH1>().is_some();
        req.extensions_mut().insert(InboundCtx {
            caller: conn.caller.clone(),
            mesh,
            app,
            entry,
            tunnel_h1,
        });
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::table_with_policy;
    use fedmesh_api::pb::dataplane as pb;
    use fedmesh_dataplane::http::full;
    use http::StatusCode;

    fn layer() -> IdentityLayer {
        IdentityLayer {
            config: ConfigHandle::fixed(table_with_policy(pb::TrafficPolicy::default())),
            // No SVID yet: the XFCC names no `By`.
            identity: MeshIdentity::new(),
            permissive: Default::default(),
        }
    }

    fn conn(admitted: Result<(MeshSni, SocketAddr), ProxyError>) -> Arc<InboundConn> {
        Arc::new(InboundConn::new(
            "127.0.0.1:40000".parse().unwrap(),
            Some("spiffe://west.example/ns/shop/sa/frontend".parse().unwrap()),
            "west".into(),
            admitted,
        ))
    }

    fn web() -> (MeshSni, SocketAddr) {
        (
            MeshSni::new(80, "shop/web".parse().unwrap(), "east".parse().unwrap()),
            "127.0.0.1:1001".parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn the_verified_caller_replaces_whatever_the_caller_wrote() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let s = seen.clone();
        let inner = tower::service_fn(move |req: Request<Body>| {
            let ctx = req.extensions().get::<InboundCtx>().cloned().unwrap();
            *s.lock().unwrap() = Some((
                req.headers().get_all(XFCC).iter().count(),
                req.headers()[XFCC].to_str().unwrap().to_string(),
                req.headers().contains_key(PROXY_ERROR),
                ctx.entry.is_some(),
                ctx.tunnel_h1,
            ));
            std::future::ready(Ok::<_, ProxyError>(Response::new(full(""))))
        });
        let mut svc = layer().layer(inner);
        let mut req = Request::get("/")
            .header(XFCC, "By=x;URI=spiffe://east.example/ns/admin/sa/root")
            .header(PROXY_ERROR, "forged")
            .body(full(""))
            .unwrap();
        req.extensions_mut().insert(conn(Ok(web())));
        req.extensions_mut().insert(TunnelH1);
        svc.call(req).await.unwrap();
        let (count, xfcc, forged_error, known, tunnel) = seen.lock().unwrap().clone().unwrap();
        assert_eq!(count, 1);
        assert_eq!(xfcc, "By=;URI=spiffe://west.example/ns/shop/sa/frontend");
        assert!(!forged_error);
        assert!(known, "the service's entry rides with the request");
        assert!(tunnel);
    }

    #[tokio::test]
    async fn a_request_on_a_connection_not_admitted_gets_the_reason() {
        let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = reached.clone();
        let inner = tower::service_fn(move |_req: Request<Body>| {
            r.store(true, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(Ok::<_, ProxyError>(Response::new(full(""))))
        });
        let mut svc = layer().layer(inner);
        let mut req = Request::get("/").body(full("")).unwrap();
        req.extensions_mut()
            .insert(conn(Err(ProxyError::NotAdmitted {
                status: StatusCode::MISDIRECTED_REQUEST,
                kind: "wrong-cluster",
                message: "the connection is for cluster west, this is east".into(),
            })));
        let e = svc.call(req).await.err().unwrap();
        assert_eq!(e.status(), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(e.kind(), "wrong-cluster");
        assert!(!reached.load(std::sync::atomic::Ordering::Relaxed));
    }
}
