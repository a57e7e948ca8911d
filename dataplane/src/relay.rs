//! Copying bytes both ways between two connections: correct half-close (each direction ends on
//! its own), an idle timeout, and byte counts.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Counts bytes read through it and notes when anything moved.
pub struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
    activity: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.fetch_add(n, Ordering::Relaxed);
            self.activity
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

fedmesh_api::delegate_async_write!(Counted);

/// Bytes moved by a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub idle_timeout: bool,
}

/// Relays between `a` and `b` until both directions end, or nothing moves for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Duration) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let (ra, rb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut a = Counted {
        inner: a,
        read: ra.clone(),
        activity: activity.clone(),
        epoch,
    };
    let mut b = Counted {
        inner: b,
        read: rb.clone(),
        activity: activity.clone(),
        epoch,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024);
    tokio::pin!(copy);
    let check = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            r = &mut copy => {
                r?;
                return Ok(Moved { a_to_b: ra.load(Ordering::Relaxed), b_to_a: rb.load(Ordering::Relaxed), idle_timeout: false });
            }
            _ = tokio::time::sleep(check) => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if epoch.elapsed().saturating_sub(last) >= idle {
                    return Ok(Moved { a_to_b: ra.load(Ordering::Relaxed), b_to_a: rb.load(Ordering::Relaxed), idle_timeout: true });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_lets_the_other_direction_finish() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(proxy_a, proxy_b, Duration::from_secs(5)));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"request").await.unwrap();
        cw.shutdown().await.unwrap(); // client done sending
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The server still answers after the client's half-close.
        sw.write_all(b"response").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response");
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(
            (moved.a_to_b, moved.b_to_a, moved.idle_timeout),
            (7, 8, false)
        );
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (_client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let moved = relay(proxy_a, proxy_b, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(moved.idle_timeout);
    }
}
