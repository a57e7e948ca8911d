//! Traffic to the workload: mTLS from other sidecars, then each request through a stack of
//! tower layers ([`Sidecar::inbound_stack`]):
//!
//! ```text
//! observe (metrics, error -> response) → identity (the connection's verified caller; requests
//! on a connection not admitted get the reason) → authentication (the JWT a RequestAuthentication
//! wants) → authorization (AuthorizationPolicies) → rate limit (the service's own, per caller,
//! its clusterset-wide share) → app (loopback)
//! ```
//!
//! Opaque TCP is admitted and authorized once per connection, then relayed ([`opaque`]), where
//! HTTP found inside a tunnel goes through the same stack.
//!
//! A PERMISSIVE service (PeerAuthentication) also takes plain text from callers outside the
//! mesh, told from TLS by the first byte ([`plaintext`]): such a connection has no caller
//! identity (`unauthenticated` in metrics, access logs and spans) and is otherwise served as a
//! tunnel's opening is — HTTP through the same stack, anything else relayed once authorized.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fedmesh_dataplane::config::RoutingTable;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::sni::MeshSni;
use fedmesh_dataplane::telemetry::ConnectionSpan;
use fedmesh_dataplane::trace::{HopSpan, TraceContext};
use fedmesh_trust::tls::{handshake_error_message, peer_spiffe_id};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::net;

mod app;
mod authn;
mod authz;
mod identity;
mod observe;
mod opaque;
mod peers;
mod plaintext;
mod ratelimit;
#[cfg(test)]
mod test_support;

use crate::Sidecar;
use crate::upstream::{ALPN_TCP, ALPN_TCP_TRACED, read_tcp_preamble};
pub(crate) use app::h1_client;
pub(crate) use identity::InboundConn;
use identity::TunnelH1;
pub(crate) use peers::PeerDomains;
pub(crate) use plaintext::PermissiveTraffic;
pub(crate) use ratelimit::Demand;

/// How long an inbound connection waits for the sidecar's first configuration.
const CONFIG_WAIT: Duration = Duration::from_secs(5);

/// How long a `fedmesh-tcp/traced` caller has to send its trace context (it sends it right
/// after the handshake, in the same flight).
const TCP_PREAMBLE_WAIT: Duration = Duration::from_secs(10);

/// The assembled inbound HTTP stack.
pub(crate) type InboundStack = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// What the inbound stack is made of.
pub(crate) struct InboundParts {
    pub spans: fedmesh_dataplane::telemetry::Spans,
    pub access_log: bool,
    pub config: fedmesh_dataplane::config::ConfigHandle,
    pub identity: fedmesh_trust::tls::MeshIdentity,
    pub metrics: Arc<fedmesh_dataplane::metrics::ProxyMetrics>,
    pub limiter: Arc<fedmesh_dataplane::ratelimit::Limiter>,
    pub demand: Demand,
    pub permissive: PermissiveTraffic,
    /// The sidecar's HTTP/1.1 client.
    pub h1: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Body,
    >,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// One request from an inbound connection, as the stack takes it.
fn into_stack_request(
    req: Request<Incoming>,
    conn: &Arc<InboundConn>,
    tunnel_h1: bool,
) -> Request<Body> {
    let mut req = req.map(fedmesh_dataplane::http::body);
    req.extensions_mut().insert(conn.clone());
    if tunnel_h1 {
        req.extensions_mut().insert(TunnelH1);
    }
    req
}

/// Calls the stack. Boxed here: holding the stack's own future across the hyper service trips
/// rustc's higher-ranked `Send` check.
fn call_stack(
    stack: &InboundStack,
    req: Request<Body>,
) -> crate::outbound::BoxFuture<Result<Response<Body>, Infallible>> {
    Box::pin(stack.clone().oneshot(req))
}

fn not_admitted(status: StatusCode, kind: &'static str, message: String) -> ProxyError {
    ProxyError::NotAdmitted {
        status,
        kind,
        message,
    }
}

impl Sidecar {
    fn cluster_of_trust_domain(
        &self,
        table: &RoutingTable,
        td: &fedmesh_api::TrustDomain,
    ) -> String {
        table
            .cluster_of
            .get(td)
            .map(|c| c.to_string())
            .unwrap_or_else(|| td.to_string())
    }

