//! The hub's admin API: JSON over HTTP (or HTTPS), documented at `/api/openapi.json`.
//!
//! `/api/v1/*` requires `Authorization: Bearer <admin token>` or, over TLS, a client certificate
//! whose SPIFFE ID is one of the admin IDs. `/healthz`, `/readyz`, `/metrics` and the OpenAPI
//! document are open.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey, SpiffeId};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::Hub;
use super::access::Role;
use super::audit::{Actor, AuditQuery, AuditRecord};
pub use super::explain::{ExplainStep, Explanation, explain_route};
use super::records::now_ms;
use fedmesh_trust::http_server::Peer;

#[derive(Clone)]
pub struct AdminState {
    pub hub: Arc<Hub>,
    pub token: Arc<String>,
    pub admin_ids: Arc<BTreeSet<SpiffeId>>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    pub name: String,
    pub trust_domain: String,
    pub region: String,
    /// A control plane currently holds a Federate stream (heartbeat within the stale period).
    pub connected: bool,
    /// RFC 3339 time the hub last heard from the cluster.
    pub last_seen: Option<String>,
    pub seconds_since_seen: Option<u64>,
    pub stale: bool,
    pub expired: bool,
    pub protocol_version: u32,
    pub bundle_sequence: Option<u64>,
    pub gateways: Vec<String>,
    pub published_version: u64,
    /// The last view version the cluster acknowledged having applied.
    pub acked_version: u64,
    /// The hub's view version now: an `acked_version` below it means the cluster has not
    /// applied the latest changes yet (or is applying them).
    #[serde(default)]
    pub view_version: u64,
    pub exports: usize,
    pub hub_replica: Option<String>,
    /// Routes and policies the cluster could not fully accept, and source files it could not
    /// read.
    #[serde(default)]
    pub problems: Vec<ProblemStatus>,
}

/// A route or policy a cluster could not fully accept, or a file of its directory source it could
/// not read: the condition that says so.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ProblemStatus {
    /// `HTTPRoute`, `GRPCRoute`, a policy's kind, or `File`.
    pub kind: String,
    /// `namespace/name`; a file's path under the source directory.
    pub name: String,
    /// `Accepted`, `ResolvedRefs` (False), `PartiallyInvalid` (True), or a file's `Valid`
    /// (False).
    pub condition: String,
    pub reason: String,
    pub message: String,
    /// The services it is about.
    pub services: Vec<String>,
}

impl From<&super::records::ProblemRecord> for ProblemStatus {
    fn from(p: &super::records::ProblemRecord) -> Self {
        Self {
            kind: p.kind.clone(),
            name: p.name.clone(),
            condition: p.condition.clone(),
            reason: p.reason.clone(),
            message: p.message.clone(),
            services: p.services.clone(),
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct PortStatus {
    pub name: String,
    pub protocol: String,
    pub port: u32,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ExporterStatus {
    pub cluster: String,
    pub ready_endpoints: u32,
    pub total_endpoints: u32,
    pub localities: Vec<String>,
    pub stale: bool,
    pub exported_unix: i64,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ConflictStatus {
    pub cluster: String,
    pub field: String,
    pub winner: String,
    pub message: String,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub service: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub ports: Vec<PortStatus>,
    pub clusters: Vec<ExporterStatus>,
    pub conflicts: Vec<ConflictStatus>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq)]
pub struct BundleStatus {
    pub trust_domain: String,
    pub cluster: String,
    pub sequence: u64,
    pub x509_authorities: usize,
    pub jwt_authorities: usize,
}

/// The longest a join token may live.
pub const MAX_JOIN_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The cluster's name (a DNS label).
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub cluster: String,
    /// The trust domain the cluster registers with; the token registers this one and no other
    /// (not the hub's own).
    #[schema(pattern = r"^(spiffe://)?[a-z0-9._-]{1,255}$")]
    pub trust_domain: String,
    /// Lifetime, 1s to 7 days, e.g. `1h` (default: the hub's --token-ttl).
    #[schema(
        pattern = r"^([1-9][0-9]{0,4}s|[1-9][0-9]{0,3}m|([1-9][0-9]?|1[0-5][0-9]|16[0-8])h|[1-7]d)$"
    )]
    pub ttl: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct TokenResponse {
    pub cluster: String,
    pub trust_domain: String,
    pub token: String,
    pub expires: String,
}

/// Every error the admin API answers.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
    /// What to do about it, where the API knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "fedmesh hub admin API", version = "v1", description = "Clusters, exported services, bundles, join tokens, the audit log and recent traces of a fedmesh clusterset."),
    paths(list_clusters, remove_cluster, cluster_imports, withdraw_export, list_services, list_bundles, super::explain::explain, create_token, super::access::list_join_tokens, super::access::revoke_join_token, super::access::create_admin_token, super::access::list_admin_tokens, super::access::revoke_admin_token, audit_log, super::traces::api::list_traces, super::traces::api::get_trace, super::traces::api::get_skew, super::traces::api::get_graph, super::plaintext::list_plaintext, super::proxies::list_proxies, super::gateways::list_gateways, super::rollouts::list_rollouts),
    components(schemas(ClusterStatus, ServiceStatus, ExporterStatus, PortStatus, ConflictStatus, BundleStatus, Explanation, ExplainStep, TokenRequest, TokenResponse, super::access::Role, super::access::AdminTokenRequest, super::access::AdminTokenResponse, super::access::AdminTokenView, super::access::JoinTokenView, super::access::Revoked, ErrorBody, AuditRecord, super::traces::SpanView, super::traces::TraceSummary, super::traces::skew::ClockSkew, super::traces::skew::ClusterOffset, super::traces::graph::Graph, super::traces::graph::GraphNode, super::traces::graph::GraphEdge, super::plaintext::PlaintextStatus, super::proxies::ProxyStatus, super::proxies::Ejection, super::gateways::GatewayStatus, super::rollouts::ClustersetRollout, super::rollouts::RolloutCluster, super::rollouts::DecisionView)),
    modifiers(&BearerAuth, &CommonResponses)
)]
pub struct ApiDoc;

