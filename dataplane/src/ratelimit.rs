//! Local rate limits: token buckets, one per limited thing (a route, a service, a caller of a
//! service), refilled continuously. A request takes a token or is told how long until one is
//! there (the `Retry-After` of its 429).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::RateLimit;

struct Bucket {
    tokens: f64,
    last: Instant,
    /// The limit the bucket was filled under: a changed limit starts a fresh bucket.
    limit: RateLimit,
}

/// Buckets by key, shared by a proxy's requests. A bucket whose limit changes keeps its tokens
/// (up to the new burst). Buckets idle for a while are dropped, so a
/// stream of new callers cannot grow it without bound.
#[derive(Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Buckets kept at most; beyond it, full (idle) ones are dropped first.
const MAX_BUCKETS: usize = 100_000;

impl Limiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a token from `key`'s bucket under `limit`; `Err(wait)` when none is left, with the
    /// time until one will be.
    pub fn take(&self, key: &str, limit: &RateLimit) -> Result<(), Duration> {
        let now = Instant::now();
        let rate = f64::from(limit.requests) / limit.period.as_secs_f64().max(1e-9);
        let burst = f64::from(limit.burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                let refill = now.duration_since(b.last).as_secs_f64()
                    * (f64::from(b.limit.requests) / b.limit.period.as_secs_f64().max(1e-9));
                b.tokens + refill < f64::from(b.limit.burst.max(1))
            });
        }
        let b = match buckets.get_mut(key) {
            Some(b) => {
                if b.limit != *limit {
                    // A new limit (a share moved): it applies from now, without refilling.
                    b.tokens = b.tokens.min(burst);
                    b.limit = limit.clone();
                }
                b
            }
            None => {
                buckets.insert(
                    key.to_string(),
                    Bucket {
                        tokens: burst,
                        last: now,
                        limit: limit.clone(),
                    },
                );
                buckets.get_mut(key).expect("just inserted")
            }
        };
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate_and_says_how_long_to_wait() {
        let l = Limiter::new();
        let limit = RateLimit {
            requests: 10,
            period: Duration::from_secs(1),
            burst: 5,
            per_caller: false,
        };
        for _ in 0..5 {
            l.take("a", &limit).unwrap();
        }
        let wait = l.take("a", &limit).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(l.take("b", &limit).is_ok(), "buckets are per key");
        tokio::time::advance(Duration::from_millis(300)).await;
        let ok = (0..10).filter(|_| l.take("a", &limit).is_ok()).count();
        assert_eq!(ok, 3, "300 ms at 10/s refills 3 tokens");
        // Over a long run the rate holds: 10/s for 10 s is 100 (plus the burst).
        let mut admitted = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if l.take("a", &limit).is_ok() {
                admitted += 1;
            }
        }
        assert!((99..=101).contains(&admitted), "{admitted}");
    }
}
