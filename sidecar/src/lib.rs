//! The sidecar: the proxy beside every workload.
//!
//! **Outbound** it takes the workload's requests — through an HTTP proxy listener, a listener
//! per service, or transparently (iptables `REDIRECT`, [`net::original_dst`]) — and sends them over
//! mTLS to a sidecar of the destination service: directly in this cluster, or through the
//! destination cluster's east-west gateway. HTTP/1.1 and HTTP/2 (gRPC) ride on pooled,
//! multiplexed HTTP/2 connections; anything else is opaque TCP.
//!
//! **Inbound** it terminates mTLS from other sidecars, checks the caller's SPIFFE ID against the
//! service's policy, and hands the request to the app on loopback with the caller's ID in
//! `x-forwarded-client-cert`.
//!
//! Where a request goes is decided per request ([`fedmesh_dataplane::balance`]): the nearest
//! healthy endpoint (zone, then region, then other clusters), weighted cross-cluster splits,
//! outlier ejection, and retries on another endpoint when an attempt never reached the app.

pub mod coalesce;
pub mod dest;
mod inbound;
pub mod net;
mod outbound;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fedmesh_dataplane::balance::{Balancer, Locality, OutlierConfig};
use fedmesh_dataplane::config::{ConfigHandle, RoutingTable};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_trust::tls::MeshIdentity;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use dest::Dest;
use upstream::{Body, Upstreams};

/// The header a proxy puts on a response it generated itself (the app never saw the request).
pub const PROXY_ERROR: &str = "fedmesh-proxy-error";
/// Between sidecars: the protocol the app spoke (`HTTP/1.1`), so the far side speaks it too.
pub const ORIG_PROTO: &str = "fedmesh-orig-proto";
pub const XFCC: &str = "x-forwarded-client-cert";

/// HTTP/1.1 on the connections the sidecar serves its app and its peers' tunnels: a request head
/// must arrive within this (between requests too), longer than on a stranger-facing port
/// ([`fedmesh_trust::limits::HEADER_READ_TIMEOUT`]) because these are keep-alive pools that idle
/// between requests.
pub const POOLED_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// The workload's zone (its region comes with the cluster).
    pub zone: String,
    /// How long to wait for a client's first bytes before treating the connection as opaque TCP
    /// (server-first protocols) on ports whose protocol is not declared.
    pub protocol_detect_timeout: Duration,
    /// Connecting to a peer; a failure moves on to another endpoint.
    pub connect_timeout: Duration,
    /// Opaque TCP connections with nothing moving for this long are closed.
    pub idle_timeout: Duration,
    /// On shutdown, open requests and connections get this long to finish.
    pub drain_timeout: Duration,
    /// Request bodies up to this size are buffered so a failed attempt can be retried (or a
    /// route's mirror can get a copy).
    pub max_retry_body: usize,
    /// Mirrored copies of requests in flight at once; beyond it copies are skipped (counted in
    /// `mirrored_requests{reason="skipped_busy"}`), never the requests themselves.
    pub max_mirrors: usize,
    /// Attempts beyond the first for failures that never reached the app (connect errors,
    /// refused streams, a peer whose app was down).
    pub safe_retries: u32,
    /// `SO_MARK` for the sidecar's own outgoing connections (transparent mode).
    pub mark: Option<u32>,
    pub max_connections: usize,
    pub outlier: OutlierConfig,
    /// How much retries may add to a service's requests.
    pub retry_budget: outbound::BudgetConfig,
    /// Where request spans go (off: none are recorded).
    pub spans: fedmesh_dataplane::telemetry::Spans,
    /// One access-log line per request and per opaque connection.
    pub access_log: bool,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        Self {
            zone: String::new(),
            protocol_detect_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(10),
            max_retry_body: 64 * 1024,
            max_mirrors: 256,
            safe_retries: 3,
            mark: None,
            max_connections: 16 * 1024,
            outlier: OutlierConfig::default(),
            retry_budget: outbound::BudgetConfig::default(),
            spans: fedmesh_dataplane::telemetry::Spans::off(),
            access_log: false,
        }
    }
}