/// The answers every operation can give, whatever it does: 401 (no admin token, or a wrong
/// one), 403 (a read-only token where an admin one is needed, or a client certificate whose ID
/// the hub does not list), and 400 for an operation that takes parameters (one that does not
/// parse, or is outside its range). All are JSON `{"error", "hint"}`.
struct CommonResponses;
impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut op.responses.responses;
                let mut add = |status: &str, description: &str| {
                    responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(description).into());
                };
                add(
                    "401",
                    "No admin token (`Authorization: Bearer ...`), or a wrong one",
                );
                add(
                    "403",
                    "A read-only token where an admin one is needed, or a client certificate whose SPIFFE ID is not an admin ID of this hub",
                );
                if op.parameters.as_ref().is_some_and(|p| !p.is_empty())
                    || op.request_body.is_some()
                {
                    add(
                        "400",
                        "A parameter or body that does not parse, or a value out of its range (the error says which)",
                    );
                }
            }
        }
    }
}

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "admin_token",
            Vec::<String>::new(),
        )]);
    }
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/clusters", get(list_clusters))
        .route("/clusters/{name}", delete(remove_cluster))
        .route("/clusters/{name}/imports", get(cluster_imports))
        .route(
            "/clusters/{name}/exports/{namespace}/{service}",
            delete(withdraw_export),
        )
        .route("/services", get(list_services))
        .route("/plaintext", get(super::plaintext::list_plaintext))
        .route("/proxies", get(super::proxies::list_proxies))
        .route("/gateways", get(super::gateways::list_gateways))
        .route("/rollouts", get(super::rollouts::list_rollouts))
        .route("/bundles", get(list_bundles))
        .route("/explain", get(super::explain::explain))
        .route(
            "/tokens",
            post(create_token).get(super::access::list_join_tokens),
        )
        .route("/tokens/{id}", delete(super::access::revoke_join_token))
        .route(
            "/admin-tokens",
            post(super::access::create_admin_token).get(super::access::list_admin_tokens),
        )
        .route(
            "/admin-tokens/{name}",
            delete(super::access::revoke_admin_token),
        )
        .route("/audit", get(audit_log))
        .route("/traces", get(super::traces::api::list_traces))
        .route("/traces/{id}", get(super::traces::api::get_trace))
        .route("/traces/{id}/skew", get(super::traces::api::get_skew))
        .route("/graph", get(super::traces::api::get_graph))
        .method_not_allowed_fallback(super::api_json::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ));
    Router::new()
        .nest("/api/v1", api)
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(super::ui::router())
        .fallback(super::api_json::not_found)
        .with_state(state)
        .layer(tower::limit::ConcurrencyLimitLayer::new(256))
}

pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    answer_error(status, msg.into(), None)
}

/// [`error`] with what to do about it.
pub(crate) fn error_with_hint(
    status: StatusCode,
    msg: impl Into<String>,
    hint: impl Into<String>,
) -> Response {
    answer_error(status, msg.into(), Some(hint.into()))
}

