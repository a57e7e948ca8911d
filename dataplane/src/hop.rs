//! What a sidecar tells a remote cluster's gateway about a connection before its TLS bytes, so
//! the gateway's hop can be tied to the requests that ride the connection: a PROXY protocol v2
//! header (command LOCAL: the gateway keeps using the real peer address) carrying
//!
//! - the connection's ID (`PP2_TYPE_UNIQUE_ID`, 8 bytes), which the gateway uses as its span's
//!   ID, and which every CLIENT span of a request on the connection names
//!   (`fedmesh.connection.id`) and links to;
//! - the `traceparent` of the request that opened the connection (TLV type 0xE0, in the range
//!   the PROXY protocol leaves to applications), which makes the gateway's span that request's
//!   child.
//!
//! The header is read before any TLS, so it is unauthenticated: it only ever labels spans (a
//! caller can mislabel its own connection's span, nothing more), and it is bounded in size.

use ppp::v2::{self, Addresses, Builder, Command, IPv4, Protocol, Type, Version};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::trace::TraceContext;

/// TLV type of the triggering request's `traceparent`.
const TLV_TRACEPARENT: u8 = 0xE0;
/// A v2 header's fixed part: signature, version and command, family, length.
const FIXED_LEN: usize = 16;
/// The most a hop header may take (ours are under 100 bytes).
pub const MAX_HOP_HEADER: usize = 512;

/// A connection's hop header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopHeader {
    pub connection_id: [u8; 8],
    /// The request that opened the connection, when it was traced.
    pub trigger: Option<TraceContext>,
}

impl HopHeader {
    /// A header with a new random connection ID.
    pub fn new(trigger: Option<TraceContext>) -> Self {
        let mut connection_id = [0u8; 8];
        while connection_id == [0; 8] {
            connection_id = rand::random();
        }
        Self {
            connection_id,
            trigger,
        }
    }

    /// The connection ID as spans show it (`fedmesh.connection.id`).
    pub fn id_hex(&self) -> String {
        hex::encode(self.connection_id)
    }

    pub fn encode(&self) -> Vec<u8> {
        let tp = self.trigger.map(|t| t.header());
        // LOCAL: the receiver ignores the addresses. (An IPv4 block of zeros rather than none:
        // with an unspecified family, readers take the whole payload for addresses.)
        let mut b = Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Stream,
            Addresses::IPv4(IPv4::new([0, 0, 0, 0], [0, 0, 0, 0], 0, 0)),
        );
        // Writing into a Vec cannot fail, and both values are far below a TLV's 64 KiB.
        b = b
            .write_tlv(Type::UniqueId, &self.connection_id)
            .expect("a TLV fits a Vec");
        if let Some(tp) = &tp {
            b = b
                .write_tlv(TLV_TRACEPARENT, tp.as_bytes())
                .expect("a TLV fits a Vec");
        }
        b.build().expect("a PROXY header fits a Vec")
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let h = v2::Header::try_from(bytes).map_err(|e| format!("bad PROXY v2 header: {e}"))?;
        let mut connection_id = None;
        let mut trigger = None;
        for tlv in h.tlvs() {
            let tlv = tlv.map_err(|e| format!("bad PROXY v2 TLV: {e}"))?;
            match tlv.kind {
                k if k == Type::UniqueId as u8 => {
                    connection_id = <[u8; 8]>::try_from(tlv.value.as_ref()).ok();
                }
                TLV_TRACEPARENT => {
                    trigger = std::str::from_utf8(&tlv.value)
                        .ok()
                        .and_then(TraceContext::parse);
                }
                _ => {}
            }
        }
        Ok(Self {
            connection_id: connection_id
                .ok_or("the PROXY v2 header has no 8-byte connection ID (PP2_TYPE_UNIQUE_ID)")?,
            trigger,
        })
    }
}

/// Reads a hop header if the connection starts with one. Bytes read past it (or all of them,
/// when there is none) are left in `buf` for the ClientHello reader. It does not time out by
/// itself: the caller bounds it together with the ClientHello, so a slow opening gets one
/// deadline, not one per part.
pub async fn read_hop_header<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<HopHeader>, String> {
    let prefix = v2::PROTOCOL_PREFIX;
    let mut need = FIXED_LEN;
    let mut chunk = [0u8; 512];
    loop {
        let seen = buf.len().min(prefix.len());
        if !prefix.starts_with(&buf[..seen]) {
            return Ok(None);
        }
        if buf.len() >= FIXED_LEN {
            let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            need = FIXED_LEN + len;
            if need > MAX_HOP_HEADER {
                return Err(format!(
                    "the PROXY header is {need} bytes, more than the {MAX_HOP_HEADER} allowed"
                ));
            }
            if buf.len() >= need {
                let header = HopHeader::decode(&buf[..need])?;
                buf.drain(..need);
                return Ok(Some(header));
            }
        }
        let want = (need - buf.len()).min(chunk.len());
        let n = r
            .read(&mut chunk[..want])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err("the connection closed inside its PROXY header".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_header_round_trips_and_leaves_the_hello_bytes() {
        let trigger =
            TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let h = HopHeader::new(trigger);
        let mut wire = h.encode();
        assert!(wire.len() < 100, "{}", wire.len());
        wire.extend_from_slice(b"\x16\x03\x01hello");
        // Delivered a few bytes at a time.
        let (mut w, mut r) = tokio::io::duplex(7);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = w.write_all(&wire).await;
        });
        let mut buf = Vec::new();
        let got = read_hop_header(&mut r, &mut buf).await.unwrap();
        assert_eq!(got, Some(h));
        // What followed the header stays for the ClientHello reader (at most one chunk read
        // past it).
        assert!(b"\x16\x03\x01hello".starts_with(&buf), "{buf:?}");
    }

    #[tokio::test]
    async fn no_header_reads_nothing_more_than_the_first_bytes() {
        let mut r: &[u8] = b"\x16\x03\x01\x02\x00";
        let mut buf = Vec::new();
        let got = read_hop_header(&mut r, &mut buf).await.unwrap();
        assert_eq!(got, None);
        assert_eq!(buf, b"\x16\x03\x01\x02\x00");
    }

    #[tokio::test]
    async fn oversized_or_broken_headers_are_refused_with_the_reason() {
        let mut big = v2::PROTOCOL_PREFIX.to_vec();
        big.extend_from_slice(&[0x20, 0x00, 0xff, 0xff]);
        let mut r: &[u8] = &big;
        let e = read_hop_header(&mut r, &mut Vec::new()).await.unwrap_err();
        assert!(e.contains("more than the 512 allowed"), "{e}");

        // A LOCAL header without a connection ID.
        let mut no_id = v2::PROTOCOL_PREFIX.to_vec();
        no_id.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        let mut r: &[u8] = &no_id;
        let e = read_hop_header(&mut r, &mut Vec::new()).await.unwrap_err();
        assert!(e.contains("connection ID"), "{e}");

        // Closed half way.
        let mut r: &[u8] = &v2::PROTOCOL_PREFIX[..5];
        let e = read_hop_header(&mut r, &mut Vec::new()).await.unwrap_err();
        assert!(e.contains("closed inside"), "{e}");
    }
}
