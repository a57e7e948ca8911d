//! What a route does to a request besides choosing where it goes: header modifiers, URL
//! rewrites, redirects, mirroring — and the backends it chooses among. Compiled once; applied
//! per request by the sidecar's filter layer.

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{ClusterName, ServiceKey};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Set, add and remove headers (each name gets one action).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, h: &mut HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            // Joined with "," and no space: what Gateway API conformance expects to arrive.
            let joined = h
                .get_all(n)
                .iter()
                .map(|x| x.as_bytes())
                .chain(std::iter::once(v.as_bytes()))
                .collect::<Vec<_>>()
                .join(&b","[..]);
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                h.insert(n.clone(), value);
            }
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

/// How a path is rewritten (in a redirect's Location, or before forwarding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    Full(String),
    /// Replaces the route's matched prefix.
    Prefix(String),
}

impl PathModifier {
    /// The new path for `path`, which matched the prefix `matched` (stored without a trailing
    /// slash, "" for `/`).
    pub fn apply(&self, path: &str, matched: Option<&str>) -> String {
        match self {
            Self::Full(p) => p.clone(),
            Self::Prefix(replacement) => {
                let matched = matched.unwrap_or("");
                let rest = path.strip_prefix(matched).unwrap_or(path);
                let replacement = replacement.trim_end_matches('/');
                let out = if rest.is_empty() || rest == "/" {
                    if replacement.is_empty() {
                        "/".to_string()
                    } else if rest == "/" {
                        format!("{replacement}/")
                    } else {
                        replacement.to_string()
                    }
                } else {
                    format!("{replacement}{rest}")
                };
                if out.starts_with('/') {
                    out
                } else {
                    format!("/{out}")
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

/// Where a route sends a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendTarget {
    /// The route's own service: in one cluster, or wherever locality sends it.
    Parent(Option<ClusterName>),
    /// A Service of this cluster only.
    Service { key: ServiceKey, port: Option<u16> },
    /// A service in every cluster exporting it.
    Import { key: ServiceKey, port: Option<u16> },
    /// Resolves to nothing: its share of requests is answered 500.
    Unresolved,
}

impl BackendTarget {
    /// The service whose targets this backend routes to (None: the parent).
    pub fn service(&self) -> Option<&ServiceKey> {
        match self {
            Self::Service { key, .. } | Self::Import { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteBackend {
    pub target: BackendTarget,
    pub weight: u32,
    /// Applied only when this backend is chosen.
    pub filters: Vec<Filter>,
    /// Requests drawn to it are counted under this name for a rollout's analysis
    /// ([`crate::signals`]).
    pub signals: Option<std::sync::Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub backend: BackendTarget,
    pub numerator: u32,
    pub denominator: u32,
    /// The copies' answers are counted under this name for a rollout's analysis.
    pub signals: Option<std::sync::Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

fn header_modifier(m: &pb::HeaderModifier) -> Result<HeaderModifier, String> {
    let pairs = |list: &[pb::Header]| {
        list.iter()
            .map(|h| {
                Ok((
                    HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|e| format!("header name {:?}: {e}", h.name))?,
                    HeaderValue::from_str(&h.value)
                        .map_err(|e| format!("header {} value: {e}", h.name))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(HeaderModifier {
        set: pairs(&m.set)?,
        add: pairs(&m.add)?,
        remove: m
            .remove
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("{n:?}: {e}")))
            .collect::<Result<_, _>>()?,
    })
}

fn path_modifier(p: &Option<pb::PathModifier>) -> Option<PathModifier> {
    p.as_ref().map(|p| {
        if p.full {
            PathModifier::Full(p.value.clone())
        } else {
            PathModifier::Prefix(p.value.clone())
        }
    })
}

fn port(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p > 0)
}

pub(crate) fn backend_target(b: &pb::BackendRef) -> Result<BackendTarget, String> {
    if b.unresolved {
        return Ok(BackendTarget::Unresolved);
    }
    let key = || {
        b.service
            .parse::<ServiceKey>()
            .map_err(|e| format!("backend {:?}: {e}", b.service))
    };
    Ok(match pb::backend_ref::Kind::try_from(b.kind) {
        Ok(pb::backend_ref::Kind::Parent) => BackendTarget::Parent(
            (!b.cluster.is_empty())
                .then(|| ClusterName::new(&b.cluster))
                .transpose()
                .map_err(|e| format!("backend cluster {:?}: {e}", b.cluster))?,
        ),
        Ok(pb::backend_ref::Kind::Service) => BackendTarget::Service {
            key: key()?,
            port: port(b.port),
        },
        Ok(pb::backend_ref::Kind::ServiceImport) => BackendTarget::Import {
            key: key()?,
            port: port(b.port),
        },
        Err(_) => return Err(format!("backend kind {} is unknown", b.kind)),
    })
}

impl TryFrom<&pb::Filter> for Filter {
    type Error = String;

    fn try_from(f: &pb::Filter) -> Result<Self, String> {
        use pb::filter::Kind;
        Ok(match &f.kind {
            Some(Kind::RequestHeaders(m)) => Self::RequestHeaders(header_modifier(m)?),
            Some(Kind::ResponseHeaders(m)) => Self::ResponseHeaders(header_modifier(m)?),
            Some(Kind::Redirect(r)) => Self::Redirect(Redirect {
                scheme: (!r.scheme.is_empty()).then(|| r.scheme.clone()),
                hostname: (!r.hostname.is_empty()).then(|| r.hostname.clone()),
                path: path_modifier(&r.path),
                port: port(r.port),
                status: StatusCode::from_u16(r.status.clamp(100, 599) as u16)
                    .map_err(|e| e.to_string())?,
            }),
            Some(Kind::Rewrite(r)) => Self::Rewrite(Rewrite {
                hostname: (!r.hostname.is_empty())
                    .then(|| HeaderValue::from_str(&r.hostname))
                    .transpose()
                    .map_err(|e| format!("rewrite hostname: {e}"))?,
                path: path_modifier(&r.path),
            }),
            Some(Kind::Mirror(m)) => {
                let backend = m.backend.as_ref().ok_or("a mirror needs a backend")?;
                Self::Mirror(Mirror {
                    backend: backend_target(backend)?,
                    numerator: m.numerator,
                    denominator: m.denominator.max(1),
                    signals: (!backend.signals.is_empty()).then(|| backend.signals.as_str().into()),
                })
            }
            None => return Err("a filter without a kind".into()),
        })
    }
}

pub(crate) fn filters(list: &[pb::Filter]) -> Result<Vec<Filter>, String> {
    list.iter().map(Filter::try_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_follows_the_gateway_api_table() {
        for (path, matched, replace, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/strip-prefix/three", "/strip-prefix", "/", "/three"),
            (
                "/original-prefix/lemon",
                "/original-prefix",
                "/replacement-prefix",
                "/replacement-prefix/lemon",
            ),
        ] {
            assert_eq!(
                PathModifier::Prefix(replace.into()).apply(path, Some(matched)),
                want,
                "{path} {matched} {replace}"
            );
        }
        assert_eq!(
            PathModifier::Full("/one".into()).apply("/full/one/two", Some("/full/one")),
            "/one"
        );
    }

    #[test]
    fn header_modifiers_set_append_with_commas_and_remove_case_insensitively() {
        let m = HeaderModifier {
            set: vec![(
                HeaderName::from_static("x-header-set"),
                HeaderValue::from_static("set"),
            )],
            add: vec![(
                HeaderName::from_static("x-header-add"),
                HeaderValue::from_static("added"),
            )],
            remove: vec![HeaderName::from_static("x-header-remove")],
        };
        let mut h = HeaderMap::new();
        h.insert("X-Header-Set", HeaderValue::from_static("old"));
        h.append("x-header-add", HeaderValue::from_static("a"));
        h.append("x-header-add", HeaderValue::from_static("b"));
        h.insert("X-HEADER-REMOVE", HeaderValue::from_static("x"));
        m.apply(&mut h);
        assert_eq!(h["x-header-set"], "set");
        assert_eq!(h["x-header-add"], "a,b,added");
        assert!(h.get("x-header-remove").is_none());
    }
}
