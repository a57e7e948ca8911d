//! Opaque TCP from another sidecar (ALPN `fedmesh-tcp`).
//!
//! Bytes a caller sends through a tunnel reach the app unparsed — unless they are HTTP. An HTTP
//! app reached through a tunnel (`CONNECT`, a `tcp-*` port, a WebSocket) would otherwise believe
//! whatever `x-forwarded-client-cert` the caller wrote, and take any workload for any other. So
//! the caller's first bytes are sniffed before anything reaches the app:
//! - HTTP/1.x or HTTP/2 (prior knowledge) is served as HTTP, each request with the header replaced
//!   by the verified caller (upgrades such as WebSocket are passed through after that);
//! - a definite non-HTTP opening is relayed byte for byte;
//! - what could still be HTTP after [`MAX_SNIFF`] bytes is refused: no HTTP server reads a
//!   request line that long, but some accept one, so "cannot tell" must not mean "relay".
//!
//! A server-first protocol (the app greets, the caller answers) sends nothing at first: after the
//! detection timeout the app is connected and its greeting relayed while the caller's first bytes
//! are still sniffed. HTTP arriving then is served as HTTP if the app has said nothing yet, and
//! refused if it has (an app that greets is not an HTTP server).

use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{InboundConn, call_stack, into_stack_request};
use crate::Sidecar;
use crate::net::{self, Prefixed};
use fedmesh_dataplane::relay::relay;
use fedmesh_dataplane::telemetry::ConnectionSpan;
use opentelemetry::KeyValue;

/// How many bytes of a tunnel's opening are read before deciding. Larger than any request line an
/// HTTP server we know accepts by default (nginx 8 KiB, hyper 8 KiB; Go reads up to 1 MiB, but
/// only with a space-separated, control-free line, which is all we wait for).
pub(crate) const MAX_SNIFF: usize = 64 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a tunnel's first bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    Http1,
    Http2,
    /// Certainly not an HTTP request: relayed as is.
    Opaque,
    /// Could still be an HTTP request line after [`MAX_SNIFF`] bytes: refused.
    Undecidable,
}

/// RFC 9110 `tchar`: what an HTTP method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the opening of a tunnel; `None` while more bytes could change the answer. `eof`:
/// the caller sent everything it will send.
pub(crate) fn sniff(buf: &[u8], eof: bool) -> Option<Opening> {
    let undecided = if eof {
        Some(Opening::Opaque)
    } else if buf.len() >= MAX_SNIFF {
        Some(Opening::Undecidable)
    } else {
        None
    };
    // HTTP/1 servers skip empty lines before a request (RFC 9112 §2.2), so do we.
    let start = buf.iter().position(|b| !matches!(b, b'\r' | b'\n'));
    let Some(start) = start else {
        return undecided;
    };
    let rest = &buf[start..];
    let n = rest.len().min(H2_PREFACE.len());
    if start == 0 && rest[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Opening::Http2)
        } else {
            undecided
        };
    }
    // A request line: method (tchars), whitespace, then a target and a version free of controls.
    let method = rest.iter().take_while(|b| is_tchar(**b)).count();
    if method == 0 {
        return Some(Opening::Opaque);
    }
    match rest.get(method) {
        None => return undecided,
        Some(b' ' | b'\t') => {}
        Some(_) => return Some(Opening::Opaque),
    }
    let line = &rest[method..];
    let Some(lf) = line.iter().position(|b| *b == b'\n') else {
        if line
            .iter()
            .any(|b| (b.is_ascii_control() && !matches!(b, b'\t' | b'\r')) || *b == 0x7f)
        {
            return Some(Opening::Opaque);
        }
        return undecided;
    };
    let line = &line[..lf];
    if line
        .iter()
        .any(|b| (b.is_ascii_control() && !matches!(b, b'\t' | b'\r')) || *b == 0x7f || *b >= 0x80)
    {
        return Some(Opening::Opaque);
    }
    let trimmed = line.trim_ascii_end();
    let version = trimmed.len() >= 8 && {
        let v = &trimmed[trimmed.len() - 8..];
        v[..5].eq_ignore_ascii_case(b"HTTP/")
            && v[5].is_ascii_digit()
            && v[6] == b'.'
            && v[7].is_ascii_digit()
    };
    Some(if version {
        Opening::Http1
    } else {
        Opening::Opaque
    })
}

