//! The east-west gateway: admits mTLS connections from other clusters to this cluster's exported
//! services and passes them, still encrypted, to a healthy local endpoint.
//!
//! The gateway never terminates TLS. It reads the ClientHello (within a size and time limit),
//! takes the destination from the SNI (`p<port>.<service>.<namespace>.<cluster>.fedmesh`, see
//! [`fedmesh_dataplane::sni`]), and admits the connection only when the cluster is its own and the
//! service is exported here. The mTLS session is end to end between the caller's sidecar and the
//! destination's sidecar, which verifies the caller's SVID against the caller's trust domain.
//!
//! A fedmesh sidecar starts each connection with a PROXY protocol v2 header naming the connection
//! and the request that opened it ([`fedmesh_dataplane::hop`]); the gateway reads it (bounded, and
//! optional) before the ClientHello, strips it, and records the connection's span ([`span`]).
//!
//! One SNI is not passed through: `probe.<this cluster>.fedmesh` asks the gateway itself whether it
//! is reachable, and it answers over mTLS with its own SVID ([`fedmesh_dataplane::probe`]).
//!
//! Refusals close the connection at once (with a TLS `unrecognized_name` alert when the client
//! spoke TLS) and are counted by reason; they never disturb other connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use fedmesh_dataplane::access;
use fedmesh_dataplane::balance::{Balancer, Choose, Locality, OutlierConfig};
use fedmesh_dataplane::config::ConfigHandle;
use fedmesh_dataplane::connect::Plan;
use fedmesh_dataplane::hop::read_hop_header;
use fedmesh_dataplane::metrics::{BytesLabels, ProxyMetrics, SniLabels, TcpLabels};
use fedmesh_dataplane::policy::Outlier;
use fedmesh_dataplane::prefixed::Prefixed;
use fedmesh_dataplane::probe::{self, ProbeAnswer};
use fedmesh_dataplane::relay::relay_tcp;
use fedmesh_dataplane::sni::{HelloError, MeshSni, read_client_hello};
use fedmesh_dataplane::target::{Place, Target};
use fedmesh_dataplane::telemetry::Spans;
use fedmesh_trust::listen::Server;
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use tokio::io::AsyncWriteExt;

mod span;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Limits and timeouts; the defaults suit production.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// The whole ClientHello must arrive within this time.
    pub hello_timeout: Duration,
    /// And within this many bytes (TLS records included).
    pub max_hello_bytes: usize,
    /// Connecting to one endpoint; a failure moves on to another endpoint.
    pub connect_timeout: Duration,
    /// How many endpoints one connection may try.
    pub connect_attempts: usize,
    /// A connection with no bytes moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections beyond this are refused at once.
    pub max_connections: usize,
    /// On shutdown, open connections get this long to finish.
    pub drain_timeout: Duration,
    /// The gateway's zone, to prefer endpoints near it.
    pub zone: String,
    pub outlier: OutlierConfig,
    /// Where connection spans go (off: none are recorded).
    pub spans: Spans,
    /// One access-log line per connection, admitted or refused.
    pub access_log: bool,
    /// The gateway's own identity: with it, it answers reachability probes from other clusters'
    /// control planes (mTLS, any trust domain it trusts); without, a probe is refused.
    pub identity: Option<MeshIdentity>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(5),
            max_hello_bytes: 32 * 1024,
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            idle_timeout: Duration::from_secs(3600),
            max_connections: 16 * 1024,
            drain_timeout: Duration::from_secs(30),
            zone: String::new(),
            outlier: OutlierConfig::default(),
            spans: Spans::off(),
            access_log: false,
            identity: None,
        }
    }
}

pub struct Gateway {
    options: GatewayOptions,
    config: ConfigHandle,
    balancer: Arc<Balancer>,
    metrics: Arc<ProxyMetrics>,
    server: Server,
    /// Answers probes (from `options.identity`).
    probe: Option<tokio_rustls::TlsAcceptor>,
}

/// What a connection's opening asked for.
enum Opening {
    /// A service of this cluster: relay to the endpoint connected.
    Relay(MeshSni, TcpStream, Target, Vec<Target>),
    /// A reachability probe for this gateway itself.
    Probe,
}

