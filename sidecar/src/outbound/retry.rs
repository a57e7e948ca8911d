//! Retries that cannot amplify an outage.
//!
//! An attempt is retried on another target when it never reached the app — the connection
//! failed, the stream was refused, the peer's sidecar answered that its app is down (503) or
//! that it does not serve the destination (421) — or, when the route asks for it, when the answer
//! was a gateway failure (502-504). A request is retried only while its body can be sent again
//! (small bodies are kept; a streaming one only when none of it left), and a request that may
//! have reached the app unanswered only when its method is idempotent.
//!
//! Every retry of a request that reached a peer draws on the service's [`RetryBudget`], as
//! Linkerd's do: retries may add at most 20% to the requests of the last ten seconds, plus a floor
//! of ten per second so a quiet service can still retry (moving on from a connection that could
//! not be made costs the peer nothing and needs no budget; it is bounded by `safe_retries` and
//! never tries a target twice). When a backend is down everywhere the budget runs dry and failures
//! come back at once, instead of multiplying the load on whatever is still standing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fedmesh_api::ServiceKey;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::{Body, Buffered, PROXY_ERROR, buffer_small, full};
use fedmesh_dataplane::metrics::ProxyMetrics;
use http::{Method, Request, Response, StatusCode};
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
    async fn new(body: Body, limit: usize) -> Result<Self, ProxyError> {
        Ok(match buffer_small(body, limit).await? {
            Buffered::Whole(b) => Self::Replayable(b),
            Buffered::Streaming(b) => Self::Streaming(Some(b)),
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

/// On an attempt that retries an answer of the app: when every target has been tried, one may
/// be tried again (a retry of a connection that could not be made never goes back).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AppRetry;

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
            let app = ctx.app_retry();
            let attempt_timeout = ctx.attempt_timeout();
            let (parts, body) = req.into_parts();
            let idempotent = is_idempotent(&parts.method);
            let mut body = BodySlot::new(body, layer.max_retry_body).await?;
            let (mut safe_left, mut app_left) = (layer.safe_retries, app.attempts);
            let mut app_retries_done = 0u32;
            let mut last: Option<Result<Response<Body>, ProxyError>> = None;
            // The next attempt retries an answer of the app (it may go back to a target tried).
            let mut after_app_failure = false;
            loop {
                let Some(b) = body.take() else {
                    return last.unwrap_or_else(|| {
                        Err(ProxyError::Unavailable(format!(
                            "{}: the request body was sent and cannot be sent again",
                            ctx.destination()
                        )))
                    });
                };
                let mut attempt = Request::from_parts(parts.clone(), b);
                if after_app_failure {
                    attempt.extensions_mut().insert(AppRetry);
                }
                let call: BoxFuture<_> = Box::pin(inner.call(attempt));
                let outcome = match attempt_timeout {
                    None => call.await,
                    Some(after) => match tokio::time::timeout(after, call).await {
                        Ok(outcome) => outcome,
                        Err(_) => Err(AttemptError::new(ProxyError::Timeout {
                            dest: ctx.destination(),
                            after,
                        })),
                    },
                };
                // Whether the next attempt is a retry the route asked for (it waits its backoff).
                let app_retry = match outcome {
                    Ok(resp) => {
                        let status = resp.status();
                        let from_proxy = resp.headers().contains_key(PROXY_ERROR);
                        // Never reached the app (its sidecar said so): safe to retry anything.
                        let unreached = from_proxy
                            && matches!(
                                status,
                                StatusCode::SERVICE_UNAVAILABLE | StatusCode::MISDIRECTED_REQUEST
                            );
                        let app_failure = !unreached && app.codes.contains(&status.as_u16());
                        let wanted = body.replayable()
                            && ((unreached && safe_left > 0) || (app_failure && app_left > 0));
                        if !wanted {
                            return Ok(resp);
                        }
                        if !budget.withdraw() {
                            layer.metrics.retry_budget_exhausted.inc();
                            return Ok(resp);
                        }
                        last = Some(Ok(resp));
                        if unreached {
                            safe_left -= 1;
                            false
                        } else {
                            app_left -= 1;
                            true
                        }
                    }
                    Err(AttemptError { error, unsent }) => {
                        if matches!(
                            error,
                            ProxyError::Unavailable(_) | ProxyError::Overloaded(_)
                        ) {
                            // Nothing left to try, or the backend's breaker is open: the last
                            // answer stands.
                            return last.unwrap_or(Err(error));
                        }
                        // An attempt past its own limit counts as the 504 it is answered with.
                        let timed_out = matches!(error, ProxyError::Timeout { .. });
                        let sent_nothing = unsent.is_some();
                        let (can, as_app) = match unsent {
                            // Never sent: the body comes back with the request.
                            Some(r) => {
                                body.put_back(r.into_body());
                                (safe_left > 0, false)
                            }
                            None if timed_out => (
                                body.replayable() && app.codes.contains(&504) && app_left > 0,
                                true,
                            ),
                            // Sent, no answer: only an idempotent request we still hold.
                            None => (
                                idempotent
                                    && body.replayable()
                                    && matches!(error, ProxyError::UpstreamReset { .. })
                                    && safe_left > 0,
                                false,
                            ),
                        };
                        if !can {
                            return Err(error);
                        }
                        // A connection that could not be made cost the peer nothing: moving on to
                        // another target (at most `safe_retries` times, never the same one twice)
                        // needs no budget. Anything that reached a peer does.
                        if !sent_nothing && !budget.withdraw() {
                            layer.metrics.retry_budget_exhausted.inc();
                            return Err(error);
                        }
                        if as_app {
                            app_left -= 1;
                        } else {
                            safe_left -= 1;
                        }
                        last = Some(Err(error));
                        as_app
                    }
                };
                after_app_failure = app_retry;
                if app_retry && let Some(b) = app.backoff {
                    tokio::time::sleep(backoff(b, app_retries_done, rand::random())).await;
                    app_retries_done += 1;
                }
            }
        })
    }
}

