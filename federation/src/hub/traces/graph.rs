//! The clusterset's service graph, drawn from the spans in the hub's window.
//!
//! Each sidecar CLIENT span is one request (or opaque TCP connection) from its service to
//! another: the callee is the SERVER span that answered it when the window holds it (its
//! cluster, namespace and service), else what the client knew (the destination cluster and
//! the address it asked for — a request that failed before reaching anyone still shows).
//!
//! The window holds sampled traces, plus every failed or slow request. A kept span says how
//! many requests it stands for (`fedmesh.sampling.adjusted_count`: 1 for a span kept because it
//! failed or was slow, 1/ratio for one kept because its trace was sampled), so rates and error
//! shares are estimates of all traffic, not of what happened to be kept, and latency quantiles
//! are weighted the same way.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::SpanView;

/// The attribute a proxy records on a kept span: how many requests it stands for.
pub const ADJUSTED_COUNT: &str = "fedmesh.sampling.adjusted_count";

/// The service graph of a time window.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub window_seconds: u64,
    /// Client spans the graph was drawn from.
    pub spans: usize,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

/// A service in a cluster.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GraphNode {
    /// `cluster/namespace/service` (`cluster/service` without a namespace).
    pub id: String,
    /// Empty when not known (a request that failed before reaching a cluster).
    pub cluster: String,
    pub namespace: String,
    pub service: String,
}

/// Requests from one service to another.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct GraphEdge {
    pub source: String,
    pub target: String,
    /// Requests in the window (estimated from the kept spans and their sampling).
    pub requests: f64,
    pub requests_per_second: f64,
    /// The share of requests that failed, 0 to 1.
    pub error_share: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Kept spans the figures rest on: few means rough figures.
    pub sampled: usize,
    /// `http`, `grpc` or `tcp`.
    pub protocol: String,
    /// The callers' SPIFFE IDs, as their sidecars hold them.
    pub callers: Vec<String>,
    /// The callees' SPIFFE IDs, as their sidecars hold them (none for requests that failed
    /// before reaching one).
    pub callees: Vec<String>,
    /// The east-west gateways the requests went through.
    pub gateways: Vec<String>,
}

/// One request as the graph counts it.
struct Call {
    weight: f64,
    failed: bool,
    duration_ns: u64,
    caller: Option<String>,
    callee: Option<String>,
    gateway: Option<String>,
    protocol: &'static str,
}

/// Builds the graph of the client spans that started at or after `since_unix_nano`.
#[derive(Default)]
pub struct GraphBuilder {
    since_unix_nano: u64,
    window_seconds: u64,
    spans: usize,
    nodes: BTreeSet<GraphNode>,
    calls: BTreeMap<(String, String), Vec<Call>>,
}

impl GraphBuilder {
    pub fn new(since_unix_nano: u64, window_seconds: u64) -> Self {
        Self {
            since_unix_nano,
            window_seconds: window_seconds.max(1),
            ..Self::default()
        }
    }

