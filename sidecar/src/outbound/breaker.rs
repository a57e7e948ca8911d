//! The circuit breaker: per backend service, limits on what this sidecar sends at once — requests
//! in flight (until their response body ends), retries in flight, attempts waiting for a
//! connection, and connections — set by the service's TrafficPolicy `circuitBreaker`. Past a
//! limit an attempt is answered at once with 503 (`fedmesh-proxy-error: overloaded`) and nothing
//! is sent: a slow or failing backend cannot make its callers pile up work without bound.
//! Failure accrual (ejecting endpoints) is the balancer's, under the same policy's
//! `outlierDetection`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use fedmesh_api::ServiceKey;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, BoxError, body};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::policy::CircuitBreaker;
use http::{Request, Response};
use hyper::body::Frame;
use tower::{Layer, Service};

use super::ctx::{AttemptError, BoxFuture, Tried, route_ctx};

/// What one backend service has in flight from this sidecar.
#[derive(Default)]
pub(crate) struct BreakerState {
    pub requests: AtomicU32,
    pub retries: AtomicU32,
    pub pending: AtomicU32,
    pub connections: Arc<AtomicU32>,
}

/// Breaker states by service, shared by the sidecar's requests.
#[derive(Default)]
pub(crate) struct Breakers(Mutex<HashMap<ServiceKey, Arc<BreakerState>>>);

impl Breakers {
    pub fn of(&self, service: &ServiceKey) -> Arc<BreakerState> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get(service) {
            return s.clone();
        }
        m.entry(service.clone()).or_default().clone()
    }
}

/// Handed to the endpoint with each attempt: the limits on waiting for and making connections.
#[derive(Clone)]
pub(crate) struct Breaker {
    pub service: ServiceKey,
    pub state: Arc<BreakerState>,
    pub limits: CircuitBreaker,
}

impl Breaker {
    /// The error for a limit that is reached.
    pub fn overloaded(&self, what: &str, limit: u32) -> ProxyError {
        ProxyError::Overloaded(format!(
            "the circuit breaker of {} is open: {what} reached its limit of {limit} (TrafficPolicy circuitBreaker)",
            self.service
        ))
    }
}

/// Counts one in a counter until dropped.
pub(crate) struct Held(Arc<BreakerState>, fn(&BreakerState) -> &AtomicU32);

