//! The route layer: finds the request's service in the configuration snapshot and the first route
//! of its policy that matches, and hands both to the layers below ([`RouteCtx`]).

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::config::{ConfigHandle, RoutingTable, Scope};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use http::{Request, Response};
use tower::{Layer, Service};

use super::ctx::{BoxFuture, RouteCtx};
use crate::dest::Dest;

/// Where routing tables come from: the live configuration, or a fixed table in tests.
pub(crate) trait Tables: Clone + Send + Sync + 'static {
    fn table(&self) -> Arc<RoutingTable>;
}

impl Tables for ConfigHandle {
    fn table(&self) -> Arc<RoutingTable> {
        ConfigHandle::table(self)
    }
}

impl Tables for Arc<RoutingTable> {
    fn table(&self) -> Arc<RoutingTable> {
        self.clone()
    }
}

#[derive(Clone)]
pub(crate) struct RouteLayer<T> {
    tables: T,
}

impl<T> RouteLayer<T> {
    pub fn new(tables: T) -> Self {
        Self { tables }
    }
}

impl<T: Clone, S> Layer<S> for RouteLayer<T> {
    type Service = Route<T, S>;
    fn layer(&self, inner: S) -> Self::Service {
        Route {
            inner,
            tables: self.tables.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Route<T, S> {
    inner: S,
    tables: T,
}

impl<T, S> Service<Request<Body>> for Route<T, S>
where
    T: Tables,
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(dest) = req.extensions().get::<Dest>().cloned() else {
            return Box::pin(std::future::ready(Err(ProxyError::BadRequest(
                "the request names no destination".into(),
            ))));
        };
        let table = self.tables.table();
        let Some(entry) = table.service(&dest.service).cloned() else {
            return Box::pin(std::future::ready(Err(ProxyError::NoRoute(
                dest.service.to_string(),
            ))));
        };
        let route = entry.policy.routes.iter().position(|r| {
            r.matches.is_empty()
                || r.matches
                    .iter()
                    .any(|m| m.matches(req.uri(), req.headers()))
        });
        let local_only = entry.resolve(dest.scope) == Scope::Local;
        req.extensions_mut().insert(RouteCtx {
            table,
            entry,
            dest,
            route,
            local_only,
        });
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{dest, ok, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;

    #[tokio::test]
    async fn the_first_matching_route_applies_and_unknown_services_have_no_route() {
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![
                pb::Route {
                    name: "premium".into(),
                    matches: vec![pb::RouteMatch {
                        path_prefix: "/".into(),
                        headers: [("x-user".to_string(), "premium".to_string())].into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                pb::Route {
                    name: "all".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let inner = tower::service_fn(move |req: Request<Body>| {
            let ctx = req.extensions().get::<RouteCtx>().unwrap();
            s.lock()
                .unwrap()
                .push(ctx.route().map(|r| r.name.clone()).unwrap_or_default());
            ok()
        });
        let mut svc = RouteLayer::new(table.clone()).layer(inner);
        for user in ["premium", "basic"] {
            let mut req = Request::get("/x")
                .header("x-user", user)
                .body(fedmesh_dataplane::http::full(""))
                .unwrap();
            req.extensions_mut().insert(dest("shop/web"));
            svc.call(req).await.unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), ["premium", "all"]);
        let mut req = Request::get("/")
            .body(fedmesh_dataplane::http::full(""))
            .unwrap();
        req.extensions_mut().insert(dest("shop/nope"));
        let err = svc.call(req).await.unwrap_err();
        assert_eq!(err.kind(), "no-route");
    }
}
