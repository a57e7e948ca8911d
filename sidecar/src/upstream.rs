//! mTLS connections to peers: another sidecar in this cluster, or another cluster's east-west
//! gateway (which passes the TLS session through to a sidecar there).
//!
//! Every connection presents this workload's SVID and names its destination in the SNI
//! ([`MeshSni`]); the server must present an SVID of the destination cluster's trust domain.
//! HTTP rides on pooled HTTP/2 connections (one per peer and destination, multiplexed); opaque
//! TCP gets a connection of its own with ALPN `fedmesh-tcp`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::coalesce::Coalesce;
use fedmesh_api::TrustDomain;
use fedmesh_dataplane::h2pool::H2Pool;
use fedmesh_dataplane::hop::HopHeader;
use fedmesh_dataplane::target::{ConnectTo, Target};
use fedmesh_dataplane::trace::TraceContext;
use fedmesh_trust::tls::{Authorizer, MeshIdentity, handshake_error_message};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::net;

pub use fedmesh_dataplane::http::{Body, BoxError};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_TCP: &[u8] = b"fedmesh-tcp";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("{addr} did not agree to {wanted}")]
    Alpn { addr: String, wanted: String },
    #[error("HTTP/2 handshake with {addr} failed: {reason}")]
    H2 { addr: String, reason: String },
    /// The backend's circuit breaker allows no more connections.
    #[error("{open} connections are open to the backend of {addr} (its limit)")]
    Limit { addr: String, open: u32 },
}

/// Connections to one backend service: how many are open, and how many may be.
pub struct ConnGate {
    pub open: Arc<AtomicU32>,
    pub max: Option<u32>,
}

impl UpstreamError {
    /// Whether the peer may be healthy and only this attempt failed in a way that never reached
    /// it (all of these: nothing was sent).
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect_failed",
            UpstreamError::Tls { .. } => "tls_failed",
            UpstreamError::Alpn { .. } => "alpn_mismatch",
            UpstreamError::H2 { .. } => "h2_handshake_failed",
            UpstreamError::Limit { .. } => "overloaded",
        }
    }
}

/// One connection counted in a [`ConnGate`] until dropped.
struct CountedConn(Arc<AtomicU32>);