impl Held {
    /// Takes a place under `limit`, or `None` when it is full.
    pub fn take(
        state: &Arc<BreakerState>,
        counter: fn(&BreakerState) -> &AtomicU32,
        limit: Option<u32>,
    ) -> Option<Self> {
        let c = counter(state);
        let before = c.fetch_add(1, Ordering::AcqRel);
        if limit.is_some_and(|l| before >= l) {
            c.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(state.clone(), counter))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted until it ends.
struct Guarded {
    inner: Body,
    _held: Vec<Held>,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone)]
pub(crate) struct BreakerLayer {
    pub breakers: Arc<Breakers>,
    pub metrics: Arc<ProxyMetrics>,
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct BreakerService<S> {
    inner: S,
    layer: BreakerLayer,
}

impl<S> Service<Request<Body>> for BreakerService<S>
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
        let service = ctx.backend_key().clone();
        let breaker = Breaker {
            state: self.layer.breakers.of(&service),
            limits: ctx.backend_policy().circuit_breaker.clone(),
            service,
        };
        let is_retry = req
            .extensions()
            .get::<Tried>()
            .is_some_and(|t| !t.snapshot().is_empty());
        let mut held = Vec::with_capacity(2);
        let taken = Held::take(&breaker.state, |s| &s.requests, breaker.limits.max_requests)
            .ok_or_else(|| {
                breaker.overloaded(
                    "requests in flight",
                    breaker.limits.max_requests.unwrap_or(0),
                )
            })
            .and_then(|h| {
                held.push(h);
                if !is_retry {
                    return Ok(());
                }
                Held::take(&breaker.state, |s| &s.retries, breaker.limits.max_retries)
                    .map(|h| held.push(h))
                    .ok_or_else(|| {
                        breaker.overloaded(
                            "retries in flight",
                            breaker.limits.max_retries.unwrap_or(0),
                        )
                    })
            });
        if let Err(e) = taken {
            self.layer.metrics.count_error("overloaded");
            return Box::pin(std::future::ready(Err(e.into())));
        }
        req.extensions_mut().insert(breaker);
        let call: BoxFuture<_> = Box::pin(self.inner.call(req));
        Box::pin(async move {
            let resp = call.await?;
            Ok(resp.map(|b| {
                body(Guarded {
                    inner: b,
                    _held: held,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;

    /// A body that ends when `release` is cancelled.
    fn held_body(release: CancellationToken) -> Body {
        let (mut tx, b) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        tokio::spawn(async move {
            release.cancelled().await;
            let _ = tx.send_data(Bytes::new()).await;
        });
        body(b)
    }

    #[tokio::test]
    async fn past_its_limits_the_breaker_answers_at_once_and_closes_when_bodies_end() {
        let table = table_with_policy(pb::TrafficPolicy {
            circuit_breaker: Some(pb::CircuitBreaker {
                max_requests: 2,
                max_retries: 1,
                ..Default::default()
            }),
            ..Default::default()
        });
        let release = CancellationToken::new();
        let r = release.clone();
        let inner = tower::service_fn(move |_req: Request<Body>| {
            Box::pin(std::future::ready(Ok(Response::new(held_body(r.clone())))))
                as BoxFuture<Result<Response<Body>, AttemptError>>
        });
        let l = BreakerLayer {
            breakers: Arc::new(Breakers::default()),
            metrics: Arc::new(ProxyMetrics::new("test")),
        };
        let state = l.breakers.of(&"shop/web".parse().unwrap());
        let mut svc = l.layer(inner);
        let a = svc.call(routed_request(&table, "shop/web")).await.unwrap();
        let b = svc.call(routed_request(&table, "shop/web")).await.unwrap();
        let err = svc
            .call(routed_request(&table, "shop/web"))
            .await
            .unwrap_err();
        assert_eq!(
            (err.error.kind(), err.error.status().as_u16()),
            ("overloaded", 503)
        );
        assert!(
            err.error.to_string().contains("requests in flight"),
            "{}",
            err.error
        );
        assert_eq!(state.requests.load(Ordering::Acquire), 2);
        // The bodies end: the breaker closes.
        release.cancel();
        for r in [a, b] {
            r.into_body().collect().await.unwrap();
        }
        assert_eq!(state.requests.load(Ordering::Acquire), 0);
        let c = svc.call(routed_request(&table, "shop/web")).await.unwrap();
        drop(c);

        // A retry (the request tried a target already) also needs a place among the retries.
        let retry = || {
            let mut req = routed_request(&table, "shop/web");
            let tried = Tried::default();
            tried.push(
                table.service_named("shop/web").unwrap().targets[&80][0].clone(),
                "same-cluster",
            );
            req.extensions_mut().insert(tried);
            req
        };
        let hold = CancellationToken::new();
        let h = hold.clone();
        let mut slow = BreakerLayer {
            breakers: Arc::new(Breakers::default()),
            metrics: Arc::new(ProxyMetrics::new("test")),
        }
        .layer(tower::service_fn(move |_req: Request<Body>| {
            Box::pin(std::future::ready(Ok(Response::new(held_body(h.clone())))))
                as BoxFuture<Result<Response<Body>, AttemptError>>
        }));
        let first = slow.call(retry()).await.unwrap();
        assert_eq!(
            slow.call(retry()).await.unwrap_err().error.kind(),
            "overloaded"
        );
        drop(first);
        assert!(slow.call(retry()).await.is_ok());
    }
}
