//! The HTTP limits every fedmesh server keeps, in one place: what a client must send by when, how
//! large a head may be, and what HTTP/2 allows. The hub's admin and OTLP ports, the proxies'
//! admin ports, the sidecar's listeners and the bundle endpoint build their hyper connections
//! here; the gRPC servers keep the same figures through [`crate::grpc::server`]. SECURITY.md
//! lists each port with these limits.
//!
//! - HTTP/1.1: a request head must arrive within [`HEADER_READ_TIMEOUT`] (an idle connection, or a
//!   slow-loris dribbling its head, is closed then) and fit in [`MAX_HEADER_BYTES`] (else 431).
//! - HTTP/2: a client must send its connection preface within [`HEADER_READ_TIMEOUT`]
//!   ([`Preface`]); then header lists are bounded by [`MAX_HEADER_BYTES`], streams by
//!   [`MAX_STREAMS`], streams opened and reset in a burst (CVE-2023-44487) by
//!   [`MAX_PENDING_RESETS`], and a peer that stops answering PINGs is cut after
//!   [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] — which also ends a header block dribbled
//!   in CONTINUATION frames, since a peer in the middle of one cannot answer a PING.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, ReadBuf};

/// A request head (HTTP/1.1) or the connection preface (HTTP/2) must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request heads (HTTP/1.1) and decoded header lists (HTTP/2) larger than this are refused.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_STREAMS: u32 = 1024;
/// HTTP/2 streams a client may open and reset before the server has handled them; more and the
/// connection is closed with ENHANCE_YOUR_CALM (the rapid-reset attack).
pub const MAX_PENDING_RESETS: usize = 32;
/// HTTP/2 streams the server may reset for a client's protocol errors before closing the
/// connection.
pub const MAX_LOCAL_RESETS: usize = 256;
/// An HTTP/2 connection with nothing received for this long gets a PING...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// ...and is closed if the answer takes longer than this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE_LEN: usize = 24;

/// An HTTP/1.1 server connection builder with the limits above.
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    b
}

/// An HTTP/2 server connection builder with the limits above.
pub fn http2() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2_limits(&mut b);
    b
}

fn h2_limits(b: &mut hyper::server::conn::http2::Builder<TokioExecutor>) {
    b.timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
}

/// A server connection builder for HTTP/1.1 and HTTP/2 (told apart by the preface), with the
/// limits above on each.
pub fn auto() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let mut h2 = b.http2();
    h2.timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    b
}

/// A connection that must deliver its first `need` bytes within a deadline: reads fail with
/// `TimedOut` once it passes short of them. HTTP/2's keepalive only starts after the preface, and
/// protocol detection waits for first bytes, so without this a client that connects (and
/// completes TLS) and then says nothing holds its connection for ever.
pub struct Preface<T> {
    inner: T,
    need: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Preface<T> {
    /// `inner`, which must deliver `need` bytes within [`HEADER_READ_TIMEOUT`] from now.
    pub fn new(inner: T, need: usize) -> Self {
        Self::within(inner, need, HEADER_READ_TIMEOUT)
    }

    /// `inner`, which must deliver `need` bytes within `timeout` from now.
    pub fn within(inner: T, need: usize, timeout: Duration) -> Self {
        Self {
            inner,
            need,
            deadline: (need > 0).then(|| Box::pin(tokio::time::sleep(timeout))),
        }
    }

    /// For an HTTP/2 connection: the 24-byte client preface.
    pub fn h2(inner: T) -> Self {
        Self::new(inner, H2_PREFACE_LEN)
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Preface<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if self.deadline.is_some() {
                    self.need = self.need.saturating_sub(got);
                    if self.need == 0 {
                        self.deadline = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let late = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if late {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent too little before the header read timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

fedmesh_api::delegate_async_write!(Preface);

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Preface<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_client_silent_past_the_deadline_gets_timed_out_and_one_that_spoke_does_not() {
        let (client, server) = tokio::io::duplex(64);
        let mut silent = Preface::within(server, 4, Duration::from_millis(50));
        let mut b = [0u8; 8];
        let e = silent.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        drop(client);

        let (mut client, server) = tokio::io::duplex(64);
        let mut spoke = Preface::within(server, 4, Duration::from_millis(50));
        client.write_all(b"abcd").await.unwrap();
        assert_eq!(spoke.read(&mut b).await.unwrap(), 4);
        // Past the deadline, the connection is an ordinary one.
        tokio::time::sleep(Duration::from_millis(80)).await;
        client.write_all(b"e").await.unwrap();
        assert_eq!(spoke.read(&mut b).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn too_few_bytes_by_the_deadline_is_a_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut slow = Preface::within(server, 24, Duration::from_millis(50));
        client.write_all(b"PRI").await.unwrap();
        let mut b = [0u8; 8];
        assert_eq!(slow.read(&mut b).await.unwrap(), 3);
        let e = slow.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }
}
