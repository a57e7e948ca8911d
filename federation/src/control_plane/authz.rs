//! AuthorizationPolicies, checked and compiled for the callee's sidecars: each becomes a
//! `pb::AuthzPolicy` on every service it targets (its `targetRefs`, or every service of its
//! namespace), and a report for its status. A policy that does not validate is still compiled,
//! as `invalid`, so the sidecars fail closed (an ALLOW allows nothing, a DENY denies everything)
//! rather than open; its status says what is wrong.

use std::collections::BTreeMap;

use fedmesh_api::authz::{AuthzRuleSpec, AuthzTargetRef};
use fedmesh_api::gateway::reason;
use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{ClusterName, Namespace, ServiceKey, SpiffeId, TrustDomain};

use super::policy::{PolicyReport, policy_reason};
use super::routes::Cond;
use super::source::LocalObjects;
use super::state::ClusterSet;

pub const KIND: &str = "AuthorizationPolicy";
/// A trust domain no caller has: a source that names only unknown clusters matches nobody.
const NO_CALLER: &str = "no-caller.invalid";

/// The name the data plane knows a policy by (refusals, metrics, access logs).
pub fn data_plane_name(key: &ServiceKey) -> String {
    format!("{KIND} {key}")
}

/// The policies of each service (`namespace/name`), and a report per policy.
pub struct CompiledAuthz {
    pub by_service: BTreeMap<String, Vec<pb::AuthzPolicy>>,
    pub reports: Vec<PolicyReport>,
}

/// What the clusterset knows: each cluster's trust domain.
struct Clusters<'a> {
    cs: &'a ClusterSet,
    own: &'a ClusterName,
    own_td: &'a TrustDomain,
}

impl Clusters<'_> {
    fn trust_domain(&self, c: &ClusterName) -> Option<String> {
        if c == self.own {
            return Some(self.own_td.to_string());
        }
        self.cs
            .clusters
            .get(c)
            .map(|i| i.trust_domain.clone())
            .filter(|t| !t.is_empty())
    }
}

fn principal(p: &str) -> Result<String, String> {
    let id = match p.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('/') => prefix.trim_end_matches('/'),
        Some(_) => {
            return Err(format!(
                "principal {p:?}: a wildcard must be a whole last segment (spiffe://TD/ns/NS/*)"
            ));
        }
        None => p,
    };
    SpiffeId::new(id).map_err(|e| format!("principal {p:?}: {e}"))?;
    Ok(p.to_string())
}

fn path(p: &str) -> Result<String, String> {
    let body = p.strip_suffix('*').unwrap_or(p);
    if !p.starts_with('/') && p != "*" {
        return Err(format!("path {p:?} must start with '/'"));
    }
    if body.contains('*') {
        return Err(format!("path {p:?}: '*' may only end a path (a prefix)"));
    }
    Ok(p.to_string())
}

/// A `when` key: `request.headers[NAME]` (the header, lower case) or
/// `request.auth.claims[NAME]...` (the claim's path in the request's validated JWT).
fn condition_key(key: &str) -> Result<(String, Vec<String>), String> {
    if let Some(rest) = key.strip_prefix("request.auth.claims") {
        let path: Vec<String> = rest
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .map(|r| r.split("][").map(str::to_string).collect())
            .unwrap_or_default();
        if path.is_empty() || path.iter().any(|p| p.is_empty() || p.contains(['[', ']'])) {
            return Err(format!(
                "when key {key:?}: write request.auth.claims[NAME] (nested: [NAME][FIELD])"
            ));
        }
        return Ok((String::new(), path));
    }
    let name = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
        .ok_or_else(|| {
            format!("when key {key:?}: use request.headers[NAME] or request.auth.claims[NAME]")
        })?;
    http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("when key {key:?}: {name:?} is not a header name"))?;
    Ok((name.to_ascii_lowercase(), Vec::new()))
}

