//! gRPC over SPIFFE mTLS with tonic, using our rustls configs on both ends.
//!
//! - [`incoming`] accepts TCP connections, completes TLS handshakes concurrently (each bounded by a
//!   timeout), and yields streams whose connect info carries the peer's verified SPIFFE ID, so a
//!   handler can ask "who is calling?" with [`peer_id`].
//! - [`channel`] builds a lazily-connecting, reconnecting tonic channel over a rustls client config.
//! - [`pinned_ca_client_config`] verifies a server against a CA pinned by its SHA-256 — the
//!   bootstrap used by join tokens, before the client holds any bundle.
//! - [`server`] and [`UnauthenticatedLimitLayer`] are the limits every fedmesh gRPC server keeps:
//!   those ports take connections from anyone (joining needs no certificate), so no caller may make
//!   a server hold unbounded streams, connections or buffered messages.

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
/// TLS handshakes in progress at once on one listener; more connections wait in the kernel's
/// backlog.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Open connections on one listener; beyond it new connections are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Decoded request headers per stream (SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Calls in flight, over all connections, from callers without a client certificate.
pub const MAX_UNAUTHENTICATED_CALLS: usize = 32;
/// How long a call from a caller without a certificate may take, its request body included.
pub const UNAUTHENTICATED_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an accepted connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The verified SPIFFE ID of the client certificate, if the client presented one.
    pub spiffe_id: Option<SpiffeId>,
    /// That certificate's serial number (lowercase hex): which issued identity is calling, so a
    /// server can refuse identities it has revoked.
    pub serial: Option<String>,
    /// When that certificate expires.
    pub not_after: Option<std::time::SystemTime>,
}

/// An accepted TLS connection.
pub struct TlsConn {
    /// Held to sending its first bytes in time, as every HTTP connection is.
    inner: crate::limits::Preface<tokio_rustls::server::TlsStream<TcpStream>>,
    info: PeerInfo,
    /// One of the listener's [`MAX_CONNECTIONS`], returned when the connection is dropped.
    _slot: tokio::sync::OwnedSemaphorePermit,
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
/// the reason) and dropped; they never reach tonic. At most [`MAX_PENDING_HANDSHAKES`] handshakes
/// run at once and at most [`MAX_CONNECTIONS`] connections stay open.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsConn, std::io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Result<TlsConn, std::io::Error>>(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(handshake) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = crate::listen::accept(&listener, "gRPC") => accepted,
            };
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                tracing::warn!(%remote, limit = MAX_CONNECTIONS, "too many open connections; closing a new one");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(handshake);
                match accepted {
                    Ok(Ok(tls)) => {
                        let certs = tls.get_ref().1.peer_certificates();
                        let spiffe_id = peer_spiffe_id(certs);
                        let leaf = certs
                            .and_then(|c| c.first())
                            .and_then(|c| crate::svid::inspect(c).ok());
                        let not_after = leaf.as_ref().map(|i| i.not_after);
                        let serial = leaf.map(|i| i.serial_hex);
                        let conn = TlsConn {
                            inner: crate::limits::Preface::h2(tls),
                            info: PeerInfo {
                                remote: Some(remote),
                                spiffe_id,
                                serial,
                                not_after,
                            },
                            _slot: slot,
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

/// A tonic server builder with the limits every fedmesh gRPC server keeps: bounded streams per
/// connection and header lists, HTTP/2 keepalive (a dead peer is noticed in ~25 s), and a cap on
/// streams a client may open and reset in a burst (the "rapid reset" attack).
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_pending_accept_reset_streams(Some(32))
        .http2_max_local_error_reset_streams(Some(256))
}

/// Bounds what callers without a client certificate can make a server do: only the `allowed`
/// methods (full paths such as `/fedmesh.identity.v1.Identity/Join`), at most
/// [`MAX_UNAUTHENTICATED_CALLS`] at once across all connections (more are answered
/// `RESOURCE_EXHAUSTED` before their body is read), each within
/// [`UNAUTHENTICATED_CALL_TIMEOUT`]. Callers that presented a verified SVID pass untouched.
#[derive(Clone)]
pub struct UnauthenticatedLimitLayer {
    allowed: &'static [&'static str],
    permits: Arc<tokio::sync::Semaphore>,
}

impl UnauthenticatedLimitLayer {
    pub fn new(allowed: &'static [&'static str]) -> Self {
        Self {
            allowed,
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED_CALLS)),
        }
    }
}

impl<S> tower::Layer<S> for UnauthenticatedLimitLayer {
    type Service = UnauthenticatedLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UnauthenticatedLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct UnauthenticatedLimit<S> {
    inner: S,
    layer: UnauthenticatedLimitLayer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for UnauthenticatedLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let authenticated = req
            .extensions()
            .get::<PeerInfo>()
            .is_some_and(|p| p.spiffe_id.is_some());
        if authenticated {
            return Box::pin(self.inner.call(req));
        }
        let refuse = |status: tonic::Status| -> Self::Future {
            Box::pin(std::future::ready(Ok(status.into_http())))
        };
        if !self.layer.allowed.contains(&req.uri().path()) {
            return refuse(tonic::Status::unauthenticated(format!(
                "{} needs a client certificate (an SVID of this trust domain)",
                req.uri().path()
            )));
        }
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = MAX_UNAUTHENTICATED_CALLS,
                "too many calls from callers without a certificate; refusing one"
            );
            return refuse(tonic::Status::resource_exhausted(
                "too many calls without a client certificate in progress; retry shortly",
            ));
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let result = tokio::time::timeout(UNAUTHENTICATED_CALL_TIMEOUT, call).await;
            drop(permit);
            match result {
                Ok(r) => r,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "a call without a client certificate must finish within {UNAUTHENTICATED_CALL_TIMEOUT:?}"
                ))
                .into_http()),
            }
        })
    }
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

/// A client config (presenting nothing) that trusts only the server `spiffe://<td><server_path>`,
/// where `td` is the trust domain of the CA with SHA-256 `pin_hex`: the server's chain must
/// contain that CA, the CA must have signed the leaf, and the leaf must carry exactly that ID.
/// Every SVID of the trust domain is signed by the same CA, so the pin alone would let any
/// workload pose as the server and collect the token it is about to be sent.
pub fn pinned_ca_client_config(
    pin_hex: &str,
    server_path: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ClientConfig>, String> {
    let pin = hex::decode(pin_hex).map_err(|_| format!("CA pin {pin_hex:?} is not hex"))?;
    if pin.len() != 32 {
        return Err(format!(
            "CA pin {pin_hex:?} is not a SHA-256 (64 hex digits)"
        ));
    }
    if !server_path.starts_with('/') {
        return Err(format!("server path {server_path:?} must start with '/'"));
    }
    let provider = crypto_provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            pin,
            server_path: server_path.to_string(),
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct PinnedCa {
    pin: Vec<u8>,
    server_path: String,
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
        let td = crate::svid::trust_domain_of_authority(ca).ok_or_else(|| {
            rustls::Error::General(
                "the pinned CA names no trust domain (no spiffe:// URI SAN)".into(),
            )
        })?;
        let expected = SpiffeId::new(&format!("spiffe://{td}{}", self.server_path))
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let presented = crate::svid::inspect(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?
            .spiffe_id;
        if presented != expected {
            return Err(rustls::Error::General(format!(
                "the server is {presented}, not {expected}: another workload of the trust domain is answering at this address"
            )));
        }
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
