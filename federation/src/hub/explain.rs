//! `explain`: why a service is or is not routable from a cluster, as a chain of checks a person
//! can follow (`GET /api/v1/explain`, `fedmesh explain`), from the hub's view of the clusterset:
//! the routes and splits the asking cluster applies to it, its problems, each exporter's export
//! and endpoints, each exporter's gateway as the asking cluster's last mTLS probe found it, and
//! what the proxies' outlier detection holds ejected on the way (the asking cluster's sidecars,
//! the exporter's gateways: each reports it on its configuration stream, its control plane in
//! its proxy report).
//! The first failing step names the broken link; its hint says what to do.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fedmesh_api::{ClusterName, ServiceKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Hub;
use super::admin::{AdminState, error};
use super::records::now_ms;

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ExplainStep {
    /// `ok`, `warn` or `fail`.
    pub status: String,
    pub message: String,
    /// What to do about it (or the command that looks further).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct Explanation {
    pub service: String,
    pub from: String,
    pub routable: bool,
    pub steps: Vec<ExplainStep>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExplainQuery {
    /// The service: NAMESPACE/NAME, NAME.NAMESPACE, or its DNS name
    /// (NAME.NAMESPACE.svc.clusterset.local).
    #[param(
        pattern = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.svc(\.cluster\.local|\.clusterset\.local)?)?\.*)$"
    )]
    service: String,
    /// The cluster asking.
    #[param(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    from: String,
}

#[utoipa::path(get, path = "/api/v1/explain", params(ExplainQuery),
    responses((status = 200, description = "The chain of checks, the first failing one the broken link", body = Explanation)))]
pub(super) async fn explain(
    State(s): State<AdminState>,
    super::api_json::ApiQuery(q): super::api_json::ApiQuery<ExplainQuery>,
) -> Response {
    let service = match ServiceKey::from_user_input(&q.service) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("service: {e}")),
    };
    let from = match ClusterName::new(&q.from) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("from: {e}")),
    };
    Json(explain_route(&s.hub, &service, &from)).into_response()
}

