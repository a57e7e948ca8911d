//! Gateway API routes (HTTPRoute, GRPCRoute) attached to Services → the data plane's routes, and
//! each route's status.
//!
//! Semantics follow the GAMMA profile (GEP-1294) and the mesh conformance suite: a route binds to
//! its parent Service (one port, or all), applies to traffic addressed to the Service (never to a
//! pod's own address), and once any route binds a Service port, a request that matches none is
//! answered 404. Matches are ordered by the spec's precedence across every route of the parent
//! (exact path, longest prefix, method, most header matches, most query matches, oldest route,
//! name). A consumer route (in another namespace than its parent) applies to that namespace's
//! callers only, and for them replaces the producer's routes.
//!
//! A mistake never sends traffic elsewhere: a rule fedmesh cannot apply keeps its matches and
//! answers 500 with the reason; a backend that resolves to nothing answers 500 for its share;
//! and the route's status says so (`Accepted`, `ResolvedRefs`, `PartiallyInvalid`, with the reason
//! in words).

use std::collections::BTreeMap;
use std::time::Duration;

use fedmesh_api::gateway::{
    BackendRef, CLUSTER_KIND, FEDMESH_GROUP, GrpcRouteRule, HttpRouteMatch, HttpRouteRule,
    MCS_GROUP, ParentReference, RouteFilter, reason,
};
use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{ClusterName, ServiceKey};

use super::source::LocalObjects;
use super::state::ClusterSet;

mod matches;
mod summary;
use matches::{
    first_by_name, grpc_precedence, header_modifier, http_match, is_core, path_modifier,
    precedence, value_match,
};
pub use summary::summaries;

/// One condition of a route's status for a parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn ok(reason: &'static str) -> Self {
        Self {
            status: true,
            reason,
            message: String::new(),
        }
    }
    pub fn yes(reason: &'static str, message: String) -> Self {
        Self {
            status: true,
            reason,
            message,
        }
    }
    pub fn no(reason: &'static str, message: String) -> Self {
        Self {
            status: false,
            reason,
            message,
        }
    }
}

/// A route's status for one of its parents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentReport {
    pub parent_ref: ParentReference,
    pub accepted: Cond,
    pub resolved_refs: Cond,
    /// Set when some rules could not be applied (they answer 500).
    pub partially_invalid: Option<Cond>,
}

/// What fedmesh says about one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteReport {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub route: ServiceKey,
    pub generation: Option<i64>,
    pub parents: Vec<ParentReport>,
}

/// The data plane's routes per parent service, and every route's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledRoutes {
    pub by_parent: BTreeMap<ServiceKey, Vec<pb::Route>>,
    pub reports: Vec<RouteReport>,
}

/// What a route can refer to.
pub(super) struct World<'a> {
    pub local: &'a LocalObjects,
    pub cs: &'a ClusterSet,
    pub own: &'a ClusterName,
}

impl World<'_> {
    pub fn service_port_names(&self, key: &ServiceKey) -> Option<Vec<(i32, String)>> {
        let svc = self.local.services.get(key)?;
        Some(
            svc.spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| (p.port, p.name.clone().unwrap_or_default()))
                .collect(),
        )
    }

    pub fn in_clusterset(&self, key: &ServiceKey) -> bool {
        self.cs.imports.contains_key(key) || self.local.exports.contains_key(key)
    }

    pub fn knows_cluster(&self, c: &ClusterName) -> bool {
        c == self.own || self.cs.clusters.contains_key(c)
    }
}

pub(super) fn parse_duration(s: &str, what: &str) -> Result<Option<Duration>, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{what} {s:?}: {e} (write e.g. 500ms, 2s or 1m)"))?;
    Ok((!d.is_zero()).then_some(d))
}

/// The match of every request (path prefix `/`), for the routes fedmesh makes itself.
pub(super) fn every_request() -> pb::RouteMatch {
    http_match(&HttpRouteMatch::default()).unwrap_or_default()
}

