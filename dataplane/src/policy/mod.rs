//! A service's routing policy, compiled once per configuration from the control plane's
//! policy — its Gateway API routes (HTTPRoute, GRPCRoute) and its TrafficPolicy: durations as
//! `Duration`, clusters as `ClusterName`, matchers ready to run ([`matchers`]), filters and
//! backends typed ([`filters`]), callers as parsed patterns. The request path only runs them.

mod authn;
mod authz;
mod filters;
mod matchers;
mod traffic;

use std::time::Duration;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{ClusterName, SpiffeId, TrustDomain};
use http::{HeaderMap, Method, Uri};

pub use authn::{Authn, Claims, Unauthenticated};
pub use authz::{Authz, CallerRules, Denial, HttpRequest, Subject, Verdict, namespace_of};
pub use filters::{
    BackendTarget, Filter, HeaderModifier, Mirror, PathModifier, Redirect, Rewrite, RouteBackend,
};
pub use matchers::{GrpcMatch, Matcher, PathMatch, RouteMatch};
pub use traffic::{
    Abort, CircuitBreaker, Fault, HashKey, LoadBalancing, MILLION, Outlier, RateLimit,
};

/// A share of traffic for one cluster (or, with `cluster: None`, wherever locality routing
/// sends it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterShare {
    pub cluster: Option<ClusterName>,
    pub weight: u32,
}

/// Gateway API retries (GEP-1731): which codes, how many times, how far apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Response codes retried (connection failures always are).
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: u32,
    /// The least wait between attempts.
    pub backoff: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// Where it came from (`HTTPRoute shop/web-canary`; "" for a TrafficPolicy rule).
    pub source: String,
    /// Any of them (none: every request).
    pub matches: Vec<RouteMatch>,
    /// Gateway API backendRefs, chosen among by weight (none: the service itself).
    pub route_backends: Vec<RouteBackend>,
    pub filters: Vec<Filter>,
    /// The whole request's limit.
    pub timeout: Option<Duration>,
    /// One attempt's limit.
    pub backend_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// The service port it binds; `None`: every port.
    pub port: Option<u16>,
    /// A consumer route: only for callers of this namespace.
    pub consumer_namespace: Option<String>,
    pub grpc: bool,
    /// Why the rule cannot be applied: its requests are answered 500 with this.
    pub invalid: Option<String>,
    /// From a TrafficPolicy targeting the route.
    pub fault: Option<Fault>,
    pub rate_limit: Option<RateLimit>,
}

impl Route {
    /// The prefix the request matched, for ReplacePrefixMatch (the rule has exactly one match).
    pub fn matched_prefix(&self) -> Option<&str> {
        self.matches
            .first()
            .and_then(|m| m.path.as_ref())
            .and_then(PathMatch::prefix)
    }
}

/// What a request's route is.
#[derive(Debug)]
pub enum Selected<'p> {
    /// Index in [`Policy::routes`] and the route.
    Route(usize, &'p Route),
    /// Routes bind this port and none matches: answered 404.
    NoMatch,
    /// No route concerns this request: the service's defaults apply.
    Default,
}

/// Who may call a service: an exact SPIFFE ID, or every ID under a path prefix (`.../*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerPattern {
    Exact(SpiffeId),
    /// IDs of `trust_domain` whose path starts with `path_prefix` (which ends in `/`).
    Prefix {
        trust_domain: TrustDomain,
        path_prefix: String,
    },
}

impl CallerPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') => {
                // Parsed as the ID of the prefix without its last slash: the same checks apply.
                let id = SpiffeId::new(prefix.trim_end_matches('/'))
                    .map_err(|e| format!("caller pattern {s:?}: {e}"))?;
                Ok(Self::Prefix {
                    trust_domain: id.trust_domain().clone(),
                    path_prefix: format!("{}/", id.path()),
                })
            }
            Some(_) => Err(format!(
                "caller pattern {s:?}: a wildcard must be a whole last segment (spiffe://TD/ns/NS/*)"
            )),
            None => SpiffeId::new(s)
                .map(Self::Exact)
                .map_err(|e| format!("caller {s:?}: {e}")),
        }
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(e) => e == id,
            Self::Prefix {
                trust_domain,
                path_prefix,
            } => id.trust_domain() == trust_domain && id.path().starts_with(path_prefix.as_str()),
        }
    }
}

/// The name a TrafficPolicy's `allowedCallers` goes by as an ALLOW policy.
pub const ALLOWED_CALLERS: &str = "TrafficPolicy allowedCallers";

