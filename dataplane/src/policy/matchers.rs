//! When a route applies: path (Exact, PathPrefix by whole segments, RegularExpression), headers,
//! query parameters, method, and for gRPC the service and method of `:path` — compiled once,
//! run per request without parsing configuration.

use fedmesh_api::pb::dataplane as pb;
use http::{HeaderMap, HeaderName, Method, Uri};
use regex::Regex;

/// A string matcher: exact, or a regular expression that must match the whole value.
#[derive(Clone, Debug)]
pub enum Matcher {
    Exact(String),
    Regex(Regex),
}

impl Matcher {
    pub fn new(value: &str, regex: bool) -> Result<Self, String> {
        if regex {
            // Anchored: a regex match covers the whole value, as Gateway API implementations do.
            Regex::new(&format!("^(?:{value})$"))
                .map(Self::Regex)
                .map_err(|e| format!("{value:?} is not a regular expression: {e}"))
        } else {
            Ok(Self::Exact(value.to_string()))
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Regex(r) => r.is_match(v),
        }
    }
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for Matcher {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// Whole path segments: `/abc` matches `/abc`, `/abc/` and `/abc/def`, not `/abcd`. Stored
    /// without a trailing `/` ("" for `/`, which matches every path).
    Prefix(String),
    Exact(String),
    Regex(Matcher),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Prefix(p) => {
                p.is_empty()
                    || path == p
                    || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            Self::Exact(e) => path == e,
            Self::Regex(r) => r.matches(path),
        }
    }

    /// The matched prefix, for ReplacePrefixMatch.
    pub fn prefix(&self) -> Option<&str> {
        match self {
            Self::Prefix(p) => Some(p),
            _ => None,
        }
    }
}

/// The service and method of a gRPC call (`:path` = `/SERVICE/METHOD`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcMatch {
    pub service: Option<Matcher>,
    pub method: Option<Matcher>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<(HeaderName, Matcher)>,
    pub query: Vec<(String, Matcher)>,
    pub method: Option<Method>,
    pub grpc: Option<GrpcMatch>,
}

impl RouteMatch {
    pub fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        if let Some(m) = &self.method
            && m != method
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches(uri.path())
        {
            return false;
        }
        if let Some(g) = &self.grpc {
            let mut parts = uri.path().trim_start_matches('/').splitn(2, '/');
            let (service, rpc) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if g.service.as_ref().is_some_and(|m| !m.matches(service))
                || g.method.as_ref().is_some_and(|m| !m.matches(rpc))
            {
                return false;
            }
        }
        let headers_ok = self.headers.iter().all(|(name, m)| {
            let mut values = headers.get_all(name).iter();
            // Repeated headers: each value is tried (RFC 9110 lets them be joined by commas).
            values.any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        });
        if !headers_ok {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        let pairs: Vec<(String, String)> = uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        self.query.iter().all(|(name, m)| {
            // The first value of a repeated parameter counts.
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .is_some_and(|(_, v)| m.matches(v))
        })
    }
}

fn value_matches(list: &[pb::ValueMatch], what: &str) -> Result<Vec<(String, Matcher)>, String> {
    list.iter()
        .map(|m| {
            Ok((
                m.name.clone(),
                Matcher::new(&m.value, m.regex).map_err(|e| format!("{what} {}: {e}", m.name))?,
            ))
        })
        .collect()
}

impl TryFrom<&pb::RouteMatch> for RouteMatch {
    type Error = String;