pub(super) fn millis(d: Option<Duration>) -> u32 {
    d.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// A rule's problems: why it cannot be applied (it then answers 500), and which backends resolve
/// to nothing (their share answers 500).
#[derive(Default)]
struct RuleProblems {
    invalid: Option<(&'static str, String)>,
    unresolved: Vec<(&'static str, String)>,
}

fn backend(
    b: &BackendRef,
    route_ns: &str,
    world: &World<'_>,
    problems: &mut RuleProblems,
    filters: Vec<pb::Filter>,
) -> pb::BackendRef {
    let r = &b.reference;
    let ns = r.namespace.clone().unwrap_or_else(|| route_ns.to_string());
    let weight = b.weight.unwrap_or(1).clamp(0, 1_000_000) as u32;
    let port = r.port.unwrap_or(0).clamp(0, 65535) as u32;
    let mut out = pb::BackendRef {
        weight,
        port,
        filters,
        ..Default::default()
    };
    let mut unresolved = |reason: &'static str, msg: String| {
        problems.unresolved.push((reason, msg));
        true
    };
    let missing = match (r.group.as_deref(), r.kind.as_deref().unwrap_or("Service")) {
        (g, "Service") if is_core(&g.map(str::to_string)) => match ServiceKey::new(&ns, &r.name) {
            Err(e) => unresolved(
                reason::BACKEND_NOT_FOUND,
                format!("backend {}: {e}", r.name),
            ),
            Ok(key) => {
                out.kind = pb::backend_ref::Kind::Service as i32;
                out.service = key.to_string();
                match world.service_port_names(&key) {
                    None => unresolved(
                        reason::BACKEND_NOT_FOUND,
                        format!("there is no Service {key} in this cluster"),
                    ),
                    Some(_) if r.port.is_none() => unresolved(
                        reason::BACKEND_NOT_FOUND,
                        format!("backend Service {key} needs a port"),
                    ),
                    Some(ports) if !ports.iter().any(|(p, _)| Some(*p) == r.port) => unresolved(
                        reason::BACKEND_NOT_FOUND,
                        format!("Service {key} has no port {}", r.port.unwrap_or(0)),
                    ),
                    Some(_) => false,
                }
            }
        },
        (Some(MCS_GROUP), "ServiceImport") => match ServiceKey::new(&ns, &r.name) {
            Err(e) => unresolved(
                reason::BACKEND_NOT_FOUND,
                format!("backend {}: {e}", r.name),
            ),
            Ok(key) => {
                out.kind = pb::backend_ref::Kind::ServiceImport as i32;
                out.service = key.to_string();
                if world.in_clusterset(&key) {
                    false
                } else {
                    unresolved(
                        reason::BACKEND_NOT_FOUND,
                        format!("no cluster exports {key} (there is no ServiceImport {key})"),
                    )
                }
            }
        },
        (Some(FEDMESH_GROUP), CLUSTER_KIND) => {
            out.kind = pb::backend_ref::Kind::Parent as i32;
            match ClusterName::new(&r.name) {
                Ok(c) if world.knows_cluster(&c) => {
                    out.cluster = c.to_string();
                    false
                }
                Ok(c) => unresolved(
                    reason::BACKEND_NOT_FOUND,
                    format!(
                        "cluster {c} is not in the clusterset (fedmesh status lists its clusters)"
                    ),
                ),
                Err(e) => unresolved(
                    reason::BACKEND_NOT_FOUND,
                    format!("cluster {:?}: {e}", r.name),
                ),
            }
        }
        (g, k) => unresolved(
            reason::INVALID_KIND,
            format!(
                "backend kind {k} of group {:?} is not one fedmesh routes to (Service, multicluster.x-k8s.io ServiceImport, fedmesh.io Cluster)",
                g.unwrap_or("")
            ),
        ),
    };
    out.unresolved = missing;
    out
}

/// Compiles a rule's filters; `prefix_matched`: the rule has exactly one PathPrefix match.
fn filters(
    list: &[RouteFilter],
    route_ns: &str,
    world: &World<'_>,
    problems: &mut RuleProblems,
    prefix_matched: bool,
    grpc: bool,
) -> Result<Vec<pb::Filter>, (&'static str, String)> {
    use pb::filter::Kind;
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for f in list {
        let unsupported = |m: String| (reason::UNSUPPORTED_VALUE, m);
        if f.type_ != "RequestMirror" && !seen.insert(f.type_.clone()) {
            return Err(unsupported(format!("filter {} is given twice", f.type_)));
        }
        let kind = match f.type_.as_str() {
            "RequestHeaderModifier" => Kind::RequestHeaders(
                header_modifier(f.request_header_modifier.as_ref().ok_or_else(|| {
                    unsupported("RequestHeaderModifier without requestHeaderModifier".into())
                })?)
                .map_err(unsupported)?,
            ),
            "ResponseHeaderModifier" => Kind::ResponseHeaders(
                header_modifier(f.response_header_modifier.as_ref().ok_or_else(|| {
                    unsupported("ResponseHeaderModifier without responseHeaderModifier".into())
                })?)
                .map_err(unsupported)?,
            ),
            "RequestRedirect" if !grpc => {
                let r = f
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| unsupported("RequestRedirect without requestRedirect".into()))?;
                let status = r.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&status) {
                    return Err(unsupported(format!(
                        "redirect status {status} is not 301, 302, 303, 307 or 308"
                    )));
                }
                if let Some(s) = &r.scheme
                    && s != "http"
                    && s != "https"
                {
                    return Err(unsupported(format!(
                        "redirect scheme {s:?} is not http or https"
                    )));
                }
                Kind::Redirect(pb::Redirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, prefix_matched))
                        .transpose()
                        .map_err(unsupported)?,
                    port: r.port.unwrap_or(0).clamp(0, 65535) as u32,
                    status: status as u32,
                })
            }
            "URLRewrite" if !grpc => {
                let r = f
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| unsupported("URLRewrite without urlRewrite".into()))?;
                Kind::Rewrite(pb::Rewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, prefix_matched))
                        .transpose()
                        .map_err(unsupported)?,
                })
            }
            "RequestMirror" => {
                let m = f
                    .request_mirror
                    .as_ref()
                    .ok_or_else(|| unsupported("RequestMirror without requestMirror".into()))?;
                let (numerator, denominator) = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        return Err(unsupported(
                            "a mirror takes percent or fraction, not both".into(),
                        ));
                    }
                    (Some(p), None) => (p.clamp(0, 100) as u32, 100),
                    (None, Some(fr)) => {
                        let d = fr.denominator.unwrap_or(100).max(1) as u32;
                        (fr.numerator.clamp(0, d as i32) as u32, d)
                    }
                    (None, None) => (100, 100),
                };
                let target = BackendRef {
                    reference: m.backend_ref.clone(),
                    weight: Some(1),
                    filters: vec![],
                };
                let mut mirror_problems = RuleProblems::default();
                let b = backend(&target, route_ns, world, &mut mirror_problems, vec![]);
                // A mirror that resolves to nothing is not configured (and said so).
                problems.unresolved.extend(mirror_problems.unresolved);
                if b.unresolved {
                    continue;
                }
                Kind::Mirror(pb::Mirror {
                    backend: Some(b),
                    numerator,
                    denominator,
                })
            }
            other => {
                return Err(unsupported(format!(
                    "filter {other} is not supported{}",
                    if grpc { " on a GRPCRoute" } else { "" }
                )));
            }
        };
        out.push(pb::Filter { kind: Some(kind) });
    }
    let has = |t: &str| seen.contains(t);
    if has("RequestRedirect") && has("URLRewrite") {
        return Err((
            reason::INCOMPATIBLE_FILTERS,
            "RequestRedirect and URLRewrite cannot be used together".into(),
        ));
    }
    Ok(out)
}

