//! Access logs: one structured line per request and per opaque connection (`--access-log`),
//! emitted as `tracing` events of target `access`, so they come out as text or JSON like every
//! other line (`--log-format`), with the trace and span IDs that find the request's spans.

use std::time::Duration;

use crate::trace::HopSpan;

/// One request, as either side of a sidecar saw it.
pub struct Request<'a> {
    /// `outbound` or `inbound`.
    pub direction: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub src_cluster: &'a str,
    pub dst_cluster: &'a str,
    pub service: &'a str,
    /// The caller's SPIFFE ID (inbound: as mTLS proved it; outbound: this workload).
    pub caller: &'a str,
    /// Where it went: an endpoint or `cluster@gateway` (outbound), the app (inbound).
    pub upstream: &'a str,
    pub attempts: usize,
    /// Why the proxy answered itself, if it did.
    pub proxy_error: &'a str,
    pub hop: &'a HopSpan,
}

pub fn request(r: &Request<'_>) {
    tracing::info!(
        target: "access",
        direction = r.direction,
        method = r.method,
        path = r.path,
        status = r.status,
        duration_ms = r.duration.as_secs_f64() * 1000.0,
        src_cluster = r.src_cluster,
        dst_cluster = r.dst_cluster,
        service = r.service,
        caller = r.caller,
        upstream = r.upstream,
        attempts = r.attempts,
        proxy_error = r.proxy_error,
        trace_id = %r.hop.trace_id_hex(),
        span_id = %r.hop.span_id_hex(),
        "request"
    );
}

/// One connection: a sidecar's opaque TCP, or a gateway's relay.
pub struct Connection<'a> {
    /// `outbound` or `gateway`.
    pub direction: &'a str,
    pub service: &'a str,
    pub peer: &'a str,
    pub upstream: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    /// Why it was refused or failed ("" when it did not).
    pub error: &'a str,
    pub hop: Option<&'a HopSpan>,
}

/// The line of a relayed connection, from what the relay returned (`received_before`: bytes
/// read from the opener before the relay began, e.g. a ClientHello).
#[allow(clippy::too_many_arguments)]
pub fn relayed(
    direction: &str,
    service: &str,
    peer: &str,
    upstream: &str,
    moved: &std::io::Result<crate::relay::Moved>,
    received_before: u64,
    duration: Duration,
    hop: Option<&HopSpan>,
) {
    let (received, sent) = moved.as_ref().map_or((0, 0), |m| (m.a_to_b, m.b_to_a));
    connection(&Connection {
        direction,
        service,
        peer,
        upstream,
        bytes_received: received + received_before,
        bytes_sent: sent,
        duration,
        error: &moved
            .as_ref()
            .err()
            .map(|e| format!("{:?}", e.kind()))
            .unwrap_or_default(),
        hop,
    });
}

pub fn connection(c: &Connection<'_>) {
    tracing::info!(
        target: "access",
        direction = c.direction,
        service = c.service,
        peer = c.peer,
        upstream = c.upstream,
        bytes_received = c.bytes_received,
        bytes_sent = c.bytes_sent,
        duration_ms = c.duration.as_secs_f64() * 1000.0,
        error = c.error,
        trace_id = %c.hop.map(HopSpan::trace_id_hex).unwrap_or_default(),
        span_id = %c.hop.map(HopSpan::span_id_hex).unwrap_or_default(),
        "connection"
    );
}
