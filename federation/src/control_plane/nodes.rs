//! Which node may hold which workload identity: SPIRE's node-bound registration entries.
//!
//! An agent joins with a one-time token made for its node (`fedmesh control-plane token create
//! --node NAME`); no token works for two nodes or twice. The control plane then signs a workload
//! SVID for that agent only when its node may host the workload: an entry registered for the
//! node (`fedmesh control-plane entry create --node NAME --spiffe-id ID`), or, with the
//! Kubernetes source, a running pod of that namespace and service account scheduled on the node
//! (`spiffe://<td>/ns/<ns>/sa/<sa>`, as the control plane sees the pods — the agent's word is not
//! enough). A compromised node can thus obtain the identities of its own workloads only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::SpiffeId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::ControlPlane;
use super::agents::AgentRecord;
use crate::hub::records::now_unix;
use crate::store::{Compare, KvStore, StoreError, Txn, TxnOutcome};
use crate::tokens::{self, JoinToken};

const ENTRIES: &str = "node-entries/";
const AGENTS: &str = "agents/";
/// A node token's default lifetime: long enough to start the agent, too short to be worth
/// stealing from a provisioning log.
pub const NODE_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest a node token may live.
pub const NODE_TOKEN_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

fn entries_prefix(node: &str) -> String {
    format!("{ENTRIES}{node}/")
}

fn entry_key(node: &str, id: &SpiffeId) -> String {
    format!("{ENTRIES}{node}/{id}")
}

/// A workload identity registered for one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub node: String,
    pub spiffe_id: SpiffeId,
    pub created_unix: i64,
}

/// A node as the control plane knows it: its agent's registration and its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    /// The agent's registration; `None` while no agent joined (or after `node remove`).
    pub agent: Option<AgentRecord>,
    pub entries: Vec<SpiffeId>,
    /// Workload identities its running pods may hold (Kubernetes source).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_identities: Vec<String>,
}

