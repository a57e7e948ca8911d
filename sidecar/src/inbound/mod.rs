//! Traffic to the workload: mTLS from other sidecars, authorization by SPIFFE ID, and the hand-off
//! to the app on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_api::SpiffeId;
use fedmesh_dataplane::config::RoutingTable;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::h2pool::H2Pool;
use fedmesh_dataplane::sni::MeshSni;
use fedmesh_dataplane::trace;
use fedmesh_trust::tls::{handshake_error_message, peer_spiffe_id};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::net;
use fedmesh_dataplane::http::strip_hop_by_hop;

mod opaque;
use crate::upstream::ALPN_TCP;
use crate::{ORIG_PROTO, PROXY_ERROR, Sidecar, XFCC};
use fedmesh_dataplane::http::Body;

/// How long an inbound connection waits for the sidecar's first configuration.
const CONFIG_WAIT: Duration = Duration::from_secs(5);

/// HTTP/2 cleartext connections to the local app, one multiplexed connection per app address.
#[derive(Default)]
pub(crate) struct AppH2Pool(H2Pool<SocketAddr>);

impl AppH2Pool {
    async fn get(&self, app: SocketAddr, timeout: Duration) -> Result<SendRequest<Body>, String> {
        self.0
            .get(&app, || async move {
                let tcp = net::connect_addr(app, timeout, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(sender)
            })
            .await
    }
}

/// Who called and what for, settled once per connection.
struct InboundConn {
    caller: SpiffeId,
    caller_cluster: String,
    /// The service and port named by the SNI, once checked to be served here.
    admitted: Result<(MeshSni, SocketAddr), (StatusCode, &'static str, String)>,
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
    ) -> Result<(MeshSni, SocketAddr), (StatusCode, &'static str, String)> {
        let sni = sni.ok_or((
            StatusCode::MISDIRECTED_REQUEST,
            "no-sni",
            "the connection named no destination (SNI)".to_string(),
        ))?;
        let mesh = MeshSni::parse(sni)
            .map_err(|e| (StatusCode::MISDIRECTED_REQUEST, "bad-sni", e.to_string()))?;
        let Some(here) = &table.local else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "this sidecar has no configuration from its control plane yet".to_string(),
            ));
        };
        if mesh.cluster != here.name {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
                "wrong-cluster",
                format!(
                    "the connection is for cluster {}, this is {}",
                    mesh.cluster, here.name
                ),
            ));
        }
        let entry = table.service(&mesh.service).ok_or_else(|| {
            (
                StatusCode::MISDIRECTED_REQUEST,
                "unknown-service",
                format!("{} is not a service of this cluster", mesh.service),
            )
        })?;
        if !entry.serves(mesh.port, addressed) {
            return Err((
                StatusCode::MISDIRECTED_REQUEST,
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
            return Err((
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
        let conn = Arc::new(InboundConn {
            caller_cluster: self.cluster_of_trust_domain(&table, caller.trust_domain()),
            admitted: self.admit(
                &table,
                sni.as_deref(),
                addressed,
                app,
                caller.trust_domain(),
            ),
            caller,
        });
        drop(table);
        if let Err((_, kind, msg)) = &conn.admitted {
            self.metrics.refuse(kind);
            tracing::info!(%peer, caller = %conn.caller, error = %msg, "inbound connection not admitted");
        }
        match alpn.as_deref() {
            Some(ALPN_TCP) => self.inbound_tcp(tls, conn, graceful).await,
            _ => self.serve_h2(tls, conn, graceful).await,
        }
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
        let me = self.clone();
        let svc = service_fn(move |req| {
            let (me, conn) = (me.clone(), conn.clone());
            async move { Ok::<_, Infallible>(me.inbound_request(req, &conn, false).await) }
        });
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(64 * 1024)
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .keep_alive_interval(Duration::from_secs(30));
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

    fn authorize(
        &self,
        table: &RoutingTable,
        mesh: &MeshSni,
        caller: &SpiffeId,
    ) -> Result<(), String> {
        let Some(entry) = table.service(&mesh.service) else {
            return Ok(());
        };
        if entry.policy.allows(caller) {
            Ok(())
        } else {
            Err(format!(
                "{caller} may not call {} (its TrafficPolicy allows only: {})",
                mesh.service,
                entry.policy.allowed_callers_text.join(", ")
            ))
        }
    }

    /// The service's rate limits, enforced by each of its sidecars on what it admits: its own
    /// (TrafficPolicy `rateLimit`; one bucket for everyone, or one per caller identity), and its
    /// part of this cluster's share of a clusterset-wide limit (the share over the service's
    /// ready endpoints here).
    fn admit_rate(
        &self,
        table: &RoutingTable,
        mesh: &MeshSni,
        caller: &SpiffeId,
    ) -> Result<(), ProxyError> {
        let Some(entry) = table.service(&mesh.service) else {
            return Ok(());
        };
        if let Some(share) = &entry.policy.clusterset_rate_limit {
            *self
                .demand
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(mesh.service.clone())
                .or_default() += 1;
            let here = entry.local_targets(mesh.port).len().max(1) as u32;
            let own = fedmesh_dataplane::policy::RateLimit {
                requests: share.requests.div_ceil(here),
                burst: share.burst.div_ceil(here).max(1),
                ..share.clone()
            };
            let key = format!("clusterset|{}", mesh.service);
            self.limiter
                .take(&key, &own)
                .map_err(|retry_after| ProxyError::RateLimited {
                    what: format!("{} across the clusterset", mesh.service),
                    limit: format!(
                        "this sidecar's part: {} requests per {:?}",
                        own.requests, own.period
                    ),
                    retry_after,
                })?;
        }
        let Some(limit) = entry.policy.rate_limit.as_ref() else {
            return Ok(());
        };
        let key = if limit.per_caller {
            format!("inbound|{}|{caller}", mesh.service)
        } else {
            format!("inbound|{}", mesh.service)
        };
        self.limiter
            .take(&key, limit)
            .map_err(|retry_after| ProxyError::RateLimited {
                what: if limit.per_caller {
                    format!("{} for {caller}", mesh.service)
                } else {
                    mesh.service.to_string()
                },
                limit: format!("{} requests per {:?}", limit.requests, limit.period),
                retry_after,
            })
    }

    async fn inbound_tcp(
        self: &Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        conn: Arc<InboundConn>,
        graceful: CancellationToken,
    ) {
        let Ok((mesh, app)) = &conn.admitted else {
            return;
        };
        let table = self.config.table();
        if let Err(e) = self.authorize(&table, mesh, &conn.caller) {
            self.metrics.refuse("unauthorized");
            tracing::info!(error = %e, "inbound TCP connection denied");
            return;
        }
        drop(table);
        let app = *app;
        self.inbound_opaque(tls, conn, app, graceful).await;
    }

    /// Only this sidecar says who called: whatever the caller wrote is replaced.
    fn set_caller(&self, headers: &mut http::HeaderMap, conn: &InboundConn) {
        headers.remove(ORIG_PROTO);
        headers.remove(PROXY_ERROR);
        headers.remove(XFCC);
        let own = self
            .identity
            .spiffe_id()
            .map(|i| i.to_string())
            .unwrap_or_default();
        if let Ok(v) = HeaderValue::from_str(&format!("By={own};URI={}", conn.caller)) {
            headers.insert(XFCC, v);
        }
    }

    fn count_inbound_error(&self, reason: &str) {
        self.metrics
            .request_errors
            .get_or_create(&fedmesh_dataplane::metrics::ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// One request for the app. `tunnel_h1`: it came as HTTP/1 inside a tunnel, and goes to the
    /// app as HTTP/1 too.
    async fn inbound_request(
        &self,
        req: Request<Incoming>,
        conn: &InboundConn,
        tunnel_h1: bool,
    ) -> Response<Body> {
        let start = Instant::now();
        let table = self.config.table();
        let own_cluster = table.cluster_name().to_string();
        let (mesh, app) = match &conn.admitted {
            Ok(x) => x,
            Err((status, kind, msg)) => {
                return fedmesh_dataplane::error::proxy_response(*status, kind, msg);
            }
        };
        let service = mesh.service.to_string();
        if let Err(msg) = self.authorize(&table, mesh, &conn.caller) {
            self.metrics.refuse("unauthorized");
            let resp =
                fedmesh_dataplane::error::proxy_response(StatusCode::FORBIDDEN, "denied", &msg);
            crate::outbound::record(
                &self.metrics,
                "inbound",
                &conn.caller_cluster,
                &own_cluster,
                &service,
                resp.status(),
                start.elapsed(),
            );
            return resp;
        }
        if let Err(e) = self.admit_rate(&table, mesh, &conn.caller) {
            self.count_inbound_error("rate_limited");
            let resp = e.into_response();
            crate::outbound::record(
                &self.metrics,
                "inbound",
                &conn.caller_cluster,
                &own_cluster,
                &service,
                resp.status(),
                start.elapsed(),
            );
            return resp;
        }
        drop(table);
        let (mut parts, body) = req.into_parts();
        let h1 = tunnel_h1
            || parts
                .headers
                .get(ORIG_PROTO)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"HTTP/1.1"));
        strip_hop_by_hop(&mut parts.headers);
        self.set_caller(&mut parts.headers, conn);
        let _span = trace::propagate(&mut parts.headers);
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let body: Body = http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
            body,
            |e| -> fedmesh_dataplane::http::BoxError { Box::new(e) },
        ));
        let result = if h1 {
            if !parts.headers.contains_key(header::HOST)
                && let Some(a) = parts.uri.authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                parts.headers.insert(header::HOST, v);
            }
            parts.version = Version::HTTP_11;
            parts.uri = match format!("http://{app}{path}").parse::<Uri>() {
                Ok(u) => u,
                Err(e) => {
                    return fedmesh_dataplane::error::proxy_response(
                        StatusCode::BAD_REQUEST,
                        "bad-request",
                        &e.to_string(),
                    );
                }
            };
            self.app_h1
                .request(Request::from_parts(parts, body))
                .await
                .map_err(|e| {
                    if e.is_connect() {
                        (true, e.to_string())
                    } else {
                        (false, e.to_string())
                    }
                })
        } else {
            match self.app_h2.get(*app, self.options.connect_timeout).await {
                Err(e) => Err((true, e)),
                Ok(mut sender) => sender
                    .send_request(Request::from_parts(parts, body))
                    .await
                    .map_err(|e| (false, e.to_string())),
            }
        };
        let resp = match result {
            Ok(r) => r.map(fedmesh_dataplane::http::body),
            Err((true, e)) => {
                self.count_inbound_error("app_unreachable");
                // The app never saw it: the caller's sidecar may retry elsewhere.
                fedmesh_dataplane::error::proxy_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "app-unreachable",
                    &format!("the app at {app} does not accept connections: {e}"),
                )
            }
            Err((false, e)) => {
                self.count_inbound_error("app_error");
                // The app may have acted on it: a 502, which callers retry only by policy.
                fedmesh_dataplane::error::proxy_response(
                    StatusCode::BAD_GATEWAY,
                    "app-error",
                    &format!("the app at {app} failed the request: {e}"),
                )
            }
        };
        crate::outbound::record(
            &self.metrics,
            "inbound",
            &conn.caller_cluster,
            &own_cluster,
            &service,
            resp.status(),
            start.elapsed(),
        );
        resp
    }
}
