//! The one accept-and-drain loop of every fedmesh server: the gateway, the sidecar's listeners,
//! the bundle endpoint, and (through [`accept`]) the hub's admin API and the gRPC servers.
//!
//! - [`accept`] takes the next connection; an error such as `EMFILE` is logged and retried after a
//!   short pause instead of spinning, and every accepted socket gets `TCP_NODELAY`.
//! - [`Server::serve`] accepts until shutdown, bounds open connections (a connection beyond the
//!   limit is closed at once and reported), then stops accepting, flags itself draining (for
//!   `/readyz`), tells handlers to finish (their `graceful` token) and gives them `drain_timeout`
//!   before cancelling what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long to wait after a failed `accept` (out of file descriptors, usually) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `listener`, with `TCP_NODELAY` set. Accept errors are logged with
/// `what` (the server's name) and retried after a pause; this never returns an error.
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                tracing::warn!(server = what, error = %e, "accept failed; retrying shortly");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// A server's connection limits and drain behaviour.
#[derive(Clone)]
pub struct Server {
    /// Named in logs.
    pub name: &'static str,
    /// One permit per open connection.
    pub slots: Arc<Semaphore>,
    /// On shutdown, open connections get this long to finish.
    pub drain_timeout: Duration,
    /// Set once the server stops accepting.
    pub draining: Arc<AtomicBool>,
}

/// What a finished [`Server::serve`] saw while draining.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Connections open when accepting stopped.
    pub open: usize,
    /// Connections still open at the drain timeout, closed by cancelling their handlers.
    pub cut: usize,
}

impl Server {
    pub fn new(name: &'static str, max_connections: usize, drain_timeout: Duration) -> Self {
        Self {
            name,
            slots: Arc::new(Semaphore::new(max_connections)),
            drain_timeout,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Serves `listener` until `shutdown`: each connection goes to `handler` with its peer and a
    /// `graceful` token cancelled when shutdown begins (an HTTP handler then asks its client to
    /// stop). A connection over the limit is closed at once and passed to `refused`.
    pub async fn serve<F, Fut>(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
        refused: impl Fn(SocketAddr),
        handler: F,
    ) -> Drained
    where
        F: Fn(TcpStream, SocketAddr, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = accept(&listener, self.name) => c,
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                drop(stream);
                refused(peer);
                continue;
            };
            let fut = handler(stream, peer, shutdown.clone());
            let stop = hard_stop.clone();
            tracker.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = fut => {}
                }
                drop(permit);
            });
        }
        self.draining.store(true, Ordering::Relaxed);
        drop(listener);
        tracker.close();
        let open = tracker.len();
        if open > 0 {
            tracing::info!(server = self.name, connections = open, timeout = ?self.drain_timeout, "draining open connections");
        }
        let mut cut = 0;
        if tokio::time::timeout(self.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            cut = tracker.len();
            tracing::warn!(
                server = self.name,
                connections = cut,
                "drain timeout; closing the remaining connections"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
        Drained { open, cut }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_is_closed_and_reported() {
        let (l, addr) = listener().await;
        let server = Server::new("test", 1, Duration::from_secs(1));
        let refused = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let r = refused.clone();
        let serving = tokio::spawn({
            let (server, shutdown) = (server.clone(), shutdown.clone());
            async move {
                server
                    .serve(
                        l,
                        shutdown,
                        move |_| {
                            r.fetch_add(1, Ordering::Relaxed);
                        },
                        |mut s, _, graceful| async move {
                            // Holds its slot until shutdown, then says goodbye.
                            graceful.cancelled().await;
                            let _ = s.write_all(b"bye").await;
                        },
                    )
                    .await
            }
        });
        let mut first = TcpStream::connect(addr).await.unwrap();
        // The first connection holds the only slot once the server has taken it.
        while server.slots.available_permits() == 1 {
            tokio::task::yield_now().await;
        }
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(second.read(&mut buf).await.unwrap(), 0, "closed at once");
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        shutdown.cancel();
        let mut got = Vec::new();
        first.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye", "the open connection was told to finish");
        // It finished within the drain timeout (it may even have before accepting stopped).
        assert_eq!(serving.await.unwrap().cut, 0);
        assert!(server.draining.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_outlives_the_drain_timeout_is_cut() {
        let (l, addr) = listener().await;
        let server = Server::new("test", 8, Duration::from_secs(5));
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn({
            let (server, shutdown) = (server.clone(), shutdown.clone());
            async move {
                server
                    .serve(
                        l,
                        shutdown,
                        |_| {},
                        |_s, _, _graceful| async move {
                            // Ignores the request to finish.
                            std::future::pending::<()>().await
                        },
                    )
                    .await
            }
        });
        let _conn = TcpStream::connect(addr).await.unwrap();
        while server.slots.available_permits() == 8 {
            tokio::task::yield_now().await;
        }
        shutdown.cancel();
        assert_eq!(serving.await.unwrap(), Drained { open: 1, cut: 1 });
    }
}
