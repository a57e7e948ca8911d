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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::net;

pub use fedmesh_dataplane::http::{Body, BoxError};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_TCP: &[u8] = b"fedmesh-tcp";
/// Opaque TCP whose first bytes inside TLS carry the caller's trace context ([`tcp_preamble`]),
/// so the callee's span of the connection joins the caller's trace. Offered before
/// [`ALPN_TCP`], which a sidecar that does not know it picks instead.
pub const ALPN_TCP_TRACED: &[u8] = b"fedmesh-tcp/traced";

const OFFER_H2: &[&[u8]] = &[ALPN_H2];
const OFFER_TCP: &[&[u8]] = &[ALPN_TCP_TRACED, ALPN_TCP];

/// What a caller sends first on a [`ALPN_TCP_TRACED`] connection: one byte, the length of what
/// follows, then a W3C `traceparent` (length 0: no context).
pub(crate) fn tcp_preamble(context: Option<TraceContext>) -> Vec<u8> {
    let tp = context.map(|c| c.header()).unwrap_or_default();
    let mut v = Vec::with_capacity(1 + tp.len());
    v.push(tp.len() as u8);
    v.extend_from_slice(tp.as_bytes());
    v
}

/// Reads a [`tcp_preamble`]: the caller's trace context, if it sent one; an error for anything
/// that is not a preamble.
pub(crate) async fn read_tcp_preamble<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<TraceContext>> {
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let n = r.read_u8().await? as usize;
    if n == 0 {
        return Ok(None);
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    let text = std::str::from_utf8(&buf).map_err(|_| invalid("the trace context is not text"))?;
    TraceContext::parse(text)
        .map(Some)
        .ok_or_else(|| invalid("the trace context is not a traceparent"))
}

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

/// How long a pooled HTTP/2 connection with requests waiting may stay silent before it is
/// PINGed, and how long the PING may take before the connection is declared dead.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(4);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

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

type ConfigCache = HashMap<(TrustDomain, &'static [&'static [u8]]), Arc<ClientConfig>>;

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

    fn client_config(
        &self,
        td: &TrustDomain,
        alpns: &'static [&'static [u8]],
    ) -> Arc<ClientConfig> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        configs
            .entry((td.clone(), alpns))
            .or_insert_with(|| {
                self.identity.client_config(
                    Authorizer::trust_domain(td.clone()),
                    alpns.iter().map(|a| a.to_vec()).collect(),
                )
            })
            .clone()
    }

    /// An mTLS connection for opaque TCP to `target` (see [`Upstreams::tls`]). When the peer
    /// takes [`ALPN_TCP_TRACED`], `context` (the connection's span) goes first, so the peer's
    /// span of the connection is its child.
    pub async fn tcp(
        &self,
        target: &Target,
        connect_timeout: Option<Duration>,
        context: Option<TraceContext>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let (mut tls, _) = self
            .tls(target, OFFER_TCP, connect_timeout, context)
            .await?;
        if tls.get_ref().1.alpn_protocol() == Some(ALPN_TCP_TRACED) {
            let sent = async {
                tls.write_all(&tcp_preamble(context)).await?;
                tls.flush().await
            };
            sent.await.map_err(|e| UpstreamError::Connect {
                addr: target.connect_to().to_string(),
                reason: e.to_string(),
            })?;
        }
        Ok(tls)
    }

    /// Opens an mTLS connection to `target`, naming its destination in the SNI and expecting a
    /// server of its trust domain. To another cluster's gateway, the connection starts with a
    /// hop header ([`HopHeader`]: its ID and `trigger`, the request that opened it), returned
    /// with the stream.
    async fn tls(
        &self,
        target: &Target,
        alpns: &'static [&'static [u8]],
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
        let connector = TlsConnector::from(self.client_config(target.trust_domain(), alpns));
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
        if !tls
            .get_ref()
            .1
            .alpn_protocol()
            .is_some_and(|got| alpns.contains(&got))
        {
            return Err(UpstreamError::Alpn {
                addr: addr(),
                wanted: alpns
                    .iter()
                    .map(|a| String::from_utf8_lossy(a))
                    .collect::<Vec<_>>()
                    .join(" or "),
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
        let (tls, hop) = self.tls(target, OFFER_H2, connect_timeout, trigger).await?;
        let peer = target.key().to_string();
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // A peer that goes silent while requests wait on it (a partition drops packets, it
            // does not refuse them) is declared dead within 7 s: its requests fail over instead
            // of hanging until TCP gives up. PINGs go only after 4 s without a frame.
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> std::io::Result<Option<TraceContext>> {
        read_tcp_preamble(&mut &bytes[..]).await
    }

    #[tokio::test]
    async fn a_tcp_preamble_carries_the_callers_trace_context_or_none() {
        let ctx =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut bytes = tcp_preamble(Some(ctx));
        assert_eq!(bytes[0], 55);
        // The app's first bytes follow and are not consumed.
        bytes.extend_from_slice(b"PING");
        let mut r = &bytes[..];
        assert_eq!(read_tcp_preamble(&mut r).await.unwrap(), Some(ctx));
        assert_eq!(r, b"PING");
        assert_eq!(read(&tcp_preamble(None)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_but_a_preamble_is_refused() {
        let mut bad = vec![55u8];
        bad.extend_from_slice(&[b'x'; 55]);
        let e = read(&bad).await.unwrap_err();
        assert!(e.to_string().contains("not a traceparent"), "{e}");
        assert!(read(&[3, 0xff, 0xfe, 0xfd]).await.is_err());
        // Cut short: the caller closed before sending it all.
        assert_eq!(
            read(&[55, b'0', b'0']).await.unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }
}
