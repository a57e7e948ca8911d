//! The workload's outgoing traffic: routing, balancing, retries, and the trip to a peer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedmesh_dataplane::config::{AppProtocol, RoutingTable};
use fedmesh_dataplane::metrics::{
    BytesLabels, ReasonLabels, RequestLabels, RouteLabels, TcpLabels,
};
use fedmesh_dataplane::policy::Backend;
use fedmesh_dataplane::relay::relay;
use fedmesh_dataplane::target::Target;
use fedmesh_dataplane::trace;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::dest::{self, Dest, Scope};
use crate::net::{self, Prefixed, Protocol};
use crate::upstream::{ALPN_TCP, Body, BoxError, UpstreamError};
use crate::{ORIG_PROTO, PROXY_ERROR, Sidecar, XFCC};

/// A response the proxy made itself.
pub(crate) fn proxy_error(status: StatusCode, kind: &'static str, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("fedmesh: {msg}\n")))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(PROXY_ERROR, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(crate) fn boxed(r: Response<Incoming>) -> Response<Body> {
    r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed())
}

/// Headers that belong to one connection and never cross a proxy (RFC 9110 §7.6.1), plus those
/// named in `Connection`.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        // gRPC needs `te: trailers`, the one TE value HTTP/2 allows.
    } else {
        h.remove(header::TE);
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The request body, kept so a failed attempt can be retried when it is small enough.
enum BodySlot {
    Replayable(Bytes),
    Streaming(Option<Body>),
}

impl BodySlot {
    async fn new(body: Incoming, limit: usize) -> Result<Self, Response<Body>> {
        let small =
            body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= limit as u64);
        if !small {
            return Ok(Self::Streaming(Some(
                body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
            )));
        }
        match Limited::new(body, limit).collect().await {
            Ok(c) => Ok(Self::Replayable(c.to_bytes())),
            Err(e) => Err(proxy_error(
                StatusCode::BAD_REQUEST,
                "request-body",
                format!("reading the request body failed: {e}"),
            )),
        }
    }

    fn take(&mut self) -> Option<Body> {
        match self {
            Self::Replayable(b) => Some(Full::new(b.clone()).map_err(|e| match e {}).boxed()),
            Self::Streaming(b) => b.take(),
        }
    }

    fn put_back(&mut self, body: Body) {
        if let Self::Streaming(slot) = self {
            *slot = Some(body);
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Replayable(_))
    }
}

/// The declared protocol of a service port, if any (`appProtocol`, else the port name's prefix).
fn declared_protocol(table: &RoutingTable, dest: &Dest) -> Option<Protocol> {
    match table.service(&dest.service)?.port(dest.port)?.protocol {
        AppProtocol::Http => Some(Protocol::Http1),
        AppProtocol::Opaque => Some(Protocol::Tcp),
        AppProtocol::Undeclared => None,
    }
}

impl Sidecar {
    /// The remote targets whose trust domain this sidecar holds no bundle for yet: a handshake
    /// with them cannot succeed, so they are not tried (routing and bundles arrive by different
    /// streams; the bundle follows the route within moments).
    fn untrusted(&self, candidates: &[Target]) -> Vec<Target> {
        if candidates.iter().all(Target::is_local) {
            return Vec::new();
        }
        let trust = self.identity.trust();
        candidates
            .iter()
            .filter(|t| !t.is_local() && !trust.trusts(t.trust_domain().as_str()))
            .cloned()
            .collect()
    }

    /// The answer when nothing could be tried: names the clusters skipped for want of a bundle.
    fn nothing_to_try(dest: &Dest, untrusted: &[Target]) -> String {
        let mut clusters: Vec<String> = untrusted
            .iter()
            .filter(|t| !t.is_local())
            .map(|t| format!("{} ({})", t.cluster(), t.trust_domain()))
            .collect();
        clusters.dedup();
        if clusters.is_empty() {
            format!("{dest} has no healthy endpoint in any cluster")
        } else {
            format!(
                "{dest} has no healthy endpoint this sidecar can verify: no trust bundle yet for {}; check that the clusters are federated (fedmesh status)",
                clusters.join(", ")
            )
        }
    }