/// Why `service` is or is not routable from `from`, as a chain of checks a person can follow.
pub fn explain_route(hub: &Hub, service: &ServiceKey, from: &ClusterName) -> Explanation {
    // Before the view is read: it reads the view too.
    let probes = super::gateways::gateway_status(hub);
    let proxies = hub.proxies.current();
    let v = hub.view();
    let now = now_ms();
    let mut steps = Steps::default();
    let done = |steps: Steps, routable: bool| Explanation {
        service: service.to_string(),
        from: from.to_string(),
        routable,
        steps: steps.0,
    };
    let Some(asker) = v.cluster(from).cloned() else {
        steps.fail(
            format!("cluster {from} is not joined to this clusterset"),
            "fedmesh status (the clusters that joined); a cluster joins with a token from `fedmesh hub token create`",
        );
        return done(steps, false);
    };
    steps.ok(format!(
        "cluster {from} is joined (trust domain {})",
        asker.trust_domain
    ));
    if asker.stale {
        steps.warn(
            format!(
                "{from} is stale: the hub has not heard from it recently, so its view may be out of date (it keeps routing with its last view)"
            ),
            "fedmesh status; the log of its control plane",
        );
    }
    // The routes the asking cluster's sidecars apply to the service, rule by rule.
    for r in asker
        .routes
        .iter()
        .filter(|r| r.service == service.to_string())
    {
        let total: u64 = r.backends.iter().map(|b| u64::from(b.1)).sum();
        let to: Vec<String> = r
            .backends
            .iter()
            .map(|(name, weight, unresolved)| {
                let share = (u64::from(*weight) * 100)
                    .checked_div(total)
                    .map(|p| format!(" {p}%"))
                    .unwrap_or_default();
                let broken = if *unresolved {
                    " (resolves to nothing: its share answers 500)"
                } else {
                    ""
                };
                format!("{name}{share}{broken}")
            })
            .collect();
        let who = if r.consumer_namespace.is_empty() {
            String::new()
        } else {
            format!(" (for callers in namespace {})", r.consumer_namespace)
        };
        let message = format!(
            "{} in {from}{who}: {} → {}",
            r.source,
            r.matches,
            if to.is_empty() {
                "no backend".to_string()
            } else {
                to.join(", ")
            }
        );
        if !r.invalid.is_empty() {
            steps.warn(
                format!("{message}: this rule cannot be applied, requests it matches are answered 500: {}", r.invalid),
                "the route's status (kubectl get httproute -o yaml, or the directory source's status files)",
            );
        } else if r.backends.iter().any(|b| b.2) {
            steps.warn(message, "the route's status (ResolvedRefs)");
        } else {
            steps.ok(message);
        }
    }
    // What the asking cluster's own routes and policies for the service could not apply.
    for p in asker
        .problems
        .iter()
        .filter(|p| p.kind != "ServiceExport")
        .filter(|p| p.services.iter().any(|s| *s == service.to_string()))
    {
        steps.warn(
            format!(
                "{} {} in {from}: {} {} ({}): {}",
                p.kind,
                p.name,
                p.condition,
                if p.condition == "PartiallyInvalid" {
                    "True"
                } else {
                    "False"
                },
                p.reason,
                p.message
            ),
            "the object's status in that cluster",
        );
    }
    let Some(import) = v.import(service).cloned() else {
        // A cluster may have a ServiceExport it cannot export: say why.
        let mut why = false;
        for c in v.clusters() {
            for p in c
                .problems
                .iter()
                .filter(|p| p.kind == "ServiceExport" && p.name == service.to_string())
            {
                steps.fail(
                    format!(
                        "{} has a ServiceExport {service} but cannot export it: {} ({})",
                        c.name, p.message, p.reason
                    ),
                    format!(
                        "in {}: create the Service {} in namespace {} (or fix it), and the export follows",
                        c.name, service.name, service.namespace
                    ),
                );
                why = true;
            }
        }
        if !why {
            steps.fail(
                format!("{service} is not exported by any cluster"),
                format!(
                    "create a ServiceExport named {} in namespace {} next to the Service, in the cluster that runs it",
                    service.name, service.namespace
                ),
            );
        }
        return done(steps, false);
    };
    let exporters: Vec<String> = import.clusters.iter().map(|c| c.cluster.clone()).collect();
    steps.ok(format!("{service} is exported by {}", exporters.join(", ")));
    for c in &import.conflicts {
        steps.warn(
            format!("conflict: {}", c.message),
            "fedmesh status (MCS conflict resolution: the oldest export wins)",
        );
    }
    if v.bundle(&asker.trust_domain).is_none() {
        steps.fail(
            format!(
                "the hub has no bundle of {from} ({}): exporters cannot verify its callers",
                asker.trust_domain
            ),
            format!("is {from}'s control plane connected? fedmesh status; its log"),
        );
    }
    let mut routable = false;
    for ic in &import.clusters {
        let Ok(name) = ClusterName::new(&ic.cluster) else {
            continue;
        };
        let Some(exporter) = v.cluster(&name) else {
            continue;
        };
        let ready: u32 = ic
            .endpoints
            .iter()
            .map(|e| e.ready)
            .fold(0, u32::saturating_add);
        let mut ok = true;
        if exporter.expired {
            steps.fail(
                format!("{name} expired (silent too long); its export is withdrawn"),
                format!("start {name}'s control plane again; fedmesh status"),
            );
            continue;
        }
        if exporter.stale {
            let silent = v
                .presence(&name)
                .map(|p| (now - p.last_seen_ms).max(0) / 1000);
            steps.warn(
                format!(
                    "{name} is stale (silent for {}s): its export stays routable until data-plane health says otherwise",
                    silent.unwrap_or(0)
                ),
                format!("the log of {name}'s control plane"),
            );
        }
        let mut via = "locally".to_string();
        if name != *from {
            if v.bundle(&exporter.trust_domain).is_none() {
                steps.fail(
                    format!(
                        "no bundle of {} ({name}) at the hub: {from} cannot verify its endpoints",
                        exporter.trust_domain
                    ),
                    format!("is {name}'s control plane connected? fedmesh status"),
                );
                ok = false;
            }
            if exporter.gateways.is_empty() {
                steps.fail(
                    format!("{name} publishes no east-west gateway address: remote clusters cannot reach it"),
                    format!("start {name}'s control plane with --gateway HOST:PORT (where its `fedmesh gateway` listens for other clusters)"),
                );
                ok = false;
            } else {
                match gateway_steps(&mut steps, &probes, from, &name, &exporter.gateways) {
                    Some(gw) => via = gw,
                    None => ok = false,
                }
            }
        }
        let health = ejection_steps(&mut steps, &proxies, service, from, &name);
        if ready == 0 {
            steps.fail(
                format!("no healthy endpoints of {service} in {name}"),
                format!("in {name}: are the pods of {service} running and ready? (the EndpointSlices of the Service)"),
            );
            ok = false;
        }
        if ok {
            steps.ok(format!(
                "{name}: {ready} ready endpoint(s), reachable {via}{health}"
            ));
            routable = true;
        }
    }
    let last_change = v.last_change;
    drop(v);
    let acked = hub.acked_version(from);
    if acked < last_change && !asker.stale {
        steps.warn(
            format!(
                "{from} has acknowledged view version {acked} of {last_change}; the latest changes may still be on their way"
            ),
            format!("fedmesh check; the log of {from}'s control plane"),
        );
    }
    if routable {
        steps.ok(format!("{service} is routable from {from}"));
    } else {
        steps.fail(
            format!("{service} is not routable from {from}"),
            "the first ✗ above is the broken link",
        );
    }
    done(steps, routable)
}

