//! Request authentication: a service's RequestAuthentications decide whether a request carries a
//! valid JWT ([`fedmesh_dataplane::policy::Authn`]). Its claims ride with the request for the
//! authorization layer (`when: request.auth.claims[...]`); a missing or bad token is answered 401
//! with the reason (gRPC: UNAUTHENTICATED), counted as `unauthenticated`. Like authorization, a
//! request is checked under the configuration it arrived with.

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, grpc_error, is_grpc};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::policy::Claims;
use http::{Request, Response};
use tower::{Layer, Service};

use super::identity::inbound_ctx;
use crate::outbound::BoxFuture;

/// The claims of the request's validated token.
#[derive(Clone)]
pub(crate) struct RequestClaims(pub Arc<Claims>);

#[derive(Clone)]
pub(crate) struct AuthenticateLayer {
    pub metrics: Arc<ProxyMetrics>,
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Authenticate<S> {
    inner: S,
    metrics: Arc<ProxyMetrics>,
}

impl<S> Service<Request<Body>> for Authenticate<S>
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
        let checked = inbound_ctx(&req).and_then(|ctx| {
            let Some(entry) = ctx.entry.as_deref() else {
                return Ok(None);
            };
            entry.policy.authn.authenticate(req.headers()).map_err(|e| {
                ProxyError::Unauthenticated(format!("{} requires a valid JWT: {e}", entry.key))
            })
        });
        match checked {
            Ok(Some(claims)) => {
                req.extensions_mut().insert(RequestClaims(claims));
            }
            Ok(None) => {}
            Err(e) => {
                self.metrics.refuse(e.kind());
                tracing::info!(error = %e, "inbound request not authenticated");
                if let (ProxyError::Unauthenticated(m), true) = (&e, is_grpc(req.headers())) {
                    return Box::pin(std::future::ready(Ok(grpc_error(16, e.kind(), m))));
                }
                return Box::pin(std::future::ready(Err(e)));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::test_support::{request_from, web_entry};
    use fedmesh_api::pb::dataplane as pb;
    use http::StatusCode;

    /// A service with a RequestAuthentication whose keys could not be fetched: every request is
    /// refused 401 naming the reason (gRPC: UNAUTHENTICATED); the inner service is not reached.
    #[tokio::test]
    async fn a_request_without_a_valid_token_is_answered_401_with_the_reason() {
        let entry = web_entry(pb::TrafficPolicy {
            request_authn: vec![pb::RequestAuthn {
                name: "RequestAuthentication shop/users".into(),
                rules: vec![pb::JwtRule {
                    issuer: "https://login.example.com".into(),
                    jwks_error: "connection refused".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        let metrics = Arc::new(ProxyMetrics::new("test"));
        let inner = tower::service_fn(|_req: Request<Body>| {
            std::future::ready(Err::<Response<Body>, _>(ProxyError::BadRequest(
                "an unauthenticated request reached the app".into(),
            )))
        });
        let mut svc = AuthenticateLayer {
            metrics: metrics.clone(),
        }
        .layer(inner);
        let e = svc
            .call(request_from(
                &entry,
                "spiffe://west.example/ns/shop/sa/frontend",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            e.to_string(),
            "shop/web requires a valid JWT: a JWT is required (RequestAuthentication shop/users): send it as Authorization: Bearer <token>"
        );
        let r = e.into_response();
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );

        let mut grpc = request_from(&entry, "spiffe://west.example/ns/shop/sa/frontend");
        grpc.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "application/grpc".parse().unwrap(),
        );
        grpc.headers_mut().insert(
            http::header::AUTHORIZATION,
            "Bearer a.eyJpc3MiOiJodHRwczovL2xvZ2luLmV4YW1wbGUuY29tIn0.c"
                .parse()
                .unwrap(),
        );
        let r = svc.call(grpc).await.unwrap();
        assert_eq!(r.headers()["grpc-status"], "16");
        let message = r.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("connection refused"), "{message}");
        assert!(
            metrics.encode().contains("reason=\"unauthenticated\"} 2"),
            "{}",
            metrics.encode()
        );
    }
}
