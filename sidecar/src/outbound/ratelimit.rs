//! The route's rate limit: a TrafficPolicy targeting a route gives its rules a token bucket in
//! each caller's sidecar; a request finding it empty is answered 429 with `Retry-After` and
//! counted (`request_errors{reason="rate_limited"}`). A service's own limit, and limits per
//! caller identity, are enforced where the callers are known: by the service's sidecars, on
//! what they admit (see the inbound side).

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::ratelimit::Limiter;
use http::{Request, Response};
use tower::{Layer, Service};

use super::ctx::{BoxFuture, route_ctx};

#[derive(Clone)]
pub(crate) struct RateLimitLayer {
    pub limiter: Arc<Limiter>,
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct RateLimited<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> Service<Request<Body>> for RateLimited<S>
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
        let ctx = match route_ctx(&req) {
            Ok(c) => c,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        if let Some((i, route)) = ctx.route.zip(ctx.route())
            && let Some(limit) = &route.rate_limit
        {
            let key = format!("{}#{i}", ctx.entry.key);
            if let Err(retry_after) = self.limiter.take(&key, limit) {
                return Box::pin(std::future::ready(Err(ProxyError::RateLimited {
                    what: route.source.clone(),
                    limit: limit.to_string(),
                    retry_after,
                })));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{ok, routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_routes_limit_answers_429_with_retry_after_beyond_its_rate() {
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![pb::Route {
                name: "all".into(),
                source: "HTTPRoute shop/web".into(),
                rate_limit: Some(pb::RateLimit {
                    requests: 5,
                    period_ms: 10_000,
                    burst: 5,
                    per_caller: false,
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut svc = RateLimitLayer {
            limiter: Arc::new(Limiter::new()),
        }
        .layer(tower::service_fn(|_req: Request<Body>| ok()));
        for _ in 0..5 {
            svc.call(routed_request(&table, "shop/web")).await.unwrap();
        }
        let err = svc
            .call(routed_request(&table, "shop/web"))
            .await
            .unwrap_err();
        assert_eq!((err.kind(), err.status().as_u16()), ("rate-limited", 429));
        let resp = err.into_response();
        assert_eq!(resp.headers()["retry-after"], "2", "one token per 2 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(svc.call(routed_request(&table, "shop/web")).await.is_ok());
    }
}
