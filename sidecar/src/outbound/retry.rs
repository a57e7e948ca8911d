//! Retries that cannot amplify an outage.
//!
//! An attempt is retried on another target when it never reached the app — the connection
//! failed, the stream was refused, the peer's sidecar answered that its app is down (503) or
//! that it does not serve the destination (421) — or, when the route asks for it, when the answer
//! was a gateway failure (502-504). A request is retried only while its body can be sent again
//! (small bodies are kept; a streaming one only when none of it left), and a request that may
//! have reached the app unanswered only when its method is idempotent.
//!
//! Every retry draws on the service's [`RetryBudget`], as Linkerd's do: retries may add at most
//! 20% to the requests of the last ten seconds, plus a floor of ten per second so a quiet
//! service can still retry. When a backend is down everywhere the budget runs dry and failures
//! come back at once, instead of multiplying the load on whatever is still standing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fedmesh_api::ServiceKey;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, PROXY_ERROR, full};
use fedmesh_dataplane::metrics::ProxyMetrics;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::ctx::{AttemptError, BoxFuture, route_ctx};

/// How much retrying a service's requests may add.
#[derive(Clone, Debug)]
pub struct BudgetConfig {
    /// Retries allowed per request, on average over `window`.
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic.
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Requests and retries of one service over a sliding window of one-second buckets.
pub struct RetryBudget {
    config: BudgetConfig,
    buckets: Mutex<VecDeque<Bucket>>,
}

struct Bucket {
    start: Instant,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    fn with_current<T>(&self, f: impl FnOnce(&mut VecDeque<Bucket>) -> T) -> T {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        while b
            .front()
            .is_some_and(|x| now.duration_since(x.start) >= self.config.window)
        {
            b.pop_front();
        }
        if b.back()
            .is_none_or(|x| now.duration_since(x.start) >= Duration::from_secs(1))
        {
            b.push_back(Bucket {
                start: now,
                requests: 0,
                retries: 0,
            });
        }
        f(&mut b)
    }

    /// A request was made.
    pub fn deposit(&self) {
        self.with_current(|b| {
            if let Some(x) = b.back_mut() {
                x.requests += 1;
            }
        });
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let (ratio, floor) = (
            self.config.ratio,
            u64::from(self.config.min_per_second) * self.config.window.as_secs().max(1),
        );
        self.with_current(|b| {
            let requests: u64 = b.iter().map(|x| x.requests).sum();
            let retries: u64 = b.iter().map(|x| x.retries).sum();
            let allowed = floor + (ratio * requests as f64) as u64;
            if retries < allowed {
                if let Some(x) = b.back_mut() {
                    x.retries += 1;
                }
                true
            } else {
                false
            }
        })
    }
}

/// One budget per service, shared by all of a sidecar's requests to it.
#[derive(Default)]
pub struct Budgets {
    config: BudgetConfig,
    by_service: Mutex<HashMap<ServiceKey, Arc<RetryBudget>>>,
}

impl Budgets {
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            by_service: Mutex::default(),
        }
    }

    pub fn of(&self, service: &ServiceKey) -> Arc<RetryBudget> {
        let mut m = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = m.get(service) {
            return b.clone();
        }
        m.entry(service.clone())
            .or_insert_with(|| Arc::new(RetryBudget::new(self.config.clone())))
            .clone()
    }
}

/// The request body, kept so a failed attempt can be retried when it is small enough.
enum BodySlot {
    Replayable(Bytes),
    Streaming(Option<Body>),
}

