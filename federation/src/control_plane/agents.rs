//! The node agents' registrations with their control plane.
//!
//! Each agent's record keeps the serial numbers of the identities issued to it (the current one
//! and, after a renewal, the next), as SPIRE keeps an attested node's. An agent that joins again
//! under the same node name starts a new registration, and the identities of the earlier one can
//! no longer renew, sign workload SVIDs or follow bundles.

use fedmesh_api::SpiffeId;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::hub::records::now_unix;
use crate::store::{Compare, KvStore, Txn};

const AGENTS: &str = "agents/";

fn agent_key(node: &str) -> String {
    format!("{AGENTS}{node}")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub node: String,
    pub id: SpiffeId,
    pub joined_unix: i64,
    /// Serials (hex) of this registration's identities.
    pub identity_serials: Vec<String>,
}

pub fn node_of(id: &SpiffeId) -> &str {
    id.path().rsplit('/').next().unwrap_or_default()
}

/// Records a (new) registration of `id` holding only the identity `serial`.
pub async fn register(db: &dyn KvStore, id: &SpiffeId, serial: &str) -> Result<(), Status> {
    let node = node_of(id);
    let record = AgentRecord {
        node: node.to_string(),
        id: id.clone(),
        joined_unix: now_unix(),
        identity_serials: vec![serial.to_string()],
    };
    crate::store::put(
        db,
        &agent_key(node),
        serde_json::to_vec(&record).unwrap_or_default(),
    )
    .await
    .map(|_| ())
    .map_err(|e| Status::unavailable(e.to_string()))
}

/// Checks that the agent identity `serial` of `id` belongs to its current registration; with
/// `next`, records a renewed identity beside it. A node without a registration (removed with
/// `fedmesh control-plane node remove`) is refused: its agent must join again with a new token.
pub async fn check(
    db: &dyn KvStore,
    id: &SpiffeId,
    serial: Option<&str>,
    next: Option<&str>,
) -> Result<(), Status> {
    let revoked = || {
        Status::permission_denied(format!(
            "{id} belongs to an earlier registration of this node (it joined again); the agent must join again"
        ))
    };
    let serial = serial.ok_or_else(revoked)?;
    let key = agent_key(node_of(id));
    let stored = db
        .get(&key)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (mut record, compare) = match stored {
        Some(kv) => {
            let r: AgentRecord = serde_json::from_slice(&kv.value)
                .map_err(|e| Status::internal(format!("agent record {key}: {e}")))?;
            if !r.identity_serials.iter().any(|s| s == serial) {
                return Err(revoked());
            }
            (r, Compare::ModRevision(key.clone(), kv.mod_revision))
        }
        None => {
            return Err(Status::permission_denied(format!(
                "node {} is not registered (it was removed, or never joined): its agent must join again with a token made for it (fedmesh control-plane token create --node {})",
                node_of(id),
                node_of(id)
            )));
        }
    };
    let wanted = match next {
        Some(n) => vec![serial.to_string(), n.to_string()],
        None => vec![serial.to_string()],
    };
    // Write only when it changes something: a renewal, or a renewed identity now used.
    let newest = record.identity_serials.last().is_some_and(|s| s == serial);
    if next.is_some() || (newest && record.identity_serials.len() > 1) {
        record.identity_serials = wanted;
        let outcome = db
            .commit(
                Txn::new()
                    .when(compare)
                    .put(key, serde_json::to_vec(&record).unwrap_or_default()),
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // A renewal must be recorded, or the agent's next identity would be refused; the other
        // writes may lose to a concurrent one (which wrote the same or a newer list).
        if next.is_some() && matches!(outcome, crate::store::TxnOutcome::Failed) {
            return Err(Status::aborted(format!(
                "the registration of {id} changed concurrently; retry"
            )));
        }
    }
    Ok(())
}