    /// Checks that the SNI names a service port this workload serves at `addressed` (the address
    /// the caller connected to), and finds the app address.
    fn admit(
        &self,
        table: &RoutingTable,
        sni: Option<&str>,
        addressed: SocketAddr,
        app: Option<SocketAddr>,
        caller_td: &fedmesh_api::TrustDomain,
    ) -> Result<(MeshSni, SocketAddr), ProxyError> {
        let misdirected =
            |kind, message| not_admitted(StatusCode::MISDIRECTED_REQUEST, kind, message);
        let sni = sni.ok_or_else(|| {
            misdirected(
                "no-sni",
                "the connection named no destination (SNI)".to_string(),
            )
        })?;
        let mesh = MeshSni::parse(sni).map_err(|e| misdirected("bad-sni", e.to_string()))?;
        let Some(here) = &table.local else {
            return Err(not_admitted(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "this sidecar has no configuration from its control plane yet".to_string(),
            ));
        };
        if mesh.cluster != here.name {
            return Err(misdirected(
                "wrong-cluster",
                format!(
                    "the connection is for cluster {}, this is {}",
                    mesh.cluster, here.name
                ),
            ));
        }
        let entry = table.service(&mesh.service).ok_or_else(|| {
            misdirected(
                "unknown-service",
                format!("{} is not a service of this cluster", mesh.service),
            )
        })?;
        if !entry.serves(mesh.port, addressed) {
            return Err(misdirected(
                "not-an-endpoint",
                format!(
                    "{addressed} is not an endpoint of {} port {}",
                    mesh.service, mesh.port
                ),
            ));
        }
        // Other clusters reach only what this cluster exports (a flat network must not open
        // more than the gateway does).
        if !entry.exported && caller_td != &here.trust_domain {
            return Err(not_admitted(
                StatusCode::FORBIDDEN,
                "not-exported",
                format!(
                    "{} is not exported from cluster {}; callers from trust domain {caller_td} cannot reach it (create a ServiceExport)",
                    mesh.service, here.name
                ),
            ));
        }
        let app = app.unwrap_or_else(|| SocketAddr::new([127, 0, 0, 1].into(), addressed.port()));
        Ok((mesh, app))
    }

