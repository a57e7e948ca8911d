//! Fault injection: the TrafficPolicy of a route (or of the whole service) delays and aborts a
//! share of the requests that carry its headers, before anything is sent — so a tester can break
//! a dependency for her own requests alone and watch how the caller copes. An abort answers with
//! the HTTP status, or for gRPC with HTTP 200 and the `grpc-status` (trailers-only).

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::metrics::{ProxyMetrics, ReasonLabels};
use fedmesh_dataplane::policy::{Abort, Fault, MILLION};
use http::{Request, Response};
use tower::{Layer, Service};

use super::ctx::{BoxFuture, route_ctx};

#[derive(Clone)]
pub(crate) struct FaultLayer {
    pub metrics: Arc<ProxyMetrics>,
}

impl<S> Layer<S> for FaultLayer {
    type Service = Faults<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Faults {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Faults<S> {
    inner: S,
    metrics: Arc<ProxyMetrics>,
}

impl<S> Faults<S> {
    fn count(&self, kind: &str) {
        self.metrics
            .faults
            .get_or_create(&ReasonLabels {
                reason: kind.into(),
            })
            .inc();
    }
}

/// Whether a share (parts per million) is drawn.
fn drawn(ppm: u32) -> bool {
    rand::random::<u32>() % MILLION < ppm
}

fn grpc_abort(code: u32) -> Response<Body> {
    fedmesh_dataplane::http::grpc_error(
        code,
        "fault-injected",
        "fault injected by a fedmesh TrafficPolicy",
    )
}

impl<S> Service<Request<Body>> for Faults<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let ctx = match route_ctx(&req) {
            Ok(c) => c,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let fault: Option<&Fault> =
            ctx.route()
                .and_then(|r| r.fault.as_ref())
                .or(ctx.entry.policy.fault.as_ref());
        let Some(fault) = fault.filter(|f| f.applies(req.headers())) else {
            return Box::pin(self.inner.call(req));
        };
        let delay = fault.delay.filter(|(_, ppm)| drawn(*ppm)).map(|(d, _)| d);
        let abort = fault.abort.filter(|(_, ppm)| drawn(*ppm)).map(|(a, _)| a);
        if delay.is_none() && abort.is_none() {
            return Box::pin(self.inner.call(req));
        }
        if delay.is_some() {
            self.count("delay");
        }
        if abort.is_some() {
            self.count("abort");
        }
        let policy_of = ctx
            .route()
            .filter(|r| r.fault.is_some())
            .map(|r| r.source.clone())
            .unwrap_or_else(|| ctx.entry.key.to_string());
        let mut inner = self.inner.clone();
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            match abort {
                Some(Abort::Http(status)) => Err(ProxyError::FaultInjected { status, policy_of }),
                Some(Abort::Grpc(code)) => Ok(grpc_abort(code)),
                None => {
                    let call: BoxFuture<_> = Box::pin(inner.call(req));
                    call.await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{ok, routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use http::HeaderValue;
    use std::time::Duration;
    use tokio::time::Instant;

    fn layer() -> FaultLayer {
        FaultLayer {
            metrics: Arc::new(ProxyMetrics::new("test")),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_and_aborts_hit_their_share_of_requests_with_the_header_only() {
        let table = table_with_policy(pb::TrafficPolicy {
            fault: Some(pb::Fault {
                delay_ms: 1000,
                delay_ppm: 500_000,
                abort_status: 503,
                abort_ppm: 200_000,
                headers: vec![pb::ValueMatch {
                    name: "x-chaos".into(),
                    value: "me".into(),
                    regex: false,
                }],
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut svc = layer().layer(tower::service_fn(|_req: Request<Body>| ok()));
        let n = 2000;
        let (mut aborted, mut delayed) = (0, 0);
        for _ in 0..n {
            let mut req = routed_request(&table, "shop/web");
            req.headers_mut()
                .insert("x-chaos", HeaderValue::from_static("me"));
            let start = Instant::now();
            match svc.call(req).await {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!((e.kind(), e.status().as_u16()), ("fault-injected", 503));
                    aborted += 1;
                }
            }
            if start.elapsed() >= Duration::from_secs(1) {
                delayed += 1;
            }
        }
        // 20% ± 3 points and 50% ± 4 points of 2000 (over 4 standard deviations).
        assert!((340..=460).contains(&aborted), "{aborted} aborted of {n}");
        assert!((920..=1080).contains(&delayed), "{delayed} delayed of {n}");
        // Without the header nothing happens.
        let start = Instant::now();
        for _ in 0..100 {
            svc.call(routed_request(&table, "shop/web")).await.unwrap();
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_grpc_abort_is_a_trailers_only_status() {
        let table = table_with_policy(pb::TrafficPolicy {
            fault: Some(pb::Fault {
                abort_grpc_status: 14,
                abort_ppm: MILLION,
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut svc = layer().layer(tower::service_fn(|_req: Request<Body>| ok()));
        let r = svc.call(routed_request(&table, "shop/web")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
    }
}
