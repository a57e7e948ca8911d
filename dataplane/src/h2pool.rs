//! One multiplexed HTTP/2 connection per key: the sidecar's pool of connections to peers and
//! gateways (keyed by peer and destination) and to its local app (keyed by address).
//!
//! A caller gets the open connection's sender when there is one. Otherwise it connects while
//! holding the key's slot, so concurrent callers share one connection attempt and its result
//! instead of each opening a connection; a failed attempt leaves the slot empty for the next.
//! Each connection may carry a tag of the caller's (`M`), handed out with its sender: the
//! sidecar keeps there the ID a gateway knows the connection by.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use hyper::client::conn::http2::SendRequest;

use crate::http::Body;

type Slot<M> = Arc<tokio::sync::Mutex<Option<(SendRequest<Body>, M)>>>;

pub struct H2Pool<K, M = ()> {
    slots: Mutex<HashMap<K, Slot<M>>>,
}

impl<K, M> Default for H2Pool<K, M> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

fn open<M>(slot: &Slot<M>) -> bool {
    slot.try_lock()
        .map(|g| g.as_ref().is_some_and(|(s, _)| !s.is_closed()))
        // Someone is connecting: count it as open.
        .unwrap_or(true)
}

impl<K: Hash + Eq, M: Clone> H2Pool<K, M> {
    fn slot<Q>(&self, key: &Q) -> Slot<M>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned + ?Sized,
        Q::Owned: Into<K>,
    {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get(key) {
            Some(s) => s.clone(),
            None => slots.entry(key.to_owned().into()).or_default().clone(),
        }
    }

    /// A sender on `key`'s connection and its tag, opening one with `connect` when none is
    /// open.
    pub async fn get<Q, E, F, Fut>(&self, key: &Q, connect: F) -> Result<(SendRequest<Body>, M), E>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned + ?Sized,
        Q::Owned: Into<K>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(SendRequest<Body>, M), E>>,
    {
        let slot = self.slot(key);
        let mut guard = slot.lock().await;
        if let Some((s, tag)) = guard.as_ref()
            && !s.is_closed()
        {
            return Ok((s.clone(), tag.clone()));
        }
        *guard = None;
        let conn = connect().await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets `key`'s connection (after it failed); the next caller opens another.
    pub fn evict<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Drops the slots whose connection has closed.
    pub fn sweep(&self) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| open(s));
    }

    /// Open connections (and attempts under way).
    pub fn open(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| open(s))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/2 server on loopback that answers 200, and how many connections it accepted.
    async fn server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(
                            TokioIo::new(s),
                            hyper::service::service_fn(|_req| async {
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    crate::http::full("ok"),
                                ))
                            }),
                        ),
                );
            }
        });
        (addr, accepted)
    }

    async fn connect(addr: std::net::SocketAddr) -> Result<(SendRequest<Body>, ()), String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok((sender, ()))
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_connection_and_an_evicted_one_is_replaced() {
        let (addr, accepted) = server().await;
        let pool: H2Pool<std::net::SocketAddr> = H2Pool::default();
        let calls = (0..8).map(|_| pool.get(&addr, || connect(addr)));
        for sender in futures::future::join_all(calls).await {
            let (mut sender, ()) = sender.unwrap();
            let resp = sender
                .send_request(http::Request::new(crate::http::full("")))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one connection for all"
        );
        assert_eq!(pool.open(), 1);
        pool.evict(&addr);
        assert_eq!(pool.open(), 0);
        let (mut sender, ()) = pool.get(&addr, || connect(addr)).await.unwrap();
        // Answered: the server has accepted the new connection.
        sender
            .send_request(http::Request::new(crate::http::full("")))
            .await
            .unwrap();
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_failed_connect_leaves_the_slot_for_the_next_caller() {
        let (addr, _) = server().await;
        let pool: H2Pool<Box<str>> = H2Pool::default();
        let err = pool
            .get("peer", || async {
                Err::<(SendRequest<Body>, ()), _>("refused")
            })
            .await
            .unwrap_err();
        assert_eq!(err, "refused");
        assert!(pool.get("peer", || connect(addr)).await.is_ok());
        assert_eq!(pool.open(), 1);
    }
}