    /// Adds one trace's spans.
    pub fn add_trace(&mut self, spans: &[SpanView]) {
        let servers: HashMap<&str, &SpanView> = spans
            .iter()
            .filter(|s| s.kind == "server" && from_sidecar(s))
            .map(|s| (s.parent_span_id.as_str(), s))
            .collect();
        for c in spans.iter().filter(|s| {
            s.kind == "client" && from_sidecar(s) && s.start_unix_nano >= self.since_unix_nano
        }) {
            self.spans += 1;
            let source = node(&c.cluster, ns(c), &c.service);
            let server = servers.get(c.span_id.as_str());
            let target = match server {
                Some(s) => node(&s.cluster, ns(s), &s.service),
                None => {
                    let cluster = c
                        .attributes
                        .get("fedmesh.destination.cluster")
                        .map_or("", String::as_str);
                    let host = c
                        .attributes
                        .get("server.address")
                        .map_or("unknown", String::as_str);
                    match service_of(host) {
                        Some((namespace, name)) => node(cluster, namespace, name),
                        None => node(cluster, "", host),
                    }
                }
            };
            let call = Call {
                weight: c
                    .attributes
                    .get(ADJUSTED_COUNT)
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|w| w.is_finite())
                    .map_or(1.0, |w| w.clamp(1.0, 1e6)),
                failed: c.error.is_some(),
                duration_ns: c.duration_ns,
                caller: c.attributes.get("fedmesh.caller").cloned(),
                callee: server.and_then(|s| s.attributes.get("fedmesh.callee").cloned()),
                gateway: c.attributes.get("fedmesh.gateway").cloned(),
                protocol: if c.attributes.contains_key("rpc.system") {
                    "grpc"
                } else if c.attributes.contains_key("http.request.method") {
                    "http"
                } else {
                    "tcp"
                },
            };
            self.calls
                .entry((source.id.clone(), target.id.clone()))
                .or_default()
                .push(call);
            self.nodes.insert(source);
            self.nodes.insert(target);
        }
    }

    pub fn finish(self) -> Graph {
        let window = self.window_seconds as f64;
        let edges = self
            .calls
            .into_iter()
            .map(|((source, target), mut calls)| {
                let requests: f64 = calls.iter().map(|c| c.weight).sum();
                // A fold from +0.0: an empty f64 sum is -0.0, which would print as a share.
                let failed = calls
                    .iter()
                    .filter(|c| c.failed)
                    .fold(0.0, |sum, c| sum + c.weight);
                calls.sort_by_key(|c| c.duration_ns);
                let set = |f: fn(&Call) -> &Option<String>| -> Vec<String> {
                    calls
                        .iter()
                        .filter_map(|c| f(c).clone())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect()
                };
                GraphEdge {
                    source,
                    target,
                    requests,
                    requests_per_second: requests / window,
                    error_share: if requests > 0.0 {
                        failed / requests
                    } else {
                        0.0
                    },
                    p50_ms: quantile(&calls, requests, 0.50),
                    p99_ms: quantile(&calls, requests, 0.99),
                    sampled: calls.len(),
                    protocol: calls.first().map_or("http", |c| c.protocol).to_string(),
                    callers: set(|c| &c.caller),
                    callees: set(|c| &c.callee),
                    gateways: set(|c| &c.gateway),
                }
            })
            .collect();
        Graph {
            window_seconds: self.window_seconds,
            spans: self.spans,
            nodes: self.nodes.into_iter().collect(),
            edges,
        }
    }
}

/// Spans a mesh sidecar recorded (an app's own spans would count its requests twice).
fn from_sidecar(s: &SpanView) -> bool {
    s.proxy() == Some("sidecar")
}

/// `(namespace, name)` of a service's DNS name (`NAME.NS.svc.clusterset.local` or
/// `NAME.NS.svc.cluster.local`), so a request that never reached the service is drawn to the
/// same node as those that did.
fn service_of(host: &str) -> Option<(&str, &str)> {
    let rest = host
        .strip_suffix(".svc.clusterset.local")
        .or_else(|| host.strip_suffix(".svc.cluster.local"))?;
    let (name, namespace) = rest.split_once('.')?;
    (!name.is_empty() && !namespace.is_empty() && !namespace.contains('.'))
        .then_some((namespace, name))
}

fn ns(s: &SpanView) -> &str {
    s.resource
        .get("service.namespace")
        .map_or("", String::as_str)
}

fn node(cluster: &str, namespace: &str, service: &str) -> GraphNode {
    let id = [cluster, namespace, service]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    GraphNode {
        id,
        cluster: cluster.to_string(),
        namespace: namespace.to_string(),
        service: service.to_string(),
    }
}

