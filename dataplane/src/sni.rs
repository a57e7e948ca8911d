//! How a connection names its destination without the gateway decrypting anything: the TLS
//! ClientHello's SNI.
//!
//! Format (every label a DNS label, so the whole name is a valid DNS name):
//!
//! ```text
//! p<port>.<service>.<namespace>.<cluster>.fedmesh
//! e.g.  p8080.web.shop.west.fedmesh
//! ```
//!
//! `port` is the service port (decimal, 1..65535, no leading zero), `cluster` the cluster whose
//! gateway should admit the connection. Parsing is strict: anything else is refused.
//!
//! [`read_client_hello`] reads a ClientHello from a stream — split across TCP segments or TLS
//! records — within a size and a time limit, keeping every byte so it can be replayed upstream.

use std::fmt;
use std::time::Duration;

use fedmesh_api::{ClusterName, ServiceKey};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const SUFFIX: &str = "fedmesh";

/// A destination named by SNI.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MeshSni {
    pub port: u16,
    pub service: ServiceKey,
    pub cluster: ClusterName,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("SNI {0:?} is not p<port>.<service>.<namespace>.<cluster>.fedmesh")]
    Format(String),
    #[error("SNI {sni:?}: {reason}")]
    Invalid { sni: String, reason: String },
}

impl MeshSni {
    pub fn new(port: u16, service: ServiceKey, cluster: ClusterName) -> Self {
        Self {
            port,
            service,
            cluster,
        }
    }

    pub fn parse(sni: &str) -> Result<Self, SniError> {
        let bad = |reason: &str| SniError::Invalid {
            sni: sni.to_string(),
            reason: reason.to_string(),
        };
        if sni.len() > 253 {
            return Err(bad("longer than 253 characters"));
        }
        let labels: Vec<&str> = sni.split('.').collect();
        let [port, service, namespace, cluster, suffix] = labels.as_slice() else {
            return Err(SniError::Format(sni.to_string()));
        };
        if *suffix != SUFFIX {
            return Err(SniError::Format(sni.to_string()));
        }
        let digits = port
            .strip_prefix('p')
            .filter(|d| !d.is_empty() && d.len() <= 5 && d.bytes().all(|b| b.is_ascii_digit()))
            .filter(|d| !d.starts_with('0'))
            .ok_or_else(|| bad("the port label must be p<1..65535>"))?;
        let port: u16 = digits
            .parse()
            .map_err(|_| bad("the port label must be p<1..65535>"))?;
        let service = ServiceKey::new(namespace, service).map_err(|e| bad(&e.to_string()))?;
        let cluster = ClusterName::new(cluster).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            port,
            service,
            cluster,
        })
    }
}

impl fmt::Display for MeshSni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p{}.{}.{}.{}.{SUFFIX}",
            self.port, self.service.name, self.service.namespace, self.cluster
        )
    }
}

/// Why a connection's first bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not TLS (the first bytes are not a TLS handshake record)")]
    NotTls,
    #[error("the ClientHello has no SNI")]
    NoSni,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("the ClientHello is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before a complete ClientHello")]
    Eof,
    #[error("reading the ClientHello: {0}")]
    Io(String),
}

impl HelloError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::NoSni => "no_sni",
            HelloError::Malformed(_) => "malformed_hello",
            HelloError::TooLarge(_) => "hello_too_large",
            HelloError::Timeout(_) => "hello_timeout",
            HelloError::Eof => "eof",
            HelloError::Io(_) => "io",
        }
    }
}

/// What the gateway needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

impl ClientHello {
    /// The verdict on the bytes a client sent first, as [`read_client_hello`] reaches it without
    /// the reading: `None` while more bytes are needed.
    pub fn parse(data: &[u8]) -> Option<Result<ClientHello, HelloError>> {
        match parse_client_hello(data) {
            Parse::Done(r) => Some(r),
            Parse::NeedMore => None,
        }
    }
}

/// Reads a complete ClientHello into `buf` (all bytes read are kept there, to be replayed to the
/// upstream) and parses it. At most `limit` bytes and `timeout` are spent.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
    timeout: Duration,
) -> Result<ClientHello, HelloError> {
    match tokio::time::timeout(timeout, read_inner(r, buf, limit)).await {
        Ok(res) => res,
        Err(_) => Err(HelloError::Timeout(timeout)),
    }
}

