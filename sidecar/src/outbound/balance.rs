//! The balance layer: picks the target of each attempt — locality tiers, the route's weighted
//! split, outlier ejection, then the backend's algorithm: least-loaded of two, round robin, or a
//! consistent hash of a header, a cookie or this caller's identity
//! ([`fedmesh_dataplane::balance`]) — skipping the
//! targets this request already tried and remote clusters whose trust bundle this sidecar does not
//! hold yet (a handshake with them cannot succeed; the bundle follows the route within moments),
//! and reports each attempt's outcome back to the balancer.

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::balance::{Balancer, Choose, Locality, stable_hash};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, PROXY_ERROR};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::policy::{HashKey, LoadBalancing, Outlier};
use fedmesh_dataplane::target::Target;
use fedmesh_trust::tls::MeshIdentity;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use super::ctx::{AttemptError, BoxFuture, RouteCtx, Tried, route_ctx};
use super::retry::AppRetry;

#[derive(Clone)]
pub(crate) struct BalanceLayer {
    pub balancer: Arc<Balancer>,
    pub identity: MeshIdentity,
    /// This sidecar's zone (--zone); empty: the one its control plane sends.
    pub zone: String,
    pub metrics: Arc<ProxyMetrics>,
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Balance<S> {
    inner: S,
    layer: BalanceLayer,
}

/// The remote targets whose trust domain this sidecar holds no bundle for.
pub(crate) fn untrusted(identity: &MeshIdentity, candidates: &[Target]) -> Vec<Target> {
    if candidates.iter().all(Target::is_local) {
        return Vec::new();
    }
    let trust = identity.trust();
    candidates
        .iter()
        .filter(|t| !t.is_local() && !trust.trusts(t.trust_domain().as_str()))
        .cloned()
        .collect()
}

/// The answer when nothing could be tried: names the clusters skipped for want of a bundle.
pub(crate) fn nothing_to_try(dest: &impl std::fmt::Display, untrusted: &[Target]) -> String {
    let mut clusters: Vec<String> = untrusted
        .iter()
        .map(|t| format!("{} ({})", t.cluster(), t.trust_domain()))
        .collect();
    clusters.dedup();
    if clusters.is_empty() {
        format!("{dest} has no healthy endpoint in any cluster")
    } else {
        format!(
            "{dest} has no healthy endpoint this sidecar can verify: no trust bundle yet for {}; check that the clusters are federated (fedmesh status)",
            clusters.join(", ")
        )
    }
}

impl BalanceLayer {
    fn locality<'a>(&'a self, ctx: &'a RouteCtx) -> Locality<'a> {
        Locality {
            cluster: ctx.table.cluster_name(),
            region: ctx.table.local.as_ref().map_or("", |l| l.region.as_str()),
            zone: ctx.table.zone(&self.zone),
        }
    }

    fn failed(&self, target: &Target, pool: &[Target], outlier: &Outlier, tried: &Tried) {
        if self.balancer.failure_with(target, pool, outlier) {
            self.metrics.ejections.inc();
            tried.ejected();
        }
    }

    /// The hash of a request's affinity key, when the backend balances by one and the request
    /// has it (else it is balanced as by least request).
    fn affinity(&self, key: &HashKey, headers: &http::HeaderMap) -> Option<u64> {
        match key {
            HashKey::Header(n) => headers.get(n).map(|v| stable_hash(v.as_bytes())),
            HashKey::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(n, _)| n == name)
                .map(|(_, v)| stable_hash(v.as_bytes())),
            HashKey::SourceIdentity => self
                .identity
                .spiffe_id()
                .map(|id| stable_hash(id.to_string().as_bytes())),
        }
    }
}

