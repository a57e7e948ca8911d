//! Serving axum over plain TCP or TLS with the limits of [`crate::limits`] and a bounded number of
//! connections, the peer's verified SPIFFE ID available to handlers: the hub's admin and OTLP
//! ports and the proxies' admin ports.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use fedmesh_api::SpiffeId;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::either::Either;
use tonic::transport::server::Connected as _;

use crate::grpc::{TlsConn, incoming};
use crate::limits::{self, Preface};

/// A plain connection must send its first bytes in time ([`Preface`]); a TLS one is held to the
/// same by [`incoming`].
pub type Io = Either<Preface<TcpStream>, TlsConn>;

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
/// [`crate::grpc::incoming`]).
pub struct HttpListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(Io, Peer)>,
}

impl HttpListener {
    /// Accepts on `listener`, TLS with `tls`; `name` is the server's name in logs.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        name: &'static str,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            match tls {
                None => loop {
                    let (tcp, remote) = tokio::select! {
                        _ = tx.closed() => return,
                        a = crate::listen::accept(&listener, name) => a,
                    };
                    let peer = Peer {
                        remote,
                        spiffe_id: None,
                    };
                    let tcp = Preface::h2(tcp);
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

/// Open connections of one HTTP server; beyond it a new one is closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// On shutdown, open connections get this long to finish.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which HTTP versions a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    Http1,
    /// HTTP/1.1 and HTTP/2, told apart by the client's preface.
    Http1And2,
}

/// Serves `router` on `listener` until `shutdown`, with the limits of [`crate::limits`] (which
/// axum's own server lacks: a connection that says nothing, or dribbles its head, is cut) and at
/// most [`MAX_CONNECTIONS`] open. Handlers see the caller as `ConnectInfo<Peer>`. On shutdown,
/// open connections finish their requests for up to 5 s.
pub async fn serve(
    mut listener: HttpListener,
    router: axum::Router,
    versions: Versions,
    name: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::serve::Listener as _;
    use hyper_util::rt::TokioIo;
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
            let io = TokioIo::new(io);
            let ended = match versions {
                Versions::Http1 => {
                    let conn = limits::http1()
                        .serve_connection(io, service)
                        .with_upgrades();
                    drive(conn, graceful, |c| c.graceful_shutdown())
                        .await
                        .map_err(|e| e.to_string())
                }
                Versions::Http1And2 => {
                    let builder = limits::auto();
                    let conn = builder.serve_connection_with_upgrades(io, service);
                    drive(conn, graceful, |c| c.graceful_shutdown())
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(e) = ended {
                tracing::debug!(server = name, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await;
}

/// Runs a connection until it ends, or until `graceful` is cancelled; then asks it to finish
/// (`shut`) and gives it [`DRAIN_TIMEOUT`].
async fn drive<C, E>(
    conn: C,
    graceful: tokio_util::sync::CancellationToken,
    shut: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = graceful.cancelled() => {
            shut(conn.as_mut());
            tokio::time::timeout(DRAIN_TIMEOUT, conn).await.unwrap_or(Ok(()))
        }
    }
}
