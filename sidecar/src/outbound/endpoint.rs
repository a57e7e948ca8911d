//! The endpoint: sends an attempt to its target over the pooled HTTP/2 mTLS connection
//! ([`crate::upstream::Upstreams`]). A connection that cannot be made, or a stream the peer
//! refused before reading it, hands the request back so it can go elsewhere whole.

use std::sync::Arc;
use std::task::{Context, Poll};

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, PROXY_ERROR, body};
use fedmesh_dataplane::target::Target;
use fedmesh_dataplane::trace::HopSpan;
use http::{Request, Response, StatusCode};
use tower::Service;

use super::breaker::{Breaker, Held};
use super::ctx::{AttemptError, BoxFuture, Tried, route_ctx};
use crate::upstream::{ConnGate, UpstreamError, Upstreams};

#[derive(Clone)]
pub(crate) struct Endpoint {
    pub upstreams: Arc<Upstreams>,
}

impl Service<Request<Body>> for Endpoint {
    type Response = Response<Body>;
    type Error = AttemptError;
    type Future = BoxFuture<Result<Response<Body>, AttemptError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let upstreams = self.upstreams.clone();
        Box::pin(async move {
            let ctx = route_ctx(&req)?;
            let Some(target) = req.extensions().get::<Target>().cloned() else {
                return Err(ProxyError::BadRequest("the attempt has no target".into()).into());
            };
            let breaker = req.extensions().get::<Breaker>().cloned();
            // Waiting for a connection counts as pending for the backend's circuit breaker.
            let pending = match &breaker {
                None => None,
                Some(b) => {
                    match Held::take(&b.state, |s| &s.pending, b.limits.max_pending_requests) {
                        Some(h) => Some(h),
                        None => {
                            return Err(AttemptError::new(b.overloaded(
                                "requests waiting for a connection",
                                b.limits.max_pending_requests.unwrap_or(0),
                            )));
                        }
                    }
                }
            };
            let gate = breaker.as_ref().map(|b| ConnGate {
                open: b.state.connections.clone(),
                max: b.limits.max_connections,
            });
            let trigger = req.extensions().get::<HopSpan>().map(HopSpan::context);
            let connected = upstreams
                .h2(&target, ctx.connect_timeout(), gate.as_ref(), trigger)
                .await;
            drop(pending);
            let mut sender = match connected {
                Ok((s, hop)) => {
                    if let (Some(hop), Some(tried)) = (hop, req.extensions().get::<Tried>()) {
                        tried.connection(hop);
                    }
                    s
                }
                Err(UpstreamError::Limit { .. }) => {
                    let b = breaker.as_ref().expect("a limit comes from a breaker");
                    return Err(AttemptError::new(
                        b.overloaded("connections", b.limits.max_connections.unwrap_or(0)),
                    ));
                }
                Err(e) => {
                    return Err(AttemptError {
                        error: ProxyError::Connect {
                            label: e.label(),
                            bad_peer: matches!(
                                e,
                                UpstreamError::Tls { .. } | UpstreamError::Alpn { .. }
                            ),
                            message: e.to_string(),
                        },
                        unsent: Some(req),
                    });
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    if resp.status() == StatusCode::MISDIRECTED_REQUEST
                        && resp.headers().contains_key(PROXY_ERROR)
                    {
                        // The peer will not serve this on that connection (RFC 9110 15.5.20):
                        // the next request opens a new one.
                        upstreams.evict(&target);
                    }
                    Ok(resp.map(body))
                }
                Err(mut e) => {
                    upstreams.evict(&target);
                    let unsent = e.take_message();
                    Err(AttemptError {
                        error: ProxyError::UpstreamReset {
                            target: target.key().to_string(),
                            error: e.into_error().to_string(),
                        },
                        unsent,
                    })
                }
            }
        })
    }
}
