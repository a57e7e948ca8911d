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
