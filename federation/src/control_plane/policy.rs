//! TrafficPolicies → the data plane's policy per service, and every policy's status.
//!
//! A policy attaches to a Service (its `targetRef`, or the Service named like it) or to an
//! HTTPRoute/GRPCRoute (or one rule of it). What it says is checked here, with the reason in words
//! on its status (`Accepted`, `ResolvedRefs`): a bad duration, a field its target kind cannot take,
//! a target that does not exist, a cluster the clusterset does not have, a second policy for the
//! same target. A policy whose new version is invalid keeps its last valid version in force.
//!
//! The v1alpha1 routing fields (`backendRefs`, `rules`, `retries`, `timeouts.request`) are
//! converted into the same routes an HTTPRoute compiles to — one routing mechanism in the data
//! plane — while no Gateway API route binds the service; the status says they are deprecated.

use std::collections::BTreeMap;

use fedmesh_api::gateway::{GROUP as GATEWAY_GROUP, reason};
use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::policy::{
    ClusterBackendRef, FaultInjection, LoadBalancerSpec, RateLimitSpec, Retries, TrafficPolicy,
    TrafficPolicySpec,
};
use fedmesh_api::{ClusterName, ServiceKey, SpiffeId};

use super::routes::{CompiledRoutes, Cond, World, millis, parse_duration};
use super::source::LocalObjects;
use super::state::ClusterSet;

/// Status reasons of policies beyond the route ones.
pub mod policy_reason {
    pub const INVALID: &str = "Invalid";
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    pub const CONFLICTED: &str = "Conflicted";
}

/// What fedmesh says about one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyReport {
    /// `TrafficPolicy` or `AuthorizationPolicy`.
    pub kind: &'static str,
    pub policy: ServiceKey,
    /// The service it is about (its target, or its target route's), when known.
    pub target: Option<String>,
    pub generation: Option<i64>,
    pub accepted: Cond,
    pub resolved_refs: Cond,
}

/// The data plane's policy per service (with the routes it routes by), and every policy's
/// status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledPolicies {
    pub by_service: BTreeMap<String, pb::TrafficPolicy>,
    pub reports: Vec<PolicyReport>,
    /// Clusterset-wide limits declared here: requests per period (ms), by service.
    pub clusterset_limits: BTreeMap<ServiceKey, (u32, u32)>,
}

/// What a policy attaches to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Service(ServiceKey),
    /// `HTTPRoute shop/x` (the data plane's `Route.source`), and a rule name.
    Route(String, Option<String>),
}

/// One policy, checked and converted.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    target: Target,
    /// Service-level parts (no routes).
    service: pb::TrafficPolicy,
    /// The v1alpha1 routing fields, converted (Service targets).
    legacy_routes: Vec<pb::Route>,
    /// Route-level parts (route targets).
    fault: Option<pb::Fault>,
    rate_limit: Option<pb::RateLimit>,
    /// A clusterset-wide limit: requests per period (ms).
    clusterset_limit: Option<(u32, u32)>,
    /// References that resolve to nothing (their share answers 500).
    unresolved: Vec<String>,
    deprecated: Vec<&'static str>,
}

/// The last valid version of each policy, kept while a newer one is invalid.
pub type Memory = BTreeMap<ServiceKey, (TrafficPolicySpec, Checked)>;

fn percent(p: Option<f64>, what: &str) -> Result<u32, String> {
    let p = p.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{what} {p} is not a percentage (0-100)"));
    }
    Ok((p * 10_000.0).round() as u32)
}