impl<S> Service<Request<Body>> for Balance<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = AttemptError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = AttemptError;
    type Future = BoxFuture<Result<Response<Body>, AttemptError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let ctx = match route_ctx(&req) {
            Ok(c) => c,
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        };
        let tried = req.extensions().get::<Tried>().cloned().unwrap_or_default();
        let candidates = ctx.candidates();
        let untrusted = untrusted(&self.layer.identity, candidates);
        let mut exclude = tried.snapshot();
        let retrying = !exclude.is_empty();
        exclude.extend(untrusted.iter().cloned());
        let here = self.layer.locality(&ctx);
        let service = ctx.backend_key().to_string();
        let how = match &ctx.backend_policy().load_balancing {
            LoadBalancing::LeastRequest => Choose::LeastOfTwo,
            LoadBalancing::RoundRobin => Choose::RoundRobin(&service),
            LoadBalancing::ConsistentHash(key) => self
                .layer
                .affinity(key, req.headers())
                .map_or(Choose::LeastOfTwo, Choose::Hash),
        };
        let split = ctx.split();
        let picked = self
            .layer
            .balancer
            .pick_by(&here, candidates, &split, &exclude, how)
            .or_else(|| {
                // An app's answer is retried on a target already tried when none is left.
                req.extensions().get::<AppRetry>()?;
                self.layer
                    .balancer
                    .pick_by(&here, candidates, &split, &untrusted, how)
            });
        let Some(target) = picked else {
            return Box::pin(std::future::ready(Err(AttemptError::new(
                ProxyError::Unavailable(nothing_to_try(&ctx.destination(), &untrusted)),
            ))));
        };
        if retrying {
            // An attempt after another: a retry actually made.
            self.layer.metrics.retries.inc();
        }
        tried.push(target.clone(), Balancer::tier_name(&here, &target));
        let lease = self.layer.balancer.lease(&target);
        req.extensions_mut().insert(target.clone());
        let call: BoxFuture<_> = Box::pin(self.inner.call(req));
        let layer = self.layer.clone();
        Box::pin(async move {
            let result = call.await;
            drop(lease);
            let pool = ctx.candidates();
            let outlier = &ctx.backend_policy().outlier;
            match &result {
                Ok(resp) => {
                    let status = resp.status();
                    let unreached = resp.headers().contains_key(PROXY_ERROR)
                        && matches!(
                            status,
                            StatusCode::SERVICE_UNAVAILABLE | StatusCode::MISDIRECTED_REQUEST
                        );
                    if unreached || matches!(status.as_u16(), 502..=504) {
                        layer.failed(&target, pool, outlier, &tried);
                    } else {
                        layer.balancer.success(&target);
                    }
                }
                Err(e) => {
                    layer.metrics.count_error(e.error.kind());
                    layer.failed(&target, pool, outlier, &tried);
                }
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use fedmesh_dataplane::balance::OutlierConfig;
    use fedmesh_dataplane::http::full;

    fn layer() -> BalanceLayer {
        BalanceLayer {
            balancer: Arc::new(Balancer::new(OutlierConfig::default())),
            identity: MeshIdentity::new(),
            zone: "a".into(),
            metrics: Arc::new(ProxyMetrics::new("test")),
        }
    }

    #[tokio::test]
    async fn each_attempt_goes_to_a_target_the_request_has_not_tried() {
        let table = table_with_policy(pb::TrafficPolicy::default());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let inner = tower::service_fn(move |req: Request<Body>| {
            s.lock()
                .unwrap()
                .push(req.extensions().get::<Target>().unwrap().key().to_string());
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            Box::pin(std::future::ready(Ok(r))) as BoxFuture<Result<Response<Body>, AttemptError>>
        });
        let mut svc = layer().layer(inner);
        let tried = Tried::default();
        for _ in 0..2 {
            let mut req = routed_request(&table, "shop/web");
            req.extensions_mut().insert(tried.clone());
            svc.call(req).await.unwrap();
        }
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, ["127.0.0.1:1001", "127.0.0.1:1002"]);
        // Both tried: nothing is left, and the answer says so.
        let mut req = routed_request(&table, "shop/web");
        req.extensions_mut().insert(tried.clone());
        let err = svc.call(req).await.unwrap_err();
        assert_eq!(err.error.kind(), "unavailable");
        assert!(
            err.error.to_string().contains("no healthy endpoint"),
            "{}",
            err.error
        );
        // A retry of the app's answer may go back to a target already tried.
        let mut req = routed_request(&table, "shop/web");
        req.extensions_mut().insert(tried.clone());
        req.extensions_mut().insert(AppRetry);
        assert!(svc.call(req).await.is_ok());
    }
}