/// Checks a node name: DNS labels joined by dots, as Kubernetes names nodes.
pub fn check_node(node: &str) -> Result<(), String> {
    if node.is_empty() {
        return Err("node name is empty".into());
    }
    for label in node.split('.') {
        fedmesh_api::names::check_dns_label("node name", label).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The identities a workload may be registered under: this trust domain, outside fedmesh's own.
pub fn check_workload_id(cp: &ControlPlane, s: &str) -> Result<SpiffeId, String> {
    let id = SpiffeId::new(s).map_err(|e| format!("spiffe_id {s:?}: {e}"))?;
    if id.trust_domain() != &cp.config.trust_domain {
        return Err(format!(
            "{id} is not in trust domain {}; a node hosts identities of its own cluster only",
            cp.config.trust_domain
        ));
    }
    if id.path().starts_with(super::identity::RESERVED_PREFIX) {
        return Err(format!("{id} is reserved for fedmesh components"));
    }
    Ok(id)
}

/// Registers `id` for `node`; `false` when it was registered already.
pub async fn add_entry(db: &dyn KvStore, node: &str, id: &SpiffeId) -> Result<bool, StoreError> {
    let key = entry_key(node, id);
    let entry = NodeEntry {
        node: node.to_string(),
        spiffe_id: id.clone(),
        created_unix: now_unix(),
    };
    let outcome = db
        .commit(
            Txn::new()
                .when(Compare::Absent(key.clone()))
                .put(key, serde_json::to_vec(&entry).unwrap_or_default()),
        )
        .await?;
    Ok(matches!(outcome, TxnOutcome::Committed(_)))
}

/// Removes `id` from `node`'s entries; `false` when it was not registered. SVIDs already issued
/// live out their (short) lifetime and are not renewed.
pub async fn delete_entry(db: &dyn KvStore, node: &str, id: &SpiffeId) -> Result<bool, StoreError> {
    delete_present(db, &entry_key(node, id)).await
}

/// Deletes `key` if it exists; `false` when it did not.
async fn delete_present(db: &dyn KvStore, key: &str) -> Result<bool, StoreError> {
    let Some(kv) = db.get(key).await? else {
        return Ok(false);
    };
    let outcome = db
        .commit(
            Txn::new()
                .when(Compare::ModRevision(key.to_string(), kv.mod_revision))
                .delete(key),
        )
        .await?;
    // Failed: changed concurrently (a renewal, another removal); the key is read again.
    match outcome {
        TxnOutcome::Committed(_) => Ok(true),
        TxnOutcome::Failed => Box::pin(delete_present(db, key)).await,
    }
}

/// The entries of `node`, or of every node.
pub async fn entries(db: &dyn KvStore, node: Option<&str>) -> Result<Vec<NodeEntry>, StoreError> {
    let prefix = node.map_or_else(|| ENTRIES.to_string(), entries_prefix);
    let (kvs, _) = db.list(&prefix).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

async fn has_entry(db: &dyn KvStore, node: &str, id: &SpiffeId) -> Result<bool, StoreError> {
    Ok(db.get(&entry_key(node, id)).await?.is_some())
}

/// Every node with an agent or an entry, sorted by name.
pub async fn nodes(cp: &ControlPlane) -> Result<Vec<NodeView>, StoreError> {
    let mut views: BTreeMap<String, NodeView> = BTreeMap::new();
    let view = |node: &str| NodeView {
        node: node.to_string(),
        agent: None,
        entries: Vec::new(),
        pod_identities: Vec::new(),
    };
    let (agents, _) = cp.db.list(AGENTS).await?;
    for kv in agents {
        if let Ok(r) = serde_json::from_slice::<AgentRecord>(&kv.value) {
            let node = r.node.clone();
            views
                .entry(node.clone())
                .or_insert_with(|| view(&node))
                .agent = Some(r);
        }
    }
    for e in entries(&*cp.db, None).await? {
        views
            .entry(e.node.clone())
            .or_insert_with(|| view(&e.node))
            .entries
            .push(e.spiffe_id);
    }
    if let Some(pods) = &cp.node_pods {
        let pods = pods.borrow().clone();
        for (node, accounts) in pods.iter() {
            views
                .entry(node.clone())
                .or_insert_with(|| view(node))
                .pod_identities = accounts
                .iter()
                .map(|(ns, sa)| workload_id_of(cp, ns, sa))
                .collect();
        }
    }
    Ok(views.into_values().collect())
}

/// Makes a one-time token that lets one agent join as `node`, pinning the CA that signs now.
pub async fn create_token(
    cp: &ControlPlane,
    node: &str,
    ttl: Duration,
) -> Result<(JoinToken, i64), String> {
    check_node(node)?;
    if ttl.is_zero() || ttl > NODE_TOKEN_MAX_TTL {
        return Err(format!(
            "a node token lives between 1s and {}; ask for less",
            humantime::format_duration(NODE_TOKEN_MAX_TTL)
        ));
    }
    tokens::create_with(
        &*cp.db,
        Some(node.to_string()),
        None,
        false,
        ttl,
        &super::identity::current_pin(cp),
    )
    .await
    .map_err(|e| e.to_string())
}

/// Ends `node`'s registration: its agent identity can no longer renew, sign workload SVIDs or
/// follow bundles, and its workloads' SVIDs are not renewed. Its entries stay for a new agent
/// that joins with a new token. `false` when no agent was registered.
pub async fn remove_node(db: &dyn KvStore, node: &str) -> Result<bool, StoreError> {
    delete_present(db, &format!("{AGENTS}{node}")).await
}

/// The (namespace, service account) pairs of the running pods on each node, as the control
/// plane's own watch of the API server sees them.
pub type NodePods = BTreeMap<String, BTreeSet<(String, String)>>;
pub type NodePodsWatch = watch::Receiver<Arc<NodePods>>;

fn workload_id_of(cp: &ControlPlane, ns: &str, sa: &str) -> String {
    format!("spiffe://{}/ns/{ns}/sa/{sa}", cp.config.trust_domain)
}

/// `/ns/<ns>/sa/<sa>` of a Kubernetes workload identity.
fn namespace_and_account(id: &SpiffeId) -> Option<(&str, &str)> {
    let rest = id.path().strip_prefix("/ns/")?;
    let (ns, rest) = rest.split_once('/')?;
    let sa = rest.strip_prefix("sa/")?;
    (!sa.contains('/')).then_some((ns, sa))
}

/// Why a node may not hold an identity.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "node {node} may not hold {id}: no entry registers it for the node (fedmesh control-plane entry create --node {node} --spiffe-id {id})"
    )]
    NoEntry { node: String, id: SpiffeId },
    #[error(
        "node {node} may not hold {id}: no running pod of namespace {ns} with service account {sa} is scheduled on the node, and no entry registers it"
    )]
    NoPod {
        node: String,
        id: SpiffeId,
        ns: String,
        sa: String,
    },
    #[error("cannot read node {node}'s entries: {error}")]
    Store { node: String, error: StoreError },
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoEntry { .. } => "no_entry",
            Refusal::NoPod { .. } => "no_pod_on_node",
            Refusal::Store { .. } => "store",
        }
    }
}

/// Whether `node` may hold the workload identity `id`.
pub async fn may_host(cp: &ControlPlane, node: &str, id: &SpiffeId) -> Result<(), Refusal> {
    let registered = has_entry(&*cp.db, node, id)
        .await
        .map_err(|error| Refusal::Store {
            node: node.to_string(),
            error,
        })?;
    if registered {
        return Ok(());
    }
    match (&cp.node_pods, namespace_and_account(id)) {
        (Some(pods), Some((ns, sa))) => {
            let found = pods
                .borrow()
                .get(node)
                .is_some_and(|a| a.contains(&(ns.to_string(), sa.to_string())));
            if found {
                Ok(())
            } else {
                Err(Refusal::NoPod {
                    node: node.to_string(),
                    id: id.clone(),
                    ns: ns.to_string(),
                    sa: sa.to_string(),
                })
            }
        }
        _ => Err(Refusal::NoEntry {
            node: node.to_string(),
            id: id.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_identities_name_their_namespace_and_account() {
        let id = |s: &str| SpiffeId::new(s).unwrap();
        assert_eq!(
            namespace_and_account(&id("spiffe://w.test/ns/shop/sa/web")),
            Some(("shop", "web"))
        );
        assert_eq!(namespace_and_account(&id("spiffe://w.test/ns/shop")), None);
        assert_eq!(
            namespace_and_account(&id("spiffe://w.test/ns/shop/sa/web/extra")),
            None
        );
        assert_eq!(namespace_and_account(&id("spiffe://w.test/web")), None);
    }
}
