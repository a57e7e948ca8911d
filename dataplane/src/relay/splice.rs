//! One direction of a TCP-to-TCP passthrough with splice(2): socket → pipe → socket, so the
//! payload moves between kernel buffers and is never copied into ours. Half-close, byte counts and
//! the idle clock work as in the copying relay.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Activity;

/// At most this much per splice into the pipe (a default pipe holds 64 KiB).
const CHUNK: usize = 64 * 1024;

/// A non-blocking pipe, the kernel buffer one direction moves through.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: pipe2 writes two new descriptors into the two-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created for us and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Self { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from a live
    // TcpStream or Pipe); null offsets mean "the file position", as sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves bytes from `src` to `dst` until `src` ends, then half-closes `dst` (so the peer sees the
/// end of this direction while the other goes on). Counts into `moved`.
pub(super) async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    moved: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    loop {
        // The pipe is empty here (all that went in came out below), so EAGAIN means the socket
        // has nothing to read, and tokio waits for it to become readable again.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // SAFETY: shutdown(2) of the write side of a socket we hold open.
            if unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) } < 0 {
                let e = io::Error::last_os_error();
                // The peer may have gone already; that ends this direction all the same.
                if e.kind() != io::ErrorKind::NotConnected {
                    return Err(e);
                }
            }
            return Ok(());
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        // Out of the pipe: here EAGAIN means the destination's send buffer is full.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::relay::relay_tcp;

    /// client ⇄ (relay) ⇄ server over loopback; the relay's task and both outer ends.
    async fn through_relay(
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<std::io::Result<crate::relay::Moved>>,
    ) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (proxy_a, _) = front.accept().await.unwrap();
        let proxy_b = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = back.accept().await.unwrap();
        let relay = tokio::spawn(relay_tcp(proxy_a, proxy_b, idle));
        (client, server, relay)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn both_directions_at_once_arrive_whole_and_counted_without_copying() {
        let (client, server, relay) = through_relay(Duration::from_secs(30)).await;
        // More than many pipe- and socket-buffers' worth each way, at the same time.
        let (up, down) = (pattern(8 << 20, 1), pattern(5 << 20, 7));
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let (u, d) = (up.clone(), down.clone());
        let send_up = tokio::spawn(async move {
            cw.write_all(&u).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let send_down = tokio::spawn(async move {
            sw.write_all(&d).await.unwrap();
            sw.shutdown().await.unwrap();
        });
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        let (a, b) = tokio::join!(sr.read_to_end(&mut got_up), cr.read_to_end(&mut got_down));
        a.unwrap();
        b.unwrap();
        send_up.await.unwrap();
        send_down.await.unwrap();
        assert!(got_up == up, "client → server bytes differ");
        assert!(got_down == down, "server → client bytes differ");
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(
            (
                moved.a_to_b,
                moved.b_to_a,
                moved.idle_timeout,
                moved.zero_copy
            ),
            (up.len() as u64, down.len() as u64, false, true)
        );
    }

    #[tokio::test]
    async fn a_half_close_ends_one_direction_and_the_answer_still_comes_back() {
        let (mut client, mut server, relay) = through_relay(Duration::from_secs(30)).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response");
        let moved = relay.await.unwrap().unwrap();
        assert_eq!((moved.a_to_b, moved.b_to_a), (7, 8));
    }

    #[tokio::test]
    async fn an_idle_passthrough_is_closed() {
        let (_client, _server, relay) = through_relay(Duration::from_millis(100)).await;
        let moved = relay.await.unwrap().unwrap();
        assert!(moved.idle_timeout && moved.zero_copy);
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error() {
        let (mut client, server, relay) = through_relay(Duration::from_secs(30)).await;
        // SO_LINGER 0: close sends RST instead of FIN.
        server.set_zero_linger().unwrap();
        drop(server);
        // Writing towards the reset side surfaces the reset in the relay.
        let _ = client.write_all(&pattern(1 << 20, 3)).await;
        let r = relay.await.unwrap();
        assert!(r.is_err(), "{r:?}");
    }
}