/// The weighted `q` quantile of `calls` (sorted by duration), in milliseconds.
fn quantile(calls: &[Call], total: f64, q: f64) -> f64 {
    let goal = total * q;
    let mut seen = 0.0;
    for c in calls {
        seen += c.weight;
        if seen >= goal {
            return c.duration_ns as f64 / 1e6;
        }
    }
    calls.last().map_or(0.0, |c| c.duration_ns as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, kind: &str, cluster: &str, service: &str) -> SpanView {
        SpanView {
            service: service.into(),
            start_unix_nano: 2_000,
            duration_ns: 1_000_000,
            attributes: BTreeMap::from([("http.request.method".into(), "GET".into())]),
            resource: std::sync::Arc::new(BTreeMap::from([
                ("fedmesh.proxy".into(), "sidecar".into()),
                ("service.namespace".into(), "shop".into()),
            ])),
            ..super::super::test_span(id, parent, kind, cluster)
        }
    }

    #[test]
    fn sampled_spans_stand_for_the_requests_they_were_drawn_from() {
        let mut g = GraphBuilder::new(1_000, 100);
        // Two sampled cross-cluster calls at 1% (100 requests each), 1 ms; one failed call
        // kept because it failed (itself only), 9 ms, which never reached west.
        for (i, ms) in [(1, 1), (2, 1)] {
            let mut c = span(&format!("c{i}"), "", "client", "east", "frontend");
            c.attributes.insert(ADJUSTED_COUNT.into(), "100".into());
            c.attributes.insert(
                "fedmesh.caller".into(),
                "spiffe://east.mesh/ns/shop/sa/frontend".into(),
            );
            c.duration_ns = ms * 1_000_000;
            let mut s = span(
                &format!("s{i}"),
                &format!("c{i}"),
                "server",
                "west",
                "reviews",
            );
            s.attributes.insert(
                "fedmesh.callee".into(),
                "spiffe://west.mesh/ns/shop/sa/reviews".into(),
            );
            g.add_trace(&[c, s]);
        }
        let mut failed = span("c3", "", "client", "east", "frontend");
        failed.error = Some("connect_timeout".into());
        failed.duration_ns = 9_000_000;
        failed
            .attributes
            .insert("fedmesh.destination.cluster".into(), "west".into());
        failed.attributes.insert(
            "server.address".into(),
            "reviews.shop.svc.clusterset.local".into(),
        );
        // An app's own span, and one before the window: neither counts.
        let mut app = span("c4", "", "client", "east", "frontend");
        std::sync::Arc::make_mut(&mut app.resource).remove("fedmesh.proxy");
        let mut old = span("c5", "", "client", "east", "frontend");
        old.start_unix_nano = 10;
        g.add_trace(&[failed, app, old]);

        let graph = g.finish();
        assert_eq!(graph.spans, 3);
        let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
        // The failed request is drawn to the service it asked for, by its DNS name.
        assert_eq!(ids, ["east/shop/frontend", "west/shop/reviews"]);
        assert_eq!(graph.edges.len(), 1);
        let edge = &graph.edges[0];
        assert_eq!(edge.target, "west/shop/reviews");
        assert_eq!(edge.requests, 201.0);
        assert_eq!(edge.requests_per_second, 2.01);
        assert_eq!(edge.error_share, 1.0 / 201.0);
        assert_eq!(edge.sampled, 3);
        assert_eq!(edge.p50_ms, 1.0);
        assert_eq!(edge.p99_ms, 1.0);
        assert_eq!(edge.callees, ["spiffe://west.mesh/ns/shop/sa/reviews"]);
        assert_eq!(edge.callers, ["spiffe://east.mesh/ns/shop/sa/frontend"]);
    }

    #[test]
    fn an_edge_without_failures_has_a_share_of_plus_zero_and_unknown_hosts_keep_their_name() {
        let mut g = GraphBuilder::new(0, 60);
        let mut c = span("c", "", "client", "east", "frontend");
        c.attributes
            .insert("server.address".into(), "example.com".into());
        g.add_trace(&[c]);
        let graph = g.finish();
        assert_eq!(graph.edges[0].target, "example.com");
        assert!(graph.edges[0].error_share.is_sign_positive());
        assert_eq!(
            service_of("api.shop.svc.cluster.local"),
            Some(("shop", "api"))
        );
        assert_eq!(service_of("a.b.c.svc.clusterset.local"), None);
    }

    #[test]
    fn quantiles_weigh_each_span_by_what_it_stands_for() {
        let calls: Vec<Call> = [(1, 98.0), (50, 1.0), (90, 1.0)]
            .into_iter()
            .map(|(ms, weight)| Call {
                weight,
                failed: false,
                duration_ns: ms * 1_000_000,
                caller: None,
                callee: None,
                gateway: None,
                protocol: "http",
            })
            .collect();
        assert_eq!(quantile(&calls, 100.0, 0.5), 1.0);
        assert_eq!(quantile(&calls, 100.0, 0.99), 50.0);
        assert_eq!(quantile(&calls, 100.0, 1.0), 90.0);
    }
}
