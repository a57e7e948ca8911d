//! Opaque TCP to a mesh service: an mTLS connection of its own (ALPN `fedmesh-tcp`) to a target
//! picked by the same balancer as HTTP — another target tried when a connect fails — and the bytes
//! relayed both ways.

use fedmesh_dataplane::balance::{Choose, stable_hash};
use fedmesh_dataplane::config::{RoutingTable, Scope};
use fedmesh_dataplane::connect::{NotConnected, Plan};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::metrics::{BytesLabels, TcpLabels};
use fedmesh_dataplane::policy::{ClusterShare, HashKey, LoadBalancing};
use fedmesh_dataplane::relay::relay;
use fedmesh_dataplane::target::Target;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::balance::{nothing_to_try, untrusted};
use crate::Sidecar;
use crate::dest::Dest;
use crate::upstream::ALPN_TCP;

impl Sidecar {
    /// Opens an mTLS connection for opaque TCP to `dest`, trying other targets when one fails.
    pub(super) async fn open_tcp(
        &self,
        table: &RoutingTable,
        dest: &Dest,
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
                    upstreams
                        .tls(&target, ALPN_TCP, connect_timeout, None)
                        .await
                        .map(|(s, _)| s)
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
        let (up, target) = match self.open_tcp(&table, &dest).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(destination = %dest, error = %e, "opaque TCP connection refused");
                return;
            }
        };
        drop(table);
        self.relay_tcp(client, up, &dest, &target).await;
    }

    pub(super) async fn relay_tcp<A, B>(&self, client: A, up: B, dest: &Dest, target: &Target)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let service = dest.service.to_string();
        self.metrics
            .tcp_connections
            .get_or_create(&TcpLabels {
                direction: "outbound".into(),
                dst_cluster: target.cluster().to_string(),
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
}