/// Why a connection was not admitted.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Hello(HelloError),
    #[error("SNI {0:?} is not a fedmesh service name")]
    BadSni(String),
    #[error("SNI names cluster {sni_cluster}, this gateway serves {own}")]
    WrongCluster { sni_cluster: String, own: String },
    #[error("{0} is not exported from this cluster")]
    NotExported(String),
    #[error("{service} has no port {port}")]
    UnknownPort { service: String, port: u16 },
    #[error("{0} has no ready endpoint here")]
    NoEndpoints(String),
    #[error("no endpoint of {0} accepted a connection")]
    Unavailable(String),
    #[error("too many connections")]
    Overloaded,
    #[error("no configuration from the control plane yet")]
    NotReady,
    #[error("{0}")]
    HopHeader(String),
    #[error("a probe, and this gateway has no identity to answer probes with")]
    ProbeUnsupported,
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Hello(h) => h.label(),
            Refusal::BadSni(_) => "bad_sni",
            Refusal::WrongCluster { .. } => "wrong_cluster",
            Refusal::NotExported(_) => "not_exported",
            Refusal::UnknownPort { .. } => "unknown_port",
            Refusal::NoEndpoints(_) => "no_endpoints",
            Refusal::Unavailable(_) => "upstream_unavailable",
            Refusal::Overloaded => "overloaded",
            Refusal::NotReady => "not_ready",
            Refusal::HopHeader(_) => "bad_proxy_header",
            Refusal::ProbeUnsupported => "probe_unsupported",
        }
    }

    /// Whether the client sent a TLS ClientHello we can answer with an alert.
    fn spoke_tls(&self) -> bool {
        !matches!(
            self,
            Refusal::Hello(
                HelloError::NotTls
                    | HelloError::Malformed(_)
                    | HelloError::TooLarge(_)
                    | HelloError::Eof
                    | HelloError::Io(_)
                    | HelloError::Timeout(_)
            ) | Refusal::Overloaded
                | Refusal::HopHeader(_)
        )
    }
}

/// A fatal TLS alert: `unrecognized_name` (112), so a client's error says what went wrong.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

