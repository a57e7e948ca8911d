//! The outermost layer: turns a proxy error into the response the caller gets, and records every
//! request — source and destination cluster, service, status, latency — whatever happened below.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use fedmesh_dataplane::config::ConfigHandle;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::metrics::ProxyMetrics;
use http::{Request, Response};
use tower::{Layer, Service};

use super::ctx::{BoxFuture, Tried};
use crate::dest::Dest;

#[derive(Clone)]
pub(crate) struct ObserveLayer {
    pub metrics: Arc<ProxyMetrics>,
    pub config: ConfigHandle,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let start = Instant::now();
        let tried = Tried::default();
        req.extensions_mut().insert(tried.clone());
        let service = req
            .extensions()
            .get::<Dest>()
            .map(|d| d.service.to_string())
            .unwrap_or_default();
        let call: BoxFuture<_> = Box::pin(self.inner.call(req));
        let layer = self.layer.clone();
        Box::pin(async move {
            let resp = match call.await {
                Ok(r) => r,
                Err(e) => {
                    layer.metrics.count_error(e.kind());
                    e.into_response()
                }
            };
            let dst = tried
                .last()
                .map(|t| t.cluster().to_string())
                .unwrap_or_default();
            let table = layer.config.table();
            layer.metrics.record(
                "outbound",
                table.cluster_name(),
                &dst,
                &service,
                resp.status(),
                start.elapsed(),
            );
            Ok(resp)
        })
    }
}