    fn try_from(m: &pb::RouteMatch) -> Result<Self, String> {
        let path = match &m.path {
            Some(p) => Some(match pb::path_match::Type::try_from(p.r#type) {
                Ok(pb::path_match::Type::Exact) => PathMatch::Exact(p.value.clone()),
                Ok(pb::path_match::Type::Regex) => PathMatch::Regex(Matcher::new(&p.value, true)?),
                Ok(pb::path_match::Type::Prefix) => {
                    PathMatch::Prefix(p.value.trim_end_matches('/').to_string())
                }
                Err(_) => return Err(format!("path match type {} is unknown", p.r#type)),
            }),
            // The TrafficPolicy form: a prefix, or nothing.
            None if !m.path_prefix.is_empty() => Some(PathMatch::Prefix(
                m.path_prefix.trim_end_matches('/').to_string(),
            )),
            None => None,
        };
        let mut headers = value_matches(&m.header_matches, "header")?
            .into_iter()
            .map(|(n, v)| {
                HeaderName::from_bytes(n.as_bytes())
                    .map(|h| (h, v))
                    .map_err(|e| format!("header name {n:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (k, v) in &m.headers {
            headers.push((
                HeaderName::from_bytes(k.as_bytes())
                    .map_err(|e| format!("header name {k:?}: {e}"))?,
                Matcher::Exact(v.clone()),
            ));
        }
        headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let method = (!m.method.is_empty())
            .then(|| Method::from_bytes(m.method.as_bytes()))
            .transpose()
            .map_err(|e| format!("method {:?}: {e}", m.method))?;
        let grpc = (!m.grpc_service.is_empty() || !m.grpc_method.is_empty())
            .then(|| -> Result<GrpcMatch, String> {
                let part = |v: &str| {
                    (!v.is_empty())
                        .then(|| Matcher::new(v, m.grpc_regex))
                        .transpose()
                };
                Ok(GrpcMatch {
                    service: part(&m.grpc_service)?,
                    method: part(&m.grpc_method)?,
                })
            })
            .transpose()?;
        Ok(Self {
            path,
            headers,
            query: value_matches(&m.query_params, "query parameter")?,
            method,
            grpc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.trim_end_matches('/').to_string())
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        for (p, path, yes) in [
            ("/abc", "/abc", true),
            ("/abc", "/abc/", true),
            ("/abc", "/abc/def", true),
            ("/abc", "/abcd", false),
            ("/abc/", "/abc", true),
            ("/", "/anything", true),
            ("/v2", "/v2example", false),
            ("/v2", "/foo/v2/example", false),
        ] {
            assert_eq!(prefix(p).matches(path), yes, "{p} vs {path}");
        }
        assert!(PathMatch::Exact("/abc".into()).matches("/abc"));
        assert!(!PathMatch::Exact("/abc".into()).matches("/abc/"));
        let re = PathMatch::Regex(Matcher::new("/v[0-9]+/.*", true).unwrap());
        assert!(re.matches("/v12/x") && !re.matches("/x/v12/x"), "anchored");
    }

    #[test]
    fn queries_headers_methods_and_grpc_calls_match() {
        let m = RouteMatch::try_from(&pb::RouteMatch {
            path: Some(pb::PathMatch {
                r#type: pb::path_match::Type::Prefix as i32,
                value: "/".into(),
            }),
            header_matches: vec![pb::ValueMatch {
                name: "Version".into(),
                value: "one".into(),
                regex: false,
            }],
            query_params: vec![pb::ValueMatch {
                name: "animal".into(),
                value: "whale".into(),
                regex: false,
            }],
            method: "GET".into(),
            ..Default::default()
        })
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("version", "one".parse().unwrap());
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert!(m.matches(&Method::GET, &uri("/?animal=whale&x=1"), &h));
        assert!(!m.matches(&Method::POST, &uri("/?animal=whale"), &h));
        assert!(!m.matches(&Method::GET, &uri("/?animal=whaledolphin"), &h));
        assert!(!m.matches(&Method::GET, &uri("/?animal=whale"), &HeaderMap::new()));
        assert!(
            m.matches(&Method::GET, &uri("/?animal=whale&animal=dog"), &h),
            "first value"
        );

        let g = RouteMatch::try_from(&pb::RouteMatch {
            grpc_service: "echo.Echo".into(),
            grpc_method: "Say".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(g.matches(&Method::POST, &uri("/echo.Echo/Say"), &HeaderMap::new()));
        assert!(!g.matches(&Method::POST, &uri("/echo.Echo/Shout"), &HeaderMap::new()));
    }
}
