//! How much plain text the clusterset's PERMISSIVE services still get (PeerAuthentication): each
//! control plane reports what its sidecars counted every few seconds; the hub keeps the latest
//! report of each cluster in memory for [`REPORT_TTL`] and serves it at `/api/v1/plaintext`, which
//! `fedmesh status` prints. A service whose plain-text share has stayed at 0 can be switched to
//! STRICT. (With several hub replicas, each knows the clusters connected to it.)

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use fedmesh_api::ClusterName;
use fedmesh_api::pb::federation as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::AdminState;

/// How long a cluster's report counts.
pub const REPORT_TTL: Duration = Duration::from_secs(15);

#[derive(Default)]
pub struct PlaintextShares {
    reports: Mutex<BTreeMap<ClusterName, (pb::PeerTraffic, Instant)>>,
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
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cluster.clone(), (t, Instant::now()));
    }

    /// Every service of the clusters that reported lately, by cluster and service.
    pub fn current(&self) -> Vec<PlaintextStatus> {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.retain(|_, (_, at)| at.elapsed() < REPORT_TTL);
        let mut out: Vec<PlaintextStatus> = reports
            .iter()
            .flat_map(|(cluster, (t, _))| {
                t.services.iter().map(move |s| {
                    let total = s.mtls_per_second + s.plaintext_per_second;
                    PlaintextStatus {
                        cluster: cluster.to_string(),
                        service: s.service.clone(),
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
#[utoipa::path(get, path = "/api/v1/plaintext", responses((status = 200, body = [PlaintextStatus])))]
pub async fn list_plaintext(State(s): State<AdminState>) -> Json<Vec<PlaintextStatus>> {
    Json(s.hub.plaintext.current())
}