fn fault(f: &FaultInjection) -> Result<pb::Fault, String> {
    let mut out = pb::Fault::default();
    for h in &f.headers {
        http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("faultInjection.headers: {:?} is not a header name", h.name))?;
        out.headers.push(pb::ValueMatch {
            name: h.name.to_ascii_lowercase(),
            value: h.value.clone(),
            regex: false,
        });
    }
    if let Some(d) = &f.delay {
        out.delay_ms = millis(parse_duration(
            &d.fixed_delay,
            "faultInjection.delay.fixedDelay",
        )?);
        out.delay_ppm = percent(d.percentage, "faultInjection.delay.percentage")?;
    }
    if let Some(a) = &f.abort {
        match (a.http_status, a.grpc_status) {
            (Some(s), None) if (200..=599).contains(&s) => out.abort_status = s,
            (Some(s), None) => {
                return Err(format!(
                    "faultInjection.abort.httpStatus {s} is not an HTTP status (200-599)"
                ));
            }
            (None, Some(g)) if (1..=16).contains(&g) => out.abort_grpc_status = g,
            (None, Some(g)) => {
                return Err(format!(
                    "faultInjection.abort.grpcStatus {g} is not a gRPC status (1-16)"
                ));
            }
            _ => {
                return Err(
                    "faultInjection.abort needs exactly one of httpStatus and grpcStatus".into(),
                );
            }
        }
        out.abort_ppm = percent(a.percentage, "faultInjection.abort.percentage")?;
    }
    if f.delay.is_none() && f.abort.is_none() {
        return Err("faultInjection needs a delay, an abort or both".into());
    }
    Ok(out)
}

fn rate_limit(r: &RateLimitSpec) -> Result<pb::RateLimit, String> {
    let per = parse_duration(&r.per, "rateLimit.per")?
        .ok_or_else(|| "rateLimit.per must be longer than 0".to_string())?;
    if r.requests == 0 {
        return Err(
            "rateLimit.requests must be above 0 (to stop all traffic, use authorization)".into(),
        );
    }
    Ok(pb::RateLimit {
        requests: r.requests,
        period_ms: millis(Some(per)).max(1),
        burst: r.burst.unwrap_or(r.requests),
        per_caller: r.per_caller,
    })
}

fn load_balancer(l: &LoadBalancerSpec) -> Result<pb::LoadBalancer, String> {
    use pb::load_balancer::Type;
    let kind = match l.type_.as_str() {
        "LeastRequest" => Type::LeastRequest,
        "RoundRobin" => Type::RoundRobin,
        "ConsistentHash" => Type::ConsistentHash,
        t => {
            return Err(format!(
                "loadBalancer.type {t:?} is not one of LeastRequest, RoundRobin, ConsistentHash"
            ));
        }
    };
    let mut out = pb::LoadBalancer {
        r#type: kind as i32,
        ..Default::default()
    };
    match (&l.consistent_hash, kind == Type::ConsistentHash) {
        (None, true) => {
            return Err("loadBalancer.type ConsistentHash needs consistentHash (a header, a cookie or sourceIdentity)".into());
        }
        (Some(_), false) => {
            return Err("loadBalancer.consistentHash is only for type ConsistentHash".into());
        }
        (Some(h), true) => {
            let keys = usize::from(h.header.is_some())
                + usize::from(h.cookie.is_some())
                + usize::from(h.source_identity);
            if keys != 1 {
                return Err("loadBalancer.consistentHash needs exactly one of header, cookie and sourceIdentity".into());
            }
            if let Some(name) = &h.header {
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    format!("loadBalancer.consistentHash.header {name:?} is not a header name")
                })?;
                out.hash_header = name.to_ascii_lowercase();
            }
            out.hash_cookie = h.cookie.clone().unwrap_or_default();
            out.hash_source_identity = h.source_identity;
        }
        (None, false) => {}
    }
    Ok(out)
}

/// A v1alpha1 cluster backend as a route backend (unresolved when the cluster is unknown).
fn cluster_backend(
    r: &ClusterBackendRef,
    what: &str,
    world: &World<'_>,
    unresolved: &mut Vec<String>,
) -> Result<pb::BackendRef, String> {
    let c = ClusterName::new(&r.cluster).map_err(|e| format!("{what}: {e}"))?;
    let known = world.knows_cluster(&c);
    if !known {
        unresolved.push(format!(
            "{what}: cluster {c} is not in the clusterset (fedmesh status lists its clusters)"
        ));
    }
    Ok(pb::BackendRef {
        kind: pb::backend_ref::Kind::Parent as i32,
        cluster: c.to_string(),
        weight: r.weight,
        unresolved: !known,
        ..Default::default()
    })
}

fn legacy_retry(r: &Option<Retries>, what: &str) -> Result<Option<pb::Retry>, String> {
    match r {
        Some(r) if r.attempts > 10 => {
            Err(format!("{what}.attempts {} is more than 10", r.attempts))
        }
        Some(r) if r.attempts > 0 => Ok(Some(pb::Retry {
            codes: vec![502, 503, 504],
            attempts: r.attempts,
            backoff_ms: 0,
        })),
        _ => Ok(None),
    }
}

