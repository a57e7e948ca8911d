//! Clusterset-wide rate limits: the hub shares each limited service's budget among the clusters
//! that serve it, by demand. Every few seconds a control plane reports what its sidecars saw of
//! each limited service and gets its cluster's share back; each cluster's sidecars then enforce
//! their share locally — no request waits for the hub. A cluster cut off from the hub keeps its
//! last share.
//!
//! A share is a tenth of the budget split evenly (so a cluster whose demand rises has something to
//! grow from) plus the rest in proportion to demand; the shares add up to the limit. When clusters
//! declare different limits for one service, the lowest holds. Reports are kept in memory for
//! [`REPORT_TTL`]: a cluster that stops reporting stops taking a share. (With several hub
//! replicas, each shares among the clusters connected to it.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey};

/// How long a cluster's report counts.
pub const REPORT_TTL: Duration = Duration::from_secs(10);

/// Of the budget, the part split evenly among the clusters before demand decides the rest.
const EVEN_PART: f64 = 0.1;

struct Report {
    /// The declared limit, in requests per second.
    limit_per_second: f64,
    demand_per_second: f64,
    at: Instant,
}

#[derive(Default)]
pub struct Quotas {
    reports: Mutex<HashMap<ServiceKey, HashMap<ClusterName, Report>>>,
}

impl Quotas {
    /// Records `cluster`'s demand and answers with its shares of the services it reported.
    pub fn report(
        &self,
        cluster: &ClusterName,
        demand: &pb::RateLimitDemand,
    ) -> pb::RateLimitShares {
        self.report_at(cluster, demand, Instant::now())
    }

    fn report_at(
        &self,
        cluster: &ClusterName,
        demand: &pb::RateLimitDemand,
        now: Instant,
    ) -> pb::RateLimitShares {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = pb::RateLimitShares::default();
        for d in &demand.services {
            let Ok(key) = d.service.parse::<ServiceKey>() else {
                continue;
            };
            if d.requests == 0 || d.period_ms == 0 {
                continue;
            }
            let period = Duration::from_millis(d.period_ms.into()).as_secs_f64();
            let by_cluster = reports.entry(key).or_default();
            by_cluster.insert(
                cluster.clone(),
                Report {
                    limit_per_second: f64::from(d.requests) / period,
                    demand_per_second: d.demand_per_second.max(0.0),
                    at: now,
                },
            );
            by_cluster.retain(|_, r| now.duration_since(r.at) < REPORT_TTL);
            let limit = by_cluster
                .values()
                .map(|r| r.limit_per_second)
                .fold(f64::INFINITY, f64::min);
            let n = by_cluster.len() as f64;
            let total: f64 = by_cluster.values().map(|r| r.demand_per_second).sum();
            let own = by_cluster[cluster].demand_per_second;
            let share = if total <= 0.0 {
                limit / n
            } else {
                limit * EVEN_PART / n + limit * (1.0 - EVEN_PART) * own / total
            };
            out.services.push(pb::ServiceShare {
                service: d.service.clone(),
                requests: (share * period).round().max(1.0) as u32,
                period_ms: d.period_ms,
                clusters: by_cluster.len() as u32,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(rps: f64) -> pb::RateLimitDemand {
        pb::RateLimitDemand {
            services: vec![pb::ServiceDemand {
                service: "shop/api".into(),
                requests: 100,
                period_ms: 1000,
                demand_per_second: rps,
            }],
        }
    }

    #[test]
    fn shares_follow_demand_add_up_to_the_limit_and_forget_silent_clusters() {
        let q = Quotas::default();
        let (east, west) = (
            ClusterName::new("east").unwrap(),
            ClusterName::new("west").unwrap(),
        );
        let t0 = Instant::now();
        // Alone, a cluster gets the whole budget.
        let s = q.report_at(&east, &demand(300.0), t0);
        assert_eq!(s.services[0].requests, 100);
        // West reports a third of east's demand: 5 + 90 × 3/4 and 5 + 90 × 1/4.
        let w = q.report_at(&west, &demand(100.0), t0);
        let e = q.report_at(&east, &demand(300.0), t0);
        assert_eq!((e.services[0].requests, w.services[0].requests), (73, 28));
        assert_eq!(e.services[0].clusters, 2);
        // Nobody asks: an even split.
        q.report_at(&east, &demand(0.0), t0);
        let w = q.report_at(&west, &demand(0.0), t0);
        let e = q.report_at(&east, &demand(0.0), t0);
        assert_eq!((e.services[0].requests, w.services[0].requests), (50, 50));
        // West goes quiet: after the TTL east has the budget again.
        let e = q.report_at(
            &east,
            &demand(10.0),
            t0 + REPORT_TTL + Duration::from_secs(1),
        );
        assert_eq!(e.services[0].requests, 100);
    }
}
