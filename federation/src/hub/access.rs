//! Who may use the admin API, and the tokens the hub hands out.
//!
//! Besides the bootstrap token the hub writes to `<data-dir>/admin-token` (role admin), an admin
//! creates **named** admin tokens, each with a role: `read-only` may read (status, explain,
//! services, traces, the audit log), `admin` may also change (join tokens, admin tokens, cluster
//! removal, export withdrawal). Each is `fma1.<name>.<secret>`; only the secret's SHA-256 is
//! stored, in the hub's store (every replica knows it), and the audit log names the token that
//! made each change. Join tokens can be listed (never their secrets) and revoked.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::{AdminState, ErrorBody, error};
use super::audit::Actor;
use super::records::{TOKENS, TokenRecord, now_unix, token_key};
use crate::store::{Compare, KvStore, Txn, TxnOutcome};

const ADMIN_TOKENS: &str = "admin-tokens/";
const ADMIN_PREFIX: &str = "fma1";

/// What an admin token may do.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read everything, change nothing.
    ReadOnly,
    /// Read and change.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::ReadOnly => "read-only",
            Role::Admin => "admin",
        })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct AdminTokenRecord {
    role: Role,
    secret_sha256: String,
    created_unix: i64,
    created_by: String,
}

/// A named admin token as listed (never its secret).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct AdminTokenView {
    pub name: String,
    pub role: Role,
    /// RFC 3339.
    pub created: String,
    /// Who created it (as in the audit log).
    pub created_by: String,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenRequest {
    /// Lower-case letters, digits and '-', at most 63 (e.g. `ci-readonly`).
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    pub role: Role,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct AdminTokenResponse {
    pub name: String,
    pub role: Role,
    /// Shown once; the hub keeps only its hash.
    pub token: String,
}

/// A join token as listed (never its secret).
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct JoinTokenView {
    pub id: String,
    /// The cluster it registers.
    pub cluster: String,
    pub trust_domain: String,
    /// RFC 3339.
    pub created: String,
    pub expires: String,
    /// `unused`, `used` or `expired`.
    pub state: String,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
pub struct Revoked {
    pub revoked: String,
}

fn admin_key(name: &str) -> String {
    format!("{ADMIN_TOKENS}{name}")
}

fn rfc3339(unix: i64) -> String {
    fedmesh_trust::svid::rfc3339(fedmesh_trust::svid::from_unix_secs(unix.max(0) as u64))
}

fn sha256_hex(s: &str) -> String {
    hex::encode(digest(&SHA256, s.as_bytes()))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "admin token name {name:?}: use lower-case letters, digits and '-' (at most 63, e.g. ci-readonly)"
        ))
    }
}

/// The name and role of a named admin token, if `presented` is one the store knows.
pub async fn authenticate(db: &dyn KvStore, presented: &str) -> Option<(String, Role)> {
    let mut parts = presented.trim().split('.');
    let (Some(ADMIN_PREFIX), Some(name), Some(secret), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    check_name(name).ok()?;
    let kv = db.get(&admin_key(name)).await.ok()??;
    let record: AdminTokenRecord = serde_json::from_slice(&kv.value).ok()?;
    let hash = sha256_hex(secret);
    super::admin::constant_time_eq(hash.as_bytes(), record.secret_sha256.as_bytes())
        .then(|| (name.to_string(), record.role))
}

#[utoipa::path(post, path = "/api/v1/admin-tokens", request_body = AdminTokenRequest,
    responses((status = 201, description = "The token (shown once): give it to the tool that uses it", body = AdminTokenResponse),
              (status = 400, description = "an invalid name, or a body that is not JSON", body = ErrorBody),
              (status = 403, description = "a read-only token", body = ErrorBody),
              (status = 409, description = "a token of that name exists", body = ErrorBody),
              (status = 415, description = "the body is not sent as application/json", body = ErrorBody),
              (status = 422, description = "a field the API does not know, or of the wrong type", body = ErrorBody)))]
pub async fn create_admin_token(
    State(s): State<AdminState>,
    Extension(actor): Extension<Actor>,
    super::api_json::ApiJson(req): super::api_json::ApiJson<AdminTokenRequest>,
) -> Response {
    if let Err(e) = check_name(&req.name) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let secret = URL_SAFE_NO_PAD.encode(crate::tokens::random::<32>());
    let record = AdminTokenRecord {
        role: req.role,
        secret_sha256: sha256_hex(&secret),
        created_unix: now_unix(),
        created_by: actor.0.clone(),
    };
    let key = admin_key(&req.name);
    let txn = Txn::new()
        .when(Compare::Absent(key.clone()))
        .put(key, serde_json::to_vec(&record).unwrap_or_default());
    match s.hub.store().commit(txn).await {
        Ok(TxnOutcome::Committed(_)) => {}
        Ok(TxnOutcome::Failed) => {
            return error(
                StatusCode::CONFLICT,
                format!(
                    "an admin token named {} exists; revoke it first or choose another name",
                    req.name
                ),
            );
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    tracing::info!(name = %req.name, role = %req.role, "admin token created");
    s.hub
        .audit(
            &actor.0,
            "admin-token.create",
            &req.name,
            format!("role {}", req.role),
        )
        .await;
    (
        StatusCode::CREATED,
        Json(AdminTokenResponse {
            token: format!("{ADMIN_PREFIX}.{}.{secret}", req.name),
            name: req.name,
            role: req.role,
        }),
    )
        .into_response()
}

#[utoipa::path(get, path = "/api/v1/admin-tokens",
    responses((status = 200, description = "Every named admin token: name, role, creation time (never the secret)", body = [AdminTokenView]),
        (status = 403, description = "A read-only token may not list tokens", body = ErrorBody)))]
