//! The request timeout: the whole request — every attempt and the wait between them — must be
//! answered within the route's (or the service's) limit, else the caller gets 504.

use std::task::{Context, Poll};

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use http::{Request, Response};
use tower::{Layer, Service};

use super::ctx::{BoxFuture, route_ctx};

#[derive(Clone, Default)]
pub(crate) struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Timeout { inner }
    }
}

#[derive(Clone)]
pub(crate) struct Timeout<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Timeout<S>
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
        // Boxed before the async block: a projection type held across an await trips rustc's
        // Send check (the "not general enough" error).
        let call: BoxFuture<_> = Box::pin(self.inner.call(req));
        match ctx.timeout() {
            None => Box::pin(call),
            Some(after) => Box::pin(async move {
                tokio::time::timeout(after, call).await.unwrap_or_else(|_| {
                    Err(ProxyError::Timeout {
                        dest: ctx.dest.to_string(),
                        after,
                    })
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{ok, routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_request_slower_than_its_route_allows_gets_504_and_a_faster_one_passes() {
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![
                pb::Route {
                    name: "slow-ok".into(),
                    matches: vec![pb::RouteMatch {
                        path_prefix: "/reports".into(),
                        ..Default::default()
                    }],
                    timeout_ms: 10_000,
                    ..Default::default()
                },
                pb::Route {
                    name: "rest".into(),
                    timeout_ms: 2000,
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let inner = tower::service_fn(|req: Request<Body>| async move {
            let wait = if req.uri().path() == "/slow" || req.uri().path() == "/reports" {
                Duration::from_secs(5)
            } else {
                Duration::from_millis(10)
            };
            tokio::time::sleep(wait).await;
            ok().await
        });
        let mut svc = TimeoutLayer.layer(inner);
        let mut call = |path: &str| {
            let mut req = routed_request(&table, "shop/web");
            *req.uri_mut() = path.parse().unwrap();
            // Routing happened before the path changed: match again as the route layer would.
            let ctx = req
                .extensions()
                .get::<std::sync::Arc<super::super::ctx::RouteCtx>>()
                .unwrap();
            let mut ctx = (**ctx).clone();
            ctx.route = Some(if path == "/reports" { 0 } else { 1 });
            req.extensions_mut().insert(std::sync::Arc::new(ctx));
            svc.call(req)
        };
        assert!(call("/fast").await.is_ok());
        let err = call("/slow").await.unwrap_err();
        assert_eq!((err.kind(), err.status().as_u16()), ("timeout", 504));
        assert!(err.to_string().contains("2s"), "{err}");
        assert!(
            call("/reports").await.is_ok(),
            "the route's own, longer limit"
        );
    }
}
