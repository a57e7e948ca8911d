//! The filter layer: what the matched rule — and the backend it drew — does to a request besides
//! choosing where it goes (Gateway API filters), in the order the route lists them:
//!
//! * `RequestHeaderModifier` sets, adds and removes request headers;
//! * `URLRewrite` replaces the path (whole, or the matched prefix) and the host the peer sees;
//! * `RequestRedirect` answers at once with a `Location` (scheme, host, port, path);
//! * `RequestMirror` sends a copy, after every change above, to another backend and ignores its
//!   answer: fire and forget, marked `fedmesh-mirror: 1`, a bounded number in flight, only bodies
//!   small enough to copy;
//! * `ResponseHeaderModifier` changes the answer's headers on the way back.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, Buffered, buffer_small, full};
use fedmesh_dataplane::metrics::{ProxyMetrics, ReasonLabels};
use fedmesh_dataplane::policy::{Filter, HeaderModifier, Mirror, Redirect};
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::ctx::{BoxFuture, RouteCtx, route_ctx};
use super::forward::{CallerHost, Mirrored};
use super::route::resolve;

/// How long a mirrored copy may take before it is given up.
const MIRROR_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub(crate) struct FilterLayer {
    /// Mirrored copies in flight; when none is free the copy is skipped, never the request.
    pub mirrors: Arc<Semaphore>,
    /// Bodies up to this size are copied for mirrors; larger or streaming ones are not mirrored.
    pub max_mirror_body: usize,
    pub metrics: Arc<ProxyMetrics>,
    /// The answers to copies a rollout watches (blue-green's mirror step).
    pub signals: Arc<fedmesh_dataplane::signals::Signals>,
}

impl<S> Layer<S> for FilterLayer {
    type Service = Filters<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Filters {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Filters<S> {
    inner: S,
    layer: FilterLayer,
}

/// What is left to do once the request's own filters ran.
#[derive(Default)]
struct Plan {
    mirrors: Vec<Mirror>,
    response: Vec<HeaderModifier>,
}

impl<S> Service<Request<Body>> for Filters<S>
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

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let ctx = match route_ctx(&req) {
            Ok(c) => c,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let filters: Vec<&Filter> = ctx
            .route()
            .map(|r| r.filters.iter())
            .into_iter()
            .flatten()
            .chain(
                ctx.route_backend()
                    .into_iter()
                    .flat_map(|b| b.filters.iter()),
            )
            .collect();
        if filters.is_empty() {
            return Box::pin(self.inner.call(req));
        }
        let mut plan = Plan::default();
        for f in filters {
            match f {
                Filter::RequestHeaders(m) => m.apply(req.headers_mut()),
                Filter::ResponseHeaders(m) => plan.response.push(m.clone()),
                Filter::Rewrite(r) => {
                    if let Some(p) = &r.path {
                        let matched = ctx.route().and_then(|r| r.matched_prefix());
                        let path = p.apply(req.uri().path(), matched);
                        if let Err(e) = set_path(req.uri_mut(), &path) {
                            return Box::pin(std::future::ready(Err(e)));
                        }
                    }
                    if let Some(h) = &r.hostname {
                        let host = h.to_str().unwrap_or_default().to_string();
                        req.headers_mut().insert(header::HOST, h.clone());
                        req.extensions_mut().insert(CallerHost(host));
                    }
                }
                Filter::Redirect(r) => {
                    let resp = redirect(&ctx, &req, r);
                    return Box::pin(std::future::ready(Ok(respond(resp, &plan.response))));
                }
                Filter::Mirror(m) => {
                    let roll = rand::random::<u32>() % m.denominator.max(1);
                    if roll < m.numerator {
                        plan.mirrors.push(m.clone());
                    }
                }
            }
        }
        let mut inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            let req = if plan.mirrors.is_empty() {
                req
            } else {
                layer
                    .mirror(&ctx, req, &plan.mirrors, inner.clone())
                    .await?
            };
            let call: BoxFuture<_> = Box::pin(inner.call(req));
            Ok(respond(call.await?, &plan.response))
        })
    }
}

fn respond(mut resp: Response<Body>, modifiers: &[HeaderModifier]) -> Response<Body> {
    for m in modifiers {
        m.apply(resp.headers_mut());
    }
    resp
}