pub async fn list_admin_tokens(State(s): State<AdminState>) -> Response {
    match s.hub.store().list(ADMIN_TOKENS).await {
        Ok((kvs, _)) => Json(
            kvs.iter()
                .filter_map(|kv| {
                    let r: AdminTokenRecord = serde_json::from_slice(&kv.value).ok()?;
                    Some(AdminTokenView {
                        name: kv.key.strip_prefix(ADMIN_TOKENS)?.to_string(),
                        role: r.role,
                        created: rfc3339(r.created_unix),
                        created_by: r.created_by,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Deletes `key` if present; 404 with `missing` otherwise.
async fn revoke(
    s: &AdminState,
    actor: &Actor,
    key: String,
    action: &str,
    target: &str,
    missing: String,
) -> Response {
    let current = match s.hub.store().get(&key).await {
        Ok(Some(kv)) => kv,
        Ok(None) => return error(StatusCode::NOT_FOUND, missing),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let txn = Txn::new()
        .when(Compare::ModRevision(key.clone(), current.mod_revision))
        .delete(key);
    match s.hub.store().commit(txn).await {
        Ok(TxnOutcome::Committed(_)) => {
            tracing::info!(target, "{action}");
            s.hub.audit(&actor.0, action, target, String::new()).await;
            Json(Revoked {
                revoked: target.to_string(),
            })
            .into_response()
        }
        // Changed (used, or revoked) in between: the caller may look again.
        Ok(TxnOutcome::Failed) => error(
            StatusCode::CONFLICT,
            format!("{target} changed while being revoked; try again"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[utoipa::path(delete, path = "/api/v1/admin-tokens/{name}",
    params(("name" = String, Path, description = "The token's name", pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")),
    responses((status = 200, description = "Revoked: it no longer authenticates", body = Revoked),
        (status = 404, description = "No admin token of that name", body = ErrorBody),
        (status = 403, description = "A read-only token may not revoke tokens", body = ErrorBody)))]
pub async fn revoke_admin_token(
    State(s): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(name): Path<String>,
) -> Response {
    if let Err(e) = check_name(&name) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let missing = format!(
        "no admin token is named {name} (the bootstrap token in <data-dir>/admin-token is replaced by writing that file and restarting the hub)"
    );
    revoke(
        &s,
        &actor,
        admin_key(&name),
        "admin-token.revoke",
        &name,
        missing,
    )
    .await
}

#[utoipa::path(get, path = "/api/v1/tokens",
    responses((status = 200, description = "Every join token: ID, cluster, trust domain, expiry and state (never the secret)", body = [JoinTokenView]),
        (status = 403, description = "A read-only token may not list join tokens", body = ErrorBody)))]
pub async fn list_join_tokens(State(s): State<AdminState>) -> Response {
    let now = now_unix();
    match s.hub.store().list(TOKENS).await {
        Ok((kvs, _)) => Json(
            kvs.iter()
                .filter_map(|kv| {
                    let r: TokenRecord = serde_json::from_slice(&kv.value).ok()?;
                    let state = match r.used_unix {
                        Some(_) => "used",
                        None if r.expires_unix <= now => "expired",
                        None => "unused",
                    };
                    Some(JoinTokenView {
                        id: kv.key.strip_prefix(TOKENS)?.to_string(),
                        cluster: r.subject.unwrap_or_default(),
                        trust_domain: r.trust_domain.map(|t| t.to_string()).unwrap_or_default(),
                        created: rfc3339(r.created_unix),
                        expires: rfc3339(r.expires_unix),
                        state: state.into(),
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}",
    params(("id" = String, Path, description = "The token's ID: the hex after `fmj1.`, as the list shows", pattern = r"^[0-9a-fA-F]+$")),
    responses((status = 200, description = "Revoked: it can no longer join", body = Revoked),
        (status = 404, description = "No join token with that ID", body = ErrorBody),
        (status = 403, description = "A read-only token may not revoke join tokens", body = ErrorBody)))]
pub async fn revoke_join_token(
    State(s): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Response {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{id:?} is not a join token ID (the hex after fmj1., as `fedmesh hub token list` shows)"
            ),
        );
    }
    let missing = format!("no join token has ID {id}");
    revoke(&s, &actor, token_key(&id), "token.revoke", &id, missing).await
}
