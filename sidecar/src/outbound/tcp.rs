//! Opaque TCP to a mesh service: an mTLS connection of its own (ALPN `fedmesh-tcp/traced`, or
//! `fedmesh-tcp` with an older peer) to a target picked by the same balancer as HTTP — another
//! target tried when a connect fails — and the bytes relayed both ways. Each connection is a
//! CLIENT span of a trace of its own (TCP carries no trace context of the app's); the gateway's
//! span of the connection and the callee sidecar's SERVER span (its context sent first inside
//! TLS) are its children.

use fedmesh_dataplane::access;
use fedmesh_dataplane::balance::{Choose, stable_hash};
use fedmesh_dataplane::config::{RoutingTable, Scope};
use fedmesh_dataplane::connect::{NotConnected, Plan};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::metrics::{BytesLabels, TcpLabels};
use fedmesh_dataplane::policy::{ClusterShare, HashKey, LoadBalancing};
use fedmesh_dataplane::relay::relay;
use fedmesh_dataplane::target::Target;
use fedmesh_dataplane::telemetry::ConnectionSpan;
use fedmesh_dataplane::trace::{HopSpan, TraceContext};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use std::time::{Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::balance::{nothing_to_try, untrusted};
use crate::Sidecar;
use crate::dest::Dest;

impl Sidecar {
    /// The span of an opaque connection to `dest`; `None` when tracing is off.
    pub(super) fn tcp_span(&self, dest: &Dest) -> Option<ConnectionSpan> {
        let spans = &self.options.spans;
        let mut s = ConnectionSpan::start(
            spans,
            || HopSpan::root(|id| spans.sample_new(id)),
            SpanKind::Client,
            format!("connect {}", dest.service),
            (SystemTime::now(), Instant::now()),
        )?;
        s.push(KeyValue::new("fedmesh.service", dest.service.to_string()));
        s.push(KeyValue::new("server.port", i64::from(dest.port)));
        s.push(KeyValue::new(
            "fedmesh.source.cluster",
            self.config.table().cluster_name().to_string(),
        ));
        if let Some(id) = self.identity.spiffe_id() {
            s.push(KeyValue::new("fedmesh.caller", id.to_string()));
        }
        Some(s)
    }

    /// Opens an mTLS connection for opaque TCP to `dest`, trying other targets when one fails;
    /// `trigger` is the connection's span, for the gateway's.
    pub(super) async fn open_tcp(
        &self,
        table: &RoutingTable,
        dest: &Dest,
        trigger: Option<TraceContext>,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Target), ProxyError> {
        let entry = table
            .service(&dest.service)
            .ok_or_else(|| ProxyError::NoRoute(dest.service.to_string()))?;
        let candidates = entry.targets_for(dest.scope, dest.port);
        // A cluster.local name stays in this cluster: no split across clusters.
        let split: Vec<ClusterShare> = if entry.resolve(dest.scope) == Scope::Local {
            Vec::new()
        } else {
            entry.policy.connection_split(dest.port)
        };
        let connect_timeout = entry.policy.connect_timeout;
        let here = self.locality(table);
        let service = entry.key.to_string();
        // A connection has no headers: round robin and a hash of this caller's identity apply.
        let how = match &entry.policy.load_balancing {
            LoadBalancing::RoundRobin => Choose::RoundRobin(&service),
            LoadBalancing::ConsistentHash(HashKey::SourceIdentity) => {
                self.identity.spiffe_id().map_or(Choose::LeastOfTwo, |id| {
                    Choose::Hash(stable_hash(id.to_string().as_bytes()))
                })
            }
            _ => Choose::LeastOfTwo,
        };
        let untrusted = untrusted(&self.identity, candidates);
        let upstreams = &self.upstreams;
        self.balancer
            .connect_first(
                Plan {
                    here: &here,
                    pool: candidates,
                    split: &split,
                    how,
                    outlier: &entry.policy.outlier,
                    tries: 1 + self.options.safe_retries as usize,
                },
                untrusted.clone(),
                &self.metrics,
                |target: Target| async move {
                    upstreams.tcp(&target, connect_timeout, trigger).await
                },
                |_, e| self.metrics.count_error(e.label()),
            )
            .await
            .map_err(|e| match e {
                NotConnected::NothingToTry => {
                    ProxyError::Unavailable(nothing_to_try(dest, &untrusted))
                }
                NotConnected::Failed(e) => ProxyError::Connect {
                    label: e.label(),
                    bad_peer: false,
                    message: e.to_string(),
                },
            })
    }

    pub(super) async fn outbound_tcp<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: S,
        dest: Dest,
    ) {
        let table = self.config.table();
        let mut span = self.tcp_span(&dest);
        let trigger = span.as_ref().map(|s| s.hop().context());
        let (up, target) = match self.open_tcp(&table, &dest, trigger).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(destination = %dest, error = %e, "opaque TCP connection refused");
                if let Some(s) = span.take() {
                    s.finish_failed(e.kind());
                }
                return;
            }
        };
        drop(table);
        self.relay_tcp(client, up, &dest, &target, span).await;
    }

    pub(super) async fn relay_tcp<A, B>(
        &self,
        client: A,
        up: B,
        dest: &Dest,
        target: &Target,
        mut span: Option<ConnectionSpan>,
    ) where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(s) = &mut span {
            s.push(KeyValue::new(
                "fedmesh.destination.cluster",
                target.cluster().to_string(),
            ));
            s.push(KeyValue::new("fedmesh.endpoint", target.key().to_string()));
        }
        let service = dest.service.to_string();
        self.metrics
            .tcp_connections
            .get_or_create(&TcpLabels {
                reporter: "source".into(),
                destination_cluster: target.cluster().to_string(),
                destination_service: service.clone(),
            })
            .inc();
        self.metrics.tcp_active.inc();
        let _lease = self.balancer.lease(target);
        let start = std::time::Instant::now();
        let moved = relay(client, up, self.options.idle_timeout).await;
        self.metrics.tcp_active.dec();
        if self.options.access_log {
            access::relayed(
                "outbound",
                &service,
                "",
                target.key(),
                &moved,
                0,
                start.elapsed(),
                span.as_ref().map(|s| s.hop()).as_ref(),
            );
        }
        if let Some(mut s) = span {
            match &moved {
                Ok(m) => s.moved(m, 0),
                Err(e) => s.fail(format!("{:?}", e.kind())),
            }
            s.finish();
        }
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
}