    pub(crate) async fn inbound(
        self: Arc<Self>,
        s: TcpStream,
        peer: SocketAddr,
        app: Option<SocketAddr>,
        graceful: CancellationToken,
    ) {
        // In transparent mode the caller addressed the workload; iptables sent it here.
        let addressed = if app.is_none() {
            net::original_dst(&s).or_else(|_| s.local_addr())
        } else {
            s.local_addr()
        };
        let Ok(addressed) = addressed else { return };
        if self.config.table().permissive && !self.starts_with_tls(&s).await {
            return Box::pin(self.inbound_plaintext(s, peer, addressed, app, graceful)).await;
        }
        let tls = match tokio::time::timeout(
            Duration::from_secs(10),
            TlsAcceptor::from(self.inbound_tls.clone()).accept(s),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.metrics.refuse("tls_handshake");
                tracing::info!(%peer, error = %handshake_error_message(&e), "inbound TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.refuse("tls_timeout");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let Some(caller) = peer_spiffe_id(session.peer_certificates()) else {
            self.metrics.refuse("no_client_identity");
            return;
        };
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let sni = session.server_name().map(str::to_string);
        // A sidecar that just started may take connections before its first configuration
        // arrives: wait for it briefly rather than refuse a caller that is right.
        if self.config.table().local.is_none() {
            let _ = tokio::time::timeout(CONFIG_WAIT, self.config.ready()).await;
        }
        // A service of another namespace reaches this sidecar's table on demand.
        if let Some(mesh) = sni.as_deref().and_then(|s| MeshSni::parse(s).ok()) {
            self.config.ensure(&mesh.service.to_string()).await;
        }
        let table = self.config.table();
        let admitted = self.admit(
            &table,
            sni.as_deref(),
            addressed,
            app,
            caller.trust_domain(),
        );
        let caller_cluster = self.cluster_of_trust_domain(&table, caller.trust_domain());
        // Told to stop if the caller's trust domain stops being trusted ([`peers`]).
        let registered = self.peer_domains.register(caller.trust_domain(), &graceful);
        let stop = registered.stop.clone();
        let conn = Arc::new(InboundConn::new(
            peer,
            Some(caller),
            caller_cluster,
            admitted,
        ));
        drop(table);
        if let Err(e) = &conn.admitted {
            self.metrics.refuse(e.kind());
            tracing::info!(%peer, caller = %conn.caller_name(), error = %e, "inbound connection not admitted");
        }
        // What follows the handshake is boxed: a connection's task is allocated at accept with
        // room for its largest state, and one stuck in its handshake (a slow-loris) should cost
        // the handshake's few KiB, not the ~33 KiB of serving HTTP/2 or relaying bytes.
        let serve = async {
            match alpn.as_deref() {
                Some(ALPN_TCP_TRACED) => {
                    let mut tls = tls;
                    let read = tokio::time::timeout(TCP_PREAMBLE_WAIT, read_tcp_preamble(&mut tls));
                    match read.await {
                        Ok(Ok(context)) => {
                            Box::pin(self.inbound_tcp(tls, conn, stop.clone(), context)).await
                        }
                        Ok(Err(e)) => {
                            self.metrics.refuse("bad_tcp_preamble");
                            tracing::info!(%peer, caller = %conn.caller_name(), error = %e, "inbound TCP connection refused: its trace context preamble is malformed");
                        }
                        Err(_) => {
                            self.metrics.refuse("bad_tcp_preamble");
                            tracing::info!(%peer, caller = %conn.caller_name(), "inbound TCP connection refused: no trace context preamble within {TCP_PREAMBLE_WAIT:?}");
                        }
                    }
                }
                Some(ALPN_TCP) => Box::pin(self.inbound_tcp(tls, conn, stop.clone(), None)).await,
                _ => Box::pin(self.serve_h2(tls, conn, stop.clone())).await,
            }
        };
        // Its trust withdrawn, a connection has the drain timeout to finish (HTTP/2 was sent
        // a GOAWAY); a drain of the whole sidecar is the listener's to end.
        let withdrawn = async {
            stop.cancelled().await;
            if graceful.is_cancelled() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(self.options.drain_timeout).await;
        };
        tokio::select! {
            _ = serve => {}
            _ = withdrawn => {
                tracing::info!(%peer, "closed an inbound connection: its caller's trust domain is no longer trusted");
            }
        }
        drop(registered);
    }

    /// HTTP/2 from a peer sidecar (or found inside a tunnel): every request is checked and
    /// handed to the app.
    async fn serve_h2<S>(
        self: &Arc<Self>,
        io: S,
        conn: Arc<InboundConn>,
        graceful: CancellationToken,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let stack = self.inbound.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            call_stack(&stack, into_stack_request(req, &conn, false))
        });
        let mut b = fedmesh_trust::limits::http2();
        b.initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024);
        let conn = b.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "inbound connection ended with an error");
                }
            }
            _ = graceful.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// An opaque connection: its SERVER span (a child of the caller's CLIENT span when it sent
    /// its `context`), admission and authorization once, then [`opaque`].
    async fn inbound_tcp(
        self: &Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        conn: Arc<InboundConn>,
        graceful: CancellationToken,
        context: Option<TraceContext>,
    ) {
        let table = self.config.table();
        let span = self.inbound_tcp_span(&table, &conn, context);
        let (mesh, app) = match &conn.admitted {
            Ok(admitted) => admitted,
            Err(e) => {
                if let Some(s) = span {
                    s.finish_failed(e.kind());
                }
                return;
            }
        };
        let subject = fedmesh_dataplane::policy::Subject {
            caller: conn.caller.as_ref(),
            port: mesh.port,
            http: None,
        };
        if let Err(e) = authz::authorize(
            table.service(&mesh.service).map(|e| &**e),
            &subject,
            &self.metrics,
        ) {
            tracing::info!(error = %e, "inbound TCP connection denied");
            if let Some(s) = span {
                s.finish_failed("unauthorized");
            }
            return;
        }
        drop(table);
        let app = *app;
        self.inbound_opaque(tls, conn, app, graceful, span).await;
    }

    /// The callee's span of an opaque connection; `None` when tracing is off.
    fn inbound_tcp_span(
        &self,
        table: &RoutingTable,
        conn: &InboundConn,
        context: Option<TraceContext>,
    ) -> Option<ConnectionSpan> {
        let spans = &self.options.spans;
        let hop = || match context {
            Some(c) => HopSpan::child_of(c),
            None => HopSpan::root(|id| spans.sample_new(id)),
        };
        let service = conn
            .admitted
            .as_ref()
            .map(|(m, _)| m.service.to_string())
            .unwrap_or_default();
        let mut s = ConnectionSpan::start(
            spans,
            hop,
            SpanKind::Server,
            format!("accept {service}"),
            (SystemTime::now(), Instant::now()),
        )?;
        for kv in [
            KeyValue::new("fedmesh.service", service),
            KeyValue::new("fedmesh.caller", conn.caller_name()),
            KeyValue::new("fedmesh.source.cluster", conn.caller_cluster.clone()),
            KeyValue::new(
                "fedmesh.destination.cluster",
                table.cluster_name().to_string(),
            ),
            KeyValue::new("network.peer.address", conn.peer.ip().to_string()),
        ] {
            s.push(kv);
        }
        if let Ok((mesh, _)) = &conn.admitted {
            s.push(KeyValue::new("server.port", i64::from(mesh.port)));
        }
        Some(s)
    }

    /// Assembles the inbound HTTP stack (once, when the sidecar is made).
    pub(crate) fn inbound_stack(parts: InboundParts) -> InboundStack {
        let app = app::App::new(
            parts.h1,
            parts.connect_timeout,
            parts.idle_timeout,
            parts.metrics.clone(),
        );
        let limited = ratelimit::ServiceRateLimitLayer {
            limiter: parts.limiter,
            demand: parts.demand,
        }
        .layer(app);
        let authorized = authz::AuthorizeLayer {
            metrics: parts.metrics.clone(),
        }
        .layer(limited);
        let authenticated = authn::AuthenticateLayer {
            metrics: parts.metrics.clone(),
        }
        .layer(authorized);
        let identified = identity::IdentityLayer {
            config: parts.config.clone(),
            identity: parts.identity.clone(),
            permissive: parts.permissive,
        }
        .layer(authenticated);
        let observed = observe::ObserveLayer {
            metrics: parts.metrics,
            config: parts.config,
            spans: parts.spans,
            identity: parts.identity,
            access_log: parts.access_log,
        }
        .layer(identified);
        BoxCloneSyncService::new(observed)
    }
}
