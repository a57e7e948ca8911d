//! Authorization: a service's AuthorizationPolicies (and its TrafficPolicy's `allowedCallers`)
//! decide who may call it, on the caller's verified SPIFFE ID and, for HTTP and gRPC, the method,
//! path and headers ([`fedmesh_dataplane::policy::Authz`]). A denial is 403 (gRPC:
//! PERMISSION_DENIED) naming the policy, counted with the caller and the policy. A request is
//! checked against the configuration it arrived under, so a changed policy applies from the next
//! request, on connections already open too. Opaque TCP is checked once per connection
//! ([`authorize`] without a request).

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::config::ServiceEntry;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, grpc_error, is_grpc};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::policy::{
    ALLOWED_CALLERS, CallerRules, Denial, HttpRequest, Selected, Subject, namespace_of,
};
use http::{Request, Response};
use tower::{Layer, Service};

use super::authn::RequestClaims;
use super::identity::{InboundConn, caller_name, inbound_ctx};
use crate::outbound::BoxFuture;

/// Whether the subject may call the service of `entry` (a service without an entry has no
/// policy); audits and denials are counted and logged.
pub(crate) fn authorize(
    entry: Option<&ServiceEntry>,
    s: &Subject<'_>,
    metrics: &ProxyMetrics,
) -> Result<(), ProxyError> {
    authorize_for(entry, None, s, metrics)
}

/// [`authorize`] with the caller's rules of `entry` worked out already (per connection).
fn authorize_for(
    entry: Option<&ServiceEntry>,
    rules: Option<&CallerRules>,
    s: &Subject<'_>,
    metrics: &ProxyMetrics,
) -> Result<(), ProxyError> {
    let Some(entry) = entry else { return Ok(()) };
    let authz = &entry.policy.authz;
    if authz.is_empty() {
        return Ok(());
    }
    let verdict = match rules {
        Some(r) => authz.evaluate_for(r, s),
        None => authz.evaluate(s),
    };
    if verdict.audited.is_empty() && verdict.denied_by.is_none() {
        // The common case allocates nothing.
        return Ok(());
    }
    let service = entry.key.to_string();
    let caller = caller_name(s.caller);
    for policy in &verdict.audited {
        metrics.count_authz(&service, policy, &caller, "audited");
        tracing::info!(%service, %caller, policy, "audit: an AUDIT policy matched; let through");
    }
    let Some(denial) = verdict.denied_by else {
        return Ok(());
    };
    metrics.refuse("unauthorized");
    metrics.count_authz(&service, denial.policy(), &caller, "denied");
    let why = match &denial {
        Denial::Denied(p) => format!("denied by {p}"),
        Denial::NotAllowed(ps) if ps[..] == [ALLOWED_CALLERS] => format!(
            "its TrafficPolicy allows only: {}",
            entry.policy.allowed_callers_text.join(", ")
        ),
        Denial::NotAllowed(ps) => format!("no ALLOW policy matches: {}", ps.join(", ")),
    };
    Err(ProxyError::Denied(format!(
        "{caller} may not call {service} ({why})"
    )))
}

