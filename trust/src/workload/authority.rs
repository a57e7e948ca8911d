//! Makes the Workload API reachable from gRPC C-core clients (the PyPI `spiffe` package,
//! grpc-java, grpc-swift).
//!
//! Those clients send the percent-encoded socket path as the HTTP/2 `:authority` when dialing a
//! Unix socket (`tmp%2Fagent.sock`). That is not a valid authority, and h2 (under tonic) resets
//! such streams with PROTOCOL_ERROR (hyperium/h2#487, still open). Go and Rust SPIFFE clients send
//! `localhost` and are unaffected.
//!
//! This wrapper sits between the socket and h2. It looks at the first request of a connection:
//! - a valid `:authority` (or anything unexpected): the connection passes through untouched;
//! - an invalid one: every header block of that connection is decoded (HPACK) and re-encoded with
//!   `:authority: localhost`. Re-encoding all blocks, not just the bad one, keeps h2's HPACK
//!   dynamic table consistent with what it receives.
//!
//! Only the client-to-server direction is touched, and it is read before any caller is attested,
//! by anyone who can open the socket: every limit is bounded. Frames above h2's maximum frame size
//! are left for h2 to refuse; a header block may be 64 KiB on the wire and 16 KiB decoded. HPACK
//! lets a 1-byte reference stand for a 4 KiB table entry, so the decoded size is counted as it
//! grows and a block that exceeds it ends the connection before anything is copied.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// h2's default SETTINGS_MAX_FRAME_SIZE: frames we emit never exceed it.
const MAX_OUT_FRAME: usize = 16_384;
/// Frames larger than this are not buffered; the connection is handed to h2 as is, which refuses
/// them (it advertises SETTINGS_MAX_FRAME_SIZE 16 KiB).
const MAX_IN_FRAME: usize = MAX_OUT_FRAME;
/// Largest header block we decode (a Workload API request is a few hundred bytes).
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest decoded header list (RFC 7541 §4.1 sizes: name + value + 32 per field), the
/// SETTINGS_MAX_HEADER_LIST_SIZE the Workload API server advertises.
pub const MAX_HEADER_LIST: usize = 16 * 1024;
/// The HPACK table size h2 advertises by default (SETTINGS_HEADER_TABLE_SIZE).
const HPACK_TABLE: usize = 4096;
const REPLACEMENT: &[u8] = b"localhost";

enum Mode {
    /// Reading the client connection preface.
    Preface,
    /// Frames until the first header block decides the mode.
    Undecided,
    /// Rewriting every header block.
    Rewrite,
    /// Untouched from here on.
    Passthrough,
}

struct Pending {
    stream_id: u32,
    end_stream: bool,
    block: BytesMut,
    /// The original frames, emitted unchanged if we end up not rewriting.
    raw: BytesMut,
}

/// A client-to-server stream whose invalid `:authority` headers are replaced by `localhost`.
pub struct AuthorityRewrite<S> {
    inner: S,
    mode: Mode,
    input: BytesMut,
    output: BytesMut,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    eof: bool,
    /// Whatever must live as long as the connection (the server's per-caller count).
    held: Option<Box<dyn Send + Sync>>,
}

