//! The route layer: finds the request's service in the configuration snapshot, the rule of its
//! routes that matches ([`Policy::select`]: the caller's consumer routes first, then the
//! service's own, by Gateway API precedence), and draws one of the rule's backends by weight; it
//! hands all of it to the layers below ([`RouteCtx`]). A request that matches no rule of routes
//! binding its port gets 404, a rule that cannot be applied 500, as Gateway API asks.

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::config::{ConfigHandle, RoutingTable, Scope};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use http::{Request, Response};
use tower::{Layer, Service};

use fedmesh_dataplane::policy::{BackendTarget, Route as PolicyRoute, RouteBackend, Selected};

use super::ctx::{BoxFuture, Drawn, DrawnTarget, RouteCtx, Tried};
use crate::dest::Dest;

/// A request addressed to one endpoint (a pod's own address): it goes there, past the
/// Service's routes.
#[derive(Clone, Debug)]
pub(crate) struct Pinned(pub fedmesh_dataplane::target::Target);

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
        let local_only = entry.resolve(dest.scope) == Scope::Local;
        let mut ctx = RouteCtx {
            table,
            entry: entry.clone(),
            dest,
            route: None,
            backend: None,
            local_only,
        };
        if let Some(Pinned(t)) = req.extensions().get::<Pinned>().cloned() {
            ctx.backend = Some(Drawn {
                index: None,
                to: DrawnTarget::Endpoint(t),
            });
            routed(&mut req, ctx);
            return Box::pin(self.inner.call(req));
        }
        let selected = entry.policy.select(
            ctx.dest.port,
            ctx.table.own_namespace.as_deref(),
            req.method(),
            req.uri(),
            req.headers(),
        );
        match selected {
            Selected::Default => {}
            Selected::NoMatch => {
                return Box::pin(std::future::ready(Err(ProxyError::NoMatchingRoute {
                    service: ctx.dest.to_string(),
                    method: req.method().to_string(),
                    path: req.uri().path().to_string(),
                })));
            }
            Selected::Route(i, route) => {
                if let Some(reason) = &route.invalid {
                    return Box::pin(std::future::ready(Err(ProxyError::RouteInvalid {
                        source_route: route.source.clone(),
                        reason: reason.clone(),
                    })));
                }
                ctx.route = Some(i);
                match draw(&ctx, route, rand::random()) {
                    Ok(b) => ctx.backend = b,
                    Err(e) => return Box::pin(std::future::ready(Err(e))),
                }
            }
        }
        routed(&mut req, ctx);
        Box::pin(self.inner.call(req))
    }
}

/// Hands the routing decision to the layers below, and to the observe layer's record.
fn routed(req: &mut Request<Body>, ctx: RouteCtx) {
    let ctx = Arc::new(ctx);
    if let Some(t) = req.extensions().get::<Tried>() {
        t.routed(ctx.clone());
    }
    req.extensions_mut().insert(ctx);
}

/// Resolves a backend of the routing table: the service itself or another one.
pub(crate) fn resolve(
    ctx: &RouteCtx,
    target: &BackendTarget,
    index: Option<usize>,
    source: &str,
) -> Result<Drawn, ProxyError> {
    let other = |key: &fedmesh_api::ServiceKey, port: Option<u16>, scope| {
        let entry = ctx.table.service(key).cloned().ok_or_else(|| {
            ProxyError::BackendUnresolved(format!(
                "{source}: backend {key} is not in this sidecar's configuration (does the service exist?)"
            ))
        })?;
        Ok(DrawnTarget::Service {
            entry,
            port: port.unwrap_or(ctx.dest.port),
            scope,
        })
    };
    let to = match target {
        BackendTarget::Parent(c) => DrawnTarget::Parent(c.clone()),
        BackendTarget::Service { key, port } => other(key, *port, Scope::Local)?,
        BackendTarget::Import { key, port } => other(key, *port, Scope::ClusterSet)?,
        BackendTarget::Unresolved => {
            return Err(ProxyError::BackendUnresolved(format!(
                "{source}: the backend this request drew resolves to nothing (the route's ResolvedRefs condition says why)"
            )));
        }
    };
    Ok(Drawn { index, to })
}

