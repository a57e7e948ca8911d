//! Serving axum over plain TCP or TLS, with the peer's verified SPIFFE ID available to handlers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use fedmesh_api::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

pub type Io = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

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

/// A listener for axum: TCP, or TLS with handshakes done concurrently off the accept path.
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
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                match &acceptor {
                    None => {
                        let _ = tx
                            .send((
                                Either::Left(tcp),
                                Peer {
                                    remote,
                                    spiffe_id: None,
                                },
                            ))
                            .await;
                    }
                    Some(acceptor) => {
                        let (acceptor, tx) = (acceptor.clone(), tx.clone());
                        tokio::spawn(async move {
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(tcp),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => {
                                    let spiffe_id = fedmesh_trust::tls::peer_spiffe_id(
                                        tls.get_ref().1.peer_certificates(),
                                    );
                                    let _ = tx
                                        .send((Either::Right(tls), Peer { remote, spiffe_id }))
                                        .await;
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%remote, error = %fedmesh_trust::tls::handshake_error_message(&e), "admin TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%remote, "admin TLS handshake timed out"),
                            }
                        });
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