fn answer_error(status: StatusCode, msg: String, hint: Option<String>) -> Response {
    // The client's mistakes are the client's to read; the hub's own failures (its store
    // unavailable, its disk full) are the operator's, so they go to the log too.
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), error = %msg, "admin API request failed");
    }
    (status, Json(ErrorBody { error: msg, hint })).into_response()
}

async fn authorize(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(id) = &peer.spiffe_id
        && s.admin_ids.contains(id)
    {
        req.extensions_mut().insert(Actor(format!("admin {id}")));
        return next.run(req).await;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(t) = presented else {
        if let Some(id) = &peer.spiffe_id {
            s.hub.metrics.refuse("admin_id");
            return error(
                StatusCode::FORBIDDEN,
                format!(
                    "the client certificate's SPIFFE ID {id} is not an admin ID of this hub (its --admin-id list); present a listed one, or an admin token"
                ),
            );
        }
        return error(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <admin token>` (the hub wrote it to <data-dir>/admin-token)",
        );
    };
    let (actor, role) = if constant_time_eq(t.as_bytes(), s.token.as_bytes()) {
        ("admin token".to_string(), Role::Admin)
    } else {
        match super::access::authenticate(s.hub.store().as_ref(), t).await {
            Some((name, role)) => (format!("admin token {name}"), role),
            None => {
                s.hub.metrics.refuse("admin_token");
                return error(StatusCode::UNAUTHORIZED, "the admin token is wrong");
            }
        }
    };
    if role == Role::ReadOnly && !read_only_may(req.method(), req.uri().path()) {
        s.hub.metrics.refuse("read_only_token");
        // The path as sent (this router is nested under /api/v1).
        let path = req
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map_or_else(|| req.uri().path().to_string(), |u| u.path().to_string());
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{actor} is read-only: it may read status, services, explain, traces and the audit log, not {} {path}; use an admin token",
                req.method(),
            ),
        );
    }
    req.extensions_mut().insert(Actor(actor));
    next.run(req).await
}

/// A read-only token reads, and never lists tokens.
fn read_only_may(method: &axum::http::Method, path: &str) -> bool {
    let reads = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
    let tokens = ["/tokens", "/admin-tokens"]
        .iter()
        .any(|p| path.ends_with(p) || path.contains(&format!("{p}/")));
    reads && !tokens
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_pretty_json().unwrap_or_default(),
    )
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), s.hub.store().revision()).await {
        Ok(Ok(r)) => (StatusCode::OK, format!("ready (store revision {r})\n")).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store did not answer within 2s",
        ),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let clusters: Vec<crate::metrics::ClusterSeen> = cluster_statuses(&s.hub)
        .into_iter()
        .map(|c| crate::metrics::ClusterSeen {
            cluster: c.name,
            seconds_since_seen: c.seconds_since_seen,
            stale: c.stale,
            connected: c.connected,
        })
        .collect();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.hub.metrics.encode_with_clusters(&clusters),
    )
}

/// Cluster status as the admin API reports it.
pub fn cluster_statuses(hub: &Hub) -> Vec<ClusterStatus> {
    let v = hub.view();
    let now = now_ms();
    v.clusters()
        .map(|c| {
            let p = v.presence(&c.name);
            let since = p.map(|p| ((now - p.last_seen_ms).max(0) / 1000) as u64);
            ClusterStatus {
                name: c.name.to_string(),
                trust_domain: c.trust_domain.to_string(),
                region: c.region.clone(),
                connected: p.is_some_and(|p| {
                    p.connected
                        && (now - p.last_seen_ms) < hub.config.stale_after.as_millis() as i64
                }),
                last_seen: p.map(|p| {
                    fedmesh_trust::svid::rfc3339(
                        std::time::UNIX_EPOCH + Duration::from_millis(p.last_seen_ms.max(0) as u64),
                    )
                }),
                seconds_since_seen: since,
                stale: c.stale,
                expired: c.expired,
                protocol_version: c.protocol_version,
                bundle_sequence: v.bundle(&c.trust_domain).map(|b| b.sequence),
                gateways: c.gateways.clone(),
                published_version: c.published_version,
                acked_version: p.map(|p| p.acked_version).unwrap_or(0).max(
                    hub.acked
                        .lock()
                        .map(|m| m.get(&c.name).copied().unwrap_or(0))
                        .unwrap_or(0),
                ),
                view_version: v.last_change,
                exports: v.services_exported_by(&c.name).len(),
                hub_replica: p.map(|p| p.hub.clone()),
                problems: c.problems.iter().map(ProblemStatus::from).collect(),
            }
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v1/clusters",
    responses((status = 200, description = "Every cluster that joined: its trust domain, region, gateways, whether it is connected, stale or expired, and the view version it applied", body = [ClusterStatus])))]
async fn list_clusters(State(s): State<AdminState>) -> Json<Vec<ClusterStatus>> {
    Json(cluster_statuses(&s.hub))
}

#[utoipa::path(delete, path = "/api/v1/clusters/{name}", params(("name" = String, Path, description = "The cluster's name (a DNS label)", pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")),
    responses((status = 204, description = "Removed: its exports are withdrawn and its bundle leaves every other cluster"),
        (status = 404, description = "No cluster of that name joined", body = ErrorBody)))]
async fn remove_cluster(
    State(s): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
) -> Response {
    let Ok(c) = ClusterName::new(&name) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{name:?} is not a cluster name"),
        );
    };
    match s.hub.remove_cluster(&c).await {
        Ok(true) => {
            tracing::info!(cluster = %c, "cluster removed by an operator");
            s.hub
                .audit(&actor.0, "cluster.remove", c.as_str(), String::new())
                .await;
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no cluster {c}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[utoipa::path(delete, path = "/api/v1/clusters/{name}/exports/{namespace}/{service}",
    params(("name" = String, Path, description = "The cluster's name (a DNS label)", pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
        ("namespace" = String, Path, description = "The service's namespace (a DNS label)", pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
        ("service" = String, Path, description = "The service's name (a DNS label)", pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")),
    responses((status = 204, description = "The cluster's export of the service is withdrawn until it publishes it again"),
        (status = 404, description = "No such cluster, or it does not export the service", body = ErrorBody)))]
async fn withdraw_export(
    State(s): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Path((name, namespace, service)): Path<(String, String, String)>,
) -> Response {
    let (Ok(c), Ok(k)) = (
        ClusterName::new(&name),
        ServiceKey::new(&namespace, &service),
    ) else {
        return error(StatusCode::BAD_REQUEST, "invalid cluster or service name");
    };
    match s.hub.withdraw_export(&c, &k).await {
        Ok(true) => {
            tracing::info!(cluster = %c, service = %k, "export withdrawn by an operator");
            s.hub
                .audit(
                    &actor.0,
                    "export.withdraw",
                    &format!("{c}/{k}"),
                    String::new(),
                )
                .await;
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("{c} does not export {k}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn service_status(hub: &Hub, i: &pb::Import) -> ServiceStatus {
    let v = hub.view();
    ServiceStatus {
        service: i.service.clone(),
        type_: match i.r#type {
            2 => "Headless".into(),
            _ => "ClusterSetIP".into(),
        },
        ports: i
            .ports
            .iter()
            .map(|p| PortStatus {
                name: p.name.clone(),
                protocol: p.protocol.clone(),
                port: p.port,
            })
            .collect(),
        clusters: i
            .clusters
            .iter()
            .map(|c| ExporterStatus {
                cluster: c.cluster.clone(),
                ready_endpoints: c
                    .endpoints
                    .iter()
                    .map(|e| e.ready)
                    .fold(0, u32::saturating_add),
                total_endpoints: c
                    .endpoints
                    .iter()
                    .map(|e| e.total)
                    .fold(0, u32::saturating_add),
                localities: c
                    .endpoints
                    .iter()
                    .map(|e| format!("{}/{}", e.region, e.zone))
                    .collect(),
                stale: ClusterName::new(&c.cluster)
                    .ok()
                    .and_then(|n| v.cluster(&n).map(|r| r.stale))
                    .unwrap_or(false),
                exported_unix: c.exported_unix,
            })
            .collect(),
        conflicts: i
            .conflicts
            .iter()
            .map(|c| ConflictStatus {
                cluster: c.cluster.clone(),
                field: c.field.clone(),
                winner: c.winner.clone(),
                message: c.message.clone(),
            })
            .collect(),
    }
}

#[utoipa::path(get, path = "/api/v1/services",
    responses((status = 200, description = "Every exported service of the clusterset (its ServiceImport): type, ports, the clusters exporting it with their endpoints, and conflicts", body = [ServiceStatus])))]
async fn list_services(State(s): State<AdminState>) -> Json<Vec<ServiceStatus>> {
    let imports: Vec<_> = s.hub.view().imports().cloned().collect();
    Json(imports.iter().map(|i| service_status(&s.hub, i)).collect())
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/imports", params(("name" = String, Path, description = "The cluster's name (a DNS label)", pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")),
    responses((status = 200, description = "The services the cluster imports (every exported service of the clusterset)", body = [ServiceStatus]),
        (status = 404, description = "No cluster of that name joined", body = ErrorBody)))]
async fn cluster_imports(State(s): State<AdminState>, Path(name): Path<String>) -> Response {
    let Ok(c) = ClusterName::new(&name) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{name:?} is not a cluster name"),
        );
    };
    if s.hub.view().cluster(&c).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no cluster {c}"));
    }
    // Every cluster imports every exported service (MCS); this is what `c` receives.
    let imports: Vec<_> = s.hub.view().imports().cloned().collect();
    Json(
        imports
            .iter()
            .map(|i| service_status(&s.hub, i))
            .collect::<Vec<_>>(),
    )
    .into_response()
}

#[utoipa::path(get, path = "/api/v1/bundles",
    responses((status = 200, description = "Every cluster's trust bundle the hub holds: sequence and authority counts", body = [BundleStatus])))]
async fn list_bundles(State(s): State<AdminState>) -> Json<Vec<BundleStatus>> {
    let v = s.hub.view();
    Json(
        v.bundles()
            .map(|b| {
                let parsed = fedmesh_trust::bundle::SpiffeBundle::from_json(
                    b.trust_domain.clone(),
                    b.jwks.as_bytes(),
                )
                .ok();
                BundleStatus {
                    trust_domain: b.trust_domain.to_string(),
                    cluster: b.cluster.to_string(),
                    sequence: b.sequence,
                    x509_authorities: parsed
                        .as_ref()
                        .map(|p| p.x509_authorities().len())
                        .unwrap_or(0),
                    jwt_authorities: parsed
                        .as_ref()
                        .map(|p| p.jwt_authorities().len())
                        .unwrap_or(0),
                }
            })
            .collect(),
    )
}

#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery),
    responses((status = 200, description = "The records that match, newest first", body = Vec<AuditRecord>),
        (status = 503, description = "The hub's store is unavailable", body = ErrorBody)))]
/// The audit log: every change through this API or the federation protocol, newest first.
async fn audit_log(
    State(s): State<AdminState>,
    super::api_json::ApiQuery(q): super::api_json::ApiQuery<AuditQuery>,
) -> Response {
    if let Some(r) = q.refusal() {
        return r;
    }
    match s.hub.audit_log(&q).await {
        Ok(records) => Json(records).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = TokenRequest,
    responses((status = 201, description = "The join token (shown once) and its expiry", body = TokenResponse),
              (status = 400, description = "an invalid cluster name, trust domain or lifetime, or a body that is not JSON", body = ErrorBody),
              (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
              (status = 422, description = "a field the API does not know, or of the wrong type", body = ErrorBody)))]
async fn create_token(
    State(s): State<AdminState>,
    Extension(actor): Extension<Actor>,
    super::api_json::ApiJson(req): super::api_json::ApiJson<TokenRequest>,
) -> Response {
    let cluster = match ClusterName::new(&req.cluster) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let trust_domain = match fedmesh_api::TrustDomain::new(&req.trust_domain) {
        Ok(td) if td == s.hub.trust_domain() => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{td} is the hub's own trust domain; a cluster needs its own"),
            );
        }
        Ok(td) => td,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("trust_domain: {e}")),
    };
    let ttl = match req
        .ttl
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
    {
        Ok(Some(t)) if t.is_zero() || t > MAX_JOIN_TOKEN_TTL => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "ttl: {} is not between 1s and {} (a join token is a bearer secret until it is used: keep it short)",
                    humantime::format_duration(t),
                    humantime::format_duration(MAX_JOIN_TOKEN_TTL)
                ),
            );
        }
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e} (write e.g. 1h)")),
    };
    match s.hub.create_token(&cluster, &trust_domain, ttl).await {
        Ok((token, expires)) => {
            tracing::info!(%cluster, %trust_domain, "join token created");
            let id = crate::tokens::JoinToken::parse(&token)
                .map(|t| t.id)
                .unwrap_or_default();
            s.hub
                .audit(
                    &actor.0,
                    "token.create",
                    cluster.as_str(),
                    format!(
                        "join token {id} for trust domain {trust_domain}, valid until {}",
                        fedmesh_trust::svid::rfc3339(fedmesh_trust::svid::from_unix_secs(
                            expires.max(0) as u64
                        ))
                    ),
                )
                .await;
            (
                StatusCode::CREATED,
                Json(TokenResponse {
                    cluster: cluster.to_string(),
                    trust_domain: trust_domain.to_string(),
                    token,
                    expires: fedmesh_trust::svid::rfc3339(fedmesh_trust::svid::from_unix_secs(
                        expires.max(0) as u64,
                    )),
                }),
            )
                .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