/// One rule, checked; unknown clusters are listed in `unresolved` (they match no caller).
fn rule(
    r: &AuthzRuleSpec,
    clusters: &Clusters<'_>,
    unresolved: &mut Vec<String>,
) -> Result<pb::AuthzRule, String> {
    let mut out = pb::AuthzRule::default();
    for f in &r.from {
        let s = &f.source;
        let mut src = pb::AuthzSource {
            principals: s
                .principals
                .iter()
                .map(|p| principal(p))
                .collect::<Result<_, _>>()?,
            not_principals: s
                .not_principals
                .iter()
                .map(|p| principal(p))
                .collect::<Result<_, _>>()?,
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            trust_domains: Vec::new(),
        };
        for n in s.namespaces.iter().chain(&s.not_namespaces) {
            Namespace::new(n).map_err(|e| format!("namespace {n:?}: {e}"))?;
        }
        for t in &s.trust_domains {
            TrustDomain::new(t).map_err(|e| format!("trust domain {t:?}: {e}"))?;
            src.trust_domains.push(t.clone());
        }
        if !s.clusters.is_empty() {
            // The caller must be of one of these clusters (and, with trustDomains, of one of
            // those trust domains too).
            let mut tds = Vec::new();
            for c in &s.clusters {
                let name = ClusterName::new(c).map_err(|e| format!("cluster {c:?}: {e}"))?;
                match clusters.trust_domain(&name) {
                    Some(td) => tds.push(td),
                    None => unresolved.push(format!("cluster {c} is not in the clusterset")),
                }
            }
            src.trust_domains = if src.trust_domains.is_empty() {
                tds
            } else {
                src.trust_domains
                    .into_iter()
                    .filter(|t| tds.contains(t))
                    .collect()
            };
            if src.trust_domains.is_empty() {
                // No known cluster (or none of the given trust domains): no caller matches.
                src.trust_domains.push(NO_CALLER.into());
            }
        }
        out.from.push(src);
    }
    for t in &r.to {
        let o = &t.operation;
        for m in &o.methods {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "method {m:?}: write it in upper case (GET, POST, ...)"
                ));
            }
        }
        for p in &o.ports {
            if *p == 0 || *p > 65535 {
                return Err(format!("port {p} is not a port"));
            }
        }
        out.to.push(pb::AuthzOperation {
            methods: o.methods.clone(),
            paths: o.paths.iter().map(|p| path(p)).collect::<Result<_, _>>()?,
            not_paths: o
                .not_paths
                .iter()
                .map(|p| path(p))
                .collect::<Result<_, _>>()?,
            ports: o.ports.clone(),
        });
    }
    for w in &r.when {
        if w.values.is_empty() && w.not_values.is_empty() {
            return Err(format!("when {:?}: give values or notValues", w.key));
        }
        let (header, claim) = condition_key(&w.key)?;
        out.when.push(pb::AuthzCondition {
            header,
            values: w.values.clone(),
            not_values: w.not_values.clone(),
            claim,
        });
    }
    Ok(out)
}

fn action(a: Option<&str>) -> Result<pb::AuthzAction, String> {
    match a.unwrap_or("ALLOW") {
        "ALLOW" => Ok(pb::AuthzAction::AuthzAllow),
        "DENY" => Ok(pb::AuthzAction::AuthzDeny),
        "AUDIT" => Ok(pb::AuthzAction::AuthzAudit),
        other => Err(format!("action {other:?}: use ALLOW, DENY or AUDIT")),
    }
}

/// Every service of `key`'s namespace (`namespace/name`).
pub(super) fn namespace_services(key: &ServiceKey, local: &LocalObjects) -> Vec<String> {
    local
        .services
        .keys()
        .filter(|k| k.namespace == key.namespace)
        .map(|k| k.to_string())
        .collect()
}

/// The services a policy `key` with `refs` applies to (`namespace/name`; no refs: every service
/// of its namespace), and the references that name no service.
pub(super) fn targets(
    key: &ServiceKey,
    refs: &[AuthzTargetRef],
    local: &LocalObjects,
) -> Result<(Vec<String>, Vec<String>), String> {
    let (found, missing) = targets_or_routes(key, refs, local, false)?;
    Ok((found.into_keys().collect(), missing))
}

