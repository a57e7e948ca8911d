//! The latest report of each cluster on one subject (its proxies, its plain text, its gateway
//! probes), kept in memory for a while: what control planes send every few seconds besides
//! their exports. A report older than the store's time to live no longer counts: its cluster
//! stopped sending (or is connected to another hub replica, which knows it instead).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fedmesh_api::ClusterName;

pub struct LatestReports<T> {
    ttl: Duration,
    reports: Mutex<BTreeMap<ClusterName, (T, Instant)>>,
}

impl<T: Clone> LatestReports<T> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            reports: Mutex::default(),
        }
    }

    /// Replaces `cluster`'s report.
    pub fn record(&self, cluster: &ClusterName, report: T) {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cluster.clone(), (report, Instant::now()));
    }

    /// The reports that still count, by cluster, with their age.
    pub fn current(&self) -> Vec<(ClusterName, T, Duration)> {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.retain(|_, (_, at)| at.elapsed() < self.ttl);
        reports
            .iter()
            .map(|(c, (r, at))| (c.clone(), r.clone(), at.elapsed()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_counts_until_its_time_to_live() {
        let store = LatestReports::new(Duration::from_millis(50));
        let east = ClusterName::new("east").unwrap();
        store.record(&east, 1);
        store.record(&east, 2);
        let now = store.current();
        assert_eq!(now.len(), 1);
        assert_eq!((now[0].0.as_str(), now[0].1), ("east", 2));
        std::thread::sleep(Duration::from_millis(60));
        assert!(store.current().is_empty());
    }
}