/// A service's compiled policy. The default is plain locality routing with no limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// In precedence order: the first that matches wins.
    pub routes: Vec<Route>,
    /// Who may call it: its AuthorizationPolicies, and its TrafficPolicy's `allowedCallers` as
    /// an ALLOW policy. Empty: any authenticated caller.
    pub authz: Authz,
    /// The JWTs a request must carry (its RequestAuthentications).
    pub authn: Authn,
    /// PeerAuthentication PERMISSIVE: plain text from outside the mesh is admitted too.
    pub permissive: bool,
    /// The text of the TrafficPolicy's `allowedCallers`, for messages.
    pub allowed_callers_text: Vec<String>,
    pub connect_timeout: Option<Duration>,
    /// Routes came from Gateway API: a request to a bound port that matches none gets 404.
    pub exhaustive: bool,
    /// Injected by callers into every request (a route's own fault comes first).
    pub fault: Option<Fault>,
    /// Enforced by the service's own sidecars on what they admit.
    pub rate_limit: Option<RateLimit>,
    /// This cluster's share of a clusterset-wide limit (its sidecars split it among themselves).
    pub clusterset_rate_limit: Option<RateLimit>,
    pub circuit_breaker: CircuitBreaker,
    pub outlier: Outlier,
    pub load_balancing: LoadBalancing,
}

fn millis(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms.into()))
}

