//! Prometheus metrics of the hub and the control plane, served on their admin ports.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct HubMetrics {
    registry: Registry,
    pub connected_clusters: Gauge,
    pub view_revision: Gauge,
    pub publishes: Family<ResultLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub updates_sent: Counter,
    pub snapshots_sent: Counter,
    pub nacks: Counter,
    pub joins: Family<ResultLabels, Counter>,
    /// Spans sent to the hub's trace window, by result (accepted, rejected, dropped).
    pub spans: Family<ResultLabels, Counter>,
    pub trace_window_spans: Gauge,
    /// The trace window's memory as estimated against its --trace-window-mib bound.
    pub trace_window_bytes: Gauge,
}

impl Default for HubMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedmesh_hub");
        let m = Self {
            registry: Registry::default(),
            connected_clusters: Gauge::default(),
            view_revision: Gauge::default(),
            publishes: Family::default(),
            refused: Family::default(),
            updates_sent: Counter::default(),
            snapshots_sent: Counter::default(),
            nacks: Counter::default(),
            joins: Family::default(),
            spans: Family::default(),
            trace_window_spans: Gauge::default(),
            trace_window_bytes: Gauge::default(),
        };
        registry.register(
            "connected_clusters",
            "Control planes with an open Federate stream to this replica",
            m.connected_clusters.clone(),
        );
        registry.register(
            "view_revision",
            "Store revision the clusterset view is at",
            m.view_revision.clone(),
        );
        registry.register(
            "publishes",
            "Publish messages by result",
            m.publishes.clone(),
        );
        registry.register(
            "refused",
            "Requests refused, by reason (foreign publish, bad token, ...)",
            m.refused.clone(),
        );
        registry.register(
            "updates_sent",
            "Delta updates sent to control planes",
            m.updates_sent.clone(),
        );
        registry.register(
            "snapshots_sent",
            "Snapshots sent to control planes",
            m.snapshots_sent.clone(),
        );
        registry.register(
            "nacks",
            "Updates control planes could not apply (they reconnect and resume)",
            m.nacks.clone(),
        );
        registry.register("joins", "Join attempts by result", m.joins.clone());
        registry.register(
            "spans",
            "Spans sent over OTLP, by result: accepted into the trace window, rejected (invalid), dropped (the oldest, to keep the window within its limits); with --otlp-forward, forwarded to the backend or forward_dropped (queue full, or the backend failed three times)",
            m.spans.clone(),
        );
        registry.register(
            "trace_window_spans",
            "Spans the trace window holds",
            m.trace_window_spans.clone(),
        );
        registry.register(
            "trace_window_bytes",
            "Memory the trace window's spans take (estimated on the high side)",
            m.trace_window_bytes.clone(),
        );
        Self { registry, ..m }
    }
}

impl HubMetrics {
    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn count_spans(&self, result: &str, n: u64) {
        if n > 0 {
            self.spans
                .get_or_create(&ResultLabels {
                    result: result.to_string(),
                })
                .inc_by(n);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
    pub result: String,
}

/// The control plane's own metrics, served on its admin socket (`GET /metrics`).
pub struct ControlPlaneMetrics {
    registry: Registry,
    /// Workload and node identities asked for by agents, by node and result (`issued`, or the
    /// reason of a refusal: `no_entry`, `no_pod_on_node`, `not_registered`, ...).
    pub svids: Family<NodeLabels, Counter>,
    /// Agent joins by node and result.
    pub joins: Family<NodeLabels, Counter>,
}

impl Default for ControlPlaneMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fedmesh_control_plane");
        let svids = Family::<NodeLabels, Counter>::default();
        let joins = Family::<NodeLabels, Counter>::default();
        registry.register(
            "svid_requests",
            "SVIDs node agents asked for, by node and result: issued, or why the node was refused",
            svids.clone(),
        );
        registry.register(
            "agent_joins",
            "Node agents' joins, by node and result",
            joins.clone(),
        );
        Self {
            registry,
            svids,
            joins,
        }
    }
}

impl ControlPlaneMetrics {
    pub fn count(family: &Family<NodeLabels, Counter>, node: &str, result: &str) {
        family
            .get_or_create(&NodeLabels {
                node: node.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