/// The route a Gateway API reference names: `HTTPRoute ns/name` (as the data plane knows it) and
/// the Services of the policy's namespace it is attached to; `None` for another kind.
fn route_ref(
    key: &ServiceKey,
    t: &AuthzTargetRef,
    local: &LocalObjects,
) -> Option<Result<(String, Vec<String>), String>> {
    if t.group != "gateway.networking.k8s.io"
        || !matches!(t.kind.as_str(), "HTTPRoute" | "GRPCRoute")
    {
        return None;
    }
    let rk = match format!("{}/{}", key.namespace, t.name).parse::<ServiceKey>() {
        Ok(k) => k,
        Err(e) => return Some(Err(format!("targetRefs: {}: {e}", t.name))),
    };
    let parents = if t.kind == "HTTPRoute" {
        local.http_routes.get(&rk).map(|r| &r.spec.parent_refs)
    } else {
        local.grpc_routes.get(&rk).map(|r| &r.spec.parent_refs)
    };
    let Some(parents) = parents else {
        return Some(Err(format!("{} {rk} does not exist", t.kind)));
    };
    // The route's Services in the policy's namespace: a policy guards its own namespace.
    let services = parents
        .iter()
        .filter(|p| p.kind.as_deref() == Some("Service"))
        .filter(|p| {
            p.namespace
                .as_deref()
                .is_none_or(|n| n == key.namespace.as_str())
        })
        .map(|p| format!("{}/{}", key.namespace, p.name))
        .filter(|s| {
            s.parse::<ServiceKey>()
                .is_ok_and(|k| local.services.contains_key(&k))
        })
        .collect();
    Some(Ok((format!("{} {rk}", t.kind), services)))
}

/// Per service (`namespace/name`), the routes a policy covers there (none: all of it).
pub(super) type Covered = BTreeMap<String, Vec<String>>;

/// What a policy applies to, per service (`namespace/name`): the routes whose requests it covers
/// there (none: every request to the service); and the references that name nothing. Routes are
/// accepted only where `routes` (AuthorizationPolicy: yes; a PeerAuthentication is about
/// connections, which no route describes).
pub(super) fn targets_or_routes(
    key: &ServiceKey,
    refs: &[AuthzTargetRef],
    local: &LocalObjects,
    routes: bool,
) -> Result<(Covered, Vec<String>), String> {
    if refs.is_empty() {
        let all = namespace_services(key, local);
        return Ok((
            all.into_iter().map(|s| (s, Vec::new())).collect(),
            Vec::new(),
        ));
    }
    let mut found = Covered::new();
    let mut whole: Vec<String> = Vec::new();
    let mut missing = Vec::new();
    for t in refs {
        if routes && let Some(r) = route_ref(key, t, local) {
            match r {
                Ok((route, services)) if services.is_empty() => missing.push(format!(
                    "{route} is attached to no Service of namespace {}",
                    key.namespace
                )),
                Ok((route, services)) => {
                    for s in services {
                        found.entry(s).or_default().push(route.clone());
                    }
                }
                Err(m) if m.starts_with("targetRefs") => return Err(m),
                Err(m) => missing.push(m),
            }
            continue;
        }
        if t.kind != "Service" || !(t.group.is_empty() || t.group == "core") {
            return Err(format!(
                "targetRefs: {} {} is not a Service (kind: Service, group \"\"){}",
                t.kind,
                t.name,
                if routes {
                    " or a route (group gateway.networking.k8s.io, kind HTTPRoute or GRPCRoute)"
                } else {
                    ""
                }
            ));
        }
        let k = format!("{}/{}", key.namespace, t.name);
        match k.parse::<ServiceKey>() {
            Ok(sk) if local.services.contains_key(&sk) => whole.push(k),
            Ok(_) => missing.push(format!("Service {k} does not exist")),
            Err(e) => return Err(format!("targetRefs: {}: {e}", t.name)),
        }
    }
    // A service named itself is covered whole, whatever routes of it are named too.
    for s in whole {
        found.insert(s, Vec::new());
    }
    Ok((found, missing))
}

