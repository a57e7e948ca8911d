//! The service's rate limits, enforced by each of its sidecars on what they admit: its own
//! (TrafficPolicy `rateLimit`: one bucket for everyone, or one per caller identity), and its part
//! of this cluster's share of a clusterset-wide limit (the share over the service's ready
//! endpoints here). A request finding no token is answered 429 with `Retry-After`. Requests to a
//! service under a clusterset-wide limit are counted as demand, which the sidecar reports to its
//! control plane (the hub shares the limit by it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fedmesh_api::{ServiceKey, SpiffeId};
use fedmesh_dataplane::config::ServiceEntry;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::policy::RateLimit;
use fedmesh_dataplane::ratelimit::Limiter;
use http::{Request, Response};
use tower::{Layer, Service};

use super::identity::inbound_ctx;
use crate::outbound::BoxFuture;

/// Requests seen since the last report, per service with a clusterset-wide limit.
pub(crate) type Demand = Arc<Mutex<HashMap<ServiceKey, u64>>>;

#[derive(Clone)]
pub(crate) struct ServiceRateLimitLayer {
    pub limiter: Arc<Limiter>,
    pub demand: Demand,
}

impl<S> Layer<S> for ServiceRateLimitLayer {
    type Service = ServiceRateLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServiceRateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct ServiceRateLimit<S> {
    inner: S,
    layer: ServiceRateLimitLayer,
}

impl ServiceRateLimitLayer {
    fn admit(
        &self,
        entry: &ServiceEntry,
        port: u16,
        caller: Option<&SpiffeId>,
    ) -> Result<(), ProxyError> {
        let service = &entry.key;
        if let Some(share) = &entry.policy.clusterset_rate_limit {
            *self
                .demand
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(service.clone())
                .or_default() += 1;
            let here = entry.local_targets(port).len().max(1) as u32;
            let own = RateLimit {
                requests: share.requests.div_ceil(here),
                burst: share.burst.div_ceil(here).max(1),
                ..share.clone()
            };
            self.limiter
                .take(&format!("clusterset|{service}"), &own)
                .map_err(|retry_after| ProxyError::RateLimited {
                    what: format!("{service} across the clusterset"),
                    limit: format!("this sidecar's part: {own}"),
                    retry_after,
                })?;
        }
        let Some(limit) = entry.policy.rate_limit.as_ref() else {
            return Ok(());
        };
        let (key, what) = if limit.per_caller {
            // Unauthenticated callers (plain text, PERMISSIVE) share one bucket.
            let caller = super::identity::caller_name(caller);
            (
                format!("inbound|{service}|{caller}"),
                format!("{service} for {caller}"),
            )
        } else {
            (format!("inbound|{service}"), service.to_string())
        };
        self.limiter
            .take(&key, limit)
            .map_err(|retry_after| ProxyError::RateLimited {
                what,
                limit: limit.to_string(),
                retry_after,
            })
    }
}

impl<S> Service<Request<Body>> for ServiceRateLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let admitted = inbound_ctx(&req).and_then(|ctx| match &ctx.entry {
            Some(entry) => self.layer.admit(entry, ctx.mesh.port, ctx.caller.as_ref()),
            None => Ok(()),
        });
        if let Err(e) = admitted {
            return Box::pin(std::future::ready(Err(e)));
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::test_support::{request_from, web_entry};
    use fedmesh_api::pb::dataplane as pb;
    use fedmesh_dataplane::http::full;
    use http::StatusCode;
    use std::time::Duration;

    fn svc(
        demand: Demand,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = ProxyError> {
        ServiceRateLimitLayer {
            limiter: Arc::new(Limiter::new()),
            demand,
        }
        .layer(tower::service_fn(|_req: Request<Body>| {
            std::future::ready(Ok::<_, ProxyError>(Response::new(full(""))))
        }))
    }

    const FRONTEND: &str = "spiffe://west.example/ns/shop/sa/frontend";
    const ADMIN: &str = "spiffe://west.example/ns/ops/sa/admin";

    #[tokio::test(start_paused = true)]
    async fn each_caller_has_its_own_bucket_and_a_refusal_says_when_to_retry() {
        let entry = web_entry(pb::TrafficPolicy {
            rate_limit: Some(pb::RateLimit {
                requests: 2,
                period_ms: 1000,
                burst: 2,
                per_caller: true,
            }),
            ..Default::default()
        });
        let mut svc = svc(Demand::default());
        for _ in 0..2 {
            svc.call(request_from(&entry, FRONTEND)).await.unwrap();
        }
        let e = svc.call(request_from(&entry, FRONTEND)).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(e.to_string().contains(FRONTEND), "{e}");
        let resp = e.into_response();
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
        // Another caller is not held back by the first.
        svc.call(request_from(&entry, ADMIN)).await.unwrap();
        // Half a second refills one token.
        tokio::time::advance(Duration::from_millis(500)).await;
        svc.call(request_from(&entry, FRONTEND)).await.unwrap();
        assert!(svc.call(request_from(&entry, FRONTEND)).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_clusterset_share_is_split_over_the_local_endpoints_and_counted_as_demand() {
        // 100 per second for this cluster in bursts of a tenth (10), two endpoints here: this
        // sidecar admits a burst of 5.
        let entry = web_entry(pb::TrafficPolicy {
            clusterset_rate_limit: Some(pb::RateLimit {
                requests: 100,
                period_ms: 1000,
                burst: 10,
                per_caller: false,
            }),
            ..Default::default()
        });
        let demand = Demand::default();
        let mut svc = svc(demand.clone());
        let mut admitted = 0;
        for _ in 0..8 {
            if svc.call(request_from(&entry, FRONTEND)).await.is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
        let seen = demand.lock().unwrap().clone();
        assert_eq!(
            seen.get(&"shop/web".parse().unwrap()),
            Some(&8),
            "refused ones count too"
        );
    }
}
