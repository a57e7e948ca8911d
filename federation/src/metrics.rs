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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

/// One registered cluster as a scrape sees it.
pub struct ClusterSeen {
    pub cluster: String,
    /// Seconds since the hub last heard from it; `None` if never since this replica started.
    pub seconds_since_seen: Option<u64>,
    pub stale: bool,
    pub connected: bool,
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
    /// Per registered cluster, set at each scrape: what to alert on.
    pub cluster_last_seen_seconds: Family<ClusterLabels, Gauge>,
    pub cluster_stale: Family<ClusterLabels, Gauge>,
    pub cluster_connected: Family<ClusterLabels, Gauge>,
    /// Scrapes set the per-cluster families whole; one at a time.
    scrape: std::sync::Mutex<()>,
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
            cluster_last_seen_seconds: Family::default(),
            cluster_stale: Family::default(),
            cluster_connected: Family::default(),
            scrape: std::sync::Mutex::new(()),
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
        registry.register(
            "cluster_last_seen_seconds",
            "Seconds since the hub last heard from each registered cluster (absent if never since this replica started)",
            m.cluster_last_seen_seconds.clone(),
        );
        registry.register(
            "cluster_stale",
            "1 for a registered cluster silent past --stale-after (its exports stay routable), else 0",
            m.cluster_stale.clone(),
        );
        registry.register(
            "cluster_connected",
            "1 for a registered cluster whose control plane holds a Federate stream, else 0",
            m.cluster_connected.clone(),
        );
        Self { registry, ..m }
    }
}

impl HubMetrics {
    /// The metrics as Prometheus text, with the per-cluster gauges set from `clusters` (the
    /// registered clusters now: a removed one leaves the families).
    pub fn encode_with_clusters(&self, clusters: &[ClusterSeen]) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.cluster_last_seen_seconds.clear();
        self.cluster_stale.clear();
        self.cluster_connected.clear();
        for c in clusters {
            let l = ClusterLabels {
                cluster: c.cluster.clone(),
            };
            if let Some(s) = c.seconds_since_seen {
                self.cluster_last_seen_seconds
                    .get_or_create(&l)
                    .set(s as i64);
            }
            self.cluster_stale.get_or_create(&l).set(i64::from(c.stale));
            self.cluster_connected
                .get_or_create(&l)
                .set(i64::from(c.connected));
        }
        self.encode()
    }

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
    /// Set at each scrape ([`ControlPlaneMetrics::encode_with`]).
    pub hub_connected: Gauge,
    pub hub_accepted_exports: Gauge,
    pub clusterset_services: Gauge,
    pub ca_authorities: Family<StateLabels, Gauge>,
    /// Other clusters' gateways as this cluster's last probe found them.
    pub gateway_up: Family<GatewayLabels, Gauge>,
    pub gateway_latency: Family<GatewayLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    scrape: std::sync::Mutex<()>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub cluster: String,
    pub gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// What a control plane scrape reports besides its counters.
pub struct ControlPlaneState {
    /// `None`: no hub configured.
    pub hub_connected: Option<bool>,
    pub hub_accepted_exports: usize,
    pub clusterset_services: usize,
    /// CA authorities by state (prepared, active, retired).
    pub ca_authorities: Vec<String>,
    /// The latest probe of every other cluster's gateways.
    pub gateway_probes: Vec<fedmesh_api::pb::federation::GatewayProbe>,
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
        let (hub_connected, hub_accepted_exports, clusterset_services) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        let ca_authorities = Family::<StateLabels, Gauge>::default();
        registry.register(
            "hub_connected",
            "1 while connected to the hub, else 0 (absent without --hub)",
            hub_connected.clone(),
        );
        registry.register(
            "hub_accepted_exports",
            "This cluster's exports the hub has accepted",
            hub_accepted_exports.clone(),
        );
        registry.register(
            "clusterset_services",
            "Services of the clusterset this cluster knows (each has a clusterset IP)",
            clusterset_services.clone(),
        );
        registry.register(
            "ca_authorities",
            "The cluster CA's authorities by state: prepared (in the bundle, not signing), active, retired (in the bundle until the SVIDs it signed expire)",
            ca_authorities.clone(),
        );
        let gateway_up = Family::<GatewayLabels, Gauge>::default();
        let gateway_latency =
            Family::<GatewayLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "gateway_probe_up",
            "1 if another cluster's east-west gateway answered this cluster's last mTLS probe, else 0",
            gateway_up.clone(),
        );
        registry.register(
            "gateway_probe_latency_seconds",
            "Connect, mTLS handshake and answer of the last successful probe of another cluster's gateway",
            gateway_latency.clone(),
        );
        Self {
            registry,
            gateway_up,
            gateway_latency,
            svids,
            joins,
            hub_connected,
            hub_accepted_exports,
            clusterset_services,
            ca_authorities,
            scrape: std::sync::Mutex::new(()),
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

    /// The metrics as Prometheus text, with the gauges set from `state`.
    pub fn encode_with(&self, state: &ControlPlaneState) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        // Without a hub the gauge stays unset: its family shows no sample.
        if let Some(c) = state.hub_connected {
            self.hub_connected.set(i64::from(c));
        }
        self.hub_accepted_exports
            .set(state.hub_accepted_exports as i64);
        self.clusterset_services
            .set(state.clusterset_services as i64);
        self.ca_authorities.clear();
        for st in &state.ca_authorities {
            self.ca_authorities
                .get_or_create(&StateLabels { state: st.clone() })
                .inc();
        }
        self.gateway_up.clear();
        self.gateway_latency.clear();
        for p in &state.gateway_probes {
            let labels = GatewayLabels {
                cluster: p.cluster.clone(),
                gateway: p.address.clone(),
            };
            self.gateway_up
                .get_or_create(&labels)
                .set(i64::from(p.reachable));
            if p.reachable {
                self.gateway_latency
                    .get_or_create(&labels)
                    .set(p.latency_us as f64 / 1e6);
            }
        }
        self.encode()
    }
}
