//! Prometheus metrics of the gateway and the sidecar.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A request's labels, named as Istio names them, so its users' queries and dashboards carry
/// over: `reporter` is `source` for the caller's sidecar (outbound), `destination` for the
/// callee's (inbound); `source_principal` is the caller's SPIFFE ID (on the callee's side as
/// proven by mTLS, `unknown` for plain text).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_principal: String,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
    pub response_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub reporter: String,
    pub source_principal: String,
    pub source_cluster: String,
    pub destination_cluster: String,
    pub destination_service: String,
}

/// An opaque TCP connection's labels: `reporter` is `source` (a sidecar) or `gateway`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub destination_cluster: String,
    pub destination_service: String,
}

/// Istio's `reporter` for a sidecar's direction (`outbound`, `inbound`); other values as given.
pub fn reporter(direction: &str) -> &str {
    match direction {
        "outbound" => "source",
        "inbound" => "destination",
        other => other,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SniLabels {
    pub sni: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// An authorization decision that named a policy: `result` is `denied` or `audited`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub service: String,
    pub policy: String,
    pub source_principal: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: String,
    pub service: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

pub struct ProxyMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram>,
    pub request_errors: Family<ReasonLabels, Counter>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_active: Gauge,
    /// HTTP requests a sidecar has taken in for its app and not yet answered.
    pub inbound_active: Gauge,
    pub bytes: Family<BytesLabels, Counter>,
    pub sni_connections: Family<SniLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub retries: Counter,
    /// Retries a retry budget did not allow.
    pub retry_budget_exhausted: Counter,
    pub ejections: Counter,
    /// Mirrored copies of requests: `sent`, and of those `failed` (an error, or no answer within
    /// 30 s); `skipped_body` (a body too large or streaming to copy), `skipped_busy` (too many in
    /// flight).
    pub mirrors: Family<ReasonLabels, Counter>,
    /// Faults injected by a TrafficPolicy, by kind (`delay`, `abort`).
    pub faults: Family<ReasonLabels, Counter>,
    /// Spans by outcome: `exported`, `failed` (the collector refused or was unreachable),
    /// `dropped` (the export queue was full).
    pub spans: Family<ReasonLabels, Counter>,
    /// Requests and connections an authorization policy denied or audited.
    pub authz: Family<AuthzLabels, Counter>,
    /// Probes a gateway answered (`answered`) or could not (`failed`: the prober was not
    /// trusted, spoke no probe protocol, or stalled).
    pub probes: Family<ReasonLabels, Counter>,
}

impl ProxyMetrics {
    pub fn new(prefix: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            request_errors: Family::default(),
            tcp_connections: Family::default(),
            tcp_active: Gauge::default(),
            inbound_active: Gauge::default(),
            bytes: Family::default(),
            sni_connections: Family::default(),
            refused: Family::default(),
            authz: Family::default(),
            retries: Counter::default(),
            retry_budget_exhausted: Counter::default(),
            ejections: Counter::default(),
            mirrors: Family::default(),
            faults: Family::default(),
            spans: Family::default(),
            probes: Family::default(),
        };
        registry.register(
            "requests",
            "HTTP requests by source and destination cluster, service and status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "HTTP request latency",
            m.request_duration.clone(),
        );
        registry.register(
            "request_errors",
            "Requests that failed in the proxy, by reason",
            m.request_errors.clone(),
        );
        registry.register(
            "tcp_connections",
            "Opaque TCP connections",
            m.tcp_connections.clone(),
        );
        registry.register(
            "tcp_active_connections",
            "Open proxied connections",
            m.tcp_active.clone(),
        );
        registry.register(
            "inbound_requests_active",
            "HTTP requests taken in for the app and not yet answered",
            m.inbound_active.clone(),
        );
        registry.register("bytes", "Bytes relayed", m.bytes.clone());
        registry.register(
            "sni_connections",
            "Connections by SNI (gateway)",
            m.sni_connections.clone(),
        );
        registry.register(
            "refused",
            "Connections refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "authz",
            "Requests and connections denied or audited by an authorization policy, by service, policy and caller",
            m.authz.clone(),
        );
        registry.register(
            "retries",
            "Attempts retried on another endpoint",
            m.retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not made because the service's retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        registry.register(
            "mirrored_requests",
            "Copies of requests sent to a route's mirror backend, by outcome",
            m.mirrors.clone(),
        );
        registry.register(
            "injected_faults",
            "Delays and aborts injected by a TrafficPolicy's faultInjection, by kind",
            m.faults.clone(),
        );
        registry.register(
            "gateway_probes",
            "Reachability probes from other clusters' control plane answered by this gateway, by outcome",
            m.probes.clone(),
        );
        registry.register(
            "spans",
            "Trace spans by outcome: exported, failed (collector error), dropped (queue full)",
            m.spans.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        Self { registry, ..m }
    }

    /// An inbound request taken in: counted in `inbound_requests_active` until the guard drops
    /// (answered, or its caller went away).
    pub fn inbound_request(&self) -> InFlight {
        self.inbound_active.inc();
        InFlight(self.inbound_active.clone())
    }

    /// Counts a request the proxy answered itself, by its `fedmesh-proxy-error` kind (the label
    /// takes `_` where the kind has `-`).
    pub fn count_error(&self, kind: &str) {
        self.request_errors
            .get_or_create(&ReasonLabels {
                reason: kind.replace('-', "_"),
            })
            .inc();
    }

    /// Counts a span's outcome.
    pub fn count_span(&self, reason: &str) {
        self.count_spans(reason, 1);
    }

    pub fn count_spans(&self, reason: &str, n: u64) {
        self.spans
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc_by(n);
    }

    /// Counts a request and its latency. `caller` is the caller's SPIFFE ID (empty: unknown).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        direction: &str,
        caller: &str,
        src_cluster: &str,
        dst_cluster: &str,
        service: &str,
        status: http::StatusCode,
        elapsed: std::time::Duration,
    ) {
        // A label the proxy could not know (no route: no destination cluster; a caller in
        // plain text: no source cluster) reads `unknown`, as in Istio, never empty.
        let known = |s: &str| -> String {
            if s.is_empty() {
                "unknown".into()
            } else {
                s.into()
            }
        };
        // Made once and moved from one family's labels to the other's: this runs for every
        // request.
        let labels = RequestLabels {
            reporter: reporter(direction).to_string(),
            source_principal: known(caller),
            source_cluster: known(src_cluster),
            destination_cluster: known(dst_cluster),
            destination_service: known(service),
            response_code: status.as_str().to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&RouteLabels {
                reporter: labels.reporter,
                source_principal: labels.source_principal,
                source_cluster: labels.source_cluster,
                destination_cluster: labels.destination_cluster,
                destination_service: labels.destination_service,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts an authorization decision that named `policy`.
    pub fn count_authz(&self, service: &str, policy: &str, caller: &str, result: &str) {
        self.authz
            .get_or_create(&AuthzLabels {
                service: service.into(),
                policy: policy.into(),
                source_principal: caller.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One request in a gauge of requests in flight, until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