/// A route after its parents are resolved, before ordering.
struct Bound {
    parent: ServiceKey,
    route: pb::Route,
    /// Oldest first, then by namespace/name, then rule order.
    order: (i64, String, usize),
}

/// A parent Service and the port a route binds on it (0: every port).
type BoundParent = (ServiceKey, u32);

/// Resolves a route's parents; returns the parents fedmesh serves and their reports so far.
fn parents(
    refs: &[ParentReference],
    route_ns: &str,
    world: &World<'_>,
) -> Vec<(ParentReference, Result<BoundParent, Cond>)> {
    refs.iter()
        .filter(|p| {
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            (kind == "Service" && is_core(&p.group))
                || (kind == "ServiceImport" && p.group.as_deref() == Some(MCS_GROUP))
        })
        .map(|p| {
            let ns = p.namespace.clone().unwrap_or_else(|| route_ns.to_string());
            let resolved = match ServiceKey::new(&ns, &p.name) {
                Err(e) => Err(Cond::no(reason::NO_MATCHING_PARENT, e.to_string())),
                Ok(key) if p.kind.as_deref() == Some("ServiceImport") => {
                    if world.in_clusterset(&key) {
                        Ok((key, p.port.unwrap_or(0).max(0) as u32))
                    } else {
                        Err(Cond::no(
                            reason::NO_MATCHING_PARENT,
                            format!("no cluster exports {key} (there is no ServiceImport {key})"),
                        ))
                    }
                }
                Ok(key) => match world.service_port_names(&key) {
                    None => Err(Cond::no(
                        reason::NO_MATCHING_PARENT,
                        format!("there is no Service {key} in this cluster"),
                    )),
                    Some(ports) => {
                        let by_port = p.port.map(|port| ports.iter().find(|(n, _)| *n == port));
                        let by_name = p
                            .section_name
                            .as_ref()
                            .map(|s| ports.iter().find(|(_, n)| n == s));
                        match (by_port, by_name) {
                            (Some(None), _) => Err(Cond::no(
                                reason::NO_MATCHING_PARENT,
                                format!("Service {key} has no port {}", p.port.unwrap_or(0)),
                            )),
                            (_, Some(None)) => Err(Cond::no(
                                reason::NO_MATCHING_PARENT,
                                format!(
                                    "Service {key} has no port named {}",
                                    p.section_name.clone().unwrap_or_default()
                                ),
                            )),
                            (Some(Some((port, _))), _) | (None, Some(Some((port, _)))) => {
                                Ok((key, *port as u32))
                            }
                            (None, None) => Ok((key, 0)),
                        }
                    }
                },
            };
            (p.clone(), resolved)
        })
        .collect()
}

