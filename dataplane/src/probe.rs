//! The gateway probe: whether a cluster's east-west gateway can be reached from another cluster,
//! with mTLS both ways, and how long that takes (`linkerd multicluster gateways`, `fedmesh
//! gateways`, `fedmesh check`).
//!
//! A gateway passes every other connection through without decrypting it. A connection whose
//! SNI is `probe.<its cluster>.fedmesh` (no service name has that shape: service names have five
//! labels) it terminates itself, with its own SVID, requiring the prober's SVID from a trust
//! domain it trusts; it answers one JSON line ([`ProbeAnswer`]) and closes. The prober (each
//! control plane, for every other cluster's gateways) requires the gateway's SVID from that
//! cluster's trust domain. So a successful probe proves the address is the right cluster's
//! gateway, that the two trust domains trust each other, and that the gateway has its
//! configuration: what a cross-cluster connection needs short of the destination endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_api::ClusterName;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sni::SUFFIX;

/// The ALPN protocol of a probe (a gateway refuses a probe SNI without it).
pub const ALPN: &[u8] = b"fedmesh-probe/1";

/// An answer larger than this is not a gateway's.
const MAX_ANSWER: u64 = 4096;

/// The SNI that asks `cluster`'s gateway to answer a probe.
pub fn sni(cluster: &ClusterName) -> String {
    format!("probe.{cluster}.{SUFFIX}")
}

/// The cluster a probe SNI names, if `sni` is one.
pub fn cluster_of(sni: &str) -> Option<&str> {
    sni.strip_prefix("probe.")?
        .strip_suffix(SUFFIX)?
        .strip_suffix('.')
        .filter(|c| !c.is_empty() && !c.contains('.'))
}

/// What a gateway says about itself to a prober.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The cluster it serves.
    pub cluster: String,
    /// Whether it holds a configuration from its control plane (it routes nothing without).
    pub ready: bool,
    /// The version of that configuration.
    pub config_version: u64,
    /// How many services it admits connections to.
    pub exported_services: u32,
}

/// Answers a probe on `stream` (the ClientHello not consumed yet): completes the handshake with
/// `acceptor` and writes `answer` as one JSON line. Returns the prober's SPIFFE ID.
pub async fn answer<S>(
    stream: S,
    acceptor: &tokio_rustls::TlsAcceptor,
    answer: &ProbeAnswer,
    timeout: Duration,
) -> Result<String, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(timeout, async {
        let mut tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(ALPN) {
            return Err("the probe did not negotiate ALPN fedmesh-probe/1".to_string());
        }
        let caller = fedmesh_trust::tls::peer_spiffe_id(conn.peer_certificates())
            .map(|id| id.to_string())
            .unwrap_or_default();
        let mut line = serde_json::to_vec(answer).map_err(|e| e.to_string())?;
        line.push(b'\n');
        tls.write_all(&line).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(caller)
    })
    .await
    .map_err(|_| format!("no probe completed within {timeout:?}"))?
}

/// What one probe found.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    /// Connect, handshake and answer.
    pub latency: Duration,
    /// The gateway's SPIFFE ID, as verified.
    pub gateway_id: String,
    pub answer: ProbeAnswer,
}

/// Probes `cluster`'s gateway at `addr` with `tls` (which presents our SVID, requires the
/// gateway's from `cluster`'s trust domain and offers [`ALPN`]). Errors say which step failed.
pub async fn probe(
    addr: &str,
    cluster: &ClusterName,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<ProbeResult, String> {
    let start = Instant::now();
    let name = ServerName::try_from(sni(cluster)).map_err(|e| e.to_string())?;
    tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("mTLS handshake with {addr} failed: {e}"))?;
        let gateway_id = fedmesh_trust::tls::peer_spiffe_id(stream.get_ref().1.peer_certificates())
            .map(|id| id.to_string())
            .unwrap_or_default();
        let mut body = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER)
            .read_to_end(&mut body)
            .await
            .map_err(|e| format!("{addr} closed the probe before answering: {e}"))?;
        let answer: ProbeAnswer = serde_json::from_slice(body.trim_ascii_end()).map_err(|e| {
            format!("{addr} answered the probe with something that is not a gateway's answer: {e}")
        })?;
        if answer.cluster != cluster.as_str() {
            return Err(format!(
                "{addr} is the gateway of {}, not of {cluster}",
                answer.cluster
            ));
        }
        Ok(ProbeResult {
            latency: start.elapsed(),
            gateway_id,
            answer,
        })
    })
    .await
    .map_err(|_| format!("{addr} did not answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_are_told_apart_from_service_names() {
        let east = ClusterName::new("east").unwrap();
        assert_eq!(sni(&east), "probe.east.fedmesh");
        assert_eq!(cluster_of("probe.east.fedmesh"), Some("east"));
        assert_eq!(cluster_of("p80.web.shop.east.fedmesh"), None);
        assert_eq!(cluster_of("probe.a.b.fedmesh"), None);
        assert_eq!(cluster_of("probe..fedmesh"), None);
        assert_eq!(cluster_of("probe.eastfedmesh"), None);
        assert!(crate::sni::MeshSni::parse(&sni(&east)).is_err());
    }
}