async fn read_inner<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<ClientHello, HelloError> {
    let mut chunk = [0u8; 4096];
    loop {
        match parse_client_hello(buf) {
            Parse::Done(h) => return h,
            Parse::NeedMore => {}
        }
        if buf.len() >= limit {
            return Err(HelloError::TooLarge(limit));
        }
        let want = chunk.len().min(limit - buf.len());
        let n = r
            .read(&mut chunk[..want])
            .await
            .map_err(|e| HelloError::Io(e.to_string()))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HelloError::Eof
            } else {
                match parse_client_hello(buf) {
                    Parse::Done(h) => return h,
                    Parse::NeedMore => HelloError::Eof,
                }
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Parse {
    Done(Result<ClientHello, HelloError>),
    NeedMore,
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SNI: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Reassembles the handshake message from as many TLS records as needed, then parses it.
fn parse_client_hello(data: &[u8]) -> Parse {
    if data.is_empty() {
        return Parse::NeedMore;
    }
    if data[0] != HANDSHAKE {
        return Parse::Done(Err(HelloError::NotTls));
    }
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        if data.len() < pos + 5 {
            return Parse::NeedMore;
        }
        let (ctype, major, len) = (
            data[pos],
            data[pos + 1],
            u16::from_be_bytes([data[pos + 3], data[pos + 4]]) as usize,
        );
        if ctype != HANDSHAKE || major != 3 {
            return Parse::Done(Err(if pos == 0 {
                HelloError::NotTls
            } else {
                HelloError::Malformed("unexpected record before the ClientHello ended")
            }));
        }
        if len == 0 || len > 16384 {
            return Parse::Done(Err(HelloError::Malformed("record length out of range")));
        }
        if data.len() < pos + 5 + len {
            return Parse::NeedMore;
        }
        handshake.extend_from_slice(&data[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return Parse::Done(Err(HelloError::Malformed(
                    "the first handshake message is not a ClientHello",
                )));
            }
            let body_len =
                u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if handshake.len() >= 4 + body_len {
                return Parse::Done(parse_body(&handshake[4..4 + body_len]));
            }
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.b.len() < n {
            return Err(HelloError::Malformed("truncated"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, HelloError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { b: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
    };
    if r.b.is_empty() {
        return Err(HelloError::NoSni); // no extensions at all
    }
    let mut exts = Reader { b: r.vec16()? };
    while !exts.b.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            EXT_SNI => {
                if hello.sni.is_some() {
                    return Err(HelloError::Malformed("two server_name extensions"));
                }
                let mut list = Reader {
                    b: Reader { b: data }.vec16()?,
                };
                while !list.b.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        if name.is_empty() || !name.iter().all(|c| c.is_ascii_graphic()) {
                            return Err(HelloError::Malformed(
                                "server name is not printable ASCII",
                            ));
                        }
                        hello.sni = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            EXT_ALPN => {
                let mut list = Reader {
                    b: Reader { b: data }.vec16()?,
                };
                while !list.b.is_empty() {
                    hello.alpn.push(list.vec8()?.to_vec());
                }
            }
            _ => {}
        }
    }
    if hello.sni.is_none() {
        return Err(HelloError::NoSni);
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_round_trip_and_are_strict() {
        let s = MeshSni::new(
            8080,
            "shop/web".parse().unwrap(),
            ClusterName::new("west").unwrap(),
        );
        assert_eq!(s.to_string(), "p8080.web.shop.west.fedmesh");
        assert_eq!(MeshSni::parse("p8080.web.shop.west.fedmesh").unwrap(), s);
        for bad in [
            "",
            "web.shop.west.fedmesh",
            "p8080.web.shop.west.fedmesh.",
            "p0.web.shop.west.fedmesh",
            "p08080.web.shop.west.fedmesh",
            "p65536.web.shop.west.fedmesh",
            "px.web.shop.west.fedmesh",
            "p80.Web.shop.west.fedmesh",
            "p80.web.shop.west.example",
            "p80.web.shop.we_st.fedmesh",
            "p80.web..west.fedmesh",
            "8080.web.shop.west.fedmesh",
            "p80.web.shop.west.extra.fedmesh",
        ] {
            assert!(MeshSni::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A real ClientHello from rustls, with the given SNI.
    fn client_hello(sni: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let key = rcgen_key();
        roots.add(key).unwrap();
        let cfg =
            rustls::ClientConfig::builder_with_provider(fedmesh_trust::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut cfg = cfg;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"fedmesh-tcp".to_vec()];
        let mut c = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            sni.to_string().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    }

    fn rcgen_key() -> rustls_pki_types::CertificateDer<'static> {
        let b = fedmesh_trust::ca::TrustDomainCa::init(
            &tempfile::tempdir().unwrap().keep().join("ca"),
            fedmesh_trust::ca::CaOptions::new(fedmesh_api::TrustDomain::new("x").unwrap()),
        )
        .unwrap()
        .bundle();
        b.x509_authorities()[0].clone()
    }

    async fn read(data: Vec<u8>, split: usize) -> Result<ClientHello, HelloError> {
        // Deliver the bytes in `split`-sized TCP segments.
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in data.chunks(split.max(1)) {
                if a.write_all(c).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        let mut buf = Vec::new();
        let r = read_client_hello(&mut b, &mut buf, 16 * 1024, Duration::from_secs(5)).await;
        writer.abort();
        r
    }

    #[tokio::test]
    async fn sni_and_alpn_from_a_real_hello_in_any_segmentation() {
        let hello = client_hello("p80.web.shop.west.fedmesh");
        for split in [1, 3, 7, 64, 5000] {
            let h = read(hello.clone(), split).await.unwrap();
            assert_eq!(h.sni.as_deref(), Some("p80.web.shop.west.fedmesh"));
            assert_eq!(h.alpn, vec![b"h2".to_vec(), b"fedmesh-tcp".to_vec()]);
        }
    }

    #[tokio::test]
    async fn a_hello_split_across_tls_records_is_reassembled() {
        let hello = client_hello("p80.web.shop.west.fedmesh");
        // Re-frame the handshake message into records of 50 bytes each.
        let msg = &hello[5..];
        let mut framed = Vec::new();
        for c in msg.chunks(50) {
            framed.extend_from_slice(&[22, 3, 1]);
            framed.extend_from_slice(&(c.len() as u16).to_be_bytes());
            framed.extend_from_slice(c);
        }
        let h = read(framed, 13).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("p80.web.shop.west.fedmesh"));
    }

    #[tokio::test]
    async fn refusals_say_why() {
        assert_eq!(
            read(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 100).await,
            Err(HelloError::NotTls)
        );
        assert_eq!(read(vec![0xff; 100], 100).await, Err(HelloError::NotTls));
        assert_eq!(
            read(vec![22, 3, 1, 0, 10, 2, 0, 0, 6, 1, 2, 3, 4, 5, 6], 100).await,
            Err(HelloError::Malformed(
                "the first handshake message is not a ClientHello"
            ))
        );
        assert_eq!(
            read(vec![22, 3, 1, 0xff, 0xff], 100).await,
            Err(HelloError::Malformed("record length out of range"))
        );
        assert_eq!(
            read(vec![22, 3, 1, 0, 200, 1], 100).await,
            Err(HelloError::Eof)
        );
        assert_eq!(read(vec![], 1).await, Err(HelloError::Eof));
        // A hello without SNI (an IP address as server name sends none).
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rcgen_key()).unwrap();
        let cfg =
            rustls::ClientConfig::builder_with_provider(fedmesh_trust::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            "127.0.0.1".try_into().unwrap(),
        )
        .unwrap();
        let mut no_sni = Vec::new();
        c.write_tls(&mut no_sni).unwrap();
        assert_eq!(read(no_sni, 100).await, Err(HelloError::NoSni));
        // Oversized: records that never end a huge handshake message.
        let mut big = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        big.resize(5 + 0x4000, 0);
        big.extend_from_slice(&[22, 3, 1, 0x40, 0x00]);
        big.resize(big.len() + 0x4000, 0);
        assert!(matches!(
            read(big, 4096).await,
            Err(HelloError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn a_stalled_hello_times_out() {
        let (_a, mut b) = tokio::io::duplex(64);
        let mut buf = Vec::new();
        let r = read_client_hello(&mut b, &mut buf, 1024, Duration::from_millis(100)).await;
        assert_eq!(r, Err(HelloError::Timeout(Duration::from_millis(100))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_client_hello(&data);
        }

        #[test]
        fn arbitrary_handshake_records_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut data = vec![22, 3, 1];
            data.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
            data.extend_from_slice(&[1, 0, (body.len() >> 8) as u8, body.len() as u8]);
            data.extend_from_slice(&body);
            let _ = parse_client_hello(&data);
        }

        #[test]
        fn arbitrary_names_never_panic(s in "\\PC{0,80}") {
            if let Ok(sni) = MeshSni::parse(&s) {
                prop_assert_eq!(sni.to_string(), s);
            }
        }
    }
}
