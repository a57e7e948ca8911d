//! The workload's outgoing traffic.
//!
//! HTTP goes through a stack of tower layers, one concern each, assembled once per sidecar
//! ([`Sidecar::outbound_stack`]) as linkerd2-proxy composes its route stacks:
//!
//! ```text
//! observe (metrics, error -> response) → route (service, matched rule, drawn backend) →
//! filters (header changes, rewrites, redirects, mirrors) → fault (injected delays and aborts) →
//! rate limit (the route's) → forward (what crosses to the peer) → timeout (the whole request) →
//! retry (budgeted; per-attempt timeouts, backoff) → circuit breaker (the backend's limits) →
//! balance (target per attempt: locality, split, algorithm, ejection) → endpoint (pooled
//! HTTP/2 mTLS)
//! ```
//!
//! Opaque TCP ([`tcp`]) picks and connects with the same balancer. Each layer lives in its own
//! module with unit tests that drive it alone.

mod balance;
mod breaker;
mod ctx;
mod endpoint;
mod fault;
mod filters;
mod forward;
mod observe;
mod ratelimit;
mod retry;
mod route;
mod tcp;
#[cfg(test)]
pub(crate) mod test_support;
mod timeout;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_dataplane::config::{AppProtocol, RoutingTable, SUBSCRIBE_WAIT};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, body, full, strip_hop_by_hop};
use fedmesh_dataplane::relay::relay;
use http::header;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::Sidecar;
use crate::dest::{self, Dest};
use crate::net::{self, Prefixed, Protocol};

pub(crate) use ctx::BoxFuture;
pub use retry::{BudgetConfig, Budgets};

