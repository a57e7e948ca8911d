//! The clusterset as this control plane last heard it from the hub: imports, clusters, bundles and
//! the view version. Every applied update is persisted (one transaction) before it is
//! acknowledged, so after a restart — or while the hub is unreachable — the control plane keeps
//! serving exactly what it had, and resumes from that version.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};
use prost::Message;
use tokio::sync::watch;

use crate::store::{KvStore, Op, RedbStore, StoreError, Txn};

const IMPORTS: &str = "imports/";
const CLUSTERS: &str = "clusters/";
const BUNDLES: &str = "bundles/";
const VERSION_KEY: &str = "meta/view-version";

/// An immutable snapshot; consumers (DNS, status writer, config stream) read it without locks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSet {
    pub version: u64,
    pub imports: BTreeMap<ServiceKey, Arc<pb::Import>>,
    pub clusters: BTreeMap<ClusterName, pb::ClusterInfo>,
    pub bundles: BTreeMap<TrustDomain, pb::Bundle>,
}

pub struct ClusterSetStore {
    db: Arc<RedbStore>,
    tx: watch::Sender<Arc<ClusterSet>>,
}

impl ClusterSetStore {
    /// Loads what was persisted (an empty clusterset at version 0 on first start).
    pub async fn load(db: Arc<RedbStore>) -> Result<Self, StoreError> {
        let mut cs = ClusterSet::default();
        for kv in db.list(IMPORTS).await?.0 {
            let i = pb::Import::decode(kv.value.as_slice())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if let Ok(k) = i.service.parse() {
                cs.imports.insert(k, Arc::new(i));
            }
        }
        for kv in db.list(CLUSTERS).await?.0 {
            let c = pb::ClusterInfo::decode(kv.value.as_slice())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if let Ok(n) = ClusterName::new(&c.name) {
                cs.clusters.insert(n, c);
            }
        }
        for kv in db.list(BUNDLES).await?.0 {
            let b = pb::Bundle::decode(kv.value.as_slice())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if let Ok(td) = TrustDomain::new(&b.trust_domain) {
                cs.bundles.insert(td, b);
            }
        }
        if let Some(kv) = db.get(VERSION_KEY).await? {
            cs.version = u64::from_be_bytes(kv.value.as_slice().try_into().unwrap_or([0; 8]));
        }
        Ok(Self {
            db,
            tx: watch::Sender::new(Arc::new(cs)),
        })
    }

    pub fn current(&self) -> Arc<ClusterSet> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterSet>> {
        self.tx.subscribe()
    }

    /// Validates, persists and publishes an update from the hub. An error means nothing changed
    /// (the caller NACKs).
    pub async fn apply(&self, u: &pb::Update) -> Result<(), String> {
        let cur = self.current();
        let mut next = if u.snapshot {
            ClusterSet::default()
        } else {
            (*cur).clone()
        };
        let mut ops = Vec::new();
        if u.snapshot {
            ops.extend(
                cur.imports
                    .keys()
                    .map(|k| Op::Delete(format!("{IMPORTS}{k}"))),
            );
            ops.extend(
                cur.clusters
                    .keys()
                    .map(|k| Op::Delete(format!("{CLUSTERS}{k}"))),
            );
            ops.extend(
                cur.bundles
                    .keys()
                    .map(|k| Op::Delete(format!("{BUNDLES}{k}"))),
            );
        }
        for i in &u.imports {
            let k: ServiceKey = i
                .service
                .parse()
                .map_err(|e| format!("import {:?}: {e}", i.service))?;
            ops.push(Op::Put(format!("{IMPORTS}{k}"), i.encode_to_vec()));
            next.imports.insert(k, Arc::new(i.clone()));
        }
        for s in &u.removed_imports {
            let k: ServiceKey = s
                .parse()
                .map_err(|e| format!("removed import {s:?}: {e}"))?;
            ops.push(Op::Delete(format!("{IMPORTS}{k}")));
            next.imports.remove(&k);
        }
        for c in &u.clusters {
            let n = ClusterName::new(&c.name).map_err(|e| e.to_string())?;
            // Sidecars connect to whatever a peer's gateway address says: keep only addresses
            // of one host and port, even if a hub let others through.
            let mut c = c.clone();
            c.gateways.retain(|g| match fedmesh_api::names::check_gateway_address(g) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(cluster = %n, gateway = %g, error = %e, "ignoring an invalid gateway address from the hub");
                    false
                }
            });
            ops.push(Op::Put(format!("{CLUSTERS}{n}"), c.encode_to_vec()));
            next.clusters.insert(n, c);
        }
        for s in &u.removed_clusters {
            let n = ClusterName::new(s).map_err(|e| e.to_string())?;
            ops.push(Op::Delete(format!("{CLUSTERS}{n}")));
            next.clusters.remove(&n);
        }
        for b in &u.bundles {
            let td = TrustDomain::new(&b.trust_domain).map_err(|e| e.to_string())?;
            fedmesh_trust::bundle::SpiffeBundle::from_json(td.clone(), &b.jwks)
                .map_err(|e| e.to_string())?;
            ops.push(Op::Put(format!("{BUNDLES}{td}"), b.encode_to_vec()));
            next.bundles.insert(td, b.clone());
        }
        for s in &u.removed_bundles {
            let td = TrustDomain::new(s).map_err(|e| e.to_string())?;
            ops.push(Op::Delete(format!("{BUNDLES}{td}")));
            next.bundles.remove(&td);
        }
        next.version = u.version;
        ops.push(Op::Put(
            VERSION_KEY.into(),
            u.version.to_be_bytes().to_vec(),
        ));
        self.db
            .commit(Txn {
                compares: vec![],
                ops,
            })
            .await
            .map_err(|e| format!("cannot persist the update: {e}"))?;
        self.tx.send_replace(Arc::new(next));
        Ok(())
    }
}
