//! Whether every cluster's east-west gateways can be reached from every other cluster: each
//! control plane probes the others' gateways (mTLS, see
//! [`crate::control_plane::gateway_probe`]) and reports the latest results every few seconds;
//! the hub keeps them in memory for [`REPORT_TTL`] and serves, for every ordered pair of joined
//! clusters and every gateway address the second publishes, what the first found
//! (`GET /api/v1/gateways`, `fedmesh gateways`, `fedmesh check`, `fedmesh explain`).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use fedmesh_api::ClusterName;
use fedmesh_api::pb::federation as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Hub;
use super::admin::AdminState;
use super::reports::LatestReports;

/// How long a cluster's probe report counts (control planes send theirs every 2 s).
pub const REPORT_TTL: Duration = Duration::from_secs(30);

pub struct ProbeReports(LatestReports<pb::GatewayProbes>);

impl Default for ProbeReports {
    fn default() -> Self {
        Self(LatestReports::new(REPORT_TTL))
    }
}

impl ProbeReports {
    pub fn record(&self, cluster: &ClusterName, r: pb::GatewayProbes) {
        self.0.record(cluster, r);
    }
}

/// One gateway as one other cluster sees it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct GatewayStatus {
    /// The cluster that probed.
    pub from: String,
    /// The cluster whose gateway it is.
    pub cluster: String,
    /// The address the cluster publishes for it.
    pub address: String,
    /// `reachable` (mTLS both ways and an answer), `unreachable` (see `error`), or `unknown`
    /// (`from` has not reported a probe of it: it is not connected, or the address is new).
    pub state: String,
    /// Connect, mTLS handshake and answer, in milliseconds.
    pub latency_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The gateway's SPIFFE ID, as verified.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway_id: String,
    /// Whether the gateway holds its control plane's configuration (it routes nothing without).
    pub ready: bool,
    pub config_version: u64,
    /// Services it admits connections to.
    pub exported_services: u32,
    /// Seconds since the probe.
    pub probed_seconds_ago: Option<u64>,
}

impl GatewayStatus {
    pub fn reachable(&self) -> bool {
        self.state == "reachable"
    }
}

/// For every ordered pair of joined, unexpired clusters and every gateway address the second
/// publishes: what the first last found.
pub fn gateway_status(hub: &Hub) -> Vec<GatewayStatus> {
    let reports = hub.probes.0.current();
    let now = super::records::now_unix();
    let v = hub.view();
    let clusters: Vec<_> = v.clusters().filter(|c| !c.expired).collect();
    let mut out = Vec::new();
    for from in &clusters {
        let report = reports
            .iter()
            .find(|(c, _, _)| *c == from.name)
            .map(|(_, r, _)| r);
        for to in clusters.iter().filter(|c| c.name != from.name) {
            for address in &to.gateways {
                let probe = report.and_then(|r| {
                    r.probes
                        .iter()
                        .find(|p| p.cluster == to.name.as_str() && p.address == *address)
                });
                out.push(match probe {
                    Some(p) => GatewayStatus {
                        from: from.name.to_string(),
                        cluster: to.name.to_string(),
                        address: address.clone(),
                        state: if p.reachable {
                            "reachable"
                        } else {
                            "unreachable"
                        }
                        .into(),
                        latency_ms: p.reachable.then(|| p.latency_us as f64 / 1000.0),
                        error: p.error.clone(),
                        gateway_id: p.gateway_id.clone(),
                        ready: p.ready,
                        config_version: p.config_version,
                        exported_services: p.exported_services,
                        probed_seconds_ago: Some((now - p.probed_unix).max(0) as u64),
                    },
                    None => GatewayStatus {
                        from: from.name.to_string(),
                        cluster: to.name.to_string(),
                        address: address.clone(),
                        state: "unknown".into(),
                        latency_ms: None,
                        error: format!(
                            "{} has not reported a probe of this gateway (is its control plane connected to the hub?)",
                            from.name
                        ),
                        gateway_id: String::new(),
                        ready: false,
                        config_version: 0,
                        exported_services: 0,
                        probed_seconds_ago: None,
                    },
                });
            }
        }
    }
    out
}

/// Every cluster's east-west gateways as every other cluster reaches them (mTLS probes).
#[utoipa::path(get, path = "/api/v1/gateways",
    responses((status = 200, description = "For every ordered pair of joined clusters and every gateway address the second publishes, what the first cluster's last probe found", body = [GatewayStatus])))]
pub async fn list_gateways(State(s): State<AdminState>) -> Json<Vec<GatewayStatus>> {
    Json(gateway_status(&s.hub))
}