pub struct Sidecar {
    options: SidecarOptions,
    identity: MeshIdentity,
    config: ConfigHandle,
    balancer: Arc<Balancer>,
    metrics: Arc<ProxyMetrics>,
    upstreams: Arc<Upstreams>,
    /// The outbound HTTP layers, assembled once.
    outbound: outbound::OutboundStack,
    /// The inbound HTTP layers, assembled once.
    inbound: inbound::InboundStack,
    /// HTTP/1.1 to addresses outside the mesh (pooled keep-alive connections; the inbound app
    /// hand-off shares it).
    plain_h1: Client<HttpConnector, Body>,
    /// Connection limits and draining, shared by all of this sidecar's listeners.
    server: fedmesh_trust::listen::Server,
    /// The inbound TLS config, built once: it reads the newest SVID and bundles at every
    /// handshake, so rotation needs no new config.
    inbound_tls: Arc<rustls::ServerConfig>,
    /// Requests seen since the last report, per service with a clusterset-wide limit.
    demand: inbound::Demand,
    /// Requests to the backends a rollout watches, since the last report.
    signals: Arc<fedmesh_dataplane::signals::Signals>,
    permissive: inbound::PermissiveTraffic,
    /// Open inbound connections by caller trust domain, to stop those no longer trusted.
    peer_domains: Arc<inbound::PeerDomains>,
    /// Whether the report of what outlier detection ejected has started (with the first
    /// listener).
    reporting: std::sync::atomic::AtomicBool,
}