/// The assembled HTTP stack.
pub(crate) type OutboundStack = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The declared protocol of a service port, if any (`appProtocol`, else the port name's prefix).
fn declared_protocol(table: &RoutingTable, dest: &Dest) -> Option<Protocol> {
    match table.service(&dest.service)?.port(dest.port)?.protocol {
        AppProtocol::Http => Some(Protocol::Http1),
        AppProtocol::Opaque => Some(Protocol::Tcp),
        AppProtocol::Undeclared => None,
    }
}

impl Sidecar {
    /// Assembles the outbound HTTP stack (once, when the sidecar is made).
    pub(crate) fn outbound_stack(
        config: fedmesh_dataplane::config::ConfigHandle,
        parts: StackParts,
    ) -> OutboundStack {
        let endpoint = endpoint::Endpoint {
            upstreams: parts.upstreams,
        };
        let balanced = balance::BalanceLayer {
            balancer: parts.balancer,
            identity: parts.identity.clone(),
            zone: parts.zone,
            metrics: parts.metrics.clone(),
        }
        .layer(endpoint);
        let broken = breaker::BreakerLayer {
            breakers: Arc::new(breaker::Breakers::default()),
            metrics: parts.metrics.clone(),
        }
        .layer(balanced);
        let retried = retry::RetryLayer {
            safe_retries: parts.safe_retries,
            max_retry_body: parts.max_retry_body,
            budgets: parts.budgets,
            metrics: parts.metrics.clone(),
        }
        .layer(broken);
        let timed = timeout::TimeoutLayer.layer(retried);
        let forwarded = forward::ForwardLayer.layer(timed);
        let limited = ratelimit::RateLimitLayer {
            limiter: parts.limiter,
        }
        .layer(forwarded);
        let faulted = fault::FaultLayer {
            metrics: parts.metrics.clone(),
        }
        .layer(limited);
        let filtered = filters::FilterLayer {
            mirrors: Arc::new(tokio::sync::Semaphore::new(parts.max_mirrors)),
            max_mirror_body: parts.max_retry_body,
            metrics: parts.metrics.clone(),
            signals: parts.signals.clone(),
        }
        .layer(faulted);
        let routed = route::RouteLayer::new(config.clone()).layer(filtered);
        let observed = observe::ObserveLayer {
            metrics: parts.metrics,
            config,
            spans: parts.spans,
            identity: parts.identity,
            access_log: parts.access_log,
            signals: parts.signals.clone(),
        }
        .layer(routed);
        BoxCloneSyncService::new(observed)
    }

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
        serve_http_conn(s, prefix, svc, graceful).await
    }

    /// Whether a routing table is loaded, waiting up to [`SUBSCRIBE_WAIT`] for the first one.
    /// On an empty table a sidecar would send a clusterset IP through to nowhere and answer
    /// `no-route` for a service it will know a moment later.
    async fn has_config(&self) -> bool {
        self.config.is_ready()
            || tokio::time::timeout(SUBSCRIBE_WAIT, self.config.ready())
                .await
                .is_ok()
    }

    /// 503 `not-ready`, counted.
    fn answer_not_ready(&self) -> Response<Body> {
        let e = ProxyError::NotReady;
        self.metrics.count_error(e.kind());
        e.into_response()
    }

    /// A connection that came before any configuration (none from the control plane, no
    /// `--config-cache`): HTTP gets 503 `not-ready` for each request, anything else is closed,
    /// since it cannot be told why. Counted as `not_ready`.
    async fn not_ready(self: Arc<Self>, mut s: TcpStream, graceful: CancellationToken) {
        tracing::debug!("connection before any configuration: not ready");
        let detected = net::detect(&mut s, self.options.protocol_detect_timeout).await;
        let Ok((Protocol::Http1 | Protocol::Http2, prefix)) = detected else {
            self.metrics.count_error(ProxyError::NotReady.kind());
            return;
        };
        let me = self.clone();
        let svc =
            service_fn(move |_req| std::future::ready(Ok::<_, Infallible>(me.answer_not_ready())));
        serve_http_conn(s, prefix, svc, graceful).await
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
        // Addressed to the listener itself (a client that dialled the outbound port, at any of
        // the addresses a wildcard listener answers on): sending it "where it was going" would
        // connect the sidecar to itself, without end.
        if Some(orig) == own || s.local_addr().is_ok_and(|local| local == orig) {
            tracing::debug!(%peer, destination = %orig, "a connection to the outbound port itself; closed");
            self.metrics.refuse("loop");
            return;
        }
        if !self.has_config().await {
            // Nothing says yet whether `orig` is a clusterset IP, a pod or the outside world.
            return self.not_ready(s, graceful).await;
        }
        if orig.is_ipv4() {
            self.config.ensure(&orig.ip().to_string()).await;
        }
        let table = self.config.table();
        if let Some(dest) = dest::from_vip(orig, &table) {
            drop(table);
            return self.outbound_to(s, dest, graceful).await;
        }
        // A pod's own address: that endpoint, with mTLS, whatever the protocol (its Service's
        // routes do not apply), else wherever it was going.
        let endpoint = table.endpoint_at(orig).cloned();
        drop(table);
        match endpoint {
            Some((entry, target)) => self.to_endpoint(s, &entry, target).await,
            None => self.passthrough(s, orig).await,
        }
    }

    /// Opaque mTLS to one endpoint (ALPN `fedmesh-tcp/traced`): the peer's sidecar checks the caller and
    /// hands the bytes to its app, naming the caller in any HTTP it finds.
    async fn to_endpoint(
        &self,
        s: TcpStream,
        entry: &fedmesh_dataplane::config::ServiceEntry,
        target: fedmesh_dataplane::target::Target,
    ) {
        let dest = Dest {
            service: entry.key.clone(),
            port: target.sni().port,
            scope: dest::Scope::Local,
        };
        let span = self.tcp_span(&dest);
        let context = span.as_ref().map(|s| s.hop().context());
        match self
            .upstreams
            .tcp(&target, entry.policy.connect_timeout, context)
            .await
        {
            Ok(up) => self.relay_tcp(s, up, &dest, &target, span).await,
            Err(e) => {
                if let Some(s) = span {
                    s.finish_failed(e.label());
                }
                self.metrics.count_error(e.label());
                tracing::warn!(endpoint = %target.key(), error = %e, "connection to a meshed endpoint failed");
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
            return ProxyError::NoRoute(format!("CONNECT {}", req.uri())).into_response();
        };
        let mut span = self.tcp_span(&dest);
        let trigger = span.as_ref().map(|s| s.hop().context());
        let (up, target) = match self.open_tcp(&table, &dest, trigger).await {
            Ok(x) => x,
            Err(e) => {
                if let Some(s) = span.take() {
                    s.finish_failed(e.kind());
                }
                return e.into_response();
            }
        };
        drop(table);
        let me = self.clone();
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    me.relay_tcp(TokioIo::new(upgraded), up, &dest, &target, span)
                        .await
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(full(""))
    }

    /// One HTTP request from the workload: finds where it goes, then hands it to the stack.
    pub(crate) async fn outbound_request(
        self: Arc<Self>,
        req: Request<Incoming>,
        fixed: Option<Dest>,
    ) -> Response<Body> {
        let start = std::time::Instant::now();
        if !self.has_config().await {
            return self.answer_not_ready();
        }
        if req.method() == Method::CONNECT {
            return self.connect_tunnel(req).await;
        }
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
        let mut pinned = None;
        let dest = match fixed.or_else(|| host.as_deref().and_then(|h| dest::from_host(h, &table)))
        {
            Some(d) => d,
            None => match host.as_deref().and_then(|h| h.parse::<SocketAddr>().ok()) {
                // A pod's own address: that endpoint, with mTLS; its Service's routes do not
                // apply. An address outside the mesh gets plain HTTP.
                Some(addr) => match table.endpoint_at(addr) {
                    Some((entry, target)) => {
                        pinned = Some(target.clone());
                        Dest {
                            service: entry.key.clone(),
                            port: target.sni().port,
                            scope: dest::Scope::Local,
                        }
                    }
                    None => {
                        drop(table);
                        return self.plain_http(req, addr).await;
                    }
                },
                None => {
                    // Answered before the stack, and counted as it would count it: the service
                    // asked for (or `unknown`), no destination cluster.
                    let service = host.as_deref().and_then(dest::subject_of_host);
                    let e = ProxyError::NoRoute(
                        host.unwrap_or_else(|| "a request without a host".into()),
                    );
                    self.metrics.count_error(e.kind());
                    let resp = e.into_response();
                    let own = self.identity.spiffe_id().map(|id| id.to_string());
                    self.metrics.record(
                        "outbound",
                        own.as_deref().unwrap_or(""),
                        table.cluster_name(),
                        "",
                        service.as_deref().unwrap_or(""),
                        resp.status(),
                        start.elapsed(),
                    );
                    return resp;
                }
            },
        };
        drop(table);
        if req.headers().contains_key(header::UPGRADE) && req.version() < Version::HTTP_2 {
            return ProxyError::Upgrade.into_response();
        }
        let mut req = req.map(body);
        req.extensions_mut().insert(dest);
        if let Some(t) = pinned {
            req.extensions_mut().insert(route::Pinned(t));
        }
        if let Some(h) = host {
            req.extensions_mut().insert(forward::CallerHost(h));
        }
        // Boxed here: holding the stack's own future across the await trips rustc's
        // higher-ranked Send check on the hyper service.
        let call: ctx::BoxFuture<Result<Response<Body>, Infallible>> =
            Box::pin(self.outbound.clone().oneshot(req));
        match call.await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    /// Plain HTTP to an address outside the mesh, as any forward proxy would.
    async fn plain_http(&self, req: Request<Incoming>, addr: SocketAddr) -> Response<Body> {
        let (mut parts, b) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match format!("http://{addr}{path}").parse() {
            Ok(u) => u,
            Err(e) => {
                return ProxyError::BadRequest(format!("bad request target: {e}")).into_response();
            }
        };
        parts.version = Version::HTTP_11;
        match self
            .plain_h1
            .request(Request::from_parts(parts, body(b)))
            .await
        {
            Ok(resp) => resp.map(body),
            Err(e) => {
                let e = ProxyError::Unavailable(format!("{addr} (outside the mesh): {e}"));
                self.metrics.count_error(e.kind());
                e.into_response()
            }
        }
    }
}

/// Serves one client connection (HTTP/1.1 or HTTP/2, `prefix` the bytes protocol detection
/// already read) with `svc`, finishing gracefully when `graceful` is cancelled.
async fn serve_http_conn<S, F>(s: TcpStream, prefix: Vec<u8>, svc: S, graceful: CancellationToken)
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future = F,
        > + Clone
        + Send
        + 'static,
    F: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let mut b = fedmesh_trust::limits::auto();
    // The app's own keep-alive connections may idle longer than a stranger's.
    b.http1()
        .header_read_timeout(crate::POOLED_HEADER_READ_TIMEOUT);
    // A connection that never says anything (its protocol declared, so not detected) is cut
    // when a silent keep-alive connection would be.
    let need = if prefix.is_empty() { 1 } else { 0 };
    let io = TokioIo::new(fedmesh_trust::limits::Preface::within(
        Prefixed::new(prefix, s),
        need,
        crate::POOLED_HEADER_READ_TIMEOUT,
    ));
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

/// What the outbound stack is made of.
pub(crate) struct StackParts {
    pub spans: fedmesh_dataplane::telemetry::Spans,
    pub access_log: bool,
    pub upstreams: Arc<crate::upstream::Upstreams>,
    pub balancer: Arc<fedmesh_dataplane::balance::Balancer>,
    pub identity: fedmesh_trust::tls::MeshIdentity,
    pub zone: String,
    pub metrics: Arc<fedmesh_dataplane::metrics::ProxyMetrics>,
    pub safe_retries: u32,
    pub max_retry_body: usize,
    pub budgets: Arc<Budgets>,
    /// Mirrored copies in flight at once.
    pub max_mirrors: usize,
    /// Rate-limit buckets (shared with the inbound side).
    pub limiter: Arc<fedmesh_dataplane::ratelimit::Limiter>,
    /// Golden signals of the backends a rollout watches, reported with the demand.
    pub signals: Arc<fedmesh_dataplane::signals::Signals>,
}
