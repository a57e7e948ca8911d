//! Clusterset-wide rate limits, the control plane's part: the limits this cluster's
//! TrafficPolicies declare, the demand its sidecars report, and the shares the hub sends back
//! ([`crate::hub::quota`]). Until the hub has answered, a cluster takes the limit divided by the
//! clusters exporting the service; cut off from the hub, it keeps its last share.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fedmesh_api::ServiceKey;
use fedmesh_api::pb::dataplane as dp;
use fedmesh_api::pb::federation as pb;
use tokio::sync::watch;

/// How often demand is reported to the hub.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// A sidecar's report counts this long.
const SIDECAR_TTL: Duration = Duration::from_secs(10);

/// A limit: requests per period (ms).
pub type Limit = (u32, u32);

/// Each sidecar's latest rate for a service: requests per second, and when it said so.
type Reports = HashMap<String, (f64, Instant)>;

pub struct ClustersetLimits {
    /// Declared by this cluster's TrafficPolicies.
    declared: watch::Sender<BTreeMap<ServiceKey, Limit>>,
    /// Each sidecar's latest rate per service: (requests per second, when).
    demand: Mutex<HashMap<ServiceKey, Reports>>,
    /// This cluster's shares, from the hub.
    shares: watch::Sender<BTreeMap<ServiceKey, Limit>>,
}

impl Default for ClustersetLimits {
    fn default() -> Self {
        Self {
            declared: watch::Sender::new(BTreeMap::new()),
            demand: Mutex::default(),
            shares: watch::Sender::new(BTreeMap::new()),
        }
    }
}

impl ClustersetLimits {
    pub fn set_declared(&self, limits: BTreeMap<ServiceKey, Limit>) {
        self.declared.send_if_modified(|d| {
            if *d == limits {
                false
            } else {
                *d = limits;
                true
            }
        });
    }

    /// Records a sidecar's report (`reporter` names it); services without a declared limit, or
    /// outside `namespace` (a sidecar reports what it serves, in its own namespace), are ignored.
    pub fn record(&self, reporter: &str, namespace: Option<&str>, d: &dp::Demand) {
        let declared = self.declared.borrow();
        let now = Instant::now();
        let mut demand = self.demand.lock().unwrap_or_else(|p| p.into_inner());
        for s in &d.services {
            let Ok(key) = s.service.parse::<ServiceKey>() else {
                continue;
            };
            if !declared.contains_key(&key) || namespace != Some(key.namespace.as_str()) {
                continue;
            }
            let interval = Duration::from_millis(s.interval_ms.max(1).into()).as_secs_f64();
            demand
                .entry(key)
                .or_default()
                .insert(reporter.to_string(), (s.requests as f64 / interval, now));
        }
    }

    /// What to tell the hub: each declared limit and this cluster's demand for it.
    pub fn report(&self) -> Option<pb::RateLimitDemand> {
        let declared = self.declared.borrow();
        if declared.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut demand = self.demand.lock().unwrap_or_else(|p| p.into_inner());
        Some(pb::RateLimitDemand {
            services: declared
                .iter()
                .map(|(key, (requests, period_ms))| {
                    let rps = demand.get_mut(key).map_or(0.0, |by| {
                        by.retain(|_, (_, at)| now.duration_since(*at) < SIDECAR_TTL);
                        by.values().map(|(r, _)| r).sum()
                    });
                    pb::ServiceDemand {
                        service: key.to_string(),
                        requests: *requests,
                        period_ms: *period_ms,
                        demand_per_second: rps,
                    }
                })
                .collect(),
        })
    }

    pub fn apply_shares(&self, s: &pb::RateLimitShares) {
        let shares: BTreeMap<ServiceKey, Limit> = s
            .services
            .iter()
            .filter_map(|x| Some((x.service.parse().ok()?, (x.requests, x.period_ms))))
            .collect();
        self.shares.send_if_modified(|cur| {
            let mut changed = false;
            for (k, v) in &shares {
                if cur.get(k) != Some(v) {
                    cur.insert(k.clone(), *v);
                    changed = true;
                }
            }
            changed
        });
    }

    /// Ticks when a share changes (the config stream then sends it on).
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<ServiceKey, Limit>> {
        self.shares.subscribe()
    }

    /// This cluster's share of `key`'s limit, for its sidecars: the hub's, else the limit over
    /// the `clusters` exporting it; `None` when no limit is declared here.
    pub fn share_of(&self, key: &ServiceKey, clusters: usize) -> Option<dp::RateLimit> {
        let (requests, period_ms) = *self.declared.borrow().get(key)?;
        let (requests, period_ms) = self.shares.borrow().get(key).copied().unwrap_or((
            (requests as usize).div_ceil(clusters.max(1)) as u32,
            period_ms,
        ));
        Some(dp::RateLimit {
            requests,
            period_ms,
            burst: 0,
            per_caller: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_is_summed_over_sidecars_and_shares_replace_the_first_guess() {
        let l = ClustersetLimits::default();
        let key: ServiceKey = "shop/api".parse().unwrap();
        assert!(l.report().is_none(), "nothing declared, nothing to report");
        l.set_declared([(key.clone(), (100, 1000))].into());
        let report = |n: u64| dp::Demand {
            services: vec![dp::ServiceRequests {
                service: "shop/api".into(),
                requests: n,
                interval_ms: 2000,
            }],
            permissive: Vec::new(),
            signals: Vec::new(),
        };
        l.record("a", Some("shop"), &report(100));
        l.record("b", Some("shop"), &report(60));
        l.record("intruder", Some("other"), &report(1_000_000));
        let r = l.report().unwrap();
        assert_eq!(r.services[0].demand_per_second, 80.0);
        // Before the hub answers: the limit over the exporting clusters.
        assert_eq!(l.share_of(&key, 2).unwrap().requests, 50);
        l.apply_shares(&pb::RateLimitShares {
            services: vec![pb::ServiceShare {
                service: "shop/api".into(),
                requests: 73,
                period_ms: 1000,
                clusters: 2,
            }],
        });
        assert_eq!(l.share_of(&key, 2).unwrap().requests, 73);
    }
}
