//! Serving axum over plain TCP or TLS, with the peer's verified SPIFFE ID available to handlers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use fedmesh_api::SpiffeId;
use fedmesh_trust::grpc::{TlsConn, incoming};
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::either::Either;
use tonic::transport::server::Connected as _;

pub type Io = Either<TcpStream, TlsConn>;

/// Who called, as known at the connection level.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: SocketAddr,
    /// The client certificate's SPIFFE ID (TLS with a client certificate only).
    pub spiffe_id: Option<SpiffeId>,
}

impl Connected<IncomingStream<'_, HttpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, HttpListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A listener for axum: TCP, or TLS with handshakes done concurrently off the accept path (the
/// same bounded handshakes and connection limit as every fedmesh gRPC server,
/// [`fedmesh_trust::grpc::incoming`]).
pub struct HttpListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(Io, Peer)>,
}

impl HttpListener {
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            match tls {
                None => loop {
                    let (tcp, remote) = tokio::select! {
                        _ = tx.closed() => return,
                        a = fedmesh_trust::listen::accept(&listener, "admin API") => a,
                    };
                    let peer = Peer {
                        remote,
                        spiffe_id: None,
                    };
                    if tx.send((Either::Left(tcp), peer)).await.is_err() {
                        return;
                    }
                },
                Some(config) => {
                    let mut conns = std::pin::pin!(incoming(listener, config));
                    while let Some(Ok(conn)) = conns.next().await {
                        let info = conn.connect_info();
                        let peer = Peer {
                            remote: info.remote.unwrap_or(local),
                            spiffe_id: info.spiffe_id,
                        };
                        if tx.send((Either::Right(conn), peer)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Self { local, rx })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Io;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (it never does while we hold the receiver): wait forever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            remote: self.local,
            spiffe_id: None,
        })
    }
}

/// A request head must arrive within this; an idle connection, or one that dribbles its head
/// (slow-loris), is closed at this point.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Request heads larger than this are answered 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Open connections of one HTTP/1.1 server; beyond it a new one is closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// On shutdown, open connections get this long to finish.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `router` over HTTP/1.1 on `listener` (TLS with `tls`) until `shutdown`, with the
/// limits axum's own server lacks: [`HEADER_READ_TIMEOUT`] on every request head (which also
/// cuts a connection that never sends one), [`MAX_HEADER_BYTES`], and [`MAX_CONNECTIONS`].
/// Handlers see the caller as `ConnectInfo<Peer>`.
pub async fn serve_http1(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    name: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::Listener as _;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut listener = HttpListener::new(listener, tls)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (io, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(server = name, peer = %peer.remote, "too many connections; closed a new one");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let graceful = shutdown.clone();
        tracker.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            let conn = http
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(server = name, error = %e, "connection ended with an error");
                    }
                }
                _ = graceful.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
                }
            }
            drop(permit);
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await;
    Ok(())
}