/// Reads from `r` into `buf` until [`sniff`] decides. `Ok(None)`: `r` stayed silent until
/// `deadline` (with `deadline: None`, reads until a decision).
async fn read_opening<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    deadline: Option<tokio::time::Instant>,
) -> std::io::Result<Option<Opening>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(o) = sniff(buf, false) {
            return Ok(Some(o));
        }
        let read = r.read(&mut chunk);
        let n = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(n) => n?,
                Err(_) => return Ok(None),
            },
            None => read.await?,
        };
        if n == 0 {
            return Ok(sniff(buf, true));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How the tunnel goes on once its opening is known.
enum Plan<S> {
    Http(Opening, Prefixed<S>),
    Relay(Prefixed<S>, TcpStream),
    Refuse(&'static str),
}

impl Sidecar {
    /// Serves an admitted, authorized opaque tunnel to `app`; `span` records what it carried
    /// (HTTP found inside gets a span per request besides).
    pub(super) async fn inbound_opaque<S>(
        self: &Arc<Self>,
        mut tls: S,
        conn: Arc<InboundConn>,
        app: std::net::SocketAddr,
        graceful: CancellationToken,
        mut span: Option<ConnectionSpan>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf = Vec::new();
        let deadline = tokio::time::Instant::now() + self.options.protocol_detect_timeout;
        let plan = match read_opening(&mut tls, &mut buf, Some(deadline)).await {
            Err(_) => Plan::Refuse("caller_closed"),
            Ok(Some(Opening::Opaque)) => match self.connect_app(app).await {
                Some(up) => Plan::Relay(Prefixed::new(buf, tls), up),
                None => Plan::Refuse("app_unreachable"),
            },
            Ok(Some(Opening::Undecidable)) => Plan::Refuse("undecidable_opening"),
            Ok(Some(http)) => Plan::Http(http, Prefixed::new(buf, tls)),
            Ok(None) => self.server_first(tls, buf, app).await,
        };
        // A plain-text caller's connection is authorized here, once it is known not to be HTTP
        // (HTTP is authorized per request).
        let plan = match plan {
            Plan::Relay(..)
                if conn.caller.is_none() && self.unauthenticated_relay_denied(&conn) =>
            {
                Plan::Refuse("unauthorized")
            }
            plan => plan,
        };
        match plan {
            Plan::Relay(client, up) => {
                self.metrics.tcp_active.inc();
                let moved = relay(client, up, self.options.idle_timeout).await;
                self.metrics.tcp_active.dec();
                if let Some(s) = &mut span {
                    match &moved {
                        Ok(m) => s.moved(m, 0),
                        Err(e) => s.fail(format!("{:?}", e.kind())),
                    }
                }
            }
            Plan::Http(opening, io) => {
                if let Some(s) = &mut span {
                    s.push(KeyValue::new("network.protocol.name", "http"));
                }
                match opening {
                    Opening::Http2 => self.serve_h2(io, conn, graceful).await,
                    _ => self.serve_h1(io, conn, graceful).await,
                }
            }
            Plan::Refuse(reason) => {
                if reason != "unauthorized" {
                    // (authorization counted its own refusal)
                    self.metrics.refuse(reason);
                }
                if let Some(s) = &mut span {
                    s.fail(reason);
                }
                match reason {
                    "app_unreachable" | "caller_closed" | "unauthorized" => {}
                    _ => tracing::info!(
                        caller = %conn.caller_name(),
                        reason,
                        "inbound tunnel refused: its opening could be an HTTP request the sidecar cannot check"
                    ),
                }
            }
        }
        if let Some(s) = span {
            s.finish();
        }
    }

    async fn connect_app(&self, app: std::net::SocketAddr) -> Option<TcpStream> {
        match net::connect(&app.to_string(), self.options.connect_timeout, None).await {
            Ok(u) => Some(u),
            Err(e) => {
                self.metrics.count_error("app-unreachable");
                tracing::warn!(app = %app, error = %e, "the app does not accept connections");
                None
            }
        }
    }

    /// The caller said nothing in time: connect the app and relay what it says while the
    /// caller's first bytes are sniffed.
    async fn server_first<S>(&self, tls: S, mut buf: Vec<u8>, app: std::net::SocketAddr) -> Plan<S>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(mut up) = self.connect_app(app).await else {
            return Plan::Refuse("app_unreachable");
        };
        let (mut rd, mut wr) = tokio::io::split(tls);
        let mut app_spoke = false;
        let mut abuf = [0u8; 16 * 1024];
        let mut cbuf = [0u8; 4096];
        let idle = self.options.idle_timeout;
        let opening = loop {
            if let Some(o) = sniff(&buf, false) {
                break o;
            }
            tokio::select! {
                r = up.read(&mut abuf) => match r {
                    Ok(0) | Err(_) => return Plan::Refuse("app_closed"),
                    Ok(n) => {
                        app_spoke = true;
                        if wr.write_all(&abuf[..n]).await.is_err() || wr.flush().await.is_err() {
                            return Plan::Refuse("caller_closed");
                        }
                    }
                },
                r = rd.read(&mut cbuf) => match r {
                    Ok(0) => break sniff(&buf, true).unwrap_or(Opening::Opaque),
                    Ok(n) => buf.extend_from_slice(&cbuf[..n]),
                    Err(_) => return Plan::Refuse("caller_closed"),
                },
                _ = tokio::time::sleep(idle) => return Plan::Refuse("idle"),
            }
        };
        let tls = rd.unsplit(wr);
        match opening {
            Opening::Opaque => Plan::Relay(Prefixed::new(buf, tls), up),
            Opening::Undecidable => Plan::Refuse("undecidable_opening"),
            _ if app_spoke => Plan::Refuse("http_after_greeting"),
            http => Plan::Http(http, Prefixed::new(buf, tls)),
        }
    }

    /// HTTP/1.x found inside a tunnel: every request is checked and handed over like those on
    /// the HTTP path; upgrades (WebSocket) continue as a relay once the app agreed.
    async fn serve_h1<S>(
        self: &Arc<Self>,
        io: S,
        conn: Arc<InboundConn>,
        graceful: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stack = self.inbound.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            call_stack(&stack, into_stack_request(req, &conn, true))
        });
        let mut b = fedmesh_trust::limits::http1();
        b.header_read_timeout(crate::POOLED_HEADER_READ_TIMEOUT);
        let conn = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP/1 inside a tunnel ended with an error");
                }
            }
            _ = graceful.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(bytes: &[u8]) -> Option<Opening> {
        sniff(bytes, false)
    }

    #[test]
    fn http_request_lines_are_http_whatever_the_method_or_preamble() {
        for opening in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\r\n\r\nGET / HTTP/1.1\r\n",
            b"\nPROPFIND /dav HTTP/1.1\n",
            b"BREW /pot http/1.0\r\n",
            b"GET\t/ HTTP/1.1  \r\n",
            b"X-CUSTOM /a%20b?c=d HTTP/9.9\r\n",
        ] {
            assert_eq!(decide(opening), Some(Opening::Http1), "{opening:?}");
        }
        assert_eq!(decide(H2_PREFACE), Some(Opening::Http2));
    }

    #[test]
    fn other_protocols_are_opaque_as_soon_as_they_cannot_be_http() {
        for opening in [
            &b"\x16\x03\x01\x02\x00"[..],  // TLS
            b"\0\0\0\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"*1\r\n$4\r\nPING\r\n",       // Redis
            b"get key\r\n",                // memcached: no HTTP version
            b"A\x20\x00\x00",              // a length prefix that looks like a token
            b"SSH-2.0-OpenSSH\r\n",
            b"GET / HTTP/1.1\x00\r\n",
            b"GET /\r\n", // HTTP/0.9 carries no headers to forge
        ] {
            assert_eq!(decide(opening), Some(Opening::Opaque), "{opening:?}");
        }
    }

    #[test]
    fn partial_openings_wait_and_overlong_ones_are_refused() {
        for partial in [
            &b""[..],
            b"\r\n",
            b"GE",
            b"GET",
            b"GET /very/long",
            b"PRI * HTTP/2",
        ] {
            assert_eq!(decide(partial), None, "{partial:?}");
            assert_eq!(sniff(partial, true), Some(Opening::Opaque), "{partial:?}");
        }
        let mut long = b"GET /".to_vec();
        long.resize(MAX_SNIFF, b'a');
        assert_eq!(decide(&long), Some(Opening::Undecidable));
        let mut method = vec![b'A'; MAX_SNIFF];
        assert_eq!(decide(&method), Some(Opening::Undecidable));
        method.truncate(10);
        assert_eq!(decide(&method), None);
    }
}
