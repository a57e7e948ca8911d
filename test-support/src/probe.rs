//! Hostile clients for the listener tests: many idle or slow (slow-loris) connections at once,
//! oversized heads, HTTP/2 rapid reset and header floods, garbage. Each probe reports what the
//! server did (how long until it cut a connection, what it answered) and leaves the judging to
//! the test. Every probe is bounded in connections and time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::attack::{self, END_HEADERS, END_STREAM, HEADERS, accept_any_server, frame};

/// How a probe reaches the listener.
#[derive(Clone)]
pub enum Wire {
    /// Plain TCP.
    Tcp,
    /// TLS (any server certificate accepted, no client certificate) offering these ALPN protocols;
    /// the probe's bytes go inside once the handshake is done.
    Tls(Vec<Vec<u8>>),
    /// A Unix socket at this path (the probe's address is not used).
    Unix(std::path::PathBuf),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn open(addr: SocketAddr, wire: &Wire) -> std::io::Result<Box<dyn Io>> {
    if let Wire::Unix(path) = wire {
        return Ok(Box::new(tokio::net::UnixStream::connect(path).await?));
    }
    let tcp = TcpStream::connect(addr).await?;
    match wire {
        Wire::Tcp | Wire::Unix(_) => Ok(Box::new(tcp)),
        Wire::Tls(alpn) => {
            let tls = tokio_rustls::TlsConnector::from(accept_any_server(alpn.clone()))
                .connect(
                    rustls_pki_types::ServerName::try_from("probe").expect("a valid name"),
                    tcp,
                )
                .await?;
            Ok(Box::new(tls))
        }
    }
}

/// What one slow or idle connection saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The server closed it (or reset it) this long after the probe connected.
    Cut(Duration),
    /// Refused at once (connect or TLS failed): a connection limit, or a handshake refusal.
    Refused(String),
    /// Still open when the probe gave up.
    Open,
}

/// What [`hold`] saw across its connections.
#[derive(Debug, Clone)]
pub struct HoldReport {
    pub held: Vec<Held>,
}

impl HoldReport {
    /// The longest time to a cut, if every connection was cut or refused.
    pub fn all_cut_within(&self) -> Option<Duration> {
        let mut longest = Duration::ZERO;
        for h in &self.held {
            match h {
                Held::Cut(d) => longest = longest.max(*d),
                Held::Refused(_) => {}
                Held::Open => return None,
            }
        }
        Some(longest)
    }
    pub fn count(&self, f: impl Fn(&Held) -> bool) -> usize {
        self.held.iter().filter(|h| f(h)).count()
    }
}

/// `n` connections, each sending `opening` at once and then one byte of `drip` every `every`
/// (cycling; an empty `drip` sends nothing more: an idle client), until the server closes it or
/// `give_up` passes. With [`Wire::Tls`] the handshake comes first and counts as the connect.
pub async fn hold(
    addr: SocketAddr,
    wire: Wire,
    n: usize,
    opening: &[u8],
    drip: &[u8],
    every: Duration,
    give_up: Duration,
) -> HoldReport {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (wire, opening, drip) = (wire.clone(), opening.to_vec(), drip.to_vec());
        tasks.spawn(async move {
            // Spread the connects over a little time, as a real flood arrives.
            tokio::time::sleep(Duration::from_millis((i % 50) as u64)).await;
            (
                i,
                hold_one(addr, &wire, &opening, &drip, every, give_up).await,
            )
        });
    }
    let mut held = vec![Held::Open; n];
    while let Some(r) = tasks.join_next().await {
        let (i, h) = r.expect("a probe task does not panic");
        held[i] = h;
    }
    HoldReport { held }
}

async fn hold_one(
    addr: SocketAddr,
    wire: &Wire,
    opening: &[u8],
    drip: &[u8],
    every: Duration,
    give_up: Duration,
) -> Held {
    let start = Instant::now();
    let mut io = match tokio::time::timeout(give_up, open(addr, wire)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            return if start.elapsed() < Duration::from_secs(1) {
                Held::Refused(e.to_string())
            } else {
                // A handshake the server let hang and then dropped is a cut, not a refusal.
                Held::Cut(start.elapsed())
            };
        }
        Err(_) => return Held::Open,
    };
    if io.write_all(opening).await.is_err() || io.flush().await.is_err() {
        return Held::Cut(start.elapsed());
    }
    let deadline = tokio::time::Instant::now() + give_up.saturating_sub(start.elapsed());
    let mut next = 0usize;
    let mut buf = [0u8; 4096];
    loop {
        let tick = tokio::time::sleep(every);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Held::Open,
            r = io.read(&mut buf) => match r {
                // Whatever the server says (an error page, a GOAWAY) is not a cut; its close is.
                Ok(0) | Err(_) => return Held::Cut(start.elapsed()),
                Ok(_) => {}
            },
            _ = tick, if !drip.is_empty() => {
                let b = drip[next % drip.len()];
                next += 1;
                if io.write_all(&[b]).await.is_err() || io.flush().await.is_err() {
                    return Held::Cut(start.elapsed());
                }
            }
        }
    }
}

/// The opening of a TLS ClientHello record that claims 512 bytes and never delivers them: a
/// handshake slow-loris (drip more bytes after it).
pub const TLS_RECORD_START: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

/// An HTTP/1.1 request head that never ends (drip header bytes after it).
pub const H1_HEAD_START: &[u8] = b"GET / HTTP/1.1\r\nHost: probe\r\nX-Slow: ";