fn set_path(uri: &mut Uri, path: &str) -> Result<(), ProxyError> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(pq)
            .map_err(|e| ProxyError::BadRequest(format!("the rewritten path is invalid: {e}")))?,
    );
    *uri = Uri::from_parts(parts)
        .map_err(|e| ProxyError::BadRequest(format!("the rewritten URI is invalid: {e}")))?;
    Ok(())
}

/// The redirect's answer. Scheme: the filter's, else `http` (what the app spoke to its sidecar);
/// host: the filter's, else the one the caller named, without its port; port: the filter's, else
/// the scheme's well-known one when the filter sets a scheme, else the service port — left out
/// when it is the scheme's default; path: the request's, unless the filter modifies it.
fn redirect(ctx: &RouteCtx, req: &Request<Body>, r: &Redirect) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let named = req
        .extensions()
        .get::<CallerHost>()
        .and_then(|h| h.0.parse::<Authority>().ok());
    let host = match (&r.hostname, &named) {
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.host().to_string(),
        (None, None) => format!(
            "{}.{}.svc.cluster.local",
            ctx.dest.service.name, ctx.dest.service.namespace
        ),
    };
    let port = r.port.unwrap_or(match r.scheme.as_deref() {
        Some("https") => 443,
        Some(_) => 80,
        None => ctx.dest.port,
    });
    let port = match (scheme, port) {
        ("http", 80) | ("https", 443) => String::new(),
        (_, p) => format!(":{p}"),
    };
    let path = match &r.path {
        Some(p) => p.apply(
            req.uri().path(),
            ctx.route().and_then(|r| r.matched_prefix()),
        ),
        None => req.uri().path().to_string(),
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let mut resp = Response::new(full(""));
    *resp.status_mut() = r.status;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(e) => {
            return ProxyError::RouteInvalid {
                source_route: ctx.route().map(|r| r.source.clone()).unwrap_or_default(),
                reason: format!("the redirect location {location:?} is not a header value: {e}"),
            }
            .into_response();
        }
    }
    resp
}

impl FilterLayer {
    fn count(&self, outcome: &str) {
        self.metrics
            .mirrors
            .get_or_create(&ReasonLabels {
                reason: outcome.into(),
            })
            .inc();
    }