fn route_of(r: &pb::Route) -> Result<Route, String> {
    let matches = r
        .matches
        .iter()
        .map(RouteMatch::try_from)
        .collect::<Result<Vec<_>, String>>()?;
    let route_backends = r
        .backend_refs
        .iter()
        .map(|b| {
            Ok(RouteBackend {
                target: filters::backend_target(b)?,
                weight: b.weight,
                filters: filters::filters(&b.filters)?,
                signals: (!b.signals.is_empty()).then(|| b.signals.as_str().into()),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Route {
        name: r.name.clone(),
        source: r.source.clone(),
        matches,
        route_backends,
        filters: filters::filters(&r.filters)?,
        timeout: millis(r.timeout_ms),
        backend_timeout: millis(r.backend_timeout_ms),
        retry: r.retry.as_ref().map(|x| RetryPolicy {
            codes: x
                .codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            attempts: x.attempts,
            backoff: millis(x.backoff_ms),
        }),
        port: u16::try_from(r.port).ok().filter(|p| *p > 0),
        consumer_namespace: (!r.consumer_namespace.is_empty())
            .then(|| r.consumer_namespace.clone()),
        grpc: r.grpc,
        invalid: (!r.invalid.is_empty()).then(|| r.invalid.clone()),
        fault: r
            .fault
            .as_ref()
            .map(Fault::try_from)
            .transpose()
            .map_err(|e| format!("fault: {e}"))?,
        rate_limit: r
            .rate_limit
            .as_ref()
            .map(RateLimit::try_from)
            .transpose()
            .map_err(|e| format!("rate limit: {e}"))?,
    })
}

impl TryFrom<&pb::TrafficPolicy> for Policy {
    type Error = String;

    fn try_from(p: &pb::TrafficPolicy) -> Result<Self, String> {
        let routes = p
            .routes
            .iter()
            .map(|r| route_of(r).map_err(|e| format!("route {:?}: {e}", r.name)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            routes,
            authz: {
                let mut authz = Authz::try_from(&p.authorization[..])
                    .map_err(|e| format!("authorization: {e}"))?;
                if !p.allowed_callers.is_empty() {
                    authz.allow_callers(
                        ALLOWED_CALLERS,
                        p.allowed_callers
                            .iter()
                            .map(|c| CallerPattern::parse(c))
                            .collect::<Result<_, _>>()?,
                    );
                }
                authz
            },
            authn: Authn::from(&p.request_authn[..]),
            permissive: p.mtls_mode == pb::MtlsMode::MtlsPermissive as i32,
            allowed_callers_text: p.allowed_callers.clone(),
            connect_timeout: millis(p.connect_timeout_ms),
            exhaustive: p.exhaustive,
            fault: p
                .fault
                .as_ref()
                .map(Fault::try_from)
                .transpose()
                .map_err(|e| format!("fault: {e}"))?,
            rate_limit: p
                .rate_limit
                .as_ref()
                .map(RateLimit::try_from)
                .transpose()
                .map_err(|e| format!("rate limit: {e}"))?,
            // Bursts of a tenth of the share: over a window the clusterset's total stays close to
            // the limit even as shares move.
            clusterset_rate_limit: p
                .clusterset_rate_limit
                .as_ref()
                .map(|r| {
                    RateLimit::try_from(&pb::RateLimit {
                        burst: (r.requests / 10).max(1),
                        ..*r
                    })
                })
                .transpose()
                .map_err(|e| format!("clusterset rate limit: {e}"))?,
            circuit_breaker: p
                .circuit_breaker
                .as_ref()
                .map(CircuitBreaker::from)
                .unwrap_or_default(),
            outlier: p.outlier.as_ref().map(Outlier::from).unwrap_or_default(),
            load_balancing: p
                .load_balancer
                .as_ref()
                .map(LoadBalancing::try_from)
                .transpose()
                .map_err(|e| format!("load balancer: {e}"))?
                .unwrap_or_default(),
        })
    }
}

impl Policy {
    /// The route of a request to service port `port` from a caller in namespace `caller_ns`:
    /// the first matching route of the caller's consumer routes when it has any for this port,
    /// else of the producer routes (routes are ordered by precedence when compiled).
    pub fn select(
        &self,
        port: u16,
        caller_ns: Option<&str>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Selected<'_> {
        let binds = |r: &Route| r.port.is_none_or(|p| p == port);
        let consumer = |r: &Route| {
            r.consumer_namespace.is_some() && r.consumer_namespace.as_deref() == caller_ns
        };
        let has_consumer = self.routes.iter().any(|r| binds(r) && consumer(r));
        let group = |r: &Route| {
            binds(r)
                && if has_consumer {
                    consumer(r)
                } else {
                    r.consumer_namespace.is_none()
                }
        };
        let mut any = false;
        for (i, r) in self.routes.iter().enumerate() {
            if !group(r) {
                continue;
            }
            any = true;
            if r.matches.is_empty() || r.matches.iter().any(|m| m.matches(method, uri, headers)) {
                return Selected::Route(i, r);
            }
        }
        if any && self.exhaustive {
            Selected::NoMatch
        } else {
            Selected::Default
        }
    }

    /// The cluster split a TrafficPolicy's converted v1alpha1 `backendRefs` give connections to
    /// `port` (opaque TCP has no request to route; Gateway API routes do not apply to it).
    pub fn connection_split(&self, port: u16) -> Vec<ClusterShare> {
        self.routes
            .iter()
            .find(|r| {
                r.source.starts_with("TrafficPolicy ")
                    && r.matches.is_empty()
                    && r.port.is_none_or(|p| p == port)
            })
            .map(|r| {
                r.route_backends
                    .iter()
                    .filter_map(|b| match &b.target {
                        BackendTarget::Parent(c) => Some(ClusterShare {
                            cluster: c.clone(),
                            weight: b.weight,
                        }),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn callers_match_exactly_or_by_whole_segment_prefix() {
        let web = id("spiffe://east.example/ns/shop/sa/web");
        let allows = |pats: &[&str]| {
            let p = Policy::try_from(&pb::TrafficPolicy {
                allowed_callers: pats.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .unwrap();
            p.authz
                .evaluate(&Subject {
                    caller: Some(&web),
                    port: 80,
                    http: None,
                })
                .denied_by
                .is_none()
        };
        assert!(allows(&["spiffe://east.example/ns/shop/sa/web"]));
        assert!(allows(&["spiffe://east.example/ns/shop/*"]));
        assert!(allows(&["spiffe://east.example/*"]));
        assert!(!allows(&["spiffe://west.example/*"]));
        assert!(!allows(&["spiffe://east.example/ns/shop/sa/we"]));
        assert!(allows(&[]), "no list: any authenticated caller");
        assert!(CallerPattern::parse("spiffe://east.example/ns/sho*").is_err());
    }

    #[test]
    fn policies_compile_once_with_clear_errors() {
        let cluster = |c: &str, weight| pb::BackendRef {
            kind: pb::backend_ref::Kind::Parent as i32,
            cluster: c.into(),
            weight,
            ..Default::default()
        };
        let p = Policy::try_from(&pb::TrafficPolicy {
            routes: vec![
                pb::Route {
                    name: "beta".into(),
                    matches: vec![pb::RouteMatch {
                        path_prefix: "/beta".into(),
                        headers: [("x-user".to_string(), "premium".to_string())].into(),
                        ..Default::default()
                    }],
                    timeout_ms: 1500,
                    ..Default::default()
                },
                pb::Route {
                    name: "default".into(),
                    source: "TrafficPolicy shop/web".into(),
                    backend_refs: vec![cluster("east", 80), cluster("west", 20)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.routes[0].timeout, Some(Duration::from_millis(1500)));
        let split = p.connection_split(80);
        assert_eq!(split.len(), 2);
        assert_eq!(split[0].cluster.as_ref().unwrap().as_str(), "east");
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("premium"));
        let uri: Uri = "/beta/x".parse().unwrap();
        let name = |h: &HeaderMap| match p.select(80, None, &Method::GET, &uri, h) {
            Selected::Route(_, r) => Some(r.name.clone()),
            _ => None,
        };
        assert_eq!(name(&h).as_deref(), Some("beta"));
        assert_eq!(name(&HeaderMap::new()).as_deref(), Some("default"));

        let bad = Policy::try_from(&pb::TrafficPolicy {
            routes: vec![pb::Route {
                backend_refs: vec![cluster("Not_A_Cluster", 1)],
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap_err();
        assert!(bad.contains("backend cluster"), "{bad}");
    }
}
