//! The audit log: every change made through the admin API or the federation protocol — a join, a
//! cluster's removal, an export's withdrawal, a token's creation — as one record in the hub's
//! store (so every replica reads the same log, and it survives restarts): who (the admin token,
//! an admin SPIFFE ID, a cluster), what, on what, when. Records older than the retention go at
//! the sweep. Secrets are never recorded: a token is named by its ID, never its value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Hub;
use super::records::now_ms;
use crate::store::{KvStore, StoreError, Txn};

const PREFIX: &str = "audit/";

/// Who made a change through the admin API (set by its authorization).
#[derive(Clone, Debug)]
pub struct Actor(pub String);

/// One change.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct AuditRecord {
    /// When, RFC 3339 (UTC).
    pub at: String,
    pub unix_ms: i64,
    /// Who: `admin token` (the bootstrap token), `admin token NAME`, `admin spiffe://...` (a
    /// client certificate), `cluster NAME`.
    pub actor: String,
    /// `token.create`, `token.revoke`, `admin-token.create`, `admin-token.revoke`,
    /// `cluster.join`, `cluster.remove`, `export.withdraw`, `rollout.decision` (a cluster's
    /// rollout controller decided, with its numbers).
    pub action: String,
    /// What it acted on: a cluster, `cluster/namespace/service`.
    pub target: String,
    /// More about it (never a secret).
    pub detail: String,
    /// The hub replica that recorded it.
    pub replica: String,
}

/// A query of the log.
#[derive(Deserialize, utoipa::IntoParams, Default, Debug)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Records at or after this time (Unix milliseconds).
    pub since_unix_ms: Option<i64>,
    /// At most this many, newest first (default 100, 1 to 10,000).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

impl AuditQuery {
    /// The answer to a query the schema does not allow, if it is one.
    pub fn refusal(&self) -> Option<axum::response::Response> {
        self.limit
            .filter(|v| !(1..=10_000).contains(v))
            .map(|v| crate::hub::api_json::out_of_range("limit", v, 1, 10_000))
    }
}

/// Keeps keys unique when two records of one replica fall in the same nanosecond.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn key(unix_ms: i64, replica: &str) -> String {
    // Zero-padded so the store's key order is time order.
    format!(
        "{PREFIX}{unix_ms:015}-{replica}-{:08}",
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

fn unix_ms_of(key: &str) -> Option<i64> {
    key.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

impl Hub {
    /// Records a change. The change is already made: when the store refuses the record, that is
    /// logged and counted (`fedmesh_hub_refused_total{reason="audit_write"}`), not undone.
    pub async fn audit(&self, actor: &str, action: &str, target: &str, detail: String) {
        let unix_ms = now_ms();
        let record = AuditRecord {
            at: fedmesh_trust::svid::rfc3339(
                std::time::UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64),
            ),
            unix_ms,
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail,
            replica: self.config.replica.clone(),
        };
        tracing::info!(target: "audit", actor, action, target, detail = %record.detail, "change recorded");
        let value = match serde_json::to_vec(&record) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        let txn = Txn::new().put(key(unix_ms, &self.config.replica), value);
        if let Err(e) = self.store().commit(txn).await {
            self.metrics.refuse("audit_write");
            tracing::error!(error = %e, action, target, "the audit record could not be stored");
        }
    }

    /// The log, newest first.
    pub async fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let (mut kvs, _) = self.store().list(PREFIX).await?;
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        let mut out: Vec<AuditRecord> = kvs
            .iter()
            .rev()
            .filter(|kv| {
                q.since_unix_ms
                    .is_none_or(|s| unix_ms_of(&kv.key).is_some_and(|t| t >= s))
            })
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .take(limit)
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.unix_ms));
        Ok(out)
    }
}

/// Deletes the records older than `retention`: how many went.
pub async fn expire(store: &dyn KvStore, retention: Duration) -> Result<usize, StoreError> {
    let cutoff = now_ms() - retention.as_millis() as i64;
    let (kvs, _) = store.list(PREFIX).await?;
    let old: Vec<String> = kvs
        .into_iter()
        .map(|kv| kv.key)
        .filter(|k| unix_ms_of(k).is_some_and(|t| t < cutoff))
        .collect();
    for chunk in old.chunks(500) {
        let mut txn = Txn::new();
        for k in chunk {
            txn = txn.delete(k.clone());
        }
        store.commit(txn).await?;
    }
    Ok(old.len())
}