/// The wait before an app retry: the route's backoff doubled per retry already made (at most
/// 32 times), plus up to half again of jitter so callers that failed together do not retry
/// together.
fn backoff(base: Duration, done: u32, roll: u64) -> Duration {
    let wait = base.saturating_mul(1 << done.min(5));
    let jitter_ms = (wait.as_millis() as u64 / 2).max(1);
    wait + Duration::from_millis(roll % jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::{routed_request, table_with_policy};
    use fedmesh_api::pb::dataplane as pb;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A policy whose one rule retries gateway failures `attempts` times.
    fn retrying(attempts: u32) -> pb::TrafficPolicy {
        pb::TrafficPolicy {
            routes: vec![pb::Route {
                name: "all".into(),
                retry: Some(pb::Retry {
                    codes: vec![],
                    attempts,
                    backoff_ms: 0,
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

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

        // A 502 from the app: no retry without a rule's retry, two with one.
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, BudgetConfig::default()).layer(answering(502, false, n.clone()));
        svc.call(routed_request(&table, "shop/web")).await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 1);
        let with_retries = table_with_policy(retrying(2));
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, BudgetConfig::default()).layer(answering(502, false, n.clone()));
        svc.call(routed_request(&with_retries, "shop/web"))
            .await
            .unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_when_every_backend_fails() {
        let table = table_with_policy(retrying(3));
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

    #[tokio::test(start_paused = true)]
    async fn a_routes_retry_names_its_codes_attempts_and_backoff_and_attempts_have_their_own_limit()
    {
        let table = table_with_policy(pb::TrafficPolicy {
            routes: vec![pb::Route {
                name: "all".into(),
                retry: Some(pb::Retry {
                    codes: vec![500, 504],
                    attempts: 2,
                    backoff_ms: 100,
                }),
                backend_timeout_ms: 1000,
                ..Default::default()
            }],
            ..Default::default()
        });
        // 500 is retried here (a TrafficPolicy would not), twice, waiting 100 ms then 200 ms
        // (plus up to half again of jitter).
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, BudgetConfig::default()).layer(answering(500, false, n.clone()));
        let start = Instant::now();
        let resp = svc.call(routed_request(&table, "shop/web")).await.unwrap();
        let waited = start.elapsed();
        assert_eq!(
            (resp.status().as_u16(), n.load(Ordering::Relaxed)),
            (500, 3)
        );
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(450),
            "{waited:?}"
        );
        // 502 is not among the route's codes.
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, BudgetConfig::default()).layer(answering(502, false, n.clone()));
        svc.call(routed_request(&table, "shop/web")).await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 1);

        // Each attempt gets one second; one past it counts as a 504, which the route retries.
        let n = Arc::new(AtomicU32::new(0));
        let count = n.clone();
        let slow = tower::service_fn(move |_req: Request<Body>| {
            count.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(Response::new(full("")))
            }) as BoxFuture<Result<Response<Body>, AttemptError>>
        });
        let mut svc = layer(3, BudgetConfig::default()).layer(slow);
        let start = Instant::now();
        let err = svc
            .call(routed_request(&table, "shop/web"))
            .await
            .unwrap_err();
        assert_eq!((err.kind(), err.status().as_u16()), ("timeout", 504));
        assert_eq!(n.load(Ordering::Relaxed), 3);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_doubling() {
        let b = Duration::from_millis(100);
        assert_eq!(backoff(b, 0, 0), b);
        assert_eq!(backoff(b, 1, 0), Duration::from_millis(200));
        assert!(backoff(b, 1, u64::MAX) < Duration::from_millis(300));
        assert_eq!(backoff(b, 40, 0), Duration::from_millis(3200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_could_not_be_made_moves_on_even_with_the_budget_spent() {
        let table = table_with_policy(pb::TrafficPolicy::default());
        let spent = BudgetConfig {
            ratio: 0.0,
            min_per_second: 0,
            window: Duration::from_secs(10),
        };
        let n = Arc::new(AtomicU32::new(0));
        let count = n.clone();
        let refused_once = tower::service_fn(move |req: Request<Body>| {
            let first = count.fetch_add(1, Ordering::Relaxed) == 0;
            Box::pin(std::future::ready(if first {
                Err(AttemptError {
                    error: ProxyError::Connect {
                        label: "connect_failed",
                        bad_peer: false,
                        message: "refused".into(),
                    },
                    unsent: Some(req),
                })
            } else {
                Ok(Response::new(full("")))
            })) as BoxFuture<Result<Response<Body>, AttemptError>>
        });
        let mut svc = layer(3, spent.clone()).layer(refused_once);
        assert!(svc.call(routed_request(&table, "shop/web")).await.is_ok());
        assert_eq!(n.load(Ordering::Relaxed), 2);
        // A peer that was reached and failed is retried only with budget.
        let n = Arc::new(AtomicU32::new(0));
        let mut svc = layer(3, spent).layer(answering(503, true, n.clone()));
        svc.call(routed_request(&table, "shop/web")).await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 1);
    }
}
