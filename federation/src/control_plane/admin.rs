//! The control plane's admin socket, `<data-dir>/admin.sock` (mode 0600 in the private data
//! directory): who may use it is who may read the CA's keys beside it, as with SPIRE's server
//! socket. `fedmesh control-plane token|entry|node ...` talk to it; it is JSON over HTTP/1.1.
//!
//! - `POST /v1/nodes/{node}/tokens` `{"ttl_seconds": N}` → a one-time join token for that node
//! - `GET /v1/nodes` → every node with its agent's registration and its entries
//! - `DELETE /v1/nodes/{node}` → ends the node's registration (its identities stop renewing)
//! - `POST /v1/nodes/{node}/entries` `{"spiffe_id": ID}` / `DELETE ...?spiffe_id=ID` → entries
//! - `GET /v1/ca` → the CA's authorities; `POST /v1/ca/rotate` `{"step": "prepare"|"activate"|"prune"}`
//!   → one rotation step on the running CA, then its authorities
//! - `GET /v1/proxies` → the sidecars and gateways with a configuration stream open, and the
//!   configuration version now
//! - `GET /v1/rollouts` → every Rollout of the cluster with its status and decisions;
//!   `POST /v1/rollouts/{namespace}/{name}/{pause|resume|promote|abort}` `{"by": WHO}` → one
//!   command, applied to the routes at once, and the rollout after it
//! - `GET /metrics` → Prometheus text

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::ControlPlane;
use super::nodes;

pub const SOCKET: &str = "admin.sock";

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct TokenRequest {
    #[serde(default)]
    pub ttl_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub node: String,
    pub token: String,
    pub expires_unix: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EntryRequest {
    pub spiffe_id: String,
}

/// A step of CA rotation (`fedmesh control-plane ca rotate --step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotateStep {
    /// Make the next authority and publish it in the bundle (it signs nothing yet).
    Prepare,
    /// The prepared authority starts signing; the active one retires (still trusted).
    Activate,
    /// Drop retired authorities once every SVID they signed has expired.
    Prune,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RotateRequest {
    pub step: RotateStep,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Changed {
    pub changed: bool,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: msg.into() })).into_response()
}

type Cp = State<Arc<ControlPlane>>;

fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", delete(remove_node))
        .route("/v1/nodes/{node}/tokens", post(create_token))
        .route(
            "/v1/nodes/{node}/entries",
            post(add_entry).delete(delete_entry),
        )
        .route("/v1/proxies", get(list_proxies))
        .route("/v1/rollouts", get(list_rollouts))
        .route(
            "/v1/rollouts/{namespace}/{name}/{command}",
            post(rollout_command),
        )
        .route("/v1/ca", get(ca_status))
        .route("/v1/ca/rotate", post(ca_rotate))
        .route("/metrics", get(metrics))
        .with_state(cp)
        .layer(tower::limit::ConcurrencyLimitLayer::new(16))
}