/// What `from`'s probes found of `to`'s gateways: `Some("through gateway ...")` when one answered
/// (or none was probed yet: not known to be broken), `None` when every probed one failed.
fn gateway_steps(
    steps: &mut Steps,
    probes: &[super::gateways::GatewayStatus],
    from: &ClusterName,
    to: &ClusterName,
    addresses: &[String],
) -> Option<String> {
    let mine: Vec<_> = probes
        .iter()
        .filter(|g| g.from == from.as_str() && g.cluster == to.as_str())
        .collect();
    let look = format!("fedmesh gateways --cluster {to}");
    let up: Vec<_> = mine.iter().filter(|g| g.reachable() && g.ready).collect();
    if let Some(g) = up.first() {
        steps.ok(format!(
            "{to}'s gateway {} answered {from}'s mTLS probe in {:.1}ms",
            g.address,
            g.latency_ms.unwrap_or_default()
        ));
        return Some(format!("through gateway {}", g.address));
    }
    let through = format!("through gateway {}", addresses.join(", "));
    if mine.is_empty() {
        steps.warn(
            format!("{from} has reported no probe of {to}'s gateways"),
            look.clone(),
        );
        return Some(through);
    }
    let mut failed = false;
    for g in &mine {
        match g.state.as_str() {
            "unknown" => steps.warn(
                format!("{from} has not probed {to}'s gateway {} yet", g.address),
                look.clone(),
            ),
            "reachable" => {
                failed = true;
                steps.fail(
                    format!("{to}'s gateway {} answers but holds no configuration from its control plane: it admits nothing", g.address),
                    format!("the gateway's log: can it reach {to}'s control plane?"),
                );
            }
            _ => {
                failed = true;
                steps.fail(
                    format!("{to}'s gateway {} is unreachable from {from}: {}", g.address, g.error),
                    format!("is `fedmesh gateway` running in {to}, listening at {} and reachable from {from}? {look}", g.address),
                );
            }
        }
    }
    (!failed).then_some(through)
}