/// Draws one of the route's backends by weight (`roll` is a random number). A cluster of the
/// service with no endpoint at all is passed over, its share spread over the others; when none
/// has one, the draw is among all of them and failover takes it from there.
fn draw(ctx: &RouteCtx, route: &PolicyRoute, roll: u64) -> Result<Option<Drawn>, ProxyError> {
    if route.route_backends.is_empty() {
        return Ok(None);
    }
    let parent = ctx.entry.targets_for(ctx.dest.scope, ctx.dest.port);
    let weighted: Vec<(usize, &RouteBackend)> = route
        .route_backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .collect();
    if weighted.is_empty() {
        return Err(ProxyError::BackendUnresolved(format!(
            "{}: every backend of the rule has weight 0",
            route.source
        )));
    }
    let reachable: Vec<(usize, &RouteBackend)> = weighted
        .iter()
        .copied()
        .filter(|(_, b)| match &b.target {
            BackendTarget::Parent(Some(c)) => parent.iter().any(|t| t.cluster() == c),
            _ => true,
        })
        .collect();
    let pool = if reachable.is_empty() {
        &weighted
    } else {
        &reachable
    };
    let total: u64 = pool.iter().map(|(_, b)| u64::from(b.weight)).sum();
    let mut r = roll % total;
    let (i, chosen) = pool
        .iter()
        .copied()
        .find(|(_, b)| {
            let w = u64::from(b.weight);
            if r < w {
                true
            } else {
                r -= w;
                false
            }
        })
        .unwrap_or(pool[0]);
    resolve(ctx, &chosen.target, Some(i), &route.source).map(Some)
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
            let ctx = req.extensions().get::<Arc<RouteCtx>>().unwrap();
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

    fn backend(kind: pb::backend_ref::Kind, service: &str, weight: u32) -> pb::BackendRef {
        pb::BackendRef {
            kind: kind as i32,
            service: service.into(),
            weight,
            ..Default::default()
        }
    }

    /// Sends `n` requests for `path` and counts which service each one's candidates belong to.
    async fn draws(table: &Arc<RoutingTable>, path: &str, n: usize) -> Vec<Result<String, String>> {
        let inner = tower::service_fn(|req: Request<Body>| {
            let ctx = req.extensions().get::<Arc<RouteCtx>>().unwrap();
            let key = ctx.candidates()[0].key();
            let port = key.rsplit(':').next().unwrap_or_default();
            let mut r = Response::new(fedmesh_dataplane::http::full(""));
            r.headers_mut()
                .insert("x-port", http::HeaderValue::from_str(port).unwrap());
            Box::pin(std::future::ready(Ok(r))) as BoxFuture<Result<Response<Body>, ProxyError>>
        });
        let mut svc = RouteLayer::new(table.clone()).layer(inner);
        let mut out = Vec::new();
        for _ in 0..n {
            let mut req = Request::get(path)
                .body(fedmesh_dataplane::http::full(""))
                .unwrap();
            req.extensions_mut().insert(dest("shop/web"));
            out.push(match svc.call(req).await {
                Ok(r) => Ok(r.headers()["x-port"].to_str().unwrap().to_string()),
                Err(e) => Err(format!("{} {}", e.status().as_u16(), e.kind())),
            });
        }
        out
    }

    #[tokio::test]
    async fn backends_are_drawn_by_weight_and_unresolved_shares_answer_500() {
        use pb::backend_ref::Kind;
        let route = |prefix: &str, backends: Vec<pb::BackendRef>| pb::Route {
            name: prefix.into(),
            source: "HTTPRoute shop/web".into(),
            matches: vec![pb::RouteMatch {
                path: Some(pb::PathMatch {
                    r#type: pb::path_match::Type::Prefix as i32,
                    value: prefix.into(),
                }),
                ..Default::default()
            }],
            backend_refs: backends,
            port: 80,
            ..Default::default()
        };
        let mut unresolved = backend(Kind::Service, "shop/gone", 1);
        unresolved.unresolved = true;
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![
                route(
                    "/split",
                    vec![
                        backend(Kind::Parent, "", 90),
                        backend(Kind::Service, "shop/web-v2", 10),
                    ],
                ),
                route(
                    "/half-broken",
                    vec![backend(Kind::Parent, "", 1), unresolved],
                ),
                route("/none", vec![backend(Kind::Service, "shop/web-v2", 0)]),
                pb::Route {
                    invalid: "filter CORS is not supported".into(),
                    ..route("/invalid", vec![])
                },
            ],
            exhaustive: true,
            ..Default::default()
        });
        let split = draws(&table, "/split/x", 2000).await;
        let v2 = split.iter().filter(|r| r.as_deref() == Ok("2001")).count();
        // 10% of 2000 is 200; a fair draw lands within ±60 (over 4 standard deviations).
        assert!((140..=260).contains(&v2), "{v2} of 2000 went to web-v2");
        assert!(split.iter().all(|r| r.is_ok()));

        let broken = draws(&table, "/half-broken", 400).await;
        let failed = broken.iter().filter(|r| r.is_err()).count();
        assert!(
            (140..=260).contains(&failed),
            "{failed} of 400 answered 500"
        );
        assert!(
            broken
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| e == "500 backend-unresolved")
        );
        assert_eq!(
            draws(&table, "/none", 1).await,
            [Err("500 backend-unresolved".to_string())]
        );
        assert_eq!(
            draws(&table, "/invalid", 1).await,
            [Err("500 route-invalid".to_string())]
        );
        assert_eq!(
            draws(&table, "/elsewhere", 1).await,
            [Err("404 no-matching-route".to_string())],
            "routes bind the port and no rule matches"
        );
    }
}