async fn list_nodes(State(cp): Cp) -> Response {
    match nodes::nodes(&cp).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn create_token(
    State(cp): Cp,
    UrlPath(node): UrlPath<String>,
    body: Option<Json<TokenRequest>>,
) -> Response {
    let ttl = match body.map(|b| b.0.ttl_seconds).unwrap_or(0) {
        0 => nodes::NODE_TOKEN_TTL,
        s => Duration::from_secs(s),
    };
    match nodes::create_token(&cp, &node, ttl).await {
        Ok((token, expires_unix)) => {
            tracing::info!(%node, token = %token.id, "created a node join token");
            (
                StatusCode::CREATED,
                Json(TokenResponse {
                    node,
                    token: token.to_string(),
                    expires_unix,
                }),
            )
                .into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn remove_node(State(cp): Cp, UrlPath(node): UrlPath<String>) -> Response {
    if let Err(e) = nodes::check_node(&node) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match nodes::remove_node(&*cp.db, &node).await {
        Ok(true) => {
            tracing::info!(%node, "removed the node's registration: its identities will not renew");
            Json(Changed { changed: true }).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no agent is registered for node {node}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn add_entry(
    State(cp): Cp,
    UrlPath(node): UrlPath<String>,
    Json(req): Json<EntryRequest>,
) -> Response {
    let id = match nodes::check_node(&node)
        .and_then(|()| nodes::check_workload_id(&cp, &req.spiffe_id))
    {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match nodes::add_entry(&*cp.db, &node, &id).await {
        Ok(changed) => {
            if changed {
                tracing::info!(%node, %id, "registered an entry for the node");
            }
            let status = if changed {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(Changed { changed })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn delete_entry(
    State(cp): Cp,
    UrlPath(node): UrlPath<String>,
    Query(req): Query<EntryRequest>,
) -> Response {
    let id = match nodes::check_node(&node)
        .and_then(|()| nodes::check_workload_id(&cp, &req.spiffe_id))
    {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match nodes::delete_entry(&*cp.db, &node, &id).await {
        Ok(true) => {
            tracing::info!(%node, %id, "deleted an entry of the node");
            Json(Changed { changed: true }).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("node {node} has no entry {id}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// What `GET /v1/proxies` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProxiesView {
    pub cluster: String,
    pub config_version: u64,
    pub proxies: Vec<super::proxies::ProxyView>,
}

async fn list_proxies(State(cp): Cp) -> Response {
    Json(ProxiesView {
        cluster: cp.config.cluster.to_string(),
        config_version: cp.dataplane_config().borrow().version,
        proxies: cp.proxies.list(),
    })
    .into_response()
}

async fn list_rollouts(State(cp): Cp) -> Response {
    Json(cp.rollouts.views()).into_response()
}

/// Who asked for a rollout command, for its history.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct CommandRequest {
    #[serde(default)]
    pub by: String,
}

async fn rollout_command(
    State(cp): Cp,
    UrlPath((namespace, name, command)): UrlPath<(String, String, String)>,
    body: Option<Json<CommandRequest>>,
) -> Response {
    let command = match command.parse::<super::rollouts::machine::Command>() {
        Ok(c) => c,
        Err(e) => return error(StatusCode::NOT_FOUND, e),
    };
    let key = match format!("{namespace}/{name}").parse::<fedmesh_api::ServiceKey>() {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("rollout name: {e}")),
    };
    let by = body
        .map(|b| b.0.by)
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "an operator".into());
    match cp.rollout_command(&key, command, &by).await {
        Ok(v) => Json(v).into_response(),
        Err(e @ super::rollouts::CommandError::NotFound(_)) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn ca_status(State(cp): Cp) -> Response {
    Json(cp.ca.view()).into_response()
}

/// One rotation step on the CA this control plane signs with: the bundle it publishes (to the
/// hub, agents and the bundle endpoint) follows at once.
async fn ca_rotate(State(cp): Cp, Json(req): Json<RotateRequest>) -> Response {
    use fedmesh_trust::ca::CaError;
    let now = std::time::SystemTime::now();
    let done = match req.step {
        RotateStep::Prepare => cp.ca.prepare_next(None),
        RotateStep::Activate => cp.ca.activate_next(),
        RotateStep::Prune => match cp.ca.prune(now) {
            Ok(true) => Ok(()),
            Ok(false) => {
                let blockers = cp.ca.prune_blockers(now);
                let msg = if blockers.is_empty() {
                    "nothing to prune: no authority is retired (`--step activate` retires the active one)".to_string()
                } else {
                    format!("nothing to prune yet: {}", blockers.join("; "))
                };
                return error(StatusCode::CONFLICT, msg);
            }
            Err(e) => Err(e),
        },
    };
    match done {
        Ok(()) => {
            tracing::info!(step = ?req.step, "CA rotation step done by an operator");
            Json(cp.ca.view()).into_response()
        }
        Err(e @ (CaError::NothingPrepared | CaError::UpstreamKeyNeeded)) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, step = ?req.step, "CA rotation step failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn metrics(State(cp): Cp) -> Response {
    let publish = cp.publish_status().borrow().clone();
    let state = crate::metrics::ControlPlaneState {
        hub_connected: cp.config.hub.as_ref().map(|_| publish.connected),
        hub_accepted_exports: publish.accepted.len(),
        clusterset_services: cp.snapshot().borrow().vips.len(),
        ca_authorities: cp
            .ca
            .authorities()
            .iter()
            .map(|a| format!("{:?}", a.state).to_lowercase())
            .collect(),
        gateway_probes: cp.gateway_probes.current(),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        cp.metrics.encode_with(&state),
    )
        .into_response()
}

/// Binds `<data-dir>/admin.sock` (0600; a stale file from a crash is replaced, a live socket
/// is not) and serves it until `shutdown`, then removes it.
pub fn serve(cp: Arc<ControlPlane>, shutdown: CancellationToken) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(&cp.config.data_dir);
    if std::fs::symlink_metadata(&path).is_ok() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: another control plane runs on this data directory",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let app = router(cp);
    let served = path.clone();
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the admin socket failed");
        }
        let _ = std::fs::remove_file(&served);
    });
    Ok(path)
}

/// `--admin-listen`: `/metrics` (as on the admin socket), `/healthz` and `/readyz`, read-only and
/// without the socket's changes, for Prometheus and the kubelet's probes.
pub fn serve_http(
    cp: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    use fedmesh_trust::http_server::{HttpListener, Versions, serve};
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(cp);
    tokio::spawn(async move {
        match HttpListener::new(listener, None, "control plane admin") {
            Ok(l) => serve(l, app, Versions::Http1, "control plane admin", shutdown).await,
            Err(e) => tracing::error!(error = %e, "the control plane's admin port failed"),
        }
    });
}

/// Ready once serving: agents and proxies get their identities and last configuration even while
/// the hub is away, so the hub link is reported, not required.
async fn readyz(State(cp): Cp) -> Response {
    let hub = match (&cp.config.hub, cp.publish_status().borrow().connected) {
        (None, _) => "no hub configured".to_string(),
        (Some(h), true) => format!("connected to the hub at {h}"),
        (Some(h), false) => format!(
            "not connected to the hub at {h} (serving the last clusterset view; see fedmesh status)"
        ),
    };
    (StatusCode::OK, format!("ready; {hub}\n")).into_response()
}

/// `fedmesh control-plane token|entry|node ...`: the admin socket's client.
pub struct AdminSocketClient {
    path: PathBuf,
}

impl AdminSocketClient {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: socket_path(data_dir),
        }
    }

    async fn raw(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(http::StatusCode, bytes::Bytes), String> {
        use http_body_util::BodyExt;
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the control plane's admin socket {}: {e} (is `fedmesh control-plane` running with this --data-dir, and are you its user?)",
                    self.path.display()
                )
            })?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "control-plane")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.unwrap_or_default(),
            )))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(
            Duration::from_secs(30),
            crate::hub::client::send(hyper_util::rt::TokioIo::new(stream), req),
        )
        .await
        .map_err(|_| "the control plane did not answer within 30s".to_string())??;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned()));
        }
        Ok((status, bytes))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, String> {
        let (_, bytes) = self.raw(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| format!("unexpected answer: {e}"))
    }

    pub async fn create_token(&self, node: &str, ttl: Duration) -> Result<TokenResponse, String> {
        let body = serde_json::to_vec(&TokenRequest {
            ttl_seconds: ttl.as_secs(),
        })
        .unwrap_or_default();
        self.call(
            http::Method::POST,
            &format!("/v1/nodes/{}/tokens", crate::hub::client::urlencode(node)),
            Some(body),
        )
        .await
    }

    pub async fn nodes(&self) -> Result<Vec<nodes::NodeView>, String> {
        self.call(http::Method::GET, "/v1/nodes", None).await
    }

    pub async fn remove_node(&self, node: &str) -> Result<Changed, String> {
        self.call(
            http::Method::DELETE,
            &format!("/v1/nodes/{}", crate::hub::client::urlencode(node)),
            None,
        )
        .await
    }

    pub async fn add_entry(&self, node: &str, spiffe_id: &str) -> Result<Changed, String> {
        let body = serde_json::to_vec(&EntryRequest {
            spiffe_id: spiffe_id.to_string(),
        })
        .unwrap_or_default();
        self.call(
            http::Method::POST,
            &format!("/v1/nodes/{}/entries", crate::hub::client::urlencode(node)),
            Some(body),
        )
        .await
    }

    pub async fn delete_entry(&self, node: &str, spiffe_id: &str) -> Result<Changed, String> {
        self.call(
            http::Method::DELETE,
            &format!(
                "/v1/nodes/{}/entries?spiffe_id={}",
                crate::hub::client::urlencode(node),
                crate::hub::client::urlencode(spiffe_id)
            ),
            None,
        )
        .await
    }

    pub async fn proxies(&self) -> Result<ProxiesView, String> {
        self.call(http::Method::GET, "/v1/proxies", None).await
    }

    pub async fn rollouts(&self) -> Result<Vec<super::rollouts::RolloutView>, String> {
        self.call(http::Method::GET, "/v1/rollouts", None).await
    }

    /// `command`: pause, resume, promote or abort; `by` names who asked (for the history).
    pub async fn rollout_command(
        &self,
        key: &fedmesh_api::ServiceKey,
        command: &str,
        by: &str,
    ) -> Result<super::rollouts::RolloutView, String> {
        let body = serde_json::to_vec(&CommandRequest { by: by.into() }).unwrap_or_default();
        self.call(
            http::Method::POST,
            &format!(
                "/v1/rollouts/{}/{}/{}",
                key.namespace,
                key.name,
                crate::hub::client::urlencode(command)
            ),
            Some(body),
        )
        .await
    }

    pub async fn ca(&self) -> Result<fedmesh_trust::ca::CaView, String> {
        self.call(http::Method::GET, "/v1/ca", None).await
    }

    pub async fn rotate_ca(&self, step: RotateStep) -> Result<fedmesh_trust::ca::CaView, String> {
        let body = serde_json::to_vec(&RotateRequest { step }).unwrap_or_default();
        self.call(http::Method::POST, "/v1/ca/rotate", Some(body))
            .await
    }

    pub async fn metrics(&self) -> Result<String, String> {
        let (_, bytes) = self.raw(http::Method::GET, "/metrics", None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}