/// What a server answered to one request: its status line, or how the connection ended.
pub async fn h1_exchange(addr: SocketAddr, wire: Wire, request: &[u8]) -> String {
    let run = async {
        let mut io = open(addr, &wire)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // A server may answer and close before the whole request is written.
        let _ = io.write_all(request).await;
        let _ = io.flush().await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(2).any(|w| w == b"\r\n") {
                        break;
                    }
                }
                Err(e) if got.is_empty() => return Err(format!("read: {e}")),
                Err(_) => break,
            }
        }
        if got.is_empty() {
            return Err("closed without an answer".to_string());
        }
        let line = got.split(|&b| b == b'\r').next().unwrap_or(&[]);
        Ok(String::from_utf8_lossy(line).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => e,
        Err(_) => "no answer within 30 s".to_string(),
    }
}

/// A GET whose head carries `bytes` of header values (in 8 KiB headers).
pub fn h1_oversized_request(bytes: usize) -> Vec<u8> {
    let mut r = b"GET / HTTP/1.1\r\nHost: probe\r\n".to_vec();
    let mut left = bytes;
    let mut i = 0;
    while left > 0 {
        let n = left.min(8 * 1024);
        r.extend_from_slice(format!("X-Big-{i}: ").as_bytes());
        r.extend(std::iter::repeat_n(b'a', n));
        r.extend_from_slice(b"\r\n");
        left -= n;
        i += 1;
    }
    r.extend_from_slice(b"\r\n");
    r
}

/// How an HTTP/2 connection ended under a probe.
#[derive(Debug, Clone, Default)]
pub struct H2Outcome {
    /// The GOAWAY's error code, if the server sent one.
    pub goaway: Option<u32>,
    /// RST_STREAM frames received.
    pub resets: usize,
    /// HEADERS frames received (responses begun).
    pub responses: usize,
    /// Whether the server closed the connection within the probe's time.
    pub closed: bool,
}

/// Sends `frames` (after the client preface) on one HTTP/2 connection and reads what comes back
/// for up to `wait` after the last one.
pub async fn h2_frames(
    addr: SocketAddr,
    wire: Wire,
    frames: Vec<Vec<u8>>,
    wait: Duration,
) -> H2Outcome {
    let mut out = H2Outcome::default();
    let Ok(io) = open(addr, &wire).await else {
        out.closed = true;
        return out;
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = tokio::spawn(async move {
        if wr.write_all(&attack::client_start()).await.is_err() {
            return;
        }
        for f in frames {
            if wr.write_all(&f).await.is_err() {
                return;
            }
        }
        let _ = wr.flush().await;
        // Keep the write side open: a close would end the connection on its own.
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let r = tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await;
        match r {
            Err(_) => break,
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            match buf[3] {
                0x1 => out.responses += 1,
                0x3 => out.resets += 1,
                0x7 if len >= 8 => {
                    out.goaway = Some(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]));
                }
                _ => {}
            }
            buf.drain(..9 + len);
        }
    }
    writer.abort();
    out
}

/// CVE-2023-44487: `n` streams, each opened with a complete request and reset at once.
pub fn rapid_reset(n: usize, block: &[u8]) -> Vec<Vec<u8>> {
    (0..n)
        .flat_map(|i| {
            let id = 1 + 2 * i as u32;
            [
                frame(HEADERS, END_HEADERS | END_STREAM, id, block),
                // RST_STREAM, CANCEL (8).
                frame(0x3, 0, id, &8u32.to_be_bytes()),
            ]
        })
        .collect()
}

/// One request whose header list is `bytes` long (split into CONTINUATION frames of 16 KiB):
/// more than a server's limit is a header flood.
pub fn h2_oversized_headers(block: &[u8], bytes: usize) -> Vec<Vec<u8>> {
    let mut full = block.to_vec();
    let mut i = 0;
    while full.len() < block.len() + bytes {
        full.extend(attack::literal(
            format!("x-big-{i}").as_bytes(),
            &[b'a'; 4000],
        ));
        i += 1;
    }
    let chunks: Vec<&[u8]> = full.chunks(16 * 1024).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (kind, mut flags) = if i == 0 {
                (HEADERS, END_STREAM)
            } else {
                (attack::CONTINUATION, 0)
            };
            if i == last {
                flags |= END_HEADERS;
            }
            frame(kind, flags, 1, c)
        })
        .collect()
}

/// The header block of an HTTP GET of `/` for `authority`.
pub fn h2_get(authority: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", authority),
    ] {
        b.extend(attack::literal(n.as_bytes(), v.as_bytes()));
    }
    b
}

/// Sends `bytes` of garbage and reports how the server ended the connection: `Ok(elapsed)` when
/// it closed within `wait` (whatever it answered first), `Err` when it kept the connection.
pub async fn garbage(
    addr: SocketAddr,
    wire: Wire,
    bytes: usize,
    wait: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut io = match open(addr, &wire).await {
        Ok(io) => io,
        // Garbage refused during TLS counts: the listener ended it.
        Err(_) => return Ok(start.elapsed()),
    };
    let junk: Vec<u8> = (0..bytes).map(|i| (i * 131 % 251) as u8 | 0x80).collect();
    let _ = io.write_all(&junk).await;
    let _ = io.flush().await;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "still open {wait:?} after {bytes} bytes of garbage"
                ));
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A DNS query for `name` (`qtype` 1 = A), recursion desired.
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    // Flags: RD; one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// A DNS answer's header: (id, rcode, recursion available, answer count).
pub fn dns_header(answer: &[u8]) -> Option<(u16, u8, bool, u16)> {
    (answer.len() >= 12).then(|| {
        (
            u16::from_be_bytes([answer[0], answer[1]]),
            answer[3] & 0x0f,
            answer[3] & 0x80 != 0,
            u16::from_be_bytes([answer[6], answer[7]]),
        )
    })
}

/// Sends `datagram` to a DNS server over UDP and returns its answer, if one comes within 2 s.
pub async fn dns_udp(addr: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok()?;
    sock.send_to(datagram, addr).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}