/// The v1alpha1 routing fields as routes: each rule, then a catch-all with the service-wide
/// split, timeout and retries.
fn legacy_routes(
    spec: &TrafficPolicySpec,
    source: &str,
    world: &World<'_>,
    c: &mut Checked,
) -> Result<(), String> {
    let request = spec
        .timeouts
        .as_ref()
        .and_then(|t| t.request.as_deref())
        .map(|s| parse_duration(s, "timeouts.request"))
        .transpose()?
        .flatten();
    let retry = legacy_retry(&spec.retries, "retries")?;
    let split = |refs: &[ClusterBackendRef], what: &str, c: &mut Checked| {
        let out = refs
            .iter()
            .map(|r| cluster_backend(r, what, world, &mut c.unresolved))
            .collect::<Result<Vec<_>, String>>()?;
        if !out.is_empty() && out.iter().all(|b| b.weight == 0) {
            return Err(format!(
                "{what}: every weight is 0, so nothing could be routed"
            ));
        }
        Ok(out)
    };
    for (i, r) in spec.rules.iter().enumerate() {
        let what = format!("rules[{i}]");
        let mut matches = Vec::with_capacity(r.matches.len());
        for m in &r.matches {
            let path_prefix = match &m.path {
                None => String::new(),
                Some(p) if p.type_ == "PathPrefix" && p.value.starts_with('/') => p.value.clone(),
                Some(p) if p.type_ == "PathPrefix" => {
                    return Err(format!("{what}: path {:?} must start with /", p.value));
                }
                Some(p) => {
                    return Err(format!(
                        "{what}: path match type {:?} is not supported (use PathPrefix, or an HTTPRoute)",
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
        let rule_timeout = r
            .timeouts
            .as_ref()
            .and_then(|t| t.request.as_deref())
            .map(|s| parse_duration(s, &format!("{what}.timeouts.request")))
            .transpose()?
            .flatten();
        let backend_refs = split(&r.backend_refs, &format!("{what}.backendRefs"), c)?;
        c.legacy_routes.push(pb::Route {
            name: r.name.clone().unwrap_or_else(|| format!("rule-{i}")),
            source: source.to_string(),
            matches,
            backend_refs,
            timeout_ms: millis(rule_timeout.or(request)),
            retry: legacy_retry(&r.retries, &format!("{what}.retries"))?.or(retry.clone()),
            ..Default::default()
        });
    }
    let backend_refs = split(&spec.backend_refs, "backendRefs", c)?;
    if !backend_refs.is_empty() || request.is_some() || retry.is_some() {
        c.legacy_routes.push(pb::Route {
            name: "default".into(),
            source: source.to_string(),
            backend_refs,
            timeout_ms: millis(request),
            retry,
            ..Default::default()
        });
    }
    Ok(())
}

fn target_of(p: &TrafficPolicy, key: &ServiceKey) -> Result<Target, (&'static str, String)> {
    let Some(t) = &p.spec.target_ref else {
        return Ok(Target::Service(key.clone()));
    };
    let name = |n: &str| {
        ServiceKey::new(key.namespace.as_str(), n)
            .map_err(|e| (policy_reason::INVALID, format!("targetRef.name {n:?}: {e}")))
    };
    match (t.group.as_str(), t.kind.as_str()) {
        ("", "Service") if t.section_name.is_none() => Ok(Target::Service(name(&t.name)?)),
        ("", "Service") => Err((
            policy_reason::INVALID,
            "targetRef.sectionName is for a route's rule; a Service target takes none".into(),
        )),
        (GATEWAY_GROUP, kind @ ("HTTPRoute" | "GRPCRoute")) => Ok(Target::Route(
            format!("{kind} {}", name(&t.name)?),
            t.section_name.clone(),
        )),
        (g, k) => Err((
            reason::INVALID_KIND,
            format!(
                "targetRef {k} of group {g:?} is not something a TrafficPolicy attaches to (a Service, or a gateway.networking.k8s.io HTTPRoute or GRPCRoute)"
            ),
        )),
    }
}

/// Checks one policy; `Err` when it cannot be applied at all.
fn check(
    p: &TrafficPolicy,
    key: &ServiceKey,
    world: &World<'_>,
) -> Result<Checked, (&'static str, String)> {
    let target = target_of(p, key)?;
    let spec = &p.spec;
    let invalid = |m: String| (policy_reason::INVALID, m);
    let mut c = Checked {
        target: target.clone(),
        service: pb::TrafficPolicy::default(),
        legacy_routes: Vec::new(),
        fault: None,
        rate_limit: None,
        clusterset_limit: None,
        unresolved: Vec::new(),
        deprecated: Vec::new(),
    };
    let fault = spec
        .fault_injection
        .as_ref()
        .map(fault)
        .transpose()
        .map_err(invalid)?;
    let limit = spec
        .rate_limit
        .as_ref()
        .map(rate_limit)
        .transpose()
        .map_err(invalid)?;
    if let Target::Route(route, _) = &target {
        let service_only = [
            ("authorization", spec.authorization.is_some()),
            ("timeouts", spec.timeouts.is_some()),
            ("circuitBreaker", spec.circuit_breaker.is_some()),
            ("outlierDetection", spec.outlier_detection.is_some()),
            ("loadBalancer", spec.load_balancer.is_some()),
            ("backendRefs", !spec.backend_refs.is_empty()),
            ("rules", !spec.rules.is_empty()),
            ("retries", spec.retries.is_some()),
            (
                "rateLimit.perCaller",
                limit.as_ref().is_some_and(|l| l.per_caller),
            ),
        ];
        if let Some((field, _)) = service_only.iter().find(|(_, set)| *set) {
            return Err(invalid(format!(
                "{field} applies to a Service; a policy for {route} may set faultInjection and rateLimit"
            )));
        }
        c.fault = fault;
        c.rate_limit = limit;
        return Ok(c);
    }
    if let Some(l) = &spec.clusterset_rate_limit {
        let per = parse_duration(&l.per, "clustersetRateLimit.per")
            .map_err(invalid)?
            .ok_or_else(|| invalid("clustersetRateLimit.per must be longer than 0".into()))?;
        if l.requests == 0 {
            return Err(invalid(
                "clustersetRateLimit.requests must be above 0".into(),
            ));
        }
        c.clusterset_limit = Some((l.requests, millis(Some(per)).max(1)));
    }
    let mut allowed = Vec::new();
    for a in spec.authorization.iter().flat_map(|a| &a.allowed_callers) {
        let id = a.strip_suffix("/*").unwrap_or(a);
        SpiffeId::new(id)
            .map_err(|e| invalid(format!("authorization.allowedCallers {a:?}: {e}")))?;
        allowed.push(a.clone());
    }
    let connect = spec
        .timeouts
        .as_ref()
        .and_then(|t| t.connect.as_deref())
        .map(|s| parse_duration(s, "timeouts.connect"))
        .transpose()
        .map_err(invalid)?
        .flatten();
    let outlier = spec
        .outlier_detection
        .as_ref()
        .map(|o| -> Result<pb::OutlierDetection, String> {
            if o.max_ejection_percent.is_some_and(|p| p > 100) {
                return Err("outlierDetection.maxEjectionPercent is more than 100".into());
            }
            Ok(pb::OutlierDetection {
                consecutive_failures: o.consecutive_failures.unwrap_or(0),
                base_ejection_ms: millis(
                    o.base_ejection_time
                        .as_deref()
                        .map(|s| parse_duration(s, "outlierDetection.baseEjectionTime"))
                        .transpose()?
                        .flatten(),
                ),
                max_ejection_percent: o.max_ejection_percent.unwrap_or(0),
            })
        })
        .transpose()
        .map_err(invalid)?;
    c.service = pb::TrafficPolicy {
        allowed_callers: allowed,
        connect_timeout_ms: millis(connect),
        fault,
        rate_limit: limit,
        circuit_breaker: spec.circuit_breaker.as_ref().map(|b| pb::CircuitBreaker {
            max_connections: b.max_connections.unwrap_or(0),
            max_pending_requests: b.max_pending_requests.unwrap_or(0),
            max_requests: b.max_requests.unwrap_or(0),
            max_retries: b.max_retries.unwrap_or(0),
        }),
        outlier,
        load_balancer: spec
            .load_balancer
            .as_ref()
            .map(load_balancer)
            .transpose()
            .map_err(invalid)?,
        ..Default::default()
    };
    for (field, set) in [
        ("backendRefs", !spec.backend_refs.is_empty()),
        ("rules", !spec.rules.is_empty()),
        ("retries", spec.retries.is_some()),
        (
            "timeouts.request",
            spec.timeouts.as_ref().is_some_and(|t| t.request.is_some()),
        ),
    ] {
        if set {
            c.deprecated.push(field);
        }
    }
    legacy_routes(spec, &format!("TrafficPolicy {key}"), world, &mut c).map_err(invalid)?;
    Ok(c)
}

impl Checked {
    /// Whether the target exists.
    fn target_found(&self, world: &World<'_>) -> Result<(), String> {
        match &self.target {
            Target::Service(k) => {
                if world.local.services.contains_key(k) || world.in_clusterset(k) {
                    Ok(())
                } else {
                    Err(format!(
                        "there is no Service {k} in this cluster and no ServiceImport {k}"
                    ))
                }
            }
            Target::Route(source, _) => {
                let (kind, key) = source.split_once(' ').unwrap_or(("", source));
                let found = key.parse::<ServiceKey>().is_ok_and(|k| match kind {
                    "HTTPRoute" => world.local.http_routes.contains_key(&k),
                    _ => world.local.grpc_routes.contains_key(&k),
                });
                if found {
                    Ok(())
                } else {
                    Err(format!("there is no {source}"))
                }
            }
        }
    }
}

/// Compiles every TrafficPolicy of `local` with the compiled Gateway API routes into the data
/// plane's policy per service. `memory` keeps each policy's last valid version.
pub fn compile(
    local: &LocalObjects,
    routes: &CompiledRoutes,
    cs: &ClusterSet,
    own: &ClusterName,
    memory: &mut Memory,
) -> CompiledPolicies {
    let world = World { local, cs, own };
    let mut reports = Vec::new();
    // Oldest first, then by name: the first policy for a target wins a conflict.
    let mut ordered: Vec<(&ServiceKey, &TrafficPolicy)> = local.policies.iter().collect();
    ordered.sort_by_key(|(k, p)| {
        (
            p.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(0),
            k.to_string(),
        )
    });
    memory.retain(|k, _| local.policies.contains_key(k));
    let mut applied: BTreeMap<Target, ServiceKey> = BTreeMap::new();
    let mut in_force: Vec<Checked> = Vec::new();
    for (key, p) in ordered {
        let target = match target_of(p, key) {
            Ok(Target::Service(k)) => Some(k.to_string()),
            Ok(Target::Route(source, _)) => routes
                .by_parent
                .iter()
                .find(|(_, rs)| rs.iter().any(|r| r.source == source))
                .map(|(k, _)| k.to_string()),
            Err(_) => None,
        };
        let report = |accepted: Cond, resolved_refs: Cond| PolicyReport {
            kind: "TrafficPolicy",
            policy: key.clone(),
            target: target.clone(),
            generation: p.metadata.generation,
            accepted,
            resolved_refs,
        };
        let checked = match check(p, key, &world) {
            Ok(c) => {
                memory.insert(key.clone(), (p.spec.clone(), c.clone()));
                c
            }
            Err((why, message)) => {
                let kept = memory.get(key).map(|(_, c)| c.clone());
                let message = match &kept {
                    Some(_) => format!("{message}; its last valid version stays in force"),
                    None => format!("{message}; nothing of it is applied"),
                };
                reports.push(report(
                    Cond::no(why, message),
                    Cond::ok(reason::RESOLVED_REFS),
                ));
                let Some(kept) = kept else { continue };
                kept
            }
        };
        if let Some(first) = applied.get(&checked.target) {
            reports.push(report(
                Cond::no(
                    policy_reason::CONFLICTED,
                    format!("TrafficPolicy {first} (older) already applies to the same target"),
                ),
                Cond::ok(reason::RESOLVED_REFS),
            ));
            continue;
        }
        let resolved = match checked.target_found(&world) {
            Err(m) => Cond::no(policy_reason::TARGET_NOT_FOUND, m),
            Ok(()) if !checked.unresolved.is_empty() => Cond::no(
                reason::BACKEND_NOT_FOUND,
                format!(
                    "{} (requests sent to it are answered 500)",
                    checked.unresolved.join("; ")
                ),
            ),
            Ok(()) => Cond::ok(reason::RESOLVED_REFS),
        };
        let mut accepted = Cond::ok(reason::ACCEPTED);
        if !checked.deprecated.is_empty() {
            let routed =
                matches!(&checked.target, Target::Service(k) if routes.by_parent.contains_key(k));
            accepted.message = format!(
                "{} {} deprecated: write an HTTPRoute for the service instead (README: migrating from TrafficPolicy routing){}",
                checked.deprecated.join(", "),
                if checked.deprecated.len() == 1 {
                    "is"
                } else {
                    "are"
                },
                if routed {
                    "; an HTTPRoute or GRPCRoute binds the service, so they are ignored"
                } else {
                    ""
                }
            );
        }
        if !checked.service.allowed_callers.is_empty() {
            // One way to say one thing: who may call a service is an AuthorizationPolicy.
            let note = "authorization.allowedCallers still applies but is deprecated: write an AuthorizationPolicy (ALLOW, from.source.principals) instead";
            accepted.message = if accepted.message.is_empty() {
                note.to_string()
            } else {
                format!("{}; {note}", accepted.message)
            };
        }
        reports.push(report(accepted, resolved));
        applied.insert(checked.target.clone(), key.clone());
        in_force.push(checked);
    }
    let mut by_service: BTreeMap<String, pb::TrafficPolicy> = BTreeMap::new();
    let mut clusterset_limits = BTreeMap::new();
    for c in &in_force {
        if let (Target::Service(k), Some(l)) = (&c.target, c.clusterset_limit) {
            clusterset_limits.insert(k.clone(), l);
        }
        if let Target::Service(k) = &c.target {
            let mut p = c.service.clone();
            if !routes.by_parent.contains_key(k) {
                p.routes = c.legacy_routes.clone();
            }
            by_service.insert(k.to_string(), p);
        }
    }
    for (parent, list) in &routes.by_parent {
        let p = by_service.entry(parent.to_string()).or_default();
        p.routes = list.clone();
        p.exhaustive = true;
    }
    // Route targets: their faults and limits ride on the rules they name.
    for c in &in_force {
        let Target::Route(source, rule) = &c.target else {
            continue;
        };
        for p in by_service.values_mut() {
            for r in p.routes.iter_mut() {
                if r.source == *source && rule.as_ref().is_none_or(|n| *n == r.name) {
                    r.fault = c.fault.clone();
                    r.rate_limit = c.rate_limit;
                }
            }
        }
    }
    CompiledPolicies {
        by_service,
        reports,
        clusterset_limits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_api::policy::TrafficPolicySpec;

    fn policy(name: &str, yaml: &str) -> (ServiceKey, TrafficPolicy) {
        let spec: TrafficPolicySpec = serde_saphyr::from_str(yaml).unwrap();
        let mut p = TrafficPolicy::new(name, spec);
        p.metadata.namespace = Some("shop".into());
        (format!("shop/{name}").parse().unwrap(), p)
    }

    fn local_with(policies: Vec<(ServiceKey, TrafficPolicy)>) -> LocalObjects {
        let mut local = LocalObjects::default();
        for svc in ["api", "web"] {
            let s: k8s_openapi::api::core::v1::Service = serde_saphyr::from_str(&format!(
                "metadata: {{name: {svc}, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"
            ))
            .unwrap();
            local
                .services
                .insert(format!("shop/{svc}").parse().unwrap(), s);
        }
        local.policies = policies.into_iter().collect();
        local
    }

    fn run(local: &LocalObjects, memory: &mut Memory) -> CompiledPolicies {
        compile(
            local,
            &CompiledRoutes::default(),
            &ClusterSet::default(),
            &ClusterName::new("east").unwrap(),
            memory,
        )
    }

    fn report<'a>(c: &'a CompiledPolicies, name: &str) -> &'a PolicyReport {
        c.reports
            .iter()
            .find(|r| r.policy.name.as_str() == name)
            .unwrap()
    }

    #[test]
    fn a_policy_compiles_to_the_data_planes_and_mistakes_are_reported_in_words() {
        let mut memory = Memory::new();
        let local = local_with(vec![
            policy(
                "api",
                "authorization: {allowedCallers: ['spiffe://east.example/ns/shop/*']}\nfaultInjection: {delay: {fixedDelay: 2s, percentage: 12.5}}\nrateLimit: {requests: 10, per: 1s, perCaller: true}\nloadBalancer: {type: ConsistentHash, consistentHash: {header: X-User}}\ncircuitBreaker: {maxRequests: 5}\n",
            ),
            policy(
                "web",
                "backendRefs: [{cluster: east, weight: 80}, {cluster: wset, weight: 20}]\n",
            ),
            policy("ghost", "timeouts: {connect: 1s}\n"),
            policy(
                "bad",
                "targetRef: {kind: Service, name: api}\nrateLimit: {requests: 10, per: soon}\n",
            ),
        ]);
        let c = run(&local, &mut memory);
        let api = &c.by_service["shop/api"];
        assert_eq!(api.fault.as_ref().unwrap().delay_ppm, 125_000);
        assert_eq!(api.rate_limit.as_ref().unwrap().period_ms, 1000);
        assert_eq!(api.load_balancer.as_ref().unwrap().hash_header, "x-user");
        assert_eq!(api.circuit_breaker.as_ref().unwrap().max_requests, 5);
        assert!(report(&c, "api").accepted.status);

        // The deprecated split becomes a catch-all route; the unknown cluster's share answers 500.
        let web = &c.by_service["shop/web"];
        assert_eq!(web.routes.len(), 1);
        let backends = &web.routes[0].backend_refs;
        assert_eq!(
            (backends[0].cluster.as_str(), backends[0].unresolved),
            ("east", false)
        );
        assert_eq!(
            (backends[1].cluster.as_str(), backends[1].unresolved),
            ("wset", true)
        );
        let r = report(&c, "web");
        assert!(
            r.accepted.status && r.accepted.message.contains("deprecated"),
            "{r:?}"
        );
        assert!(
            !r.resolved_refs.status && r.resolved_refs.message.contains("wset"),
            "{r:?}"
        );

        let r = report(&c, "ghost");
        assert_eq!(r.resolved_refs.reason, policy_reason::TARGET_NOT_FOUND);
        let r = report(&c, "bad");
        assert!(!r.accepted.status);
        assert!(r.accepted.message.contains("rateLimit.per"), "{r:?}");
        assert!(
            r.accepted.message.contains("nothing of it is applied"),
            "{r:?}"
        );
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_valid_version_and_a_second_policy_conflicts() {
        let mut memory = Memory::new();
        let good = policy(
            "api",
            "authorization: {allowedCallers: ['spiffe://east.example/ns/shop/sa/web']}\n",
        );
        let c = run(&local_with(vec![good]), &mut memory);
        let r = report(&c, "api");
        assert!(
            r.accepted.status
                && r.accepted
                    .message
                    .contains("allowedCallers still applies but is deprecated"),
            "{r:?}"
        );
        let edited = policy("api", "authorization: {allowedCallers: ['not-an-id']}\n");
        let mut twin = policy(
            "api-too",
            "targetRef: {kind: Service, name: api}\ntimeouts: {connect: 2s}\n",
        );
        twin.1.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(2_000_000_000).unwrap(),
            ));
        let c = run(&local_with(vec![edited, twin]), &mut memory);
        // The caller list of the last valid version still applies: nobody else gets in.
        assert_eq!(
            c.by_service["shop/api"].allowed_callers,
            ["spiffe://east.example/ns/shop/sa/web"]
        );
        let r = report(&c, "api");
        assert!(
            !r.accepted.status && r.accepted.message.contains("last valid version"),
            "{r:?}"
        );
        let r = report(&c, "api-too");
        assert_eq!(r.accepted.reason, policy_reason::CONFLICTED);
    }

    #[test]
    fn a_route_target_takes_faults_and_limits_only() {
        let mut memory = Memory::new();
        let local = local_with(vec![policy(
            "canary",
            "targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: web}\ncircuitBreaker: {maxRequests: 1}\n",
        )]);
        let c = run(&local, &mut memory);
        let r = report(&c, "canary");
        assert!(!r.accepted.status);
        assert!(
            r.accepted
                .message
                .contains("circuitBreaker applies to a Service"),
            "{r:?}"
        );
    }
}