/// A rule whose backends all weigh 0 sends nothing: valid Gateway API, but almost always a
/// mistake, so it is reported (its requests are answered 500 either way).
fn check_weights(route: &pb::Route, problems: &mut RuleProblems) {
    if !route.backend_refs.is_empty() && route.backend_refs.iter().all(|b| b.weight == 0) {
        set_invalid(
            problems,
            (
                reason::UNSUPPORTED_VALUE,
                "every backendRef of the rule has weight 0, so it sends nothing".into(),
            ),
        );
    }
}

/// Records why a rule cannot be applied (the first reason counts).
fn set_invalid(problems: &mut RuleProblems, p: (&'static str, String)) {
    problems.invalid.get_or_insert(p);
}

/// One rule compiled for the data plane, or why not.
struct RuleOut {
    matches: Result<Vec<pb::RouteMatch>, (&'static str, String)>,
    route: pb::Route,
    problems: RuleProblems,
}

fn http_rule(i: usize, rule: &HttpRouteRule, route_ns: &str, world: &World<'_>) -> RuleOut {
    let mut problems = RuleProblems::default();
    let default_match = [HttpRouteMatch::default()];
    let matches_src: &[HttpRouteMatch] = if rule.matches.is_empty() {
        &default_match
    } else {
        &rule.matches
    };
    let matches = matches_src
        .iter()
        .map(http_match)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (reason::UNSUPPORTED_VALUE, e));
    let prefix_matched = rule.matches.len() <= 1
        && matches_src[0]
            .path
            .as_ref()
            .is_none_or(|p| p.type_.as_deref().unwrap_or("PathPrefix") == "PathPrefix");
    let mut route = pb::Route {
        name: rule.name.clone().unwrap_or_else(|| format!("rule-{i}")),
        ..Default::default()
    };
    match filters(
        &rule.filters,
        route_ns,
        world,
        &mut problems,
        prefix_matched,
        false,
    ) {
        Ok(f) => route.filters = f,
        Err(p) => set_invalid(&mut problems, p),
    }
    if route
        .filters
        .iter()
        .any(|f| matches!(f.kind, Some(pb::filter::Kind::Redirect(_))))
        && !rule.backend_refs.is_empty()
    {
        set_invalid(
            &mut problems,
            (
                reason::INCOMPATIBLE_FILTERS,
                "a rule with a RequestRedirect has no backendRefs".into(),
            ),
        );
    }
    for b in &rule.backend_refs {
        let f = match filters(
            &b.filters,
            route_ns,
            world,
            &mut problems,
            prefix_matched,
            false,
        ) {
            Ok(f) => f,
            Err(p) => {
                set_invalid(&mut problems, p);
                vec![]
            }
        };
        route
            .backend_refs
            .push(backend(b, route_ns, world, &mut problems, f));
    }
    check_weights(&route, &mut problems);
    if let Some(t) = &rule.timeouts {
        let request = t
            .request
            .as_deref()
            .map(|s| parse_duration(s, "timeouts.request"))
            .transpose();
        let backend = t
            .backend_request
            .as_deref()
            .map(|s| parse_duration(s, "timeouts.backendRequest"))
            .transpose();
        match (request, backend) {
            (Ok(r), Ok(b)) => {
                let (r, b) = (r.flatten(), b.flatten());
                if let (Some(r), Some(b)) = (r, b)
                    && b > r
                {
                    set_invalid(
                        &mut problems,
                        (
                            reason::UNSUPPORTED_VALUE,
                            format!(
                                "timeouts.backendRequest {b:?} is longer than timeouts.request {r:?}"
                            ),
                        ),
                    );
                }
                route.timeout_ms = millis(r);
                route.backend_timeout_ms = millis(b);
            }
            (Err(e), _) | (_, Err(e)) => set_invalid(&mut problems, (reason::UNSUPPORTED_VALUE, e)),
        }
    }
    if let Some(r) = &rule.retry {
        let backoff = r
            .backoff
            .as_deref()
            .map(|s| parse_duration(s, "retry.backoff"))
            .transpose();
        match backoff {
            Err(e) => set_invalid(&mut problems, (reason::UNSUPPORTED_VALUE, e)),
            Ok(b) => {
                if let Some(c) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
                    set_invalid(
                        &mut problems,
                        (
                            reason::UNSUPPORTED_VALUE,
                            format!("retry code {c} is not in 400..599"),
                        ),
                    );
                }
                route.retry = Some(pb::Retry {
                    codes: r.codes.iter().map(|c| (*c).clamp(0, 999) as u32).collect(),
                    attempts: r.attempts.unwrap_or(1).clamp(0, 10) as u32,
                    backoff_ms: millis(b.flatten()),
                });
            }
        }
    }
    if let Some(field) = rule.other.keys().next() {
        set_invalid(
            &mut problems,
            (
                reason::UNSUPPORTED_VALUE,
                format!("rules[].{field} is not supported"),
            ),
        );
    }
    RuleOut {
        matches,
        route,
        problems,
    }
}