impl<S> AuthorityRewrite<S> {
    /// Keeps `value` until the connection is dropped.
    pub fn holding(mut self, value: impl Send + Sync + 'static) -> Self {
        self.held = Some(Box::new(value));
        self
    }

    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(HPACK_TABLE);
        Self {
            inner,
            mode: Mode::Preface,
            input: BytesMut::with_capacity(8192),
            output: BytesMut::new(),
            pending: None,
            decoder,
            encoder,
            eof: false,
            held: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves every complete unit of `input` to `output`, rewriting header blocks as needed.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Passthrough => {
                    if let Some(p) = self.pending.take() {
                        self.output.extend_from_slice(&p.raw);
                    }
                    let all = self.input.split();
                    self.output.extend_from_slice(&all);
                    return Ok(());
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    self.output
                        .extend_from_slice(&self.input.split_to(PREFACE.len()));
                    self.mode = Mode::Undecided;
                }
                Mode::Undecided | Mode::Rewrite => {
                    if self.input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]])
                        as usize;
                    if len > MAX_IN_FRAME {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER + len {
                        return Ok(());
                    }
                    let frame = self.input.split_to(FRAME_HEADER + len);
                    self.frame(frame)?;
                }
            }
        }
    }

    fn frame(&mut self, frame: BytesMut) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        match (kind, self.pending.is_some()) {
            (HEADERS, false) => {
                let Some(fragment) = headers_fragment(flags, payload) else {
                    self.give_up(frame);
                    return Ok(());
                };
                let mut p = Pending {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    block: BytesMut::from(fragment),
                    raw: BytesMut::new(),
                };
                p.raw.extend_from_slice(&frame);
                self.pending = Some(p);
                if flags & END_HEADERS != 0 {
                    return self.finish_block();
                }
            }
            (CONTINUATION, true) => {
                let Some(p) = self.pending.as_mut() else {
                    return Ok(());
                };
                if p.stream_id != stream_id || p.block.len() + payload.len() > MAX_HEADER_BLOCK {
                    self.give_up(frame);
                    return Ok(());
                }
                p.block.extend_from_slice(payload);
                p.raw.extend_from_slice(&frame);
                if flags & END_HEADERS != 0 {
                    return self.finish_block();
                }
            }
            (_, true) => self.give_up(frame),
            (_, false) => self.output.extend_from_slice(&frame),
        }
        Ok(())
    }

    /// Hands the rest of the connection to h2 unchanged (it will judge what it gets).
    fn give_up(&mut self, frame: BytesMut) {
        if let Some(p) = self.pending.take() {
            self.output.extend_from_slice(&p.raw);
        }
        self.output.extend_from_slice(&frame);
        self.mode = Mode::Passthrough;
    }

    /// `Err`: the block decodes to more than [`MAX_HEADER_LIST`]; the connection must end.
    fn finish_block(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let decoded = self
            .decoder
            .decode_with_cb(&p.block, |name: Cow<[u8]>, value: Cow<[u8]>| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_LIST {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            });
        if size > MAX_HEADER_LIST {
            tracing::warn!(
                decoded = size,
                limit = MAX_HEADER_LIST,
                "Workload API client sent a header block that decodes beyond the limit; closing the connection"
            );
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("header list of {size} bytes exceeds {MAX_HEADER_LIST}"),
            ));
        }
        if decoded.is_err() {
            self.output.extend_from_slice(&p.raw);
            self.mode = Mode::Passthrough;
            return Ok(());
        }
        if matches!(self.mode, Mode::Undecided) {
            let bad = headers.iter().any(|(n, v)| {
                n == b":authority" && http::uri::Authority::try_from(v.as_slice()).is_err()
            });
            if !bad {
                self.output.extend_from_slice(&p.raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            tracing::debug!(
                "Workload API client sent an invalid :authority; rewriting it to localhost for this connection"
            );
            self.mode = Mode::Rewrite;
        }
        for (name, value) in headers.iter_mut() {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = REPLACEMENT.to_vec();
            }
        }
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.emit_block(p.stream_id, p.end_stream, &block);
        Ok(())
    }

    fn emit_block(&mut self, stream_id: u32, end_stream: bool, block: &[u8]) {
        if block.is_empty() {
            let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
            put_frame(&mut self.output, HEADERS, flags, stream_id, &[]);
            return;
        }
        let mut chunks = block.chunks(MAX_OUT_FRAME).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if first {
                if end_stream {
                    flags |= END_STREAM;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            put_frame(&mut self.output, kind, flags, stream_id, chunk);
            first = false;
        }
    }
}

/// The header block fragment of a HEADERS frame, without padding and priority fields.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        pad = *p.first()? as usize;
        p = &p[1..];
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

