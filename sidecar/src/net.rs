//! Socket plumbing: the original destination of a redirected connection, socket marks,
//! connecting with a timeout, and replaying bytes read while detecting the protocol.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// `SO_ORIGINAL_DST` (netfilter; the same value for IPv4 and `IP6T_SO_ORIGINAL_DST`).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where a connection redirected by iptables `REDIRECT` was going.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let fd = s.as_raw_fd();
    let local = s.local_addr()?;
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed sockaddr storage we own.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let level = if local.is_ipv4() {
            libc::SOL_IP
        } else {
            libc::SOL_IPV6
        };
        let rc = libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        match storage.ss_family as libc::c_int {
            libc::AF_INET => {
                let sin: libc::sockaddr_in =
                    std::ptr::read((&storage as *const libc::sockaddr_storage).cast());
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    u32::from_be(sin.sin_addr.s_addr).into(),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6: libc::sockaddr_in6 =
                    std::ptr::read((&storage as *const libc::sockaddr_storage).cast());
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            f => Err(io::Error::other(format!(
                "SO_ORIGINAL_DST returned address family {f}"
            ))),
        }
    }
}

fn set_mark(socket: &TcpSocket, mark: u32) -> io::Result<()> {
    // SAFETY: setsockopt reads a c_int we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&(mark as libc::c_int) as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connects one socket to `a`, marked with `mark` when given.
async fn connect_socket(a: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = if a.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(m) = mark {
        set_mark(&socket, m)?;
    }
    let s = socket.connect(a).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn within<T>(
    what: impl std::fmt::Display,
    timeout: Duration,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {what} timed out after {timeout:?}"),
        )),
    }
}

/// Connects to `addr` ("ip:port" or "host:port") within `timeout`. With `mark`, the socket carries
/// that `SO_MARK` so iptables rules can leave the proxy's own traffic alone (needs CAP_NET_ADMIN).
pub async fn connect(addr: &str, timeout: Duration, mark: Option<u32>) -> io::Result<TcpStream> {
    within(addr, timeout, async {
        let resolved: Vec<SocketAddr> = match addr.parse::<SocketAddr>() {
            Ok(a) => vec![a],
            Err(_) => tokio::net::lookup_host(addr).await?.collect(),
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} did not resolve"));
        for a in resolved {
            match connect_socket(a, mark).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    })
    .await
}

/// Connects to `addr` within `timeout` (see [`connect`]), without resolving anything.
pub async fn connect_addr(
    addr: SocketAddr,
    timeout: Duration,
    mark: Option<u32>,
) -> io::Result<TcpStream> {
    within(addr, timeout, connect_socket(addr, mark)).await
}

/// What a client speaks, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies `buf`; `None` while more bytes could change the answer.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let mut undecided = false;
    for m in METHODS {
        let k = buf.len().min(m.len());
        if buf[..k] == m[..k] {
            if k == m.len() {
                return Some(Protocol::Http1);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(Protocol::Tcp) }
}

/// Reads until the protocol is known, the client stops sending for `timeout` (server-first
/// protocols), or the client closes. Returns the bytes read, to be replayed.
pub async fn detect(s: &mut TcpStream, timeout: Duration) -> io::Result<(Protocol, Vec<u8>)> {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 64];
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf));
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return Ok((Protocol::Tcp, buf)),
            Ok(Ok(0)) => return Ok((Protocol::Tcp, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

pub use fedmesh_dataplane::prefixed::Prefixed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_told_apart_from_their_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Tcp));
        assert_eq!(classify(b"GETX"), Some(Protocol::Tcp));
        assert_eq!(classify(b"SSH-2.0"), Some(Protocol::Tcp));
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp_and_bytes_are_replayed() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GE").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let (p, buf) = detect(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut replay = Prefixed::new(buf, s);
        let mut got = vec![0u8; 16];
        replay.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        let _c = client.await.unwrap();

        // A server-first protocol: the client says nothing.
        let addr2 = l.local_addr().unwrap();
        let _quiet = TcpStream::connect(addr2).await.unwrap();
        let (mut s2, _) = l.accept().await.unwrap();
        let (p, buf) = detect(&mut s2, Duration::from_millis(100)).await.unwrap();
        assert_eq!((p, buf.len()), (Protocol::Tcp, 0));
    }
}
