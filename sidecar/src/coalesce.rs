//! Write coalescing for pooled HTTP/2 connections to peers.
//!
//! hyper's HTTP/2 client sends a request's HEADERS from the connection task and its body from a
//! second task once the stream has flow-control capacity, and flushes after each. Over TLS every
//! flush is a record and a syscall, and each hop behind us (the gateway, the peer's sidecar) is
//! woken once per record: a small request costs two of each. [`Coalesce`] buffers writes and,
//! on a flush with something buffered, first lets the tasks that are ready run once (a deferred
//! yield), so the body joins its headers: one record, one `writev`, one wake-up per hop. The
//! cost is one scheduler turn per flush; a burst of writes larger than [`LIMIT`] goes out at
//! once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes beyond which writes go to the connection without waiting for a flush.
pub const LIMIT: usize = 64 * 1024;

type Yield = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner stream has taken.
    written: usize,
    /// The pending yield of the current flush.
    yielding: Option<Yield>,
    /// This flush has yielded once already.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            yielding: None,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Buffers `bufs`, first writing out what is buffered when they would pass [`LIMIT`].
    fn push(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.buf.len() + total > LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().push(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().push(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.len() > this.written && !this.yielded {
            let y = this
                .yielding
                .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            ready!(y.as_mut().poll(cx));
            this.yielding = None;
            this.yielded = true;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Counts the writes that reach the inner stream.
    struct Counting {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_until_a_flush_reach_the_stream_as_one() {
        let mut c = Coalesce::new(Counting { writes: vec![] });
        c.write_all(b"headers").await.unwrap();
        c.write_all(b"-body").await.unwrap();
        assert!(c.inner.writes.is_empty(), "nothing before the flush");
        c.flush().await.unwrap();
        assert_eq!(c.inner.writes, vec![b"headers-body".to_vec()]);
        // An empty flush does not yield or write.
        c.flush().await.unwrap();
        assert_eq!(c.inner.writes.len(), 1);
        // Past the limit, bytes go out without a flush; shutdown writes the rest.
        let big = vec![7u8; LIMIT];
        c.write_all(b"x").await.unwrap();
        c.write_all(&big).await.unwrap();
        assert_eq!(c.inner.writes.len(), 2);
        c.shutdown().await.unwrap();
        assert_eq!(c.inner.writes.len(), 3);
        assert_eq!(c.inner.writes[2].len(), LIMIT);
    }

    /// Counts the non-empty writes that reach a real stream.
    struct Tap<T> {
        inner: T,
        writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.inner).poll_write(cx, data);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                this.writes
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            r
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// Writes that one POST with a 1 KiB body makes on a warm hyper HTTP/2 client connection.
    async fn writes_per_request(coalesce: bool) -> usize {
        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(body)))
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), svc)
                .await;
        });
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tap = Tap {
            inner: client_io,
            writes: writes.clone(),
        };
        let io: Pin<Box<dyn Io>> = if coalesce {
            Box::pin(Coalesce::new(tap))
        } else {
            Box::pin(tap)
        };
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Full<Bytes>>(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut per_request = usize::MAX;
        for _ in 0..3 {
            let before = writes.load(std::sync::atomic::Ordering::SeqCst);
            let req = hyper::Request::post("http://x/")
                .body(Full::new(Bytes::from(vec![b'a'; 1024])))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 1024);
            // Let any trailing frame (a window update) go out before counting.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            per_request =
                per_request.min(writes.load(std::sync::atomic::Ordering::SeqCst) - before);
        }
        per_request
    }

    trait Io: AsyncRead + AsyncWrite + Send {}
    impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_h2_request_goes_out_in_one_write_instead_of_two() {
        // hyper alone: HEADERS, then DATA (on a stream without vectored writes, DATA's frame
        // header and payload apart too).
        let plain = writes_per_request(false).await;
        assert!(plain >= 2, "{plain}");
        assert_eq!(
            writes_per_request(true).await,
            1,
            "HEADERS and DATA together"
        );
    }
}
