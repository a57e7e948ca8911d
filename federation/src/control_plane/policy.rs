//! TrafficPolicy objects → the data plane's policy, validated: a policy that cannot be applied is
//! refused with the reason (the directory source then keeps the file's last good version).

use std::collections::BTreeMap;
use std::time::Duration;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::policy::{ClusterBackendRef, Retries, Timeouts, TrafficPolicySpec};
use fedmesh_api::{ClusterName, SpiffeId};

use super::source::LocalObjects;

fn backends(refs: &[ClusterBackendRef], what: &str) -> Result<Vec<pb::WeightedBackend>, String> {
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        ClusterName::new(&r.cluster).map_err(|e| format!("{what}: {e}"))?;
        out.push(pb::WeightedBackend {
            cluster: r.cluster.clone(),
            weight: r.weight,
        });
    }
    if !out.is_empty() && out.iter().all(|b| b.weight == 0) {
        return Err(format!(
            "{what}: every weight is 0, so nothing could be routed"
        ));
    }
    Ok(out)
}

fn millis(s: &Option<String>, what: &str) -> Result<u32, String> {
    match s {
        None => Ok(0),
        Some(s) => {
            let d: Duration = humantime::parse_duration(s)
                .map_err(|e| format!("{what} {s:?}: {e} (write e.g. 500ms or 2s)"))?;
            u32::try_from(d.as_millis()).map_err(|_| format!("{what} {s:?} is too long"))
        }
    }
}

fn timeouts(t: &Option<Timeouts>, what: &str) -> Result<(u32, u32), String> {
    match t {
        None => Ok((0, 0)),
        Some(t) => Ok((
            millis(&t.connect, &format!("{what} timeouts.connect"))?,
            millis(&t.request, &format!("{what} timeouts.request"))?,
        )),
    }
}

fn retries(r: &Option<Retries>) -> Result<u32, String> {
    match r {
        Some(r) if r.attempts > 10 => {
            Err(format!("retries.attempts {} is more than 10", r.attempts))
        }
        Some(r) => Ok(r.attempts),
        None => Ok(0),
    }
}

/// Converts and validates a TrafficPolicy spec.
pub fn to_pb(spec: &TrafficPolicySpec) -> Result<pb::TrafficPolicy, String> {
    let (connect, request) = timeouts(&spec.timeouts, "spec")?;
    let mut routes = Vec::with_capacity(spec.rules.len());
    for (i, r) in spec.rules.iter().enumerate() {
        let what = format!("rules[{i}]");
        let mut matches = Vec::with_capacity(r.matches.len());
        for m in &r.matches {
            let path_prefix = match &m.path {
                None => String::new(),
                Some(p) if p.type_ == "PathPrefix" => {
                    if !p.value.starts_with('/') {
                        return Err(format!("{what}: path {:?} must start with /", p.value));
                    }
                    p.value.clone()
                }
                Some(p) => {
                    return Err(format!(
                        "{what}: path match type {:?} is not supported (use PathPrefix)",
                        p.type_
                    ));
                }
            };
            let mut headers = std::collections::HashMap::new();
            for h in &m.headers {
                http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("{what}: {:?} is not a header name", h.name))?;
                headers.insert(h.name.to_ascii_lowercase(), h.value.clone());
            }
            matches.push(pb::RouteMatch {
                path_prefix,
                headers,
                ..Default::default()
            });
        }
        let (_, rt) = timeouts(&r.timeouts, &what)?;
        routes.push(pb::Route {
            name: r.name.clone().unwrap_or_else(|| format!("rule-{i}")),
            matches,
            backends: backends(&r.backend_refs, &what)?,
            timeout_ms: rt,
            retries: retries(&r.retries)?,
            ..Default::default()
        });
    }
    let mut allowed = Vec::new();
    for c in spec.authorization.iter().flat_map(|a| &a.allowed_callers) {
        let id = c.strip_suffix("/*").unwrap_or(c);
        SpiffeId::new(id).map_err(|e| format!("authorization.allowedCallers {c:?}: {e}"))?;
        allowed.push(c.clone());
    }
    Ok(pb::TrafficPolicy {
        split: backends(&spec.backend_refs, "backendRefs")?,
        routes,
        allowed_callers: allowed,
        connect_timeout_ms: connect,
        request_timeout_ms: request,
        retries: retries(&spec.retries)?,
        exhaustive: false,
        ..Default::default()
    })
}

/// The policies of the source, by service key: TrafficPolicies (invalid ones are logged and
/// left out), with the routes of the Gateway API routes attached to each service. A service with
/// such routes routes by them alone (a request matching none is answered 404).
pub fn policies_of(
    local: &LocalObjects,
    routes: &super::routes::CompiledRoutes,
) -> BTreeMap<String, pb::TrafficPolicy> {
    let mut out: BTreeMap<String, pb::TrafficPolicy> = local
        .policies
        .iter()
        .filter_map(|(k, p)| match to_pb(&p.spec) {
            Ok(pb) => Some((k.to_string(), pb)),
            Err(e) => {
                tracing::warn!(service = %k, error = %e, "ignoring an invalid TrafficPolicy");
                None
            }
        })
        .collect();
    for (parent, list) in &routes.by_parent {
        let p = out.entry(parent.to_string()).or_default();
        if !p.routes.is_empty() {
            tracing::warn!(service = %parent, "HTTPRoute/GRPCRoute rules replace the rules of this service's TrafficPolicy");
        }
        p.routes = list.clone();
        p.exhaustive = true;
    }
    out
}
