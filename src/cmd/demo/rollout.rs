//! The demo's automated canary: `shop/ratings` v2 rolled out to east, then to west, by a
//! `Rollout` in each cluster, each cluster's control plane stepping on what its own callers'
//! sidecars measured and the hub starting west's wave once east has promoted. The traffic table
//! shows the share moving from ratings-v1 to ratings-v2; each decision is printed as it is made.

use std::collections::BTreeMap;

use fedmesh_testbed::apps::RunningApp;
use fedmesh_testbed::{Cluster, Workload, WorkloadSpec};

/// The same Rollout in both clusters: two steps, then the canary takes everything.
pub const ROLLOUT: &str = r#"apiVersion: fedmesh.io/v1alpha1
kind: Rollout
metadata: {name: ratings, namespace: shop}
spec:
  service: ratings
  stable: {service: ratings-v1}
  canary: {service: ratings-v2}
  strategy:
    canary:
      steps: [{weight: 20, pause: 2s}, {weight: 50, pause: 2s}]
  analysis: {successRate: 99, latencyP99: 500ms, minRequests: 10}
  waves: [{clusters: [east]}, {clusters: [west]}]
"#;

pub struct Ratings {
    /// West's caller (east's is the demo's frontend): each cluster judges its own canary on its
    /// own callers' requests.
    pub west_frontend: Workload,
    _workloads: Vec<(Workload, RunningApp)>,
    /// Decisions already printed, per cluster.
    printed: BTreeMap<String, usize>,
}

/// Starts ratings v1 and v2 in east and west (each version a Service of its own, and `ratings`
/// selecting both), a caller in west, and the Rollout in both clusters.
pub async fn start(east: &Cluster, west: &Cluster, frontend: &Workload) -> anyhow::Result<Ratings> {
    let mut workloads = Vec::new();
    for c in [east, west] {
        let zone = format!("{}-1a", c.region);
        let mut versions = Vec::new();
        for v in ["ratings-v1", "ratings-v2"] {
            let (w, app) = c.http_echo_workload("shop", v, &zone, 0).await?;
            super::publish(c, v, &[&w])?;
            versions.push((w, app));
        }
        super::publish(c, "ratings", &[&versions[0].0, &versions[1].0])?;
        workloads.extend(versions);
    }
    let west_frontend = west
        .workload(
            &WorkloadSpec::new("shop", "frontend", &format!("{}-1a", west.region)),
            "127.0.0.1:9".parse()?,
        )
        .await?;
    for c in [east, west] {
        c.write("ratings-rollout.yaml", ROLLOUT)?;
    }
    for f in [frontend, &west_frontend] {
        f.wait_config("shop/ratings and its versions", |t| {
            ["shop/ratings", "shop/ratings-v1", "shop/ratings-v2"]
                .iter()
                .all(|s| {
                    t.service_named(s)
                        .is_some_and(|e| e.svc.endpoints.iter().any(|x| x.ready))
                })
                && t.service_named("shop/ratings")
                    .is_some_and(|e| !e.policy.routes.is_empty())
        })
        .await?;
    }
    Ok(Ratings {
        west_frontend,
        _workloads: workloads,
        printed: BTreeMap::new(),
    })
}

impl Ratings {
    /// Prints the decisions made since the last call, cluster by cluster.
    pub fn report(&mut self, clusters: &[&Cluster]) {
        for c in clusters {
            let Some(cp) = c.control_plane() else {
                continue;
            };
            for v in cp.rollouts.views() {
                let seen = self.printed.entry(c.name.clone()).or_default();
                for d in v.status.history.iter().skip(*seen) {
                    println!(
                        "  >> Rollout shop/{} in {}: {} ({}% to {}): {}",
                        v.name, c.name, d.action, d.canary_weight, v.canary, d.message
                    );
                }
                *seen = v.status.history.len();
            }
        }
    }
}
