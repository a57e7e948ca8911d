//! How much plain text the clusterset's PERMISSIVE services still get (PeerAuthentication): each
//! control plane reports what its sidecars counted every few seconds; the hub keeps the latest
//! report of each cluster in memory for [`REPORT_TTL`] and serves it at `/api/v1/plaintext`, which
//! `fedmesh status` prints. A service whose plain-text share has stayed at 0 can be switched to
//! STRICT. (With several hub replicas, each knows the clusters connected to it.)

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use fedmesh_api::ClusterName;
use fedmesh_api::pb::federation as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::AdminState;
use super::reports::LatestReports;

/// How long a cluster's report counts.
pub const REPORT_TTL: Duration = Duration::from_secs(15);

pub struct PlaintextShares(LatestReports<pb::PeerTraffic>);

impl Default for PlaintextShares {
    fn default() -> Self {
        Self(LatestReports::new(REPORT_TTL))
    }
}

/// A PERMISSIVE service in one cluster, and what reaches it.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct PlaintextStatus {
    pub cluster: String,
    /// `namespace/name`.
    pub service: String,
    pub mtls_per_second: f64,
    pub plaintext_per_second: f64,
    /// Plain text's share of the requests, 0 to 1 (0 with no requests).
    pub plaintext_share: f64,
}

impl PlaintextShares {
    pub fn record(&self, cluster: &ClusterName, t: pb::PeerTraffic) {
        self.0.record(cluster, t);
    }

    /// Every service of the clusters that reported lately, by cluster and service.
    pub fn current(&self) -> Vec<PlaintextStatus> {
        let mut out: Vec<PlaintextStatus> = self
            .0
            .current()
            .into_iter()
            .flat_map(|(cluster, t, _)| {
                t.services.into_iter().map(move |s| {
                    let total = s.mtls_per_second + s.plaintext_per_second;
                    PlaintextStatus {
                        cluster: cluster.to_string(),
                        service: s.service,
                        mtls_per_second: s.mtls_per_second,
                        plaintext_per_second: s.plaintext_per_second,
                        plaintext_share: if total > 0.0 {
                            s.plaintext_per_second / total
                        } else {
                            0.0
                        },
                    }
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.cluster).cmp(&(&b.service, &b.cluster)));
        out
    }
}

/// The PERMISSIVE services (PeerAuthentication) and how much of their traffic is still plain text.
#[utoipa::path(get, path = "/api/v1/plaintext",
    responses((status = 200, description = "Every PERMISSIVE service by cluster: requests per second with mTLS and in plain text", body = [PlaintextStatus])))]
pub async fn list_plaintext(State(s): State<AdminState>) -> Json<Vec<PlaintextStatus>> {
    Json(s.hub.plaintext.current())
}
