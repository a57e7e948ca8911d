//! Copying bytes both ways between two connections: correct half-close (each direction ends on
//! its own), an idle timeout, and byte counts. Between two plain TCP sockets on Linux
//! ([`relay_tcp`], the gateway's passthrough) the bytes never enter user space: [`splice`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
mod splice;

/// Counts bytes read through it and notes when anything moved.
pub struct Counted<T> {
    inner: T,
    read: Arc<AtomicU64>,
    activity: Activity,
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
            self.activity.touch();
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
    /// The bytes went socket to socket through the kernel (splice), never through our buffers.
    pub zero_copy: bool,
}

/// When anything last moved, for the idle timeout; shared by both directions.
#[derive(Clone)]
pub(crate) struct Activity {
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            last_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Relays between two TCP sockets like [`relay`]; on Linux with splice(2) through a pipe per
/// direction, so the bytes go from one socket to the other inside the kernel. Falls back to
/// copying through user space when pipes cannot be had (e.g. out of file descriptors).
pub async fn relay_tcp(a: TcpStream, b: TcpStream, idle: Duration) -> io::Result<Moved> {
    #[cfg(target_os = "linux")]
    match (splice::Pipe::new(), splice::Pipe::new()) {
        (Ok(p1), Ok(p2)) => {
            let activity = Activity::new();
            let (ra, rb) = (AtomicU64::new(0), AtomicU64::new(0));
            let copy = async {
                tokio::try_join!(
                    splice::one_way(&a, &b, &p1, &ra, &activity),
                    splice::one_way(&b, &a, &p2, &rb, &activity),
                )
                .map(|_| ())
            };
            return watch(copy, &ra, &rb, &activity, idle, true).await;
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "no pipe for splice; copying through user space");
        }
    }
    relay(a, b, idle).await
}

/// Runs `copy` until it ends, or until nothing moved for `idle`; then the counts.
async fn watch(
    copy: impl std::future::Future<Output = io::Result<()>>,
    ra: &AtomicU64,
    rb: &AtomicU64,
    activity: &Activity,
    idle: Duration,
    zero_copy: bool,
) -> io::Result<Moved> {
    tokio::pin!(copy);
    let check = (idle / 4).max(Duration::from_millis(10));
    let idle_timeout = loop {
        tokio::select! {
            r = &mut copy => {
                r?;
                break false;
            }
            _ = tokio::time::sleep(check) => {
                if activity.idle_for() >= idle {
                    break true;
                }
            }
        }
    };
    Ok(Moved {
        a_to_b: ra.load(Ordering::Relaxed),
        b_to_a: rb.load(Ordering::Relaxed),
        idle_timeout,
        zero_copy,
    })
}

/// Relays between `a` and `b` until both directions end, or nothing moves for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Duration) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (ra, rb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut a = Counted {
        inner: a,
        read: ra.clone(),
        activity: activity.clone(),
    };
    let mut b = Counted {
        inner: b,
        read: rb.clone(),
        activity: activity.clone(),
    };
    let copy = async {
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024)
            .await
            .map(|_| ())
    };
    watch(copy, &ra, &rb, &activity, idle, false).await
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