#[derive(Clone)]
pub(crate) struct AuthorizeLayer {
    pub metrics: Arc<ProxyMetrics>,
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Authorize<S> {
    inner: S,
    metrics: Arc<ProxyMetrics>,
}

impl<S> Service<Request<Body>> for Authorize<S>
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

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let checked = inbound_ctx(&req).and_then(|ctx| {
            // The route the caller's sidecar chose for it, when a policy targets routes.
            let route = ctx
                .entry
                .as_deref()
                .filter(|e| e.policy.authz.has_routes())
                .and_then(|e| {
                    let ns = ctx.caller.as_ref().and_then(namespace_of);
                    match e
                        .policy
                        .select(ctx.mesh.port, ns, req.method(), req.uri(), req.headers())
                    {
                        Selected::Route(_, r) => Some(r.source.as_str()),
                        _ => None,
                    }
                });
            let subject = Subject {
                caller: ctx.caller.as_ref(),
                port: ctx.mesh.port,
                http: Some(HttpRequest {
                    method: req.method(),
                    path: req.uri().path(),
                    headers: req.headers(),
                    claims: req.extensions().get::<RequestClaims>().map(|c| &*c.0),
                    route,
                }),
            };
            let rules = match (&ctx.entry, req.extensions().get::<Arc<InboundConn>>()) {
                (Some(e), Some(conn)) if !e.policy.authz.is_empty() => Some(conn.caller_rules(e)),
                _ => None,
            };
            authorize_for(
                ctx.entry.as_deref(),
                rules.as_deref(),
                &subject,
                &self.metrics,
            )
        });
        if let Err(e) = checked {
            // gRPC callers get PERMISSION_DENIED with the reason, as a gRPC error.
            if let (ProxyError::Denied(m), true) = (&e, is_grpc(req.headers())) {
                let r = grpc_error(7, e.kind(), m);
                return Box::pin(std::future::ready(Ok(r)));
            }
            return Box::pin(std::future::ready(Err(e)));
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::test_support::{request_from, web_entry};
    use fedmesh_api::pb::dataplane as pb;
    use fedmesh_dataplane::http::full;
    use http::StatusCode;

    #[tokio::test]
    async fn only_listed_callers_pass_and_the_refusal_names_who_may_call() {
        let entry = web_entry(pb::TrafficPolicy {
            allowed_callers: vec!["spiffe://west.example/ns/shop/sa/*".into()],
            ..Default::default()
        });
        let metrics = Arc::new(ProxyMetrics::new("test"));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let inner = tower::service_fn(move |_req: Request<Body>| {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(Ok::<_, ProxyError>(Response::new(full(""))))
        });
        let mut svc = AuthorizeLayer {
            metrics: metrics.clone(),
        }
        .layer(inner);
        svc.call(request_from(
            &entry,
            "spiffe://west.example/ns/shop/sa/frontend",
        ))
        .await
        .unwrap();
        let e = svc
            .call(request_from(
                &entry,
                "spiffe://west.example/ns/other/sa/frontend",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert!(
            e.to_string()
                .contains("spiffe://west.example/ns/other/sa/frontend may not call shop/web")
                && e.to_string()
                    .contains("allows only: spiffe://west.example/ns/shop/sa/*"),
            "{e}"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
        let text = metrics.encode();
        assert!(text.contains("reason=\"unauthorized\"} 1"), "{text}");
    }

    /// An AuthorizationPolicy's DENY on a gRPC method: the caller gets PERMISSION_DENIED naming
    /// the policy, other methods pass, and the denial is counted with the caller and the policy.
    #[tokio::test]
    async fn a_grpc_method_denied_by_a_policy_answers_permission_denied_naming_it() {
        let entry = web_entry(pb::TrafficPolicy {
            authorization: vec![pb::AuthzPolicy {
                name: "AuthorizationPolicy shop/no-deletes".into(),
                action: pb::AuthzAction::AuthzDeny as i32,
                rules: vec![pb::AuthzRule {
                    to: vec![pb::AuthzOperation {
                        paths: vec!["/shop.Catalog/Delete*".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                invalid: false,
                routes: Vec::new(),
            }],
            ..Default::default()
        });
        let metrics = Arc::new(ProxyMetrics::new("test"));
        let inner = tower::service_fn(|_req: Request<Body>| {
            std::future::ready(Ok::<_, ProxyError>(Response::new(full("served"))))
        });
        let mut svc = AuthorizeLayer {
            metrics: metrics.clone(),
        }
        .layer(inner);
        let grpc = |path: &str| {
            let mut r = request_from(&entry, "spiffe://west.example/ns/shop/sa/admin");
            *r.uri_mut() = path.parse().unwrap();
            *r.method_mut() = http::Method::POST;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                "application/grpc".parse().unwrap(),
            );
            r
        };
        let r = svc.call(grpc("/shop.Catalog/DeleteItem")).await.unwrap();
        assert_eq!(r.headers()["grpc-status"], "7");
        let message = r.headers()["grpc-message"].to_str().unwrap();
        assert!(
            message.contains("spiffe://west.example/ns/shop/sa/admin may not call shop/web")
                && message.contains("denied by AuthorizationPolicy shop/no-deletes"),
            "{message}"
        );
        let r = svc.call(grpc("/shop.Catalog/ListItems")).await.unwrap();
        assert!(r.headers().get("grpc-status").is_none(), "served");
        let text = metrics.encode();
        assert!(
            text.contains(
                "test_authz_total{service=\"shop/web\",policy=\"AuthorizationPolicy shop/no-deletes\",source_principal=\"spiffe://west.example/ns/shop/sa/admin\",result=\"denied\"} 1"
            ),
            "{text}"
        );
    }

    /// The caller's rules are worked out once per connection, and again when the configuration
    /// changes: a policy edited while a connection is open applies to its next request.
    #[tokio::test]
    async fn a_connection_keeps_its_callers_rules_until_the_configuration_changes() {
        let frontend = "spiffe://west.example/ns/shop/sa/frontend";
        let allow = |who: &str| {
            web_entry(pb::TrafficPolicy {
                allowed_callers: vec![who.into()],
                ..Default::default()
            })
        };
        let conn = Arc::new(InboundConn::new(
            "127.0.0.1:40000".parse().unwrap(),
            Some(frontend.parse().unwrap()),
            "west".into(),
            Err(ProxyError::NotReady),
        ));
        let metrics = Arc::new(ProxyMetrics::new("test"));
        let inner = tower::service_fn(|_req: Request<Body>| {
            std::future::ready(Ok::<_, ProxyError>(Response::new(full(""))))
        });
        let mut svc = AuthorizeLayer { metrics }.layer(inner);
        let on_conn = |entry: &Arc<fedmesh_dataplane::config::ServiceEntry>| {
            let mut r = request_from(entry, frontend);
            r.extensions_mut().insert(conn.clone());
            r
        };
        let open = allow(frontend);
        assert!(svc.call(on_conn(&open)).await.is_ok());
        assert!(svc.call(on_conn(&open)).await.is_ok());
        let first = conn.caller_rules(&open);
        assert!(Arc::ptr_eq(&first, &conn.caller_rules(&open)), "cached");
        let closed = allow("spiffe://west.example/ns/shop/sa/admin");
        let e = svc.call(on_conn(&closed)).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_service_without_a_list_admits_every_verified_caller() {
        let entry = web_entry(pb::TrafficPolicy::default());
        let metrics = ProxyMetrics::new("test");
        let caller = "spiffe://x.example/ns/a/sa/b".parse().unwrap();
        let s = Subject {
            caller: Some(&caller),
            port: 80,
            http: None,
        };
        assert!(authorize(Some(&entry), &s, &metrics).is_ok());
        assert!(authorize(None, &s, &metrics).is_ok());
    }
}
