//! gRPC over SPIFFE mTLS with tonic, using our rustls configs on both ends.
//!
//! - [`incoming`] accepts TCP connections, completes TLS handshakes concurrently (each bounded by a
//!   timeout), and yields streams whose connect info carries the peer's verified SPIFFE ID, so a
//!   handler can ask "who is calling?" with [`peer_id`].
//! - [`channel`] builds a lazily-connecting, reconnecting tonic channel over a rustls client config.
//! - [`pinned_ca_client_config`] verifies a server against a CA pinned by its SHA-256 — the
//!   bootstrap used by join tokens, before the client holds any bundle.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fedmesh_api::SpiffeId;
use futures::Stream;
use ring::digest::{SHA256, digest};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;

use crate::tls::{crypto_provider, handshake_error_message, peer_spiffe_id};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an accepted connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The verified SPIFFE ID of the client certificate, if the client presented one.
    pub spiffe_id: Option<SpiffeId>,
}

/// An accepted TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The verified caller of a tonic request served through [`incoming`].
pub fn peer_id<T>(req: &tonic::Request<T>) -> Option<SpiffeId> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.spiffe_id.clone())
}

pub fn peer_info<T>(req: &tonic::Request<T>) -> Option<PeerInfo> {
    req.extensions().get::<PeerInfo>().cloned()
}

/// Accepts TLS connections on `listener` until it is dropped. Failed handshakes are logged (with
/// the reason) and dropped; they never reach tonic.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsConn, std::io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Result<TlsConn, std::io::Error>>(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let spiffe_id = peer_spiffe_id(tls.get_ref().1.peer_certificates());
                        let conn = TlsConn {
                            inner: tls,
                            info: PeerInfo {
                                remote: Some(remote),
                                spiffe_id,
                            },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %handshake_error_message(&e), "refused TLS connection")
                    }
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A tonic channel to `addr` (`host:port`) over `config`. It connects lazily and reconnects.
pub fn channel(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr:?} is not a valid address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("{server_name:?} is not a valid server name: {e}"))?;
    let connector = TlsConnector::from(config);
    let addr = addr.to_string();
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| std::io::Error::other(handshake_error_message(&e)))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

/// SHA-256 of a certificate, hex: the pin join tokens carry.
pub fn ca_pin(cert: &CertificateDer<'_>) -> String {
    hex::encode(digest(&SHA256, cert))
}

/// A client config (optionally presenting nothing) that trusts only a server whose chain contains
/// the CA with SHA-256 `pin_hex`, and whose leaf that CA signed.
pub fn pinned_ca_client_config(
    pin_hex: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, String> {
    let pin = hex::decode(pin_hex).map_err(|_| format!("CA pin {pin_hex:?} is not hex"))?;
    if pin.len() != 32 {
        return Err(format!(
            "CA pin {pin_hex:?} is not a SHA-256 (64 hex digits)"
        ));
    }
    let provider = crypto_provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin,
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct PinnedCa {
    pin: Vec<u8>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| digest(&SHA256, c).as_ref() == self.pin.as_slice())
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server did not present the CA pinned in the join token (wrong address, or its CA changed)".into(),
                )
            })?;
        let anchor = webpki::anchor_from_trusted_cert(ca)
            .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?
            .to_owned();
        webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_for_usage(
                self.algorithms.all,
                &[anchor],
                &[],
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(|e| {
                rustls::Error::General(format!(
                    "server certificate is not signed by the pinned CA: {e}"
                ))
            })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