    /// Serves HTTP (both versions) from the workload on `s`.
    pub(crate) async fn outbound_http(
        self: Arc<Self>,
        s: TcpStream,
        prefix: Vec<u8>,
        fixed: Option<Dest>,
        graceful: CancellationToken,
    ) {
        let me = self.clone();
        let svc = service_fn(move |req| {
            let (me, fixed) = (me.clone(), fixed.clone());
            async move { Ok::<_, Infallible>(me.outbound_request(req, fixed).await) }
        });
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_buf_size(64 * 1024);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(64 * 1024);
        let io = TokioIo::new(Prefixed::new(prefix, s));
        let conn = b.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "outbound connection ended with an error");
                }
            }
            _ = graceful.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// A connection for a known service port: HTTP or opaque TCP.
    pub(crate) async fn outbound_to(
        self: Arc<Self>,
        mut s: TcpStream,
        dest: Dest,
        graceful: CancellationToken,
    ) {
        self.config.ensure(&dest.service.to_string()).await;
        let table = self.config.table();
        let (protocol, prefix) = match declared_protocol(&table, &dest) {
            Some(p) => (p, Vec::new()),
            None => match net::detect(&mut s, self.options.protocol_detect_timeout).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "client went away during protocol detection");
                    return;
                }
            },
        };
        drop(table);
        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                self.outbound_http(s, prefix, Some(dest), graceful).await
            }
            Protocol::Tcp => self.outbound_tcp(Prefixed::new(prefix, s), dest).await,
        }
    }

    pub(crate) async fn transparent(
        self: Arc<Self>,
        s: TcpStream,
        peer: SocketAddr,
        own: Option<SocketAddr>,
        graceful: CancellationToken,
    ) {
        let orig = match net::original_dst(&s) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "no original destination (is the iptables REDIRECT rule in place?)");
                self.metrics.refuse("no_original_dst");
                return;
            }
        };
        if Some(orig) == own {
            // Addressed to the listener itself: there is nowhere to send it.
            self.metrics.refuse("loop");
            return;
        }
        if orig.is_ipv4() {
            self.config.ensure(&orig.ip().to_string()).await;
        }
        let table = self.config.table();
        match dest::from_vip(orig, &table) {
            Some(dest) => {
                drop(table);
                self.outbound_to(s, dest, graceful).await
            }
            None => {
                drop(table);
                self.passthrough(s, orig).await
            }
        }
    }

    /// Traffic to something outside the mesh goes where it was going, untouched.
    async fn passthrough(&self, s: TcpStream, orig: SocketAddr) {
        match net::connect(
            &orig.to_string(),
            self.options.connect_timeout,
            self.options.mark,
        )
        .await
        {
            Ok(up) => {
                let _ = relay(s, up, self.options.idle_timeout).await;
            }
            Err(e) => {
                tracing::debug!(destination = %orig, error = %e, "passthrough connect failed")
            }
        }
    }

    /// Opens an mTLS connection for opaque TCP to `dest`, trying other targets when one fails.
    async fn open_tcp(
        &self,
        table: &RoutingTable,
        dest: &Dest,
    ) -> Result<
        (tokio_rustls::client::TlsStream<TcpStream>, Target),
        (StatusCode, &'static str, String),
    > {
        let entry = table.service(&dest.service).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                "no-route",
                format!("{} is not a service known to this sidecar", dest.service),
            )
        })?;
        let candidates = entry.targets_for(dest.scope, dest.port);
        // A cluster.local name stays in this cluster: no split across clusters.
        let split: &[Backend] = if entry.resolve(dest.scope) == Scope::Local {
            &[]
        } else {
            &entry.policy.split
        };
        let connect_timeout = entry.policy.connect_timeout;
        let here = self.locality(table);
        let mut tried = self.untrusted(candidates);
        let mut last = Self::nothing_to_try(dest, &tried);
        for attempt in 0..=self.options.safe_retries {
            let Some(target) = self.balancer.pick(&here, candidates, split, &tried) else {
                break;
            };
            if attempt > 0 {
                self.metrics.retries.inc();
            }
            match self.upstreams.tls(&target, ALPN_TCP, connect_timeout).await {
                Ok(tls) => {
                    self.balancer.success(&target);
                    return Ok((tls, target));
                }
                Err(e) => {
                    self.count_error(e.label());
                    if self.balancer.failure(&target, candidates) {
                        self.metrics.ejections.inc();
                    }
                    last = e.to_string();
                    tried.push(target);
                }
            }
        }
        Err((StatusCode::SERVICE_UNAVAILABLE, "unavailable", last))
    }

    async fn outbound_tcp<S: AsyncRead + AsyncWrite + Unpin>(&self, client: S, dest: Dest) {
        let table = self.config.table();
        let (up, target) = match self.open_tcp(&table, &dest).await {
            Ok(x) => x,
            Err((_, _, msg)) => {
                tracing::warn!(destination = %dest, error = %msg, "opaque TCP connection refused");
                return;
            }
        };
        let dst_cluster = target.cluster().to_string();
        drop(table);
        self.relay_tcp(client, up, &dest, &target, dst_cluster)
            .await;
    }

    async fn relay_tcp<A, B>(
        &self,
        client: A,
        up: B,
        dest: &Dest,
        target: &Target,
        dst_cluster: String,
    ) where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let service = dest.service.to_string();
        self.metrics
            .tcp_connections
            .get_or_create(&TcpLabels {
                direction: "outbound".into(),
                dst_cluster,
                service: service.clone(),
            })
            .inc();
        self.metrics.tcp_active.inc();
        let _lease = self.balancer.lease(target);
        let moved = relay(client, up, self.options.idle_timeout).await;
        self.metrics.tcp_active.dec();
        if let Ok(m) = moved {
            self.metrics
                .bytes
                .get_or_create(&BytesLabels {
                    direction: "out".into(),
                    service: service.clone(),
                })
                .inc_by(m.a_to_b);
            self.metrics
                .bytes
                .get_or_create(&BytesLabels {
                    direction: "in".into(),
                    service,
                })
                .inc_by(m.b_to_a);
        }
    }

    fn count_error(&self, reason: &str) {
        self.metrics
            .request_errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn record(
        &self,
        direction: &str,
        src_cluster: &str,
        dst_cluster: &str,
        service: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: direction.into(),
                src_cluster: src_cluster.into(),
                dst_cluster: dst_cluster.into(),
                service: service.into(),
                code: status.as_u16().to_string(),
            })
            .inc();
        self.metrics
            .request_duration
            .get_or_create(&RouteLabels {
                direction: direction.into(),
                src_cluster: src_cluster.into(),
                dst_cluster: dst_cluster.into(),
                service: service.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The routing table, once it knows what `host` names: a service of another namespace, or an
    /// address, is asked of the control plane the first time this sidecar meets it.
    async fn table_for_host(&self, host: Option<&str>) -> Arc<RoutingTable> {
        if let Some(subject) = host.and_then(dest::subject_of_host) {
            self.config.ensure(&subject).await;
        }
        self.config.table()
    }

    /// `CONNECT service:port` on the HTTP proxy: an opaque TCP tunnel.
    async fn connect_tunnel(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let table = self
            .table_for_host(req.uri().authority().map(|a| a.as_str()))
            .await;
        let Some(dest) = req
            .uri()
            .authority()
            .and_then(|a| dest::from_host(a.as_str(), &table))
        else {
            return proxy_error(
                StatusCode::NOT_FOUND,
                "no-route",
                format!(
                    "CONNECT {}: not a service port of the clusterset (use NAME.NAMESPACE.svc.clusterset.local:PORT)",
                    req.uri()
                ),
            );
        };
        let (up, target) = match self.open_tcp(&table, &dest).await {
            Ok(x) => x,
            Err((status, kind, msg)) => return proxy_error(status, kind, msg),
        };
        let dst_cluster = target.cluster().to_string();
        drop(table);
        let me = self.clone();
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    me.relay_tcp(TokioIo::new(upgraded), up, &dest, &target, dst_cluster)
                        .await
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
    }

    pub(crate) async fn outbound_request(
        self: Arc<Self>,
        req: Request<Incoming>,
        fixed: Option<Dest>,
    ) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return self.connect_tunnel(req).await;
        }
        let start = Instant::now();
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        let table = match &fixed {
            Some(d) => {
                self.config.ensure(&d.service.to_string()).await;
                self.config.table()
            }
            None => self.table_for_host(host.as_deref()).await,
        };
        let dest = match fixed.or_else(|| host.as_deref().and_then(|h| dest::from_host(h, &table)))
        {
            Some(d) => d,
            None => {
                self.count_error("no_route");
                return proxy_error(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    format!(
                        "{} is not a service of the clusterset known to this sidecar (use NAME.NAMESPACE.svc.clusterset.local[:PORT])",
                        host.as_deref().unwrap_or("a request without a host")
                    ),
                );
            }
        };
        if req.headers().contains_key(header::UPGRADE) && req.version() < Version::HTTP_2 {
            return proxy_error(
                StatusCode::NOT_IMPLEMENTED,
                "upgrade",
                "HTTP/1.1 upgrades (WebSocket) are not meshed yet; declare the port as tcp (name it tcp-*) to carry it opaquely".into(),
            );
        }
        let (resp, dst_cluster) = self.forward(&table, &dest, host, req).await;
        let service = dest.service.to_string();
        self.record(
            "outbound",
            &table.cluster.name,
            &dst_cluster,
            &service,
            resp.status(),
            start.elapsed(),
        );
        resp
    }

    /// Sends the request to `dest`, retrying on another target when that is safe. Returns the
    /// response and the cluster that answered.
    async fn forward(
        &self,
        table: &RoutingTable,
        dest: &Dest,
        host: Option<String>,
        req: Request<Incoming>,
    ) -> (Response<Body>, String) {
        let Some(entry) = table.service(&dest.service) else {
            return (
                proxy_error(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    format!("{} is not known", dest.service),
                ),
                String::new(),
            );
        };
        let policy = &entry.policy;
        let (mut parts, body) = req.into_parts();
        let route = policy.route(&parts.uri, &parts.headers);
        let local_only = entry.resolve(dest.scope) == Scope::Local;
        let split: &[Backend] = match route {
            // A cluster.local name stays in this cluster: no split across clusters.
            _ if local_only => &[],
            Some(r) if !r.backends.is_empty() => &r.backends,
            _ => &policy.split,
        };
        let app_retries = route
            .map(|r| r.retries)
            .filter(|n| *n > 0)
            .unwrap_or(policy.retries);
        let timeout = route.and_then(|r| r.timeout).or(policy.request_timeout);
        let connect_timeout = policy.connect_timeout;
        let candidates = entry.targets_for(dest.scope, dest.port);
        let idempotent = is_idempotent(&parts.method);

        // What crosses to the peer: no hop-by-hop headers, no caller-supplied identity header,
        // the original protocol when it was HTTP/1.x, and this hop in the trace.
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(XFCC);
        parts.headers.remove(ORIG_PROTO);
        parts.headers.remove(PROXY_ERROR);
        if parts.version < Version::HTTP_2 {
            parts
                .headers
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        let _span = trace::propagate(&mut parts.headers);
        let authority = host.unwrap_or_else(|| {
            format!(
                "{}.{}.svc.{}.local:{}",
                dest.service.name,
                dest.service.namespace,
                if local_only { "cluster" } else { "clusterset" },
                dest.port
            )
        });
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(e) => {
                return (
                    proxy_error(
                        StatusCode::BAD_REQUEST,
                        "bad-request",
                        format!("bad request target: {e}"),
                    ),
                    String::new(),
                );
            }
        };
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;

        let mut body = match BodySlot::new(body, self.options.max_retry_body).await {
            Ok(b) => b,
            Err(resp) => return (resp, String::new()),
        };
        let here = self.locality(table);
        let mut tried: Vec<Target> = self.untrusted(candidates);
        let untrusted = tried.len();
        let (mut safe_left, mut app_left) = (self.options.safe_retries, app_retries);
        let mut last: Option<(Response<Body>, String)> = None;
        let mut attempts = 0u32;
        while let Some(target) = self.balancer.pick(&here, candidates, split, &tried) {
            attempts += 1;
            if attempts > 1 {
                self.metrics.retries.inc();
            }
            let dst_cluster = target.cluster().to_string();
            let _lease = self.balancer.lease(&target);
            let mut sender = match self.upstreams.h2(&target, connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    self.count_error(e.label());
                    self.fail(&target, candidates);
                    let status = match e {
                        UpstreamError::Tls { .. } | UpstreamError::Alpn { .. } => {
                            StatusCode::BAD_GATEWAY
                        }
                        _ => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    last = Some((proxy_error(status, e.label(), e.to_string()), dst_cluster));
                    tried.push(target);
                    if safe_left == 0 {
                        break;
                    }
                    safe_left -= 1;
                    continue;
                }
            };
            let Some(b) = body.take() else { break };
            let sent = sender.try_send_request(Request::from_parts(parts.clone(), b));
            let result = match timeout {
                Some(t) => match tokio::time::timeout(t, sent).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.count_error("timeout");
                        return (
                            proxy_error(
                                StatusCode::GATEWAY_TIMEOUT,
                                "timeout",
                                format!("{dest} did not answer within {t:?}"),
                            ),
                            dst_cluster,
                        );
                    }
                },
                None => sent.await,
            };
            match result {
                Ok(resp) => {
                    let status = resp.status();
                    let from_proxy = resp.headers().contains_key(PROXY_ERROR);
                    let gateway_failure = matches!(status.as_u16(), 502..=504);
                    // Never reached the app (its sidecar said so): safe to retry anything.
                    let unreached = from_proxy
                        && matches!(
                            status,
                            StatusCode::SERVICE_UNAVAILABLE | StatusCode::MISDIRECTED_REQUEST
                        );
                    if status == StatusCode::MISDIRECTED_REQUEST && from_proxy {
                        // The peer will not serve this on that connection (RFC 9110 15.5.20):
                        // the next request opens a new one.
                        self.upstreams.evict(&target);
                    }
                    if gateway_failure || unreached {
                        self.fail(&target, candidates);
                    } else {
                        self.balancer.success(&target);
                    }
                    let retry = body.replayable()
                        && ((unreached && safe_left > 0)
                            || (!unreached && gateway_failure && app_left > 0));
                    if retry {
                        if unreached {
                            safe_left -= 1;
                        } else {
                            app_left -= 1;
                        }
                        tried.push(target);
                        last = Some((boxed(resp), dst_cluster));
                        continue;
                    }
                    return (boxed(resp), dst_cluster);
                }
                Err(mut e) => {
                    self.upstreams.evict(&target);
                    self.fail(&target, candidates);
                    let not_sent = e.take_message();
                    let err = e.into_error();
                    self.count_error("upstream_reset");
                    last = Some((
                        proxy_error(
                            StatusCode::BAD_GATEWAY,
                            "upstream-reset",
                            format!("the connection to {} failed: {err}", target.key()),
                        ),
                        dst_cluster,
                    ));
                    tried.push(target);
                    let can_retry = match not_sent {
                        // Never sent: the body comes back with the request.
                        Some(req) => {
                            body.put_back(req.into_body());
                            true
                        }
                        // Sent, no answer: only an idempotent request we still hold is retried.
                        None => body.replayable() && idempotent,
                    };
                    if !can_retry || safe_left == 0 {
                        break;
                    }
                    safe_left -= 1;
                }
            }
        }
        last.unwrap_or_else(|| {
            self.count_error("no_healthy_endpoint");
            (
                proxy_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    Self::nothing_to_try(dest, &tried[..untrusted]),
                ),
                String::new(),
            )
        })
    }

    fn fail(&self, target: &Target, pool: &[Target]) {
        if self.balancer.failure(target, pool) {
            self.metrics.ejections.inc();
        }
    }
}