fn put_frame(out: &mut BytesMut, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id & 0x7fff_ffff);
    out.put_slice(payload);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Fast path once the connection is known to be clean: read straight into the caller.
            if matches!(this.mode, Mode::Passthrough)
                && this.input.is_empty()
                && this.pending.is_none()
            {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // EOF: whatever is buffered goes through as is.
                this.eof = true;
                this.mode = Mode::Passthrough;
            } else {
                this.input.extend_from_slice(rb.filled());
            }
            this.process()?;
        }
    }
}

fedmesh_api::delegate_async_write!(AuthorityRewrite);

impl tonic::transport::server::Connected for AuthorityRewrite<tokio::net::UnixStream> {
    type ConnectInfo = super::attest::UdsPeer;
    /// Called once, when the connection is accepted: the peer's pidfd is taken then.
    fn connect_info(&self) -> Self::ConnectInfo {
        use std::os::fd::AsFd;
        let uds = self.inner.connect_info();
        let pid = uds.peer_cred.and_then(|c| c.pid());
        super::attest::UdsPeer {
            process: super::attest::PeerProcess::of(self.inner.as_fd(), pid),
            uds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn request(
        encoder: &mut loona_hpack::Encoder<'static>,
        authority: &[u8],
        stream: u32,
    ) -> BytesMut {
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", authority),
            (b"workload.spiffe.io", b"true"),
        ]);
        let mut out = BytesMut::new();
        // Split across HEADERS + CONTINUATION, with padding, to exercise reassembly.
        let (a, b) = block.split_at(block.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        put_frame(&mut out, HEADERS, PADDED, stream, &padded);
        put_frame(&mut out, CONTINUATION, END_HEADERS, stream, b);
        put_frame(&mut out, 0x0, END_STREAM, stream, b"\0\0\0\0\0");
        out
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let mut rw = AuthorityRewrite::new(io::Cursor::new(input));
        let mut out = Vec::new();
        rw.read_to_end(&mut out).await.unwrap();
        out
    }

    fn decode_authorities(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut d = loona_hpack::Decoder::new();
        let mut b = &bytes[PREFACE.len()..];
        let mut found = Vec::new();
        let mut block = Vec::new();
        while b.len() >= FRAME_HEADER {
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let (kind, flags) = (b[3], b[4]);
            let payload = &b[FRAME_HEADER..FRAME_HEADER + len];
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(
                    headers_fragment(if kind == HEADERS { flags } else { 0 }, payload).unwrap(),
                );
                if flags & END_HEADERS != 0 {
                    d.decode_with_cb(&block, |n, v| {
                        if &n[..] == b":authority" {
                            found.push(v.into_owned());
                        }
                    })
                    .unwrap();
                    block.clear();
                }
            }
            b = &b[FRAME_HEADER + len..];
        }
        found
    }

    #[tokio::test]
    async fn invalid_authority_is_rewritten_on_every_request_of_the_connection() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&request(&mut enc, b"tmp%2Fagent.sock", 1));
        input.extend_from_slice(&request(&mut enc, b"tmp%2Fagent.sock", 3));
        let out = run(input).await;
        assert_eq!(
            decode_authorities(&out),
            vec![b"localhost".to_vec(), b"localhost".to_vec()]
        );
    }

    #[tokio::test]
    async fn valid_authority_passes_through_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&request(&mut enc, b"localhost", 1));
        input.extend_from_slice(&request(&mut enc, b"localhost", 3));
        assert_eq!(run(input.clone()).await, input);
    }

    #[tokio::test]
    async fn garbage_and_truncation_pass_through_for_h2_to_judge() {
        let garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(run(garbage.clone()).await, garbage);
        let mut truncated = PREFACE.to_vec();
        truncated.extend_from_slice(&[0, 0, 50, HEADERS, END_HEADERS, 0, 0, 0, 1, 1, 2]);
        assert_eq!(run(truncated.clone()).await, truncated);
        let mut bad_hpack = PREFACE.to_vec();
        let mut f = BytesMut::new();
        put_frame(&mut f, HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]);
        bad_hpack.extend_from_slice(&f);
        assert_eq!(run(bad_hpack.clone()).await, bad_hpack);
    }
}
