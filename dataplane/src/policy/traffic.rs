//! What a TrafficPolicy adds to routes, compiled: injected faults, rate limits, circuit-breaker
//! limits, failure accrual and the load-balancing algorithm — the parts of a mesh's traffic
//! policy Gateway API has no field for.

use std::time::Duration;

use fedmesh_api::pb::dataplane as pb;
use http::StatusCode;

use super::matchers::Matcher;

/// One in a million: shares are kept in parts per million.
pub const MILLION: u32 = 1_000_000;

/// Faults injected into a share of requests, optionally only those carrying given headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Wait this long before the request goes on, for `delay_ppm` of requests.
    pub delay: Option<(Duration, u32)>,
    /// Answer at once, for `abort_ppm` of requests.
    pub abort: Option<(Abort, u32)>,
    /// Only requests with each of these headers (any, when empty).
    pub headers: Vec<(http::HeaderName, Matcher)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// A gRPC status code, answered trailers-only with HTTP 200.
    Grpc(u32),
}

impl Fault {
    /// Whether the fault concerns a request with these headers.
    pub fn applies(&self, headers: &http::HeaderMap) -> bool {
        self.headers.iter().all(|(n, m)| {
            headers
                .get_all(n)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        })
    }
}

/// A token bucket: `requests` per `period`, bursts up to `burst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub period: Duration,
    pub burst: u32,
    /// One bucket per caller SPIFFE ID.
    pub per_caller: bool,
}

/// How a limit reads in messages: `100 requests per 1s`.
impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} requests per {:?}", self.requests, self.period)
    }
}

/// How much a caller's sidecar sends to a service at once (`None`: no limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

/// Failure accrual for one service (`None` fields keep the sidecar's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: Option<u32>,
    pub base_ejection: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
}

/// What a consistent hash is computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    /// The caller's own identity: every request of one caller goes to one endpoint.
    SourceIdentity,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    /// The less loaded of two random endpoints.
    #[default]
    LeastRequest,
    RoundRobin,
    ConsistentHash(HashKey),
}

fn nonzero(n: u32) -> Option<u32> {
    (n > 0).then_some(n)
}

fn share(ppm: u32, what: &str) -> Result<u32, String> {
    if ppm > MILLION {
        return Err(format!("{what} is more than 100%"));
    }
    Ok(ppm)
}

impl TryFrom<&pb::Fault> for Fault {
    type Error = String;

    fn try_from(f: &pb::Fault) -> Result<Self, String> {
        let delay = (f.delay_ms > 0 && f.delay_ppm > 0)
            .then(|| {
                share(f.delay_ppm, "the delay's share")
                    .map(|p| (Duration::from_millis(f.delay_ms.into()), p))
            })
            .transpose()?;
        let abort = match (f.abort_status, f.abort_grpc_status) {
            _ if f.abort_ppm == 0 => None,
            (0, 0) => None,
            (s, 0) => Some(Abort::Http(
                StatusCode::from_u16(u16::try_from(s).unwrap_or(0))
                    .map_err(|_| format!("abort status {s} is not an HTTP status"))?,
            )),
            (0, g) if g <= 16 => Some(Abort::Grpc(g)),
            (0, g) => return Err(format!("abort grpcStatus {g} is not a gRPC status (1-16)")),
            _ => return Err("an abort has an HTTP or a gRPC status, not both".into()),
        }
        .map(|a| share(f.abort_ppm, "the abort's share").map(|p| (a, p)))
        .transpose()?;
        let headers = f
            .headers
            .iter()
            .map(|h| {
                Ok((
                    http::HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|e| format!("header {:?}: {e}", h.name))?,
                    Matcher::new(&h.value, h.regex)?,
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            delay,
            abort,
            headers,
        })
    }
}

impl TryFrom<&pb::RateLimit> for RateLimit {
    type Error = String;

