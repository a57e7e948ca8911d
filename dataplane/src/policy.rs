//! A service's routing policy, compiled from the control plane's `TrafficPolicy` once per
//! configuration: durations as `Duration`, clusters as `ClusterName`, header matchers as
//! `HeaderName`/`HeaderValue`, callers as parsed patterns. The request path only runs them.

use std::time::Duration;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{ClusterName, SpiffeId, TrustDomain};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// A share of traffic for one cluster (or, with `cluster: None`, wherever locality routing
/// sends it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub cluster: Option<ClusterName>,
    pub weight: u32,
}

/// When a route applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    /// A path prefix ("" matches every path).
    pub path_prefix: String,
    /// Headers that must be present with exactly these values.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl RouteMatch {
    pub fn matches(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        uri.path().starts_with(self.path_prefix.as_str())
            && self
                .headers
                .iter()
                .all(|(k, v)| headers.get(k).is_some_and(|have| have == v))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// Any of them (none: every request).
    pub matches: Vec<RouteMatch>,
    /// The route's own split; empty uses the service's.
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
    /// Retries of gateway failures (502-504); 0 uses the service's.
    pub retries: u32,
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

/// A service's compiled policy. The default is plain locality routing with no limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub split: Vec<Backend>,
    /// First match wins.
    pub routes: Vec<Route>,
    /// Empty: any authenticated caller.
    pub allowed_callers: Vec<CallerPattern>,
    /// The text of `allowed_callers`, for messages.
    pub allowed_callers_text: Vec<String>,
    pub connect_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub retries: u32,
}

fn millis(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms.into()))
}

fn backends(list: &[pb::WeightedBackend]) -> Result<Vec<Backend>, String> {
    list.iter()
        .map(|b| {
            Ok(Backend {
                cluster: if b.cluster.is_empty() {
                    None
                } else {
                    Some(
                        ClusterName::new(&b.cluster)
                            .map_err(|e| format!("backend cluster {:?}: {e}", b.cluster))?,
                    )
                },
                weight: b.weight,
            })
        })
        .collect()
}

impl TryFrom<&pb::TrafficPolicy> for Policy {
    type Error = String;

    fn try_from(p: &pb::TrafficPolicy) -> Result<Self, String> {
        let routes = p
            .routes
            .iter()
            .map(|r| {
                let matches = r
                    .matches
                    .iter()
                    .map(|m| {
                        let mut headers = m
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                Ok((
                                    HeaderName::from_bytes(k.as_bytes())
                                        .map_err(|e| format!("header name {k:?}: {e}"))?,
                                    HeaderValue::from_str(v)
                                        .map_err(|e| format!("header {k} value {v:?}: {e}"))?,
                                ))
                            })
                            .collect::<Result<Vec<_>, String>>()?;
                        headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
                        Ok(RouteMatch {
                            path_prefix: m.path_prefix.clone(),
                            headers,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| format!("route {:?}: {e}", r.name))?;
                Ok(Route {
                    name: r.name.clone(),
                    matches,
                    backends: backends(&r.backends)
                        .map_err(|e| format!("route {:?}: {e}", r.name))?,
                    timeout: millis(r.timeout_ms),
                    retries: r.retries,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            split: backends(&p.split)?,
            routes,
            allowed_callers: p
                .allowed_callers
                .iter()
                .map(|c| CallerPattern::parse(c))
                .collect::<Result<_, _>>()?,
            allowed_callers_text: p.allowed_callers.clone(),
            connect_timeout: millis(p.connect_timeout_ms),
            request_timeout: millis(p.request_timeout_ms),
            retries: p.retries,
        })
    }
}

impl Policy {
    /// The first route matching the request.
    pub fn route(&self, uri: &Uri, headers: &HeaderMap) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(uri, headers)))
    }

    /// Whether `caller` may call the service.
    pub fn allows(&self, caller: &SpiffeId) -> bool {
        self.allowed_callers.is_empty() || self.allowed_callers.iter().any(|p| p.matches(caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            p.allows(&web)
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
        let p = Policy::try_from(&pb::TrafficPolicy {
            split: vec![pb::WeightedBackend {
                cluster: "east".into(),
                weight: 80,
            }],
            routes: vec![pb::Route {
                name: "beta".into(),
                matches: vec![pb::RouteMatch {
                    path_prefix: "/beta".into(),
                    headers: [("x-user".to_string(), "premium".to_string())].into(),
                    ..Default::default()
                }],
                timeout_ms: 1500,
                ..Default::default()
            }],
            request_timeout_ms: 2000,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(p.routes[0].timeout, Some(Duration::from_millis(1500)));
        assert_eq!(p.split[0].cluster.as_ref().unwrap().as_str(), "east");
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("premium"));
        let uri: Uri = "/beta/x".parse().unwrap();
        assert_eq!(p.route(&uri, &h).map(|r| r.name.as_str()), Some("beta"));
        assert!(p.route(&uri, &HeaderMap::new()).is_none());

        let bad = Policy::try_from(&pb::TrafficPolicy {
            split: vec![pb::WeightedBackend {
                cluster: "Not_A_Cluster".into(),
                weight: 1,
            }],
            ..Default::default()
        })
        .unwrap_err();
        assert!(bad.contains("backend cluster"), "{bad}");
    }
}
