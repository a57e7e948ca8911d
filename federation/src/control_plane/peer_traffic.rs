//! How far the migration to mTLS has got: what this cluster's sidecars count of the requests to
//! their PERMISSIVE services (PeerAuthentication), mTLS or plain text, summed over the sidecars
//! and sent to the hub every few seconds, where `fedmesh status` shows it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fedmesh_api::ServiceKey;
use fedmesh_api::pb::dataplane as dp;
use fedmesh_api::pb::federation as pb;

/// A sidecar's report counts this long.
const SIDECAR_TTL: Duration = Duration::from_secs(10);

/// Per sidecar: (mTLS per second, plain text per second, when it said so).
type Reports = HashMap<String, (f64, f64, Instant)>;

#[derive(Default)]
pub struct PeerTraffic {
    reports: Mutex<BTreeMap<ServiceKey, Reports>>,
}

impl PeerTraffic {
    /// Records a sidecar's counts (`reporter` names it); services outside `namespace` (a sidecar
    /// reports what it serves, in its own namespace) are ignored.
    pub fn record(
        &self,
        reporter: &str,
        namespace: Option<&str>,
        counts: &[dp::PermissiveRequests],
    ) {
        let now = Instant::now();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        for c in counts {
            let Ok(key) = c.service.parse::<ServiceKey>() else {
                continue;
            };
            if namespace != Some(key.namespace.as_str()) {
                continue;
            }
            let secs = Duration::from_millis(c.interval_ms.max(1).into()).as_secs_f64();
            reports.entry(key).or_default().insert(
                reporter.to_string(),
                (c.mtls as f64 / secs, c.plaintext as f64 / secs, now),
            );
        }
    }

    /// The sums over the sidecars that reported lately; `None` when none did.
    pub fn report(&self) -> Option<pb::PeerTraffic> {
        let now = Instant::now();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.retain(|_, by| {
            by.retain(|_, (_, _, at)| now.duration_since(*at) < SIDECAR_TTL);
            !by.is_empty()
        });
        if reports.is_empty() {
            return None;
        }
        Some(pb::PeerTraffic {
            services: reports
                .iter()
                .map(|(key, by)| pb::ServiceTraffic {
                    service: key.to_string(),
                    mtls_per_second: by.values().map(|r| r.0).sum(),
                    plaintext_per_second: by.values().map(|r| r.1).sum(),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_summed_over_sidecars_of_the_services_namespace() {
        let t = PeerTraffic::default();
        let counts = |service: &str, mtls, plaintext| {
            vec![dp::PermissiveRequests {
                service: service.into(),
                mtls,
                plaintext,
                interval_ms: 2000,
            }]
        };
        assert!(t.report().is_none());
        t.record("a", Some("shop"), &counts("shop/api", 10, 4));
        t.record("b", Some("shop"), &counts("shop/api", 2, 0));
        // Another namespace's sidecar cannot speak for shop/api.
        t.record("c", Some("jobs"), &counts("shop/api", 0, 1000));
        let r = t.report().unwrap();
        assert_eq!(r.services.len(), 1);
        assert_eq!(r.services[0].mtls_per_second, 6.0);
        assert_eq!(r.services[0].plaintext_per_second, 2.0);
    }
}