    /// Sends a copy of `req` to each mirror's backend and returns the request to go on with.
    async fn mirror<S>(
        &self,
        ctx: &RouteCtx,
        req: Request<Body>,
        mirrors: &[Mirror],
        inner: S,
    ) -> Result<Request<Body>, ProxyError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        let (parts, body) = req.into_parts();
        let bytes = match buffer_small(body, self.max_mirror_body).await? {
            Buffered::Whole(b) => b,
            Buffered::Streaming(body) => {
                for _ in mirrors {
                    self.count("skipped_body");
                }
                return Ok(Request::from_parts(parts, body));
            }
        };
        let source = ctx.route().map(|r| r.source.as_str()).unwrap_or_default();
        for m in mirrors {
            let Ok(permit) = self.mirrors.clone().try_acquire_owned() else {
                self.count("skipped_busy");
                continue;
            };
            let drawn = match resolve(ctx, &m.backend, None, source) {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "mirror backend unresolved");
                    self.count("failed");
                    continue;
                }
            };
            let mut copy = Request::new(full(bytes.clone()));
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = parts.uri.clone();
            *copy.version_mut() = parts.version;
            *copy.headers_mut() = parts.headers.clone();
            if let Some(h) = parts.extensions.get::<CallerHost>() {
                copy.extensions_mut().insert(h.clone());
            }
            copy.extensions_mut().insert(Mirrored);
            copy.extensions_mut().insert(Arc::new(RouteCtx {
                route: None,
                backend: Some(drawn),
                ..ctx.clone()
            }));
            let call: BoxFuture<_> = Box::pin(inner.clone().call(copy));
            let layer = self.clone();
            self.count("sent");
            let signals = m.signals.clone();
            let start = std::time::Instant::now();
            tokio::spawn(async move {
                let failed = match tokio::time::timeout(MIRROR_DEADLINE, call).await {
                    Ok(Ok(resp)) => {
                        fedmesh_dataplane::signals::failed(resp.status().as_u16(), resp.headers())
                    }
                    Ok(Err(_)) | Err(_) => {
                        layer.count("failed");
                        true
                    }
                };
                if let Some(name) = signals {
                    layer.signals.record(&name, failed, start.elapsed());
                }
                drop(permit);
            });
        }
        Ok(Request::from_parts(parts, full(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use std::sync::Mutex;

    fn layer() -> FilterLayer {
        FilterLayer {
            mirrors: Arc::new(Semaphore::new(4)),
            max_mirror_body: 1024,
            metrics: Arc::new(ProxyMetrics::new("test")),
            signals: Arc::default(),
        }
    }

    fn route(path: &str, filters: Vec<pb::filter::Kind>) -> pb::Route {
        pb::Route {
            name: path.into(),
            source: "HTTPRoute shop/web".into(),
            matches: vec![pb::RouteMatch {
                path: Some(pb::PathMatch {
                    r#type: pb::path_match::Type::Prefix as i32,
                    value: path.into(),
                }),
                ..Default::default()
            }],
            filters: filters
                .into_iter()
                .map(|k| pb::Filter { kind: Some(k) })
                .collect(),
            ..Default::default()
        }
    }

    fn header(name: &str, value: &str) -> pb::Header {
        pb::Header {
            name: name.into(),
            value: value.into(),
        }
    }

    /// The path and headers of each request an inner service got.
    type Seen = Arc<Mutex<Vec<(String, http::HeaderMap)>>>;

    /// Records each request the inner service gets (path, headers) in `seen` and answers 200.
    fn recording(
        seen: &Seen,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = ProxyError,
        Future = BoxFuture<Result<Response<Body>, ProxyError>>,
    > + Clone
    + Send
    + 'static {
        let s = seen.clone();
        tower::service_fn(move |req: Request<Body>| {
            s.lock().unwrap().push((
                req.uri().path_and_query().unwrap().to_string(),
                req.headers().clone(),
            ));
            Box::pin(std::future::ready(Ok(Response::new(full(""))))) as BoxFuture<_>
        })
    }

    fn request(table: &Arc<fedmesh_dataplane::config::RoutingTable>, path: &str) -> Request<Body> {
        let mut req = routed_request(table, "shop/web");
        *req.uri_mut() = path.parse().unwrap();
        req.extensions_mut().insert(CallerHost("echo:8080".into()));
        let ctx = (**req.extensions().get::<Arc<RouteCtx>>().unwrap()).clone();
        let route = ctx.entry.policy.routes.iter().position(|r| {
            r.matches
                .iter()
                .any(|m| m.matches(req.method(), req.uri(), req.headers()))
        });
        req.extensions_mut()
            .insert(Arc::new(RouteCtx { route, ..ctx }));
        req
    }

    #[tokio::test]
    async fn rewrites_and_header_modifiers_change_what_the_backend_sees() {
        use pb::filter::Kind;
        let modify = Kind::RequestHeaders(pb::HeaderModifier {
            set: vec![header("x-header-set", "set-overwrites-values")],
            add: vec![
                header("x-header-add", "header-val-1"),
                header("x-header-add-append", "header-val-2"),
            ],
            remove: vec!["x-header-remove".into()],
        });
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![
                route(
                    "/prefix",
                    vec![
                        Kind::Rewrite(pb::Rewrite {
                            hostname: String::new(),
                            path: Some(pb::PathModifier {
                                full: false,
                                value: "/one".into(),
                            }),
                        }),
                        modify.clone(),
                    ],
                ),
                route(
                    "/strip-prefix",
                    vec![Kind::Rewrite(pb::Rewrite {
                        hostname: "elsewhere.example".into(),
                        path: Some(pb::PathModifier {
                            full: false,
                            value: "/".into(),
                        }),
                    })],
                ),
                route(
                    "/full",
                    vec![
                        Kind::Rewrite(pb::Rewrite {
                            hostname: String::new(),
                            path: Some(pb::PathModifier {
                                full: true,
                                value: "/test".into(),
                            }),
                        }),
                        Kind::ResponseHeaders(pb::HeaderModifier {
                            set: vec![header("x-served-by", "fedmesh")],
                            ..Default::default()
                        }),
                    ],
                ),
            ],
            ..Default::default()
        });
        let seen = Seen::default();
        let inner = recording(&seen);
        let mut svc = layer().layer(inner);
        let mut req = request(&table, "/prefix/two?q=1");
        for (k, v) in [
            ("x-header-remove", "remove-val"),
            ("x-header-add-append", "append-val-1"),
            ("x-header-set", "set-val"),
        ] {
            req.headers_mut().insert(k, HeaderValue::from_static(v));
        }
        svc.call(req).await.unwrap();
        svc.call(request(&table, "/strip-prefix")).await.unwrap();
        let resp = svc.call(request(&table, "/full/a/b")).await.unwrap();
        assert_eq!(resp.headers()["x-served-by"], "fedmesh");
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "/one/two?q=1");
        let h = &seen[0].1;
        assert_eq!(h["x-header-set"], "set-overwrites-values");
        assert_eq!(h["x-header-add"], "header-val-1");
        assert_eq!(h["x-header-add-append"], "append-val-1,header-val-2");
        assert!(h.get("x-header-remove").is_none());
        assert_eq!(seen[1].0, "/");
        assert_eq!(seen[1].1["host"], "elsewhere.example");
        assert_eq!(seen[2].0, "/test");
    }

    #[tokio::test]
    async fn redirects_answer_with_the_location_gateway_api_specifies() {
        use pb::filter::Kind;
        let redirect = |path: &str, r: pb::Redirect| route(path, vec![Kind::Redirect(r)]);
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![
                redirect(
                    "/original-prefix",
                    pb::Redirect {
                        path: Some(pb::PathModifier {
                            full: false,
                            value: "/replacement-prefix".into(),
                        }),
                        status: 302,
                        ..Default::default()
                    },
                ),
                redirect(
                    "/scheme",
                    pb::Redirect {
                        scheme: "https".into(),
                        status: 301,
                        ..Default::default()
                    },
                ),
                redirect(
                    "/port-and-host",
                    pb::Redirect {
                        hostname: "example.org".into(),
                        port: 8083,
                        status: 307,
                        ..Default::default()
                    },
                ),
                redirect(
                    "/same",
                    pb::Redirect {
                        status: 308,
                        ..Default::default()
                    },
                ),
            ],
            ..Default::default()
        });
        let seen = Seen::default();
        let inner = recording(&seen);
        let mut svc = layer().layer(inner);
        let mut answer = async |path: &str| {
            let r = svc.call(request(&table, path)).await.unwrap();
            (
                r.status().as_u16(),
                r.headers()[header::LOCATION].to_str().unwrap().to_string(),
            )
        };
        assert_eq!(
            answer("/original-prefix/lemon?x=1").await,
            (
                302,
                "http://echo:80/replacement-prefix/lemon?x=1".replace(":80", "")
            )
        );
        assert_eq!(answer("/scheme").await, (301, "https://echo/scheme".into()));
        assert_eq!(
            answer("/port-and-host").await,
            (307, "http://example.org:8083/port-and-host".into())
        );
        // No port in the filter and no scheme: the service port the request was addressed to.
        assert_eq!(answer("/same").await, (308, "http://echo/same".into()));
        assert!(
            seen.lock().unwrap().is_empty(),
            "redirects reach no backend"
        );
    }

    #[tokio::test]
    async fn mirrors_get_a_copy_and_their_answers_are_ignored() {
        use pb::filter::Kind;
        let mirror = |numerator| {
            Kind::Mirror(pb::Mirror {
                backend: Some(pb::BackendRef {
                    kind: pb::backend_ref::Kind::Parent as i32,
                    weight: 1,
                    ..Default::default()
                }),
                numerator,
                denominator: 100,
            })
        };
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![
                route("/always", vec![mirror(100)]),
                route("/never", vec![mirror(0)]),
            ],
            ..Default::default()
        });
        let seen = Seen::default();
        let inner = recording(&seen);
        let l = layer();
        let metrics = l.metrics.clone();
        let mut svc = l.layer(inner);
        let mut req = request(&table, "/always");
        *req.body_mut() = full("payload");
        svc.call(req).await.unwrap();
        svc.call(request(&table, "/never")).await.unwrap();
        let sent = || {
            metrics
                .mirrors
                .get_or_create(&ReasonLabels {
                    reason: "sent".into(),
                })
                .get()
        };
        // The copy is sent from a task of its own.
        for _ in 0..100 {
            if sent() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(sent(), 1);
        let paths: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(
            paths.iter().filter(|p| *p == "/always").count(),
            2,
            "{paths:?}"
        );
        assert_eq!(
            paths.iter().filter(|p| *p == "/never").count(),
            1,
            "{paths:?}"
        );
    }
}