/// What the proxies' outlier detection holds ejected on the way from `from` to `to`'s endpoints
/// of `service`: `from`'s sidecars that ejected `to`'s gateway (or, when `to` is `from`, the
/// service's endpoints), and `to`'s gateways that ejected endpoints of the service behind them.
/// A warning per ejected target; when there is none, what to add to the exporter's line.
fn ejection_steps(
    steps: &mut Steps,
    proxies: &[super::proxies::ProxyStatus],
    service: &ServiceKey,
    from: &ClusterName,
    to: &ClusterName,
) -> String {
    /// Who ejected a target: `from`'s sidecars, or `to`'s gateways.
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum By {
        Sidecars,
        Gateways,
    }
    /// One ejected target: how many proxies hold it ejected, the longest time left, the most
    /// ejections in a row, and the services whose failed requests did it.
    #[derive(Default)]
    struct Seen {
        proxies: usize,
        left: f64,
        times: u32,
        services: Vec<String>,
    }
    let svc = service.to_string();
    let of = |cluster: &ClusterName, role: &str| -> Vec<&super::proxies::ProxyStatus> {
        proxies
            .iter()
            .filter(|p| p.cluster == cluster.as_str() && p.role == role)
            .collect()
    };
    let (sidecars, gateways) = (of(from, "sidecar"), of(to, "gateway"));
    let mut seen: std::collections::BTreeMap<(By, String), Seen> = Default::default();
    let mut note = |by: By, e: &super::proxies::Ejection| {
        let s = seen.entry((by, e.address.clone())).or_default();
        s.proxies += 1;
        s.left = s.left.max(e.remaining_seconds);
        s.times = s.times.max(e.ejections);
        if !s.services.contains(&e.service) {
            s.services.push(e.service.clone());
        }
    };
    for e in sidecars.iter().flat_map(|p| &p.ejected) {
        let ours = e.cluster == to.as_str()
            && if to == from {
                !e.remote && e.service == svc
            } else {
                e.remote
            };
        if ours {
            note(By::Sidecars, e);
        }
    }
    if to != from {
        for e in gateways.iter().flat_map(|p| &p.ejected) {
            if !e.remote && e.service == svc {
                note(By::Gateways, e);
            }
        }
    }
    if seen.is_empty() {
        return match sidecars.len() {
            0 => String::new(),
            n => format!(", none ejected by {from}'s {n} sidecar(s)"),
        };
    }
    for ((by, address), s) in seen {
        let (count, kind, at, what) = match by {
            By::Sidecars if to != from => (
                sidecars.len(),
                "sidecar(s)",
                from,
                format!("{to}'s gateway"),
            ),
            By::Sidecars => (sidecars.len(), "sidecar(s)", from, "endpoint".to_string()),
            By::Gateways => (gateways.len(), "gateway(s)", to, "endpoint".to_string()),
        };
        steps.warn(
            format!(
                "{} of {count} {kind} in {at} ejected {what} {address} after requests to {} failed ({} ejection(s) in a row, back within {:.0}s): until then it gets requests only when no other candidate is healthy",
                s.proxies,
                s.services.join(", "),
                s.times,
                s.left.ceil(),
            ),
            format!(
                "do {svc}'s endpoints in {to} answer 5xx or refuse connections? fedmesh proxy-status --cluster {at} -o wide; the log of those proxies (\"outlier ejected\")"
            ),
        );
    }
    String::new()
}

/// The steps of an explanation.
#[derive(Default)]
struct Steps(Vec<ExplainStep>);

impl Steps {
    fn push(&mut self, status: &str, message: String, hint: Option<String>) {
        self.0.push(ExplainStep {
            status: status.into(),
            message,
            hint,
        });
    }
    fn ok(&mut self, message: String) {
        self.push("ok", message, None);
    }
    fn warn(&mut self, message: String, hint: impl Into<String>) {
        self.push("warn", message, Some(hint.into()));
    }
    fn fail(&mut self, message: String, hint: impl Into<String>) {
        self.push("fail", message, Some(hint.into()));
    }
}