impl BodySlot {
    /// Boxed, so that awaiting it inside a generic layer's future does not trip rustc's
    /// higher-ranked Send/From checks.
    fn new(body: Body, limit: usize) -> BoxFuture<Result<Self, ProxyError>> {
        Box::pin(async move {
            let small =
                body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= limit as u64);
            if !small {
                return Ok(Self::Streaming(Some(body)));
            }
            // Collected frame by frame (http_body_util::Limited's error conversion trips rustc's
            // higher-ranked checks in async code over boxed bodies).
            let mut body = body;
            let mut buf = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ProxyError::RequestBody(e.to_string()))?;
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        return Err(ProxyError::RequestBody(format!(
                            "the body is larger than its declared {limit} bytes"
                        )));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(Self::Replayable(buf.freeze()))
        })
    }

    fn take(&mut self) -> Option<Body> {
        match self {
            Self::Replayable(b) => Some(full(b.clone())),
            Self::Streaming(b) => b.take(),
        }
    }

    fn put_back(&mut self, body: Body) {
        if let Self::Streaming(slot) = self {
            *slot = Some(body);
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Replayable(_))
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[derive(Clone)]
pub(crate) struct RetryLayer {
    /// Attempts beyond the first for failures that never reached the app.
    pub safe_retries: u32,
    /// Bodies up to this size are kept for retries.
    pub max_retry_body: usize,
    pub budgets: Arc<Budgets>,
    pub metrics: Arc<ProxyMetrics>,
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

impl<S> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = AttemptError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx).map_err(|e| e.error)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (mut inner, layer) = (self.inner.clone(), self.layer.clone());
        Box::pin(async move {
            let ctx = route_ctx(&req)?;
            let budget = layer.budgets.of(&ctx.entry.key);
            budget.deposit();
            let (parts, body) = req.into_parts();
            let idempotent = is_idempotent(&parts.method);
            let mut body = BodySlot::new(body, layer.max_retry_body).await?;
            let (mut safe_left, mut app_left) = (layer.safe_retries, ctx.app_retries());
            let mut last: Option<Result<Response<Body>, ProxyError>> = None;
            loop {
                let Some(b) = body.take() else {
                    return last.unwrap_or_else(|| {
                        Err(ProxyError::Unavailable(format!(
                            "{}: the request body was sent and cannot be sent again",
                            ctx.dest
                        )))
                    });
                };
                let attempt = Request::from_parts(parts.clone(), b);
                let call: BoxFuture<_> = Box::pin(inner.call(attempt));
                let retry = match call.await {
                    Ok(resp) => {
                        let status = resp.status();
                        let from_proxy = resp.headers().contains_key(PROXY_ERROR);
                        // Never reached the app (its sidecar said so): safe to retry anything.
                        let unreached = from_proxy
                            && matches!(
                                status,
                                StatusCode::SERVICE_UNAVAILABLE | StatusCode::MISDIRECTED_REQUEST
                            );
                        let gateway_failure = matches!(status.as_u16(), 502..=504);
                        let wanted = body.replayable()
                            && ((unreached && safe_left > 0)
                                || (!unreached && gateway_failure && app_left > 0));
                        if !wanted {
                            return Ok(resp);
                        }
                        if !budget.withdraw() {
                            layer.metrics.retry_budget_exhausted.inc();
                            return Ok(resp);
                        }
                        if unreached {
                            safe_left -= 1;
                        } else {
                            app_left -= 1;
                        }
                        last = Some(Ok(resp));
                        true
                    }
                    Err(AttemptError { error, unsent }) => {
                        if matches!(error, ProxyError::Unavailable(_)) {
                            // Nothing left to try: the last answer stands.
                            return last.unwrap_or(Err(error));
                        }
                        let can = match unsent {
                            // Never sent: the body comes back with the request.
                            Some(r) => {
                                body.put_back(r.into_body());
                                true
                            }
                            // Sent, no answer: only an idempotent request we still hold.
                            None => {
                                idempotent
                                    && body.replayable()
                                    && matches!(error, ProxyError::UpstreamReset { .. })
                            }
                        };
                        if !can || safe_left == 0 {
                            return Err(error);
                        }
                        if !budget.withdraw() {
                            layer.metrics.retry_budget_exhausted.inc();
                            return Err(error);
                        }
                        safe_left -= 1;
                        last = Some(Err(error));
                        true
                    }
                };
                if retry {
                    layer.metrics.retries.inc();
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn layer(safe_retries: u32, budget: BudgetConfig) -> RetryLayer {
        RetryLayer {
            safe_retries,
            max_retry_body: 1024,
            budgets: Arc::new(Budgets::new(budget)),
            metrics: Arc::new(ProxyMetrics::new("test")),
        }
    }

    /// An inner service answering every attempt with `status` (from the peer's proxy when
    /// `from_proxy`), counting attempts.
    fn answering(
        status: u16,
        from_proxy: bool,
        count: Arc<AtomicU32>,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = AttemptError,
        Future = BoxFuture<Result<Response<Body>, AttemptError>>,
    > + Clone {
        tower::service_fn(move |_req: Request<Body>| {
            count.fetch_add(1, Ordering::Relaxed);
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            if from_proxy {
                r.headers_mut().insert(
                    PROXY_ERROR,
                    http::HeaderValue::from_static("app-unreachable"),
                );
            }
            Box::pin(std::future::ready(Ok(r))) as BoxFuture<_>
        })
    }

    #[tokio::test(start_paused = true)]
    async fn unreached_attempts_are_retried_and_app_failures_only_when_the_route_says() {
        let table = table_with_policy(pb::TrafficPolicy::default());
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, BudgetConfig::default()).layer(answering(503, true, n.clone()));
        let resp = svc.call(routed_request(&table, "shop/web")).await.unwrap();
        assert_eq!(
            (resp.status().as_u16(), n.load(Ordering::Relaxed)),
            (503, 4)
        );

        // A 502 from the app: no retry without a policy, two with one.
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, BudgetConfig::default()).layer(answering(502, false, n.clone()));
        svc.call(routed_request(&table, "shop/web")).await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 1);
        let with_retries = table_with_policy(pb::TrafficPolicy {
            retries: 2,
            ..Default::default()
        });
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, BudgetConfig::default()).layer(answering(502, false, n.clone()));
        svc.call(routed_request(&with_retries, "shop/web"))
            .await
            .unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_when_every_backend_fails() {
        let table = table_with_policy(pb::TrafficPolicy {
            retries: 3,
            ..Default::default()
        });
        // A floor of 1 retry per second over 10 s, plus 20% of requests.
        let budget = BudgetConfig {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        };
        let n = Arc::new(AtomicU32::new(0));
        let l = layer(3, budget);
        let metrics = l.metrics.clone();
        let mut svc = l.layer(answering(503, false, n.clone()));
        let requests = 200;
        for _ in 0..requests {
            svc.call(routed_request(&table, "shop/web")).await.unwrap();
        }
        let attempts = n.load(Ordering::Relaxed);
        let retries = attempts - requests;
        // Without a budget: 3 retries each, 600. With it: 10 (floor) + 20% of 200 = 50.
        assert_eq!(retries, 50, "{attempts} attempts");
        // Every request that wanted a retry the budget did not allow is counted (once).
        let exhausted = metrics.retry_budget_exhausted.get();
        assert!((180..=200).contains(&exhausted), "{exhausted}");
        // The window slides: ten seconds later the floor is back.
        tokio::time::advance(Duration::from_secs(11)).await;
        let before = n.load(Ordering::Relaxed);
        svc.call(routed_request(&table, "shop/web")).await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed) - before, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_but_unanswered_is_retried_only_if_idempotent() {
        let table = table_with_policy(pb::TrafficPolicy::default());
        let n = Arc::new(AtomicU32::new(0));
        let count = n.clone();
        let reset = tower::service_fn(move |_req: Request<Body>| {
            count.fetch_add(1, Ordering::Relaxed);
            Box::pin(std::future::ready(Err(AttemptError::new(
                ProxyError::UpstreamReset {
                    target: "t".into(),
                    error: "reset".into(),
                },
            )))) as BoxFuture<Result<Response<Body>, AttemptError>>
        });
        let mut svc = layer(3, BudgetConfig::default()).layer(reset);
        let mut post = routed_request(&table, "shop/web");
        *post.method_mut() = Method::POST;
        assert_eq!(svc.call(post).await.unwrap_err().kind(), "upstream-reset");
        assert_eq!(
            n.load(Ordering::Relaxed),
            1,
            "a POST that may have reached the app"
        );
        svc.call(routed_request(&table, "shop/web"))
            .await
            .unwrap_err();
        assert_eq!(n.load(Ordering::Relaxed), 1 + 4, "a GET: three retries");
    }
}