    fn try_from(r: &pb::RateLimit) -> Result<Self, String> {
        if r.requests == 0 || r.period_ms == 0 {
            return Err("a rate limit needs requests and a period above 0".into());
        }
        Ok(Self {
            requests: r.requests,
            period: Duration::from_millis(r.period_ms.into()),
            burst: if r.burst == 0 { r.requests } else { r.burst },
            per_caller: r.per_caller,
        })
    }
}

impl From<&pb::CircuitBreaker> for CircuitBreaker {
    fn from(c: &pb::CircuitBreaker) -> Self {
        Self {
            max_connections: nonzero(c.max_connections),
            max_pending_requests: nonzero(c.max_pending_requests),
            max_requests: nonzero(c.max_requests),
            max_retries: nonzero(c.max_retries),
        }
    }
}

impl From<&pb::OutlierDetection> for Outlier {
    fn from(o: &pb::OutlierDetection) -> Self {
        Self {
            consecutive_failures: nonzero(o.consecutive_failures),
            base_ejection: nonzero(o.base_ejection_ms).map(|ms| Duration::from_millis(ms.into())),
            max_ejection_percent: nonzero(o.max_ejection_percent).map(|p| p.min(100)),
        }
    }
}

impl TryFrom<&pb::LoadBalancer> for LoadBalancing {
    type Error = String;

    fn try_from(l: &pb::LoadBalancer) -> Result<Self, String> {
        use pb::load_balancer::Type;
        Ok(match Type::try_from(l.r#type) {
            Ok(Type::LeastRequest) => Self::LeastRequest,
            Ok(Type::RoundRobin) => Self::RoundRobin,
            Ok(Type::ConsistentHash) => Self::ConsistentHash(
                match (
                    l.hash_header.as_str(),
                    l.hash_cookie.as_str(),
                    l.hash_source_identity,
                ) {
                    (h, "", false) if !h.is_empty() => HashKey::Header(
                        http::HeaderName::from_bytes(h.as_bytes())
                            .map_err(|e| format!("hash header {h:?}: {e}"))?,
                    ),
                    ("", c, false) if !c.is_empty() => HashKey::Cookie(c.to_string()),
                    ("", "", true) => HashKey::SourceIdentity,
                    _ => {
                        return Err(
                            "a consistent hash needs exactly one key: a header, a cookie or the source identity"
                                .into(),
                        );
                    }
                },
            ),
            Err(_) => return Err(format!("load balancer type {} is unknown", l.r#type)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_and_limits_compile_with_clear_errors() {
        let f = Fault::try_from(&pb::Fault {
            delay_ms: 2000,
            delay_ppm: 100_000,
            abort_status: 503,
            abort_ppm: 50_000,
            headers: vec![pb::ValueMatch {
                name: "x-fault".into(),
                value: "1".into(),
                regex: false,
            }],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(f.delay, Some((Duration::from_secs(2), 100_000)));
        assert_eq!(
            f.abort,
            Some((Abort::Http(StatusCode::SERVICE_UNAVAILABLE), 50_000))
        );
        let mut h = http::HeaderMap::new();
        assert!(!f.applies(&h));
        h.insert("x-fault", http::HeaderValue::from_static("1"));
        assert!(f.applies(&h));
        let both = Fault::try_from(&pb::Fault {
            abort_status: 503,
            abort_grpc_status: 14,
            abort_ppm: 1,
            ..Default::default()
        })
        .unwrap_err();
        assert!(both.contains("not both"), "{both}");
        assert!(
            RateLimit::try_from(&pb::RateLimit::default())
                .unwrap_err()
                .contains("above 0")
        );
        let lb = LoadBalancing::try_from(&pb::LoadBalancer {
            r#type: pb::load_balancer::Type::ConsistentHash as i32,
            hash_header: "x-user".into(),
            hash_source_identity: true,
            ..Default::default()
        })
        .unwrap_err();
        assert!(lb.contains("exactly one key"), "{lb}");
    }
}