impl Gateway {
    pub fn new(options: GatewayOptions, config: ConfigHandle, metrics: Arc<ProxyMetrics>) -> Self {
        let probe = options.identity.as_ref().map(|id| {
            tokio_rustls::TlsAcceptor::from(
                id.server_config(Authorizer::AnyTrusted, vec![probe::ALPN.to_vec()]),
            )
        });
        Self {
            probe,
            balancer: Arc::new(Balancer::new(options.outlier.clone())),
            server: Server::new("gateway", options.max_connections, options.drain_timeout),
            options,
            config,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// Set while draining (for `/readyz`).
    pub fn draining(&self) -> Arc<AtomicBool> {
        self.server.draining.clone()
    }

    /// Serves `listener` until `shutdown`, then stops accepting and gives open connections
    /// `drain_timeout` to finish before closing them.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        tokio::spawn(fedmesh_dataplane::ejections::report_ejections(
            self.balancer.clone(),
            self.config.clone(),
            shutdown.clone(),
        ));
        let gw = self.clone();
        self.server
            .serve(
                listener,
                shutdown,
                |peer| {
                    self.metrics.refuse(Refusal::Overloaded.label());
                    tracing::debug!(%peer, "refused: too many connections");
                },
                move |stream, peer, _graceful| {
                    let gw = gw.clone();
                    async move { gw.handle(stream, peer).await }
                },
            )
            .await;
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let (wall, start) = (SystemTime::now(), Instant::now());
        let mut hello_bytes = Vec::with_capacity(2048);
        // The opening — hop header, then the ClientHello — has one deadline: a client that
        // sends nothing, or dribbles, is a `hello_timeout` whichever part it stalls in.
        let deadline = tokio::time::Instant::now() + self.options.hello_timeout;
        let header =
            tokio::time::timeout_at(deadline, read_hop_header(&mut client, &mut hello_bytes)).await;
        let admitted = match &header {
            Ok(Ok(_)) => self.admit(&mut client, &mut hello_bytes, deadline).await,
            Ok(Err(e)) => Err(Refusal::HopHeader(e.clone())),
            Err(_) => Err(Refusal::Hello(HelloError::Timeout(
                self.options.hello_timeout,
            ))),
        };
        let header = header.ok().and_then(Result::ok);
        let header = header.flatten();
        let mut span = span::start(&self.options.spans, header.as_ref(), peer, (wall, start));
        let admitted = match admitted {
            Ok(Opening::Probe) => return self.answer_probe(client, hello_bytes, peer).await,
            Ok(Opening::Relay(mesh, upstream, target, pool)) => Ok((mesh, upstream, target, pool)),
            Err(r) => Err(r),
        };
        let (mesh, upstream, target, pool) = match admitted {
            Ok(x) => x,
            Err(r) => {
                self.metrics.refuse(r.label());
                tracing::debug!(%peer, reason = %r, "refused");
                if self.options.access_log {
                    access::connection(&access::Connection {
                        direction: "gateway",
                        service: "",
                        peer: &peer.to_string(),
                        upstream: "",
                        bytes_received: hello_bytes.len() as u64,
                        bytes_sent: 0,
                        duration: start.elapsed(),
                        error: r.label(),
                        hop: span.as_ref().map(|s| s.hop()).as_ref(),
                    });
                }
                if let Some(mut s) = span {
                    span::refused(&mut s, r.label(), r.to_string());
                    s.finish();
                }
                if r.spoke_tls() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        let _ = client.write_all(&ALERT_UNRECOGNIZED_NAME).await;
                        let _ = client.shutdown().await;
                    })
                    .await;
                }
                return;
            }
        };
        let service = mesh.service.to_string();
        if let Some(s) = &mut span {
            span::admitted(
                s,
                mesh.to_string(),
                service.clone(),
                mesh.cluster.to_string(),
                target.key().to_string(),
            );
        }
        self.metrics
            .sni_connections
            .get_or_create(&SniLabels {
                sni: mesh.to_string(),
            })
            .inc();
        self.metrics
            .tcp_connections
            .get_or_create(&TcpLabels {
                reporter: "gateway".into(),
                destination_cluster: mesh.cluster.to_string(),
                destination_service: service.clone(),
            })
            .inc();
        self.metrics.tcp_active.inc();
        let _lease = self.balancer.lease(&target);
        let mut upstream = upstream;
        let moved = match upstream.write_all(&hello_bytes).await {
            Ok(()) => relay_tcp(client, upstream, self.options.idle_timeout).await,
            Err(e) => Err(e),
        };
        self.metrics.tcp_active.dec();
        if self.options.access_log {
            access::relayed(
                "gateway",
                &service,
                &peer.to_string(),
                target.key(),
                &moved,
                hello_bytes.len() as u64,
                start.elapsed(),
                span.as_ref().map(|s| s.hop()).as_ref(),
            );
        }
        match (&moved, &mut span) {
            (Ok(m), Some(s)) => s.moved(m, hello_bytes.len() as u64),
            (Err(e), Some(s)) => s.fail(format!("{:?}", e.kind())),
            _ => {}
        }
        if let Some(s) = span {
            s.finish();
        }
        match moved {
            Ok(m) => {
                self.metrics
                    .bytes
                    .get_or_create(&BytesLabels {
                        direction: "in".into(),
                        service: service.clone(),
                    })
                    .inc_by(m.a_to_b + hello_bytes.len() as u64);
                self.metrics
                    .bytes
                    .get_or_create(&BytesLabels {
                        direction: "out".into(),
                        service,
                    })
                    .inc_by(m.b_to_a);
                if m.idle_timeout {
                    tracing::debug!(%peer, sni = %mesh, "idle connection closed");
                }
            }
            Err(e) => {
                // The endpoint reset the connection: count it against the endpoint.
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    self.balancer.failure(&target, &pool);
                }
                tracing::debug!(%peer, sni = %mesh, error = %e, "connection ended with an error");
            }
        }
    }

    /// Answers a probe on `client`, whose opening `hello` was read already.
    async fn answer_probe(&self, client: TcpStream, hello: Vec<u8>, peer: SocketAddr) {
        let Some(acceptor) = &self.probe else { return };
        let table = self.config.table();
        let answer = ProbeAnswer {
            cluster: table
                .local
                .as_ref()
                .map(|l| l.name.to_string())
                .unwrap_or_default(),
            ready: table.local.is_some(),
            config_version: table.version,
            exported_services: table.services.values().filter(|e| e.exported).count() as u32,
        };
        let result = probe::answer(
            Prefixed::new(hello, client),
            acceptor,
            &answer,
            self.options.hello_timeout,
        )
        .await;
        let outcome = if result.is_ok() { "answered" } else { "failed" };
        self.metrics
            .probes
            .get_or_create(&fedmesh_dataplane::metrics::ReasonLabels {
                reason: outcome.into(),
            })
            .inc();
        match result {
            Ok(prober) => tracing::debug!(%peer, %prober, "answered a probe"),
            Err(error) => tracing::debug!(%peer, %error, "a probe failed"),
        }
    }

    /// Reads and checks the ClientHello, then connects to an endpoint (trying others when one
    /// fails to connect).
    async fn admit(
        &self,
        client: &mut TcpStream,
        hello_bytes: &mut Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> Result<Opening, Refusal> {
        let hello = read_client_hello(
            client,
            hello_bytes,
            self.options.max_hello_bytes,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await
        .map_err(|e| match e {
            // Reported as the whole opening's limit, not what was left of it.
            HelloError::Timeout(_) => HelloError::Timeout(self.options.hello_timeout),
            e => e,
        })
        .map_err(Refusal::Hello)?;
        let sni = hello.sni.ok_or(Refusal::Hello(HelloError::NoSni))?;
        let table = self.config.table();
        if let Some(cluster) = probe::cluster_of(&sni) {
            // Answered even before the first configuration: the answer says it is not ready.
            return match &table.local {
                Some(here) if cluster != here.name.as_str() => Err(Refusal::WrongCluster {
                    sni_cluster: cluster.to_string(),
                    own: here.name.to_string(),
                }),
                _ if self.probe.is_none() => Err(Refusal::ProbeUnsupported),
                _ => Ok(Opening::Probe),
            };
        }
        let mesh = MeshSni::parse(&sni).map_err(|_| Refusal::BadSni(sni.clone()))?;
        let Some(here) = &table.local else {
            return Err(Refusal::NotReady);
        };
        if mesh.cluster != here.name {
            return Err(Refusal::WrongCluster {
                sni_cluster: mesh.cluster.to_string(),
                own: here.name.to_string(),
            });
        }
        let entry = table
            .service(&mesh.service)
            .filter(|e| e.exported)
            .ok_or_else(|| Refusal::NotExported(mesh.service.to_string()))?;
        if !entry.has_port(mesh.port) {
            return Err(Refusal::UnknownPort {
                service: mesh.service.to_string(),
                port: mesh.port,
            });
        }
        let pool: Vec<Target> = entry.local_targets(mesh.port).to_vec();
        if pool.is_empty() {
            return Err(Refusal::NoEndpoints(mesh.service.to_string()));
        }
        let here = Locality {
            cluster: here.name.as_str(),
            region: here.region.as_str(),
            zone: table.zone(&self.options.zone),
        };
        let connect_timeout = self.options.connect_timeout;
        let connected = self
            .balancer
            .connect_first(
                Plan {
                    here: &here,
                    pool: &pool,
                    split: &[],
                    how: Choose::LeastOfTwo,
                    outlier: &Outlier::default(),
                    tries: self.options.connect_attempts,
                },
                Vec::new(),
                &self.metrics,
                |target: Target| async move {
                    let Place::Local { addr, .. } = target.place() else {
                        return Err(format!("{} is not an endpoint of this cluster", target.key()));
                    };
                    match tokio::time::timeout(connect_timeout, TcpStream::connect(*addr)).await {
                        Ok(Ok(s)) => {
                            let _ = s.set_nodelay(true);
                            Ok(s)
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no connection within {connect_timeout:?}")),
                    }
                },
                |target, error| {
                    tracing::debug!(endpoint = %target.key(), %error, "endpoint connect failed; trying another");
                },
            )
            .await;
        if let Ok((s, target)) = connected {
            return Ok(Opening::Relay(mesh, s, target, pool));
        }
        Err(Refusal::Unavailable(mesh.service.to_string()))
    }
}