fn grpc_rule(i: usize, rule: &GrpcRouteRule, route_ns: &str, world: &World<'_>) -> RuleOut {
    let mut problems = RuleProblems::default();
    let matches = if rule.matches.is_empty() {
        Ok(vec![pb::RouteMatch::default()])
    } else {
        rule.matches
            .iter()
            .map(|m| {
                let (service, method, regex) = match &m.method {
                    None => (String::new(), String::new(), false),
                    Some(mm) => {
                        let regex = match mm.type_.as_deref() {
                            None | Some("Exact") => false,
                            Some("RegularExpression") => true,
                            Some(o) => {
                                return Err(format!("method match type {o:?} is not supported"));
                            }
                        };
                        if mm.service.is_none() && mm.method.is_none() {
                            return Err("a method match needs a service or a method".into());
                        }
                        for v in [&mm.service, &mm.method].into_iter().flatten() {
                            if regex {
                                regex::Regex::new(v).map_err(|e| {
                                    format!("{v:?} is not a regular expression: {e}")
                                })?;
                            } else if v.contains('/') {
                                return Err(format!("{v:?} must not contain /"));
                            }
                        }
                        (
                            mm.service.clone().unwrap_or_default(),
                            mm.method.clone().unwrap_or_default(),
                            regex,
                        )
                    }
                };
                Ok(pb::RouteMatch {
                    grpc_service: service,
                    grpc_method: method,
                    grpc_regex: regex,
                    header_matches: first_by_name(&m.headers, true)
                        .iter()
                        .map(|h| value_match(h, "header"))
                        .collect::<Result<_, _>>()?,
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, String>>()
    }
    .map_err(|e| (reason::UNSUPPORTED_VALUE, e));
    let mut route = pb::Route {
        name: rule.name.clone().unwrap_or_else(|| format!("rule-{i}")),
        grpc: true,
        ..Default::default()
    };
    match filters(&rule.filters, route_ns, world, &mut problems, false, true) {
        Ok(f) => route.filters = f,
        Err(p) => problems.invalid = Some(p),
    }
    for b in &rule.backend_refs {
        let f = match filters(&b.filters, route_ns, world, &mut problems, false, true) {
            Ok(f) => f,
            Err(p) => {
                problems.invalid.get_or_insert(p);
                vec![]
            }
        };
        route
            .backend_refs
            .push(backend(b, route_ns, world, &mut problems, f));
    }
    check_weights(&route, &mut problems);
    if let Some(field) = rule.other.keys().next() {
        problems.invalid.get_or_insert((
            reason::UNSUPPORTED_VALUE,
            format!("rules[].{field} is not supported"),
        ));
    }
    RuleOut {
        matches,
        route,
        problems,
    }
}

/// Compiles every HTTPRoute and GRPCRoute of `local`.
pub fn compile(local: &LocalObjects, cs: &ClusterSet, own: &ClusterName) -> CompiledRoutes {
    let world = World { local, cs, own };
    let mut bound: Vec<Bound> = Vec::new();
    let mut reports = Vec::new();
    let http = local.http_routes.iter().map(|(k, r)| {
        let ns = k.namespace.to_string();
        let rules: Vec<RuleOut> = if r.spec.rules.is_empty() {
            vec![http_rule(0, &HttpRouteRule::default(), &ns, &world)]
        } else {
            r.spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, rule)| http_rule(i, rule, &ns, &world))
                .collect()
        };
        ("HTTPRoute", k, &r.metadata, &r.spec.parent_refs, rules)
    });
    let grpc = local.grpc_routes.iter().map(|(k, r)| {
        let ns = k.namespace.to_string();
        let rules: Vec<RuleOut> = r
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| grpc_rule(i, rule, &ns, &world))
            .collect();
        ("GRPCRoute", k, &r.metadata, &r.spec.parent_refs, rules)
    });
    for (kind, key, meta, parent_refs, rules) in http.chain(grpc).collect::<Vec<_>>() {
        let ns = key.namespace.to_string();
        let created = meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0);
        let invalid: Vec<String> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.problems
                    .invalid
                    .as_ref()
                    .map(|(_, m)| format!("rule {i} ({}): {m}", r.route.name))
                    .or_else(|| {
                        r.matches
                            .as_ref()
                            .err()
                            .map(|(_, m)| format!("rule {i} ({}): {m}", r.route.name))
                    })
            })
            .collect();
        let valid = rules.len() - invalid.len();
        let unresolved: Vec<(&'static str, String)> = rules
            .iter()
            .flat_map(|r| r.problems.unresolved.clone())
            .collect();
        let first_invalid_reason = rules
            .iter()
            .find_map(|r| {
                r.problems
                    .invalid
                    .as_ref()
                    .map(|(reason, _)| *reason)
                    .or_else(|| r.matches.as_ref().err().map(|(reason, _)| *reason))
            })
            .unwrap_or(reason::UNSUPPORTED_VALUE);
        let mut parent_reports = Vec::new();
        for (parent_ref, resolved) in parents(parent_refs, &ns, &world) {
            let (parent, port) = match resolved {
                Err(c) => {
                    parent_reports.push(ParentReport {
                        parent_ref,
                        accepted: c,
                        resolved_refs: Cond::ok(reason::RESOLVED_REFS),
                        partially_invalid: None,
                    });
                    continue;
                }
                Ok(x) => x,
            };
            let consumer = if parent.namespace.as_str() != ns {
                ns.clone()
            } else {
                String::new()
            };
            for (i, r) in rules.iter().enumerate() {
                // Matches that cannot be read cannot catch traffic: the rule is left out.
                let Ok(matches) = &r.matches else { continue };
                let mut route = r.route.clone();
                route.source = format!("{kind} {key}");
                route.port = port;
                route.consumer_namespace = consumer.clone();
                if let Some((_, m)) = &r.problems.invalid {
                    route.filters.clear();
                    route.backend_refs.clear();
                    route.invalid = m.clone();
                }
                for m in matches {
                    let mut one = route.clone();
                    one.matches = vec![m.clone()];
                    bound.push(Bound {
                        parent: parent.clone(),
                        route: one,
                        order: (created, key.to_string(), i),
                    });
                }
            }
            let accepted = if valid == 0 {
                Cond::no(first_invalid_reason, invalid.join("; "))
            } else {
                Cond::ok(reason::ACCEPTED)
            };
            let resolved_refs = match unresolved.first() {
                None => Cond::ok(reason::RESOLVED_REFS),
                Some((reason, _)) => Cond::no(
                    reason,
                    format!(
                        "{} (requests sent to it are answered 500)",
                        unresolved
                            .iter()
                            .map(|(_, m)| m.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                ),
            };
            let partially_invalid = (valid > 0 && !invalid.is_empty()).then(|| Cond {
                status: true,
                reason: reason::UNSUPPORTED_VALUE,
                message: format!("{} (those rules answer 500)", invalid.join("; ")),
            });
            parent_reports.push(ParentReport {
                parent_ref,
                accepted,
                resolved_refs,
                partially_invalid,
            });
        }
        reports.push(RouteReport {
            kind,
            route: key.clone(),
            generation: meta.generation,
            parents: parent_reports,
        });
    }
    let mut by_parent: BTreeMap<ServiceKey, Vec<Bound>> = BTreeMap::new();
    for b in bound {
        by_parent.entry(b.parent.clone()).or_default().push(b);
    }
    let by_parent = by_parent
        .into_iter()
        .map(|(parent, mut routes)| {
            routes.sort_by(|a, b| {
                let (ma, mb) = (&a.route.matches[0], &b.route.matches[0]);
                // gRPC routes bind before HTTP routes on the same port (GEP-1294); then the
                // spec's precedence.
                b.route
                    .grpc
                    .cmp(&a.route.grpc)
                    .then_with(|| {
                        if a.route.grpc {
                            grpc_precedence(ma).cmp(&grpc_precedence(mb))
                        } else {
                            precedence(ma).cmp(&precedence(mb))
                        }
                    })
                    .then_with(|| a.order.cmp(&b.order))
            });
            (parent, routes.into_iter().map(|b| b.route).collect())
        })
        .collect();
    CompiledRoutes { by_parent, reports }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::source::{Object, parse_object};

    fn objects(yaml: &str) -> LocalObjects {
        let mut local = LocalObjects::default();
        for doc in serde_saphyr::from_multiple::<serde_json::Value>(yaml).unwrap() {
            match parse_object(doc).unwrap() {
                Some(Object::Service(s)) => {
                    let k = crate::control_plane::source::key_of(&s.metadata).unwrap();
                    local.services.insert(k, *s);
                }
                Some(Object::HttpRoute(r)) => {
                    let k = crate::control_plane::source::key_of(&r.metadata).unwrap();
                    local.http_routes.insert(k, *r);
                }
                Some(Object::GrpcRoute(r)) => {
                    let k = crate::control_plane::source::key_of(&r.metadata).unwrap();
                    local.grpc_routes.insert(k, *r);
                }
                _ => {}
            }
        }
        local
    }

    const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec: {ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: mesh}
spec: {ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: mesh}
spec: {ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
";

    fn compiled(routes: &str) -> CompiledRoutes {
        let local = objects(&format!("{SERVICES}---\n{routes}"));
        let cs = ClusterSet::default();
        compile(&local, &cs, &ClusterName::new("east").unwrap())
    }

    fn key(s: &str) -> ServiceKey {
        s.parse().unwrap()
    }

    #[test]
    fn matches_are_ordered_by_the_specs_precedence_across_rules() {
        let c = compiled(
            "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-matching, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: echo-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: echo-v2, port: 8080}]
",
        );
        let routes = &c.by_parent[&key("mesh/echo")];
        let order: Vec<(String, usize, String)> = routes
            .iter()
            .map(|r| {
                let m = &r.matches[0];
                let p = m.path.as_ref().unwrap();
                (
                    p.value.clone(),
                    m.header_matches.len(),
                    r.backend_refs[0].service.clone(),
                )
            })
            .collect();
        assert_eq!(
            order,
            [
                ("/exact".to_string(), 0, "mesh/echo-v2".to_string()),
                ("/v2".into(), 0, "mesh/echo-v2".into()),
                ("/".into(), 1, "mesh/echo-v1".into()),
                ("/".into(), 1, "mesh/echo-v2".into()),
                ("/".into(), 0, "mesh/echo-v1".into()),
            ]
        );
        assert!(
            routes
                .iter()
                .all(|r| r.port == 80 && r.source == "HTTPRoute mesh/mesh-matching")
        );
        let status = &c.reports[0].parents[0];
        assert!(status.accepted.status && status.resolved_refs.status);
    }

    #[test]
    fn mistakes_are_reported_and_never_route_elsewhere() {
        let c = compiled(
            "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - matches: [{path: {value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ['*']}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /ghost}}]
    backendRefs: [{name: echo-v9, port: 80}, {group: fedmesh.io, kind: Cluster, name: mars}]
  - backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: nope}, {group: '', kind: Service, name: echo, port: 9999}]
  rules: [{backendRefs: [{name: echo-v1, port: 80}]}]
",
        );
        let broken = c
            .reports
            .iter()
            .find(|r| r.route == key("mesh/broken"))
            .unwrap();
        let p = &broken.parents[0];
        assert!(p.accepted.status, "two of three rules apply");
        let pi = p.partially_invalid.as_ref().unwrap();
        assert!(
            pi.message.contains("filter CORS is not supported"),
            "{}",
            pi.message
        );
        assert_eq!(p.resolved_refs.reason, reason::BACKEND_NOT_FOUND);
        assert!(
            p.resolved_refs.message.contains("no Service mesh/echo-v9")
                && p.resolved_refs
                    .message
                    .contains("cluster mars is not in the clusterset"),
            "{}",
            p.resolved_refs.message
        );
        let routes = &c.by_parent[&key("mesh/echo")];
        let cors = routes
            .iter()
            .find(|r| r.matches[0].path.as_ref().unwrap().value == "/cors")
            .unwrap();
        assert!(cors.invalid.contains("CORS") && cors.backend_refs.is_empty());
        let ghost = routes
            .iter()
            .find(|r| r.matches[0].path.as_ref().unwrap().value == "/ghost")
            .unwrap();
        assert!(ghost.backend_refs.iter().all(|b| b.unresolved));

        let orphan = c
            .reports
            .iter()
            .find(|r| r.route == key("mesh/orphan"))
            .unwrap();
        let reasons: Vec<_> = orphan
            .parents
            .iter()
            .map(|p| {
                (
                    p.accepted.status,
                    p.accepted.reason,
                    p.accepted.message.clone(),
                )
            })
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    false,
                    reason::NO_MATCHING_PARENT,
                    "there is no Service mesh/nope in this cluster".to_string()
                ),
                (
                    false,
                    reason::NO_MATCHING_PARENT,
                    "Service mesh/echo has no port 9999".to_string()
                ),
            ]
        );
    }

    #[test]
    fn consumer_routes_and_grpc_routes_bind_as_gamma_says() {
        let c = compiled(
            "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: client}
spec:
  parentRefs: [{group: '', kind: Service, name: echo-v1, namespace: mesh}]
  rules: [{backendRefs: [{name: echo-v1, namespace: mesh, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 8080}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Say}}]
    backendRefs: [{name: echo-v1, port: 8080, weight: 70}, {name: echo-v2, port: 8080, weight: 30}]
",
        );
        let consumer = &c.by_parent[&key("mesh/echo-v1")][0];
        assert_eq!(consumer.consumer_namespace, "client");
        let g = &c.by_parent[&key("mesh/echo")][0];
        assert!(g.grpc);
        assert_eq!(
            (
                g.matches[0].grpc_service.as_str(),
                g.matches[0].grpc_method.as_str()
            ),
            ("echo.Echo", "Say")
        );
        let weights: Vec<u32> = g.backend_refs.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [70, 30]);
    }
}