impl Sidecar {
    pub fn new(
        options: SidecarOptions,
        identity: MeshIdentity,
        config: ConfigHandle,
        metrics: Arc<ProxyMetrics>,
    ) -> Arc<Self> {
        let mut upstreams = Upstreams::new(identity.clone(), options.mark);
        upstreams.set_connect_timeout(options.connect_timeout);
        let upstreams = Arc::new(upstreams);
        let balancer = Arc::new(Balancer::new(options.outlier.clone()));
        let limiter = Arc::new(fedmesh_dataplane::ratelimit::Limiter::new());
        let signals = Arc::new(fedmesh_dataplane::signals::Signals::default());
        let outbound = Self::outbound_stack(
            config.clone(),
            outbound::StackParts {
                spans: options.spans.clone(),
                access_log: options.access_log,
                upstreams: upstreams.clone(),
                balancer: balancer.clone(),
                identity: identity.clone(),
                zone: options.zone.clone(),
                metrics: metrics.clone(),
                safe_retries: options.safe_retries,
                max_retry_body: options.max_retry_body,
                budgets: Arc::new(outbound::Budgets::new(options.retry_budget.clone())),
                max_mirrors: options.max_mirrors,
                limiter: limiter.clone(),
                signals: signals.clone(),
            },
        );
        // Any trust domain we hold a bundle for: our own and the federated ones.
        let inbound_tls = identity.server_config(
            fedmesh_trust::tls::Authorizer::AnyTrusted,
            vec![
                upstream::ALPN_H2.to_vec(),
                upstream::ALPN_TCP_TRACED.to_vec(),
                upstream::ALPN_TCP.to_vec(),
            ],
        );
        let demand = inbound::Demand::default();
        let permissive = inbound::PermissiveTraffic::default();
        let plain_h1 = inbound::h1_client(options.connect_timeout);
        let inbound = Self::inbound_stack(inbound::InboundParts {
            spans: options.spans.clone(),
            access_log: options.access_log,
            h1: plain_h1.clone(),
            config: config.clone(),
            identity: identity.clone(),
            metrics: metrics.clone(),
            limiter: limiter.clone(),
            demand: demand.clone(),
            permissive: permissive.clone(),
            connect_timeout: options.connect_timeout,
            idle_timeout: options.idle_timeout,
        });
        Arc::new(Self {
            peer_domains: Arc::default(),
            reporting: Default::default(),
            inbound_tls,
            inbound,
            plain_h1,
            demand,
            signals,
            permissive,
            balancer,
            upstreams,
            outbound,
            server: fedmesh_trust::listen::Server::new(
                "sidecar",
                options.max_connections,
                options.drain_timeout,
            ),
            options,
            identity,
            config,
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    pub fn draining(&self) -> Arc<AtomicBool> {
        self.server.draining.clone()
    }

    /// Open pooled connections to peers and gateways.
    pub fn pooled_connections(&self) -> usize {
        self.upstreams.pooled()
    }

    fn locality<'a>(&'a self, table: &'a RoutingTable) -> Locality<'a> {
        Locality {
            cluster: table.cluster_name(),
            region: table.local.as_ref().map_or("", |l| l.region.as_str()),
            zone: table.zone(&self.options.zone),
        }
    }

    /// An HTTP proxy for the workload (`http_proxy=http://127.0.0.1:15001`): requests name the
    /// service in their host (`web.shop.svc.clusterset.local`); `CONNECT host:port` opens an
    /// opaque TCP tunnel to a service.
    pub async fn serve_http_proxy(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) {
        let me = self.clone();
        self.accept_loop(listener, shutdown, move |s, _peer, graceful| {
            let me = me.clone();
            async move { me.outbound_http(s, Vec::new(), None, graceful).await }
        })
        .await;
    }

    /// A listener for one service port: the workload connects here instead of to the service.
    pub async fn serve_service(
        self: Arc<Self>,
        listener: TcpListener,
        dest: Dest,
        shutdown: CancellationToken,
    ) {
        let me = self.clone();
        self.accept_loop(listener, shutdown, move |s, _peer, graceful| {
            let (me, dest) = (me.clone(), dest.clone());
            async move { me.outbound_to(s, dest, graceful).await }
        })
        .await;
    }

    /// Connections redirected by iptables: those to a clusterset VIP are meshed, anything else
    /// passes through to where it was going.
    pub async fn serve_transparent(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) {
        let me = self.clone();
        let own = listener.local_addr().ok();
        self.accept_loop(listener, shutdown, move |s, peer, graceful| {
            let me = me.clone();
            async move { me.transparent(s, peer, own, graceful).await }
        })
        .await;
    }

    /// mTLS from other sidecars (directly or through this cluster's gateway). `app` is where the
    /// workload listens; `None` (transparent mode) sends each connection to loopback at the port
    /// it was originally addressed to.
    pub async fn serve_inbound(
        self: Arc<Self>,
        listener: TcpListener,
        app: Option<SocketAddr>,
        shutdown: CancellationToken,
    ) {
        tokio::spawn(self.clone().report_demand(shutdown.clone()));
        tokio::spawn(self.peer_domains.clone().follow(
            self.identity.clone(),
            self.metrics.clone(),
            shutdown.clone(),
        ));
        let me = self.clone();
        self.accept_loop(listener, shutdown, move |s, peer, graceful| {
            let me = me.clone();
            async move { me.inbound(s, peer, app, graceful).await }
        })
        .await;
    }

    /// Every couple of seconds, tells the control plane how many requests this sidecar saw for
    /// each service it serves under a clusterset-wide limit (the hub shares the limit by demand)
    /// and for each PERMISSIVE one how many came in plain text; every quarter second, how the
    /// backends a rollout watches answered this sidecar's requests (a rollout's decision waits
    /// for them).
    async fn report_demand(self: Arc<Self>, shutdown: CancellationToken) {
        const EVERY: Duration = Duration::from_secs(2);
        const SIGNALS_EVERY: Duration = Duration::from_millis(250);
        let mut tick = tokio::time::interval(SIGNALS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let per_demand = (EVERY.as_millis() / SIGNALS_EVERY.as_millis()) as u32;
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            ticks = ticks.wrapping_add(1);
            let signals = self.signals.drain(SIGNALS_EVERY);
            if !ticks.is_multiple_of(per_demand) {
                if !signals.is_empty() {
                    self.config
                        .report_demand(fedmesh_api::pb::dataplane::Demand {
                            signals,
                            ..Default::default()
                        });
                }
                continue;
            }
            let seen: Vec<_> = self
                .demand
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            let permissive = self.permissive.drain();
            if seen.is_empty() && permissive.is_empty() && signals.is_empty() {
                continue;
            }
            let interval_ms = EVERY.as_millis() as u32;
            self.config
                .report_demand(fedmesh_api::pb::dataplane::Demand {
                    permissive: permissive
                        .into_iter()
                        .map(|(service, (mtls, plaintext))| {
                            fedmesh_api::pb::dataplane::PermissiveRequests {
                                service: service.to_string(),
                                mtls,
                                plaintext,
                                interval_ms,
                            }
                        })
                        .collect(),
                    services: seen
                        .into_iter()
                        .map(
                            |(service, requests)| fedmesh_api::pb::dataplane::ServiceRequests {
                                service: service.to_string(),
                                requests,
                                interval_ms: EVERY.as_millis() as u32,
                            },
                        )
                        .collect(),
                    signals,
                });
        }
    }

    /// Accepts until `shutdown`, then lets connections finish (HTTP connections are told to stop
    /// via `graceful`) for `drain_timeout` before closing them.
    async fn accept_loop<F, Fut>(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        f: F,
    ) where
        F: Fn(TcpStream, SocketAddr, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if !self
            .reporting
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tokio::spawn(fedmesh_dataplane::ejections::report_ejections(
                self.balancer.clone(),
                self.config.clone(),
                shutdown.clone(),
            ));
        }
        self.server
            .serve(listener, shutdown, |_| self.metrics.refuse("overloaded"), f)
            .await;
    }
}
