//! Pick, connect, and on failure try another target: the one connection loop of the gateway (to a
//! local endpoint) and the sidecar's opaque TCP (to a peer or a remote gateway). HTTP requests
//! do the same through the retry and balance layers, since a request can also fail after its
//! connection was made.
//!
//! A failed connect has sent nothing, so moving on to another target is always safe; it costs
//! no retry budget. Each failure is reported to the balancer (failure accrual may eject the
//! target) and the target is not tried again for this connection.

use std::future::Future;

use crate::balance::{Balancer, Choose, Locality};
use crate::metrics::ProxyMetrics;
use crate::policy::{ClusterShare, Outlier};
use crate::target::Target;

/// Where to pick from and how many tries one connection may make.
pub struct Plan<'a> {
    pub here: &'a Locality<'a>,
    pub pool: &'a [Target],
    pub split: &'a [ClusterShare],
    pub how: Choose<'a>,
    pub outlier: &'a Outlier,
    /// Tries in all (at least one is made).
    pub tries: usize,
}

/// Why no connection was made.
#[derive(Debug)]
pub enum NotConnected<E> {
    /// Nothing could be picked (no target left that was not excluded or already tried).
    NothingToTry,
    /// The last try's error.
    Failed(E),
}

impl Balancer {
    /// Connects to a target of `plan.pool` (never one in `exclude`), trying another after each
    /// failure until `plan.tries` are spent. Retries and ejections are counted in `metrics`;
    /// `failed` sees each failure (to log or count it).
    pub async fn connect_first<T, E, F, Fut>(
        &self,
        plan: Plan<'_>,
        mut exclude: Vec<Target>,
        metrics: &ProxyMetrics,
        mut connect: F,
        mut failed: impl FnMut(&Target, &E),
    ) -> Result<(T, Target), NotConnected<E>>
    where
        F: FnMut(Target) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut last = NotConnected::NothingToTry;
        for attempt in 0..plan.tries.max(1) {
            let Some(target) = self.pick_by(plan.here, plan.pool, plan.split, &exclude, plan.how)
            else {
                break;
            };
            if attempt > 0 {
                metrics.retries.inc();
            }
            match connect(target.clone()).await {
                Ok(conn) => {
                    self.success(&target);
                    return Ok((conn, target));
                }
                Err(e) => {
                    failed(&target, &e);
                    if self.failure_with(&target, plan.pool, plan.outlier) {
                        metrics.ejections.inc();
                    }
                    last = NotConnected::Failed(e);
                    exclude.push(target);
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::OutlierConfig;
    use crate::sni::MeshSni;
    use fedmesh_api::{ClusterName, TrustDomain};

    /// Endpoints of east at `addrs`, all in one zone.
    fn test_targets(addrs: &[&str]) -> Vec<Target> {
        let east: ClusterName = "east".parse().unwrap();
        addrs
            .iter()
            .map(|a| {
                Target::local(
                    a.parse().unwrap(),
                    "",
                    east.clone(),
                    TrustDomain::new("east.example").unwrap(),
                    MeshSni::new(80, "shop/web".parse().unwrap(), east.clone()),
                )
            })
            .collect()
    }

    fn here() -> Locality<'static> {
        Locality {
            cluster: "east",
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_failed_connect_moves_on_to_a_target_not_tried() {
        let pool = test_targets(&["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]);
        let balancer = Balancer::new(OutlierConfig::default());
        let metrics = ProxyMetrics::new("test");
        let here = here();
        let mut seen = Vec::new();
        let mut failures = 0;
        let got = balancer
            .connect_first(
                Plan {
                    here: &here,
                    pool: &pool,
                    split: &[],
                    how: Choose::LeastOfTwo,
                    outlier: &Outlier::default(),
                    tries: 3,
                },
                vec![pool[2].clone()],
                &metrics,
                |t: Target| {
                    seen.push(t.key().to_string());
                    let refuse = seen.len() == 1;
                    async move {
                        if refuse {
                            Err("refused")
                        } else {
                            Ok(t.key().to_string())
                        }
                    }
                },
                |_, _| failures += 1,
            )
            .await
            .unwrap();
        assert_eq!(failures, 1);
        assert_eq!(seen.len(), 2);
        assert_ne!(seen[0], seen[1], "the second try went elsewhere");
        assert_eq!(got.0, seen[1]);
        assert!(
            !seen.contains(&"127.0.0.1:1003".to_string()),
            "excluded target tried"
        );
        assert_eq!(metrics.retries.get(), 1);
    }

    #[tokio::test]
    async fn tries_are_bounded_and_the_last_error_is_returned() {
        let pool = test_targets(&["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]);
        let balancer = Balancer::new(OutlierConfig::default());
        let metrics = ProxyMetrics::new("test");
        let here = here();
        let mut n = 0;
        let err = balancer
            .connect_first(
                Plan {
                    here: &here,
                    pool: &pool,
                    split: &[],
                    how: Choose::LeastOfTwo,
                    outlier: &Outlier::default(),
                    tries: 2,
                },
                Vec::new(),
                &metrics,
                |_t: Target| {
                    n += 1;
                    let k = n;
                    async move { Err::<(), _>(k) }
                },
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert!(matches!(err, NotConnected::Failed(2)), "{err:?}");
        assert_eq!(n, 2);
        // Everything excluded: nothing to try, nothing attempted.
        let err = balancer
            .connect_first(
                Plan {
                    here: &here,
                    pool: &pool,
                    split: &[],
                    how: Choose::LeastOfTwo,
                    outlier: &Outlier::default(),
                    tries: 3,
                },
                pool.clone(),
                &metrics,
                |_t: Target| async { Ok::<(), ()>(()) },
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert!(matches!(err, NotConnected::NothingToTry));
    }
}