impl Drop for CountedConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type ConfigCache = HashMap<(TrustDomain, &'static [u8]), Arc<ClientConfig>>;

pub struct Upstreams {
    identity: MeshIdentity,
    connect_timeout: Duration,
    tls_timeout: Duration,
    mark: Option<u32>,
    configs: Mutex<ConfigCache>,
    h2: H2Pool<Box<str>, Option<HopHeader>>,
}

impl Upstreams {
    pub fn new(identity: MeshIdentity, mark: Option<u32>) -> Self {
        Self {
            identity,
            connect_timeout: Duration::from_secs(1),
            tls_timeout: Duration::from_secs(10),
            mark,
            configs: Mutex::new(HashMap::new()),
            h2: H2Pool::default(),
        }
    }

    pub fn set_connect_timeout(&mut self, t: Duration) {
        self.connect_timeout = t;
    }

    /// Drops pool slots whose connection has closed.
    pub fn sweep(&self) {
        self.h2.sweep();
    }

    fn client_config(&self, td: &TrustDomain, alpn: &'static [u8]) -> Arc<ClientConfig> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        configs
            .entry((td.clone(), alpn))
            .or_insert_with(|| {
                self.identity
                    .client_config(Authorizer::trust_domain(td.clone()), vec![alpn.to_vec()])
            })
            .clone()
    }

    /// Opens an mTLS connection to `target`, naming its destination in the SNI and expecting a
    /// server of its trust domain. To another cluster's gateway, the connection starts with a
    /// hop header ([`HopHeader`]: its ID and `trigger`, the request that opened it), returned
    /// with the stream.
    pub async fn tls(
        &self,
        target: &Target,
        alpn: &'static [u8],
        connect_timeout: Option<Duration>,
        trigger: Option<TraceContext>,
    ) -> Result<(TlsStream<TcpStream>, Option<HopHeader>), UpstreamError> {
        let to = target.connect_to();
        let addr = || to.to_string();
        let timeout = connect_timeout.unwrap_or(self.connect_timeout);
        let tcp = match to {
            ConnectTo::Addr(a) => net::connect_addr(a, timeout, self.mark).await,
            ConnectTo::HostPort(h) => net::connect(h, timeout, self.mark).await,
        }
        .map_err(|e| UpstreamError::Connect {
            addr: addr(),
            reason: e.to_string(),
        })?;
        let mut tcp = tcp;
        let hop = (!target.is_local()).then(|| HopHeader::new(trigger));
        if let Some(h) = &hop {
            tcp.write_all(&h.encode())
                .await
                .map_err(|e| UpstreamError::Connect {
                    addr: addr(),
                    reason: e.to_string(),
                })?;
        }
        let connector = TlsConnector::from(self.client_config(target.trust_domain(), alpn));
        let tls = tokio::time::timeout(
            self.tls_timeout,
            connector.connect(target.server_name().clone(), tcp),
        )
        .await
        .map_err(|_| UpstreamError::Tls {
            addr: addr(),
            reason: format!("no handshake within {:?}", self.tls_timeout),
        })?
        .map_err(|e| UpstreamError::Tls {
            addr: addr(),
            reason: handshake_error_message(&e),
        })?;
        if tls.get_ref().1.alpn_protocol() != Some(alpn) {
            return Err(UpstreamError::Alpn {
                addr: addr(),
                wanted: String::from_utf8_lossy(alpn).into_owned(),
            });
        }
        Ok((tls, hop))
    }

    /// A ready HTTP/2 sender to `target`, reusing a pooled connection when one is open, with
    /// the connection's hop header when it goes through a gateway (`trigger` opens a new one).
    pub async fn h2(
        &self,
        target: &Target,
        connect_timeout: Option<Duration>,
        gate: Option<&ConnGate>,
        trigger: Option<TraceContext>,
    ) -> Result<(SendRequest<Body>, Option<HopHeader>), UpstreamError> {
        self.h2
            .get(target.pool_key(), || {
                self.connect_h2(target, connect_timeout, gate, trigger)
            })
            .await
    }

    /// A new HTTP/2 connection to `target`, counted against the backend's limit from now until
    /// it closes.
    async fn connect_h2(
        &self,
        target: &Target,
        connect_timeout: Option<Duration>,
        gate: Option<&ConnGate>,
        trigger: Option<TraceContext>,
    ) -> Result<(SendRequest<Body>, Option<HopHeader>), UpstreamError> {
        let counted = match gate {
            None => None,
            Some(g) => {
                let before = g.open.fetch_add(1, Ordering::AcqRel);
                if g.max.is_some_and(|m| before >= m) {
                    g.open.fetch_sub(1, Ordering::AcqRel);
                    return Err(UpstreamError::Limit {
                        addr: target.key().to_string(),
                        open: before,
                    });
                }
                Some(CountedConn(g.open.clone()))
            }
        };
        let (tls, hop) = self.tls(target, ALPN_H2, connect_timeout, trigger).await?;
        let peer = target.key().to_string();
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .max_header_list_size(64 * 1024)
            .handshake(TokioIo::new(Coalesce::new(tls)))
            .await
            .map_err(|e| UpstreamError::H2 {
                addr: peer.clone(),
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "pooled connection closed");
            }
            drop(counted);
        });
        Ok((sender, hop))
    }

    /// Forgets a pooled connection (after it failed).
    pub fn evict(&self, target: &Target) {
        self.h2.evict(target.pool_key());
    }

    /// Open pooled connections (for metrics and tests).
    pub fn pooled(&self) -> usize {
        self.h2.open()
    }
}
