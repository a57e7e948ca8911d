//! Every proxy of the clusterset and whether it holds its control plane's configuration: each
//! control plane reports its open configuration streams every few seconds; the hub keeps the
//! latest report of each cluster in memory for [`REPORT_TTL`] and serves them at
//! `/api/v1/proxies`, which `fedmesh proxy-status` prints. (With several hub replicas, each knows
//! the clusters connected to it.)

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use fedmesh_api::ClusterName;
use fedmesh_api::pb::federation as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::AdminState;
use super::reports::LatestReports;
use crate::control_plane::proxies::{EjectedView, ProxyView};

/// How long a cluster's report counts (control planes send theirs at least every 10 s).
pub const REPORT_TTL: Duration = Duration::from_secs(30);

pub struct ProxyReports(LatestReports<pb::ProxyReport>);

impl Default for ProxyReports {
    fn default() -> Self {
        Self(LatestReports::new(REPORT_TTL))
    }
}

/// One sidecar or gateway, as its control plane last reported it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct ProxyStatus {
    pub cluster: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// `sidecar` or `gateway`.
    pub role: String,
    /// The pod or host it runs on, as it says.
    pub node: String,
    /// `SYNCED` (it acknowledged the last version it was sent), `PENDING` (an update is on its
    /// way) or `NACK` (it refused the last update; see `nack_error`).
    pub sync: String,
    /// The control plane's configuration version now. A proxy is sent a version only when its
    /// view changed, so `sent_version` may be lower and current.
    pub config_version: u64,
    pub sent_version: u64,
    pub acked_version: u64,
    /// RFC 3339; absent if it never acknowledged.
    pub acked_at: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nack_error: String,
    /// RFC 3339: when its configuration stream opened.
    pub connected_at: String,
    /// RFC 3339: expiry of the SVID its stream was opened with.
    pub svid_not_after: Option<String>,
    /// Seconds since the hub got this report.
    pub report_age_seconds: u64,
    /// What its outlier detection holds ejected now (endpoints, or other clusters' gateways).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ejected: Vec<Ejection>,
}

/// An endpoint, or another cluster's gateway, a proxy's outlier detection took out of its
/// balancing after consecutive failed requests (5xx, or no connection) until `until`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct Ejection {
    /// The target's cluster.
    pub cluster: String,
    /// Another cluster, through its gateway (ejected for every service there).
    pub remote: bool,
    /// ip:port of an endpoint, host:port of a gateway.
    pub address: String,
    /// The service (NAMESPACE/NAME) whose failed requests ejected it.
    pub service: String,
    /// RFC 3339: when the ejection ends.
    pub until: String,
    /// Seconds until then.
    pub remaining_seconds: f64,
    /// Ejections in a row: each one doubles the time out, up to a cap.
    pub ejections: u32,
}

impl Ejection {
    /// `e` if it has not ended at `now_ms`.
    fn current(e: EjectedView, now_ms: i64) -> Option<Self> {
        (e.until_unix_ms > now_ms).then(|| Self {
            until: fedmesh_trust::svid::rfc3339(
                std::time::UNIX_EPOCH + Duration::from_millis(e.until_unix_ms as u64),
            ),
            remaining_seconds: (e.until_unix_ms - now_ms) as f64 / 1000.0,
            cluster: e.cluster,
            remote: e.remote,
            address: e.address,
            service: e.service,
            ejections: e.ejections,
        })
    }
}

fn rfc3339(unix: i64) -> Option<String> {
    (unix > 0)
        .then(|| fedmesh_trust::svid::rfc3339(fedmesh_trust::svid::from_unix_secs(unix as u64)))
}

impl ProxyStatus {
    /// `v` of `cluster`, whose control plane is at `config_version`, reported `age` seconds ago.
    pub fn new(cluster: &str, config_version: u64, v: ProxyView, age: u64) -> Self {
        let now_ms = super::records::now_ms();
        Self {
            sync: v.sync_state().to_string(),
            ejected: v
                .ejected
                .into_iter()
                .filter_map(|e| Ejection::current(e, now_ms))
                .collect(),
            cluster: cluster.to_string(),
            identity: v.identity,
            role: v.role,
            node: v.node,
            config_version,
            sent_version: v.sent_version,
            acked_version: v.acked_version,
            acked_at: rfc3339(v.acked_unix),
            nack_error: v.nack_error,
            connected_at: rfc3339(v.connected_unix).unwrap_or_default(),
            svid_not_after: rfc3339(v.svid_not_after_unix),
            report_age_seconds: age,
        }
    }
}

impl ProxyReports {
    pub fn record(&self, cluster: &ClusterName, r: pb::ProxyReport) {
        self.0.record(cluster, r);
    }

    /// The proxies of the clusters that reported lately, by cluster and identity.
    pub fn current(&self) -> Vec<ProxyStatus> {
        self.0
            .current()
            .into_iter()
            .flat_map(|(cluster, r, age)| {
                r.proxies
                    .iter()
                    .map(|p| {
                        ProxyStatus::new(
                            cluster.as_str(),
                            r.config_version,
                            ProxyView::from_pb(p),
                            age.as_secs(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Every sidecar and gateway of the clusterset with a configuration stream open, and its sync
/// state.
#[utoipa::path(get, path = "/api/v1/proxies",
    responses((status = 200, description = "Every sidecar and gateway with a configuration stream open, as its control plane last reported it", body = [ProxyStatus])))]
pub async fn list_proxies(State(s): State<AdminState>) -> Json<Vec<ProxyStatus>> {
    Json(s.hub.proxies.current())
}
