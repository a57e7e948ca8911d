//! Golden signals of the backends a rollout watches: each caller's sidecar counts the requests
//! drawn to a backend marked `BackendRef.signals` — how many, how many failed (5xx), and how long
//! they took up to the response's head, in fixed buckets — and reports them to its control plane
//! with its demand (`Demand.signals`). The control plane adds its sidecars' reports into
//! [`Counts`] and judges a step by [`Counts::success_rate`] and [`Counts::quantile`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_api::pb::dataplane as pb;

/// The latency buckets' upper bounds, in milliseconds (one more bucket counts what is slower).
pub const BUCKETS_MS: [u32; 18] = [
    1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 30_000,
];

/// Requests, failures and latencies of one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
    /// One count per bucket of [`BUCKETS_MS`], and one past the last.
    pub latency: Vec<u64>,
}

/// Whether an answer counts as failed: 5xx, or a gRPC status that says the server failed
/// (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS) in the response's head — a
/// trailers-only answer, as a proxy's or an app's early error is. (A status in trailers after a
/// body is not seen here.)
pub fn failed(status: u16, headers: &http::HeaderMap) -> bool {
    status >= 500
        || headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|c| matches!(c, 2 | 4 | 13 | 14 | 15))
}

impl Counts {
    /// Counts one request: whether it failed and how long its head took.
    pub fn record(&mut self, failed: bool, elapsed: Duration) {
        self.requests = self.requests.saturating_add(1);
        if failed {
            self.failures = self.failures.saturating_add(1);
        }
        let ms = elapsed.as_secs_f64() * 1000.0;
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= f64::from(*b))
            .unwrap_or(BUCKETS_MS.len());
        self.latency.resize(BUCKETS_MS.len() + 1, 0);
        self.latency[i] = self.latency[i].saturating_add(1);
    }

    /// Adds a sidecar's report (buckets beyond ours are counted in the last).
    pub fn add(&mut self, s: &pb::BackendSignals) {
        self.requests = self.requests.saturating_add(s.requests);
        self.failures = self
            .failures
            .saturating_add(s.failures.min(s.requests))
            .min(self.requests);
        self.latency.resize(BUCKETS_MS.len() + 1, 0);
        for (i, n) in s.latency.iter().enumerate() {
            let b = &mut self.latency[i.min(BUCKETS_MS.len())];
            *b = b.saturating_add(*n);
        }
    }

    /// The share of requests that did not fail (0-1); `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| 1.0 - self.failures as f64 / self.requests as f64)
    }

    /// The `q` quantile (0-1) of the latency, interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does (past the last bound: the last bound). `None` without requests.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.latency.iter().fold(0u64, |a, n| a.saturating_add(*n));
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, n) in self.latency.iter().enumerate() {
            if *n > 0 && below.saturating_add(*n) as f64 >= rank {
                let Some(hi) = BUCKETS_MS.get(i) else {
                    return Some(Duration::from_millis(
                        BUCKETS_MS[BUCKETS_MS.len() - 1].into(),
                    ));
                };
                let lo = if i == 0 { 0 } else { BUCKETS_MS[i - 1] };
                let within = ((rank - below as f64) / *n as f64).clamp(0.0, 1.0);
                let ms = f64::from(lo) + f64::from(hi - lo) * within;
                return Some(Duration::from_secs_f64(ms / 1000.0));
            }
            below = below.saturating_add(*n);
        }
        None
    }
}

/// What a sidecar counted since its last report, by signal name.
#[derive(Debug, Default)]
pub struct Signals(Mutex<HashMap<Arc<str>, Counts>>);

impl Signals {
    pub fn record(&self, name: &Arc<str>, failed: bool, elapsed: Duration) {
        let mut by = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match by.get_mut(name) {
            Some(c) => c.record(failed, elapsed),
            None => {
                let mut c = Counts::default();
                c.record(failed, elapsed);
                by.insert(name.clone(), c);
            }
        }
    }

    /// Takes what was counted, as the report of `interval`.
    pub fn drain(&self, interval: Duration) -> Vec<pb::BackendSignals> {
        let interval_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(name, c)| pb::BackendSignals {
                name: name.to_string(),
                requests: c.requests,
                failures: c.failures,
                latency: c.latency,
                interval_ms,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_give_the_success_rate_and_an_interpolated_p99() {
        let mut c = Counts::default();
        assert_eq!(c.success_rate(), None);
        assert_eq!(c.quantile(0.99), None);
        for i in 0..100 {
            c.record(i < 5, Duration::from_millis(3));
        }
        assert_eq!(c.requests, 100);
        assert!((c.success_rate().unwrap() - 0.95).abs() < 1e-9);
        // Every request in (2, 5] ms: the 99th is 99% of the way through that bucket.
        let p99 = c.quantile(0.99).unwrap().as_secs_f64() * 1000.0;
        assert!((p99 - 4.97).abs() < 0.01, "{p99}");
        // A slow tail moves it into the tail's bucket.
        for _ in 0..10 {
            c.record(false, Duration::from_millis(400));
        }
        let p99 = c.quantile(0.99).unwrap();
        assert!(
            p99 > Duration::from_millis(300) && p99 <= Duration::from_millis(500),
            "{p99:?}"
        );
        // Slower than every bound: the last bound.
        let mut slow = Counts::default();
        slow.record(false, Duration::from_secs(60));
        assert_eq!(slow.quantile(0.5), Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_grpc_error_in_the_head_is_a_failure() {
        let mut h = http::HeaderMap::new();
        assert!(!failed(200, &h));
        assert!(failed(503, &h));
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert!(failed(200, &h));
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert!(!failed(200, &h), "NOT_FOUND is the app's answer");
    }

    #[test]
    fn reports_drain_and_add_up() {
        let s = Signals::default();
        let name: Arc<str> = "shop/reviews-v2".into();
        s.record(&name, false, Duration::from_millis(1));
        s.record(&name, true, Duration::from_millis(1));
        let r = s.drain(Duration::from_secs(2));
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].requests, r[0].failures, r[0].interval_ms),
            (2, 1, 2000)
        );
        assert!(s.drain(Duration::from_secs(2)).is_empty(), "drained");
        let mut total = Counts::default();
        total.add(&r[0]);
        total.add(&r[0]);
        assert_eq!((total.requests, total.failures), (4, 2));
        assert_eq!(total.latency[0], 4);
    }
}
