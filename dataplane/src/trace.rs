//! W3C Trace Context (`traceparent` / `tracestate`) across proxy hops.
//!
//! Every proxy hop is a span: it keeps the caller's trace ID, records the caller's span as its
//! parent, and forwards its own span ID as the new `traceparent` parent. A request that arrives
//! without a valid `traceparent` starts a new trace here. `tracestate` is forwarded untouched when
//! the `traceparent` was valid and dropped otherwise, as the specification requires.
//!
//! [`crate::telemetry`] exports a [`HopSpan`] with the hop's timing and attributes once the hop
//! ends.

use http::HeaderMap;
use http::header::HeaderValue;
use rand::Rng;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A parsed `traceparent` (version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// The span of one proxy hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's span; `None` when this hop started the trace.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    /// Parses a `traceparent` value; `None` if it is invalid (all-zero IDs included). Future
    /// versions are accepted as long as their first four fields parse, per the spec.
    pub fn parse(v: &str) -> Option<Self> {
        let v = v.trim();
        let mut parts = v.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
            return None;
        }
        if version == "00" && (parts.next().is_some() || v.len() != 55) {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    pub fn header(&self) -> String {
        String::from_utf8_lossy(&self.encode()).into_owned()
    }

    /// The `traceparent` value as a header value (made for every request: no formatting
    /// machinery, no allocation but the value's own).
    pub fn header_value(&self) -> Option<HeaderValue> {
        HeaderValue::from_bytes(&self.encode()).ok()
    }

    /// `00-<trace id>-<span id>-<flags>`, 55 bytes.
    fn encode(&self) -> [u8; 55] {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        // The slices are exactly twice the bytes' length: encoding cannot fail.
        let _ = hex::encode_to_slice(self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        let _ = hex::encode_to_slice(self.span_id, &mut out[36..52]);
        out[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        out
    }
}

impl HopSpan {
    /// A hop that starts a new trace; `sample` decides from the new trace ID.
    pub fn root(sample: impl FnOnce([u8; 16]) -> bool) -> Self {
        let trace_id = random_nonzero();
        Self {
            trace_id,
            span_id: random_nonzero(),
            parent_span_id: None,
            sampled: sample(trace_id),
        }
    }

    /// A hop of `parent`'s trace, its child, keeping its sampling decision.
    pub fn child_of(parent: TraceContext) -> Self {
        Self {
            trace_id: parent.trace_id,
            span_id: random_nonzero(),
            parent_span_id: Some(parent.span_id),
            sampled: parent.sampled,
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex::encode(self.span_id)
    }

    /// The context to forward downstream: this hop as the parent.
    pub fn context(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: self.span_id,
            sampled: self.sampled,
        }
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    let mut rng = rand::rng();
    loop {
        let mut b = [0u8; N];
        rng.fill(&mut b[..]);
        if b != [0; N] {
            return b;
        }
    }
}

/// Makes this hop a span of the request's trace (or of a new one) and rewrites the headers to
/// name it as the parent of the next hop. The caller's sampling decision is kept; for a trace
/// that starts here, `sample_new` decides from the new trace ID.
pub fn propagate(headers: &mut HeaderMap, sample_new: impl FnOnce([u8; 16]) -> bool) -> HopSpan {
    let parent = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let span = match parent {
        Some(p) => HopSpan::child_of(p),
        None => {
            headers.remove(TRACESTATE);
            HopSpan::root(sample_new)
        }
    };
    if let Some(v) = span.context().header_value() {
        headers.insert(TRACEPARENT, v);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_refuses_invalid_values() {
        let c = TraceContext::parse(VALID).unwrap();
        assert!(c.sampled);
        assert_eq!(c.header(), VALID);
        assert_eq!(c.header_value().unwrap(), VALID);
        let unsampled = TraceContext {
            sampled: false,
            ..c
        };
        assert_eq!(unsampled.header(), VALID.replace("-01", "-00"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A future version with extra fields is read by its first four.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn a_hop_keeps_the_trace_and_becomes_the_parent() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, VALID.parse().unwrap());
        h.insert(TRACESTATE, "vendor=abc".parse().unwrap());
        let span = propagate(&mut h, |_| panic!("the caller decided"));
        assert!(span.sampled);
        assert_eq!(span.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.parent_span_id,
            Some(*b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7")
        );
        let out = TraceContext::parse(h[TRACEPARENT].to_str().unwrap()).unwrap();
        assert_eq!(out.trace_id, span.trace_id);
        assert_eq!(out.span_id, span.span_id);
        assert_ne!(
            out.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(h[TRACESTATE], "vendor=abc");
    }

    #[test]
    fn an_invalid_or_missing_parent_starts_a_new_trace_and_drops_tracestate() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, "garbage".parse().unwrap());
        h.insert(TRACESTATE, "vendor=abc".parse().unwrap());
        let span = propagate(&mut h, |_| false);
        assert_eq!(span.parent_span_id, None);
        assert!(!span.sampled, "the new trace's sampler decides");
        assert!(h.get(TRACESTATE).is_none());
        let out = TraceContext::parse(h[TRACEPARENT].to_str().unwrap()).unwrap();
        assert!(!out.sampled, "and the next hops learn the decision");
    }
}
