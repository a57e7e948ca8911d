//! The admin port of the gateway and the sidecar: `/metrics` (Prometheus), `/healthz`,
//! `/readyz`, and `/config` (the routing table in force, as JSON).
//!
//! The port is often bound beyond loopback, because the kubelet probes and Prometheus scrapes it
//! at the pod's address; `/config` names services, endpoint addresses and policies, so it answers
//! loopback callers only (`kubectl port-forward`, or `kubectl exec` into the pod).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fedmesh_trust::tls::MeshIdentity;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigHandle;
use crate::metrics::ProxyMetrics;
use crate::target::{Place, Target};

#[derive(Clone)]
pub struct AdminState {
    pub role: &'static str,
    pub metrics: Arc<ProxyMetrics>,
    pub config: ConfigHandle,
    pub identity: MeshIdentity,
    /// Set when shutting down: `/readyz` fails so load balancers stop sending new work.
    pub draining: Arc<AtomicBool>,
}

pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/config", get(config))
        .with_state(state);
    use fedmesh_trust::http_server::{HttpListener, Versions, serve};
    match HttpListener::new(listener, None, "proxy admin") {
        Ok(l) => serve(l, app, Versions::Http1, "proxy admin", shutdown).await,
        Err(e) => tracing::error!(error = %e, "admin server failed"),
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let mut missing = Vec::new();
    if s.draining.load(Ordering::Relaxed) {
        missing.push("draining");
    }
    if s.identity.svid().is_none() {
        missing.push("no SVID yet from the Workload API");
    }
    if *s.config.changes().borrow() == 0 {
        missing.push("no configuration yet from the control plane (and no cached one)");
    }
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
            .into_response()
    }
}

async fn config(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<fedmesh_trust::http_server::Peer>,
) -> Response {
    let peer = peer.remote;
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            format!(
                "/config is served to loopback only (this request came from {}): use `kubectl port-forward` to this port, or ask from inside the pod\n",
                peer.ip()
            ),
        )
            .into_response();
    }
    let t = s.config.table();
    let mut services = serde_json::Map::new();
    let mut keys: Vec<_> = t.services.keys().collect();
    keys.sort();
    for k in keys {
        let e = &t.services[k];
        let mut ports = serde_json::Map::new();
        let show = |ts: &[Target]| -> Vec<serde_json::Value> {
            ts.iter()
                .map(|t| match t.place() {
                    Place::Local { addr, zone } => json!({"local": addr.to_string(), "zone": &**zone}),
                    Place::Remote { region, gateway } => {
                        json!({"cluster": t.cluster().as_str(), "region": &**region, "gateway": &**gateway})
                    }
                })
                .collect()
        };
        for p in &e.ports {
            ports.insert(
                p.port.to_string(),
                json!({"clusterset": show(e.targets(p.port)), "local": show(e.local_targets(p.port))}),
            );
        }
        let policy = &e.policy;
        services.insert(
            k.to_string(),
            json!({
                "vip": e.svc.vip,
                "clusterIP": e.svc.cluster_ip,
                "inClusterset": e.in_clusterset,
                "exported": e.exported,
                "ports": ports,
                "routes": policy.routes.iter().map(|r| json!({
                    "source": r.source,
                    "name": r.name,
                    "backends": r.route_backends.iter().map(|b| json!({
                        "to": format!("{:?}", b.target),
                        "weight": b.weight,
                    })).collect::<Vec<_>>(),
                    "invalid": r.invalid,
                })).collect::<Vec<_>>(),
                "allowedCallers": policy.allowed_callers_text,
            }),
        );
    }
    // Whom this proxy can verify: per trust domain, how many CA authorities it holds (two
    // while a rotation has prepared or retired one).
    let trust: serde_json::Map<String, serde_json::Value> = s
        .identity
        .trust()
        .bundles()
        .iter()
        .map(|b| {
            (
                b.trust_domain().to_string(),
                json!({"authorities": b.x509_authorities().len(), "sequence": b.sequence()}),
            )
        })
        .collect();
    axum::Json(json!({
        "role": s.role,
        "identity": s.identity.spiffe_id().map(|i| i.to_string()),
        "svidNotAfter": s.identity.svid().map(|v| fedmesh_trust::svid::rfc3339(v.not_after)),
        "trust": trust,
        "controlPlaneConnected": s.config.connected(),
        "epoch": t.epoch,
        "version": t.version,
        "cluster": {"name": t.cluster.name, "trustDomain": t.cluster.trust_domain, "region": t.cluster.region},
        "services": services,
    }))
    .into_response()
}
