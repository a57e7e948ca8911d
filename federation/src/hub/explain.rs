//! `explain`: why a service is or is not routable from a cluster, as a chain of checks a person
//! can follow (`GET /api/v1/explain`, `fedmesh explain`), from the hub's view of the clusterset.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fedmesh_api::{ClusterName, ServiceKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Hub;
use super::admin::{AdminState, ErrorBody, error};
use super::records::now_ms;

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ExplainStep {
    /// `ok`, `warn` or `fail`.
    pub status: String,
    pub message: String,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct Explanation {
    pub service: String,
    pub from: String,
    pub routable: bool,
    pub steps: Vec<ExplainStep>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ExplainQuery {
    /// NAMESPACE/NAME
    service: String,
    /// The cluster asking.
    from: String,
}

#[utoipa::path(get, path = "/api/v1/explain", params(ExplainQuery),
    responses((status = 200, body = Explanation), (status = 400, body = ErrorBody)))]
pub(super) async fn explain(
    State(s): State<AdminState>,
    Query(q): Query<ExplainQuery>,
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
    let v = hub.view();
    let now = now_ms();
    let mut steps = Vec::new();
    let mut step = |status: &str, message: String| {
        steps.push(ExplainStep {
            status: status.into(),
            message,
        })
    };
    let done = |steps: Vec<ExplainStep>, routable: bool| Explanation {
        service: service.to_string(),
        from: from.to_string(),
        routable,
        steps,
    };
    let Some(asker) = v.cluster(from).cloned() else {
        step(
            "fail",
            format!("cluster {from} is not joined to this clusterset (see `fedmesh status`)"),
        );
        return done(steps, false);
    };
    step(
        "ok",
        format!(
            "cluster {from} is joined (trust domain {})",
            asker.trust_domain
        ),
    );
    if asker.stale {
        step(
            "warn",
            format!(
                "{from} is stale: the hub has not heard from it recently, so its view may be out of date (it keeps routing with its last view)"
            ),
        );
    }
    // What the asking cluster's own routes and policies for the service could not apply.
    for p in asker
        .problems
        .iter()
        .filter(|p| p.services.iter().any(|s| *s == service.to_string()))
    {
        step(
            "warn",
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
        );
    }
    let Some(import) = v.import(service).cloned() else {
        step(
            "fail",
            format!(
                "{service} is not exported by any cluster: create a ServiceExport named {} in namespace {} next to the Service",
                service.name, service.namespace
            ),
        );
        return done(steps, false);
    };
    let exporters: Vec<String> = import.clusters.iter().map(|c| c.cluster.clone()).collect();
    step(
        "ok",
        format!("{service} is exported by {}", exporters.join(", ")),
    );
    for c in &import.conflicts {
        step("warn", format!("conflict: {}", c.message));
    }
    if v.bundle(&asker.trust_domain).is_none() {
        step(
            "fail",
            format!(
                "the hub has no bundle of {from} ({}): exporters cannot verify its callers; is its control plane connected?",
                asker.trust_domain
            ),
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
            step(
                "fail",
                format!("{name} expired (silent too long); its export is withdrawn"),
            );
            continue;
        }
        if exporter.stale {
            let silent = v
                .presence(&name)
                .map(|p| (now - p.last_seen_ms).max(0) / 1000);
            step(
                "warn",
                format!(
                    "{name} is stale (silent for {}s): its export stays routable until data-plane health says otherwise",
                    silent.unwrap_or(0)
                ),
            );
        }
        if name != *from {
            if v.bundle(&exporter.trust_domain).is_none() {
                step(
                    "fail",
                    format!(
                        "no bundle of {} ({name}) at the hub: {from} cannot verify its endpoints",
                        exporter.trust_domain
                    ),
                );
                ok = false;
            }
            if exporter.gateways.is_empty() {
                step(
                    "fail",
                    format!(
                        "{name} publishes no east-west gateway address: remote clusters cannot reach it"
                    ),
                );
                ok = false;
            }
        }
        if ready == 0 {
            step(
                "fail",
                format!("no healthy endpoints of {service} in {name}"),
            );
            ok = false;
        }
        if ok {
            let via = if name == *from {
                "locally".to_string()
            } else {
                format!("through gateway {}", exporter.gateways.join(", "))
            };
            step(
                "ok",
                format!("{name}: {ready} ready endpoint(s), reachable {via}"),
            );
            routable = true;
        }
    }
    let last_change = v.last_change;
    drop(v);
    let acked = hub.acked_version(from);
    if acked < last_change && !asker.stale {
        step(
            "warn",
            format!(
                "{from} has acknowledged view version {acked} of {last_change}; the latest changes may still be on their way"
            ),
        );
    }
    if routable {
        step("ok", format!("{service} is routable from {from}"));
    } else {
        step("fail", format!("{service} is not routable from {from}"));
    }
    done(steps, routable)
}
