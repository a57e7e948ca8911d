//! Authorization: a service whose policy lists allowed callers admits only those (by SPIFFE ID,
//! exact or `*` patterns); anyone else gets 403 with who may call. A request is checked against
//! the configuration it arrived under, so a changed policy applies from the next request, on
//! connections already open too. Opaque TCP is checked once per connection ([`authorize`]).

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_api::SpiffeId;
use fedmesh_dataplane::config::ServiceEntry;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::metrics::ProxyMetrics;
use http::{Request, Response};
use tower::{Layer, Service};

use super::identity::inbound_ctx;
use crate::outbound::BoxFuture;

/// Whether `caller` may call the service of `entry` (a service without an entry has no policy).
pub(crate) fn authorize(entry: Option<&ServiceEntry>, caller: &SpiffeId) -> Result<(), ProxyError> {
    let Some(entry) = entry else { return Ok(()) };
    if entry.policy.allows(caller) {
        Ok(())
    } else {
        Err(ProxyError::Denied(format!(
            "{caller} may not call {} (its TrafficPolicy allows only: {})",
            entry.key,
            entry.policy.allowed_callers_text.join(", ")
        )))
    }
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
        let checked =
            inbound_ctx(&req).and_then(|ctx| authorize(ctx.entry.as_deref(), &ctx.caller));
        if let Err(e) = checked {
            if matches!(e, ProxyError::Denied(_)) {
                self.metrics.refuse("unauthorized");
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

    #[tokio::test]
    async fn a_service_without_a_list_admits_every_verified_caller() {
        let entry = web_entry(pb::TrafficPolicy::default());
        assert!(
            authorize(
                Some(&entry),
                &"spiffe://x.example/ns/a/sa/b".parse().unwrap()
            )
            .is_ok()
        );
        assert!(authorize(None, &"spiffe://x.example/ns/a/sa/b".parse().unwrap()).is_ok());
    }
}