pub fn compile(
    local: &LocalObjects,
    cs: &ClusterSet,
    own: &ClusterName,
    own_td: &TrustDomain,
) -> CompiledAuthz {
    let clusters = Clusters { cs, own, own_td };
    let mut by_service: BTreeMap<String, Vec<pb::AuthzPolicy>> = BTreeMap::new();
    let mut reports = Vec::new();
    for (key, p) in &local.authz_policies {
        let name = data_plane_name(key);
        let mut unresolved = Vec::new();
        let checked = action(p.spec.action.as_deref()).and_then(|a| {
            let rules = p
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    rule(r, &clusters, &mut unresolved).map_err(|e| format!("rules[{i}]: {e}"))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok((a, rules))
        });
        let targeted = targets_or_routes(key, &p.spec.target_refs, local, true);
        let (compiled, accepted) = match (&checked, &targeted) {
            (Ok((a, rules)), Ok(_)) => (
                pb::AuthzPolicy {
                    name: name.clone(),
                    action: *a as i32,
                    rules: rules.clone(),
                    invalid: false,
                    routes: Vec::new(),
                },
                Cond::ok(reason::ACCEPTED),
            ),
            (Err(e), _) | (_, Err(e)) => {
                // Fail closed: an invalid DENY must still deny (every request), so an action we
                // cannot read counts as DENY.
                let a = action(p.spec.action.as_deref()).unwrap_or(pb::AuthzAction::AuthzDeny);
                let effect = match a {
                    pb::AuthzAction::AuthzDeny => {
                        "it denies every request to its targets until fixed"
                    }
                    pb::AuthzAction::AuthzAllow => "it allows nothing until fixed",
                    pb::AuthzAction::AuthzAudit => "it audits nothing until fixed",
                };
                (
                    pb::AuthzPolicy {
                        name: name.clone(),
                        action: a as i32,
                        rules: Vec::new(),
                        invalid: true,
                        routes: Vec::new(),
                    },
                    Cond::no(policy_reason::INVALID, format!("{e}; {effect}")),
                )
            }
        };
        let (services, missing) = match targeted {
            Ok(t) => t,
            // A bad targetRef: fail closed on every service of the namespace.
            Err(_) => (
                namespace_services(key, local)
                    .into_iter()
                    .map(|s| (s, Vec::new()))
                    .collect(),
                Vec::new(),
            ),
        };
        unresolved.extend(missing);
        let resolved = if unresolved.is_empty() {
            Cond::ok(reason::RESOLVED_REFS)
        } else {
            Cond::no(policy_reason::TARGET_NOT_FOUND, unresolved.join("; "))
        };
        for (s, routes) in &services {
            by_service
                .entry(s.clone())
                .or_default()
                .push(pb::AuthzPolicy {
                    routes: routes.clone(),
                    ..compiled.clone()
                });
        }
        reports.push(PolicyReport {
            kind: KIND,
            policy: key.clone(),
            target: (services.len() == 1)
                .then(|| services.keys().next().cloned())
                .flatten(),
            generation: p.metadata.generation,
            accepted,
            resolved_refs: resolved,
        });
    }
    CompiledAuthz {
        by_service,
        reports,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fedmesh_api::pb::federation as fpb;

    /// Services shop/api and shop/web, and `policies`.
    fn local(policies: &str) -> LocalObjects {
        LocalObjects::from_yaml(&format!("{SHOP}\n---\n{policies}"))
    }

    pub(crate) const SHOP: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}";

    fn compile_here(l: &LocalObjects) -> CompiledAuthz {
        let mut cs = ClusterSet::default();
        cs.clusters.insert(
            ClusterName::new("west").unwrap(),
            fpb::ClusterInfo {
                trust_domain: "west.example".into(),
                ..Default::default()
            },
        );
        compile(
            l,
            &cs,
            &ClusterName::new("east").unwrap(),
            &TrustDomain::new("east.example").unwrap(),
        )
    }

    const HEAD: &str = "apiVersion: fedmesh.io/v1alpha1\nkind: AuthorizationPolicy\n";

    #[test]
    fn a_namespace_policy_covers_every_service_and_clusters_become_trust_domains() {
        let l = local(&format!(
            "{HEAD}metadata: {{name: from-clusters, namespace: shop}}\nspec:\n  rules:\n    - from: [{{source: {{clusters: [east, west, north]}}}}]\n"
        ));
        let c = compile_here(&l);
        for svc in ["shop/api", "shop/web"] {
            let p = &c.by_service[svc][0];
            assert_eq!(p.name, "AuthorizationPolicy shop/from-clusters");
            assert!(!p.invalid);
            assert_eq!(
                p.rules[0].from[0].trust_domains,
                vec!["east.example", "west.example"]
            );
        }
        let r = &c.reports[0];
        assert!(r.accepted.status);
        assert!(!r.resolved_refs.status);
        assert!(
            r.resolved_refs
                .message
                .contains("cluster north is not in the clusterset"),
            "{}",
            r.resolved_refs.message
        );
    }

    #[test]
    fn an_invalid_policy_fails_closed_and_says_why() {
        let l = local(&format!(
            "{HEAD}metadata: {{name: bad-deny, namespace: shop}}\nspec:\n  action: DENY\n  targetRefs: [{{kind: Service, name: api}}]\n  rules:\n    - to: [{{operation: {{paths: [\"api/*\"]}}}}]\n---\n{HEAD}metadata: {{name: bad-action, namespace: shop}}\nspec:\n  action: deny\n  targetRefs: [{{kind: Service, name: web}}]\n---\n{HEAD}metadata: {{name: bad-when, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, name: web}}]\n  rules:\n    - when: [{{key: \"request.auth.claims[]\", values: [x]}}, {{key: \"source.ip\", values: [x]}}]\n"
        ));
        let c = compile_here(&l);
        let api = &c.by_service["shop/api"];
        assert_eq!(api.len(), 1);
        assert!(api[0].invalid);
        assert_eq!(api[0].action, pb::AuthzAction::AuthzDeny as i32);
        let web = &c.by_service["shop/web"];
        assert!(
            web.iter().all(|p| p.invalid)
                && web
                    .iter()
                    .any(|p| p.action == pb::AuthzAction::AuthzDeny as i32),
            "an unreadable action fails closed as a DENY: {web:?}"
        );
        let message = |name: &str| {
            let r = c
                .reports
                .iter()
                .find(|r| r.policy.name.as_str() == name)
                .unwrap();
            assert!(!r.accepted.status);
            r.accepted.message.clone()
        };
        let m = message("bad-deny");
        assert!(
            m.contains("path \"api/*\" must start with '/'")
                && m.contains("it denies every request to its targets until fixed"),
            "{m}"
        );
        assert!(message("bad-action").contains("use ALLOW, DENY or AUDIT"));
        assert!(message("bad-when").contains("write request.auth.claims[NAME]"));
    }

    #[test]
    fn a_missing_target_is_reported_and_a_non_service_target_is_invalid() {
        let mut l = local(&format!(
            "{HEAD}metadata: {{name: p, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, name: gone}}, {{kind: Service, name: api}}]\n  rules: [{{}}]\n---\n{HEAD}metadata: {{name: q, namespace: shop}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: nope}}]\n---\n{HEAD}metadata: {{name: r, namespace: shop}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: api}}]\n---\n{HEAD}metadata: {{name: admins, namespace: shop}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: api-admin}}]\n  rules: [{{}}]\n"
        ));
        let route: fedmesh_api::gateway::HTTPRoute = serde_saphyr::from_str(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api-admin, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api, port: 80}]\n  rules: [{matches: [{path: {type: PathPrefix, value: /admin}}]}]\n",
        )
        .unwrap();
        l.http_routes
            .insert("shop/api-admin".parse().unwrap(), route);
        let c = compile_here(&l);
        let report = |name: &str| {
            c.reports
                .iter()
                .find(|r| r.policy.name.as_str() == name)
                .unwrap()
        };
        let p = report("p");
        assert!(p.accepted.status);
        assert!(
            p.resolved_refs
                .message
                .contains("Service shop/gone does not exist")
        );
        let api = &c.by_service["shop/api"];
        assert!(
            api.iter()
                .any(|x| x.name.ends_with("shop/p") && !x.invalid && x.routes.is_empty())
        );
        // A route target: the policy covers that route's requests on its Service.
        assert!(
            api.iter().any(
                |x| x.name.ends_with("shop/admins") && x.routes == ["HTTPRoute shop/api-admin"]
            ),
            "{api:?}"
        );
        assert!(report("admins").resolved_refs.status);
        let q = report("q");
        assert!(q.accepted.status);
        assert!(
            q.resolved_refs
                .message
                .contains("HTTPRoute shop/nope does not exist"),
            "{}",
            q.resolved_refs.message
        );
        let r = report("r");
        assert!(
            r.accepted.message.contains("is not a Service")
                && r.accepted.message.contains("or a route"),
            "{}",
            r.accepted.message
        );
    }
}
