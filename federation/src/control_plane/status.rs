//! What the control plane tells its cluster: ServiceImports (one per service exported anywhere in
//! the clusterset, with the clusterset IP allocated here), derived EndpointSlices, and the
//! ServiceExport conditions. With the directory source they are written as YAML under
//! `<data-dir>/status/`; the Kubernetes source writes the same objects to the API server.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use fedmesh_api::mcs::{
    ClusterStatus, ServiceExport, ServiceExportStatus, ServiceImport, ServiceImportSpec,
    ServiceImportStatus, ServiceImportType, ServicePort,
};
use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::hub_link::PublishStatus;
use super::source::{Invalid, LocalObjects, export_conditions};
use super::state::ClusterSet;
use crate::store::{KvStore, Op, RedbStore, Txn};

/// Clusterset IPs, allocated per service from a CIDR (default 240.240.0.0/16, the range Istio
/// also uses for auto-allocated VIPs) and kept stable across restarts.
pub struct VipAllocator {
    db: Arc<RedbStore>,
    base: u32,
    size: u32,
    assigned: BTreeMap<ServiceKey, Ipv4Addr>,
}

const VIPS: &str = "vips/";

impl VipAllocator {
    pub async fn load(db: Arc<RedbStore>, cidr: &str) -> Result<Self, String> {
        let (addr, len) = cidr
            .split_once('/')
            .ok_or_else(|| format!("clusterset CIDR {cidr:?} is not ADDRESS/LENGTH"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("clusterset CIDR {cidr:?}: bad IPv4 address"))?;
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| (8..=30).contains(l))
            .ok_or_else(|| format!("clusterset CIDR {cidr:?}: prefix length must be 8..30"))?;
        let size = 1u32 << (32 - len);
        let base = u32::from(addr) & !(size - 1);
        let mut assigned = BTreeMap::new();
        for kv in db.list(VIPS).await.map_err(|e| e.to_string())?.0 {
            let (Ok(k), Ok(ip)) = (
                kv.key.trim_start_matches(VIPS).parse::<ServiceKey>(),
                String::from_utf8_lossy(&kv.value).parse::<Ipv4Addr>(),
            ) else {
                continue;
            };
            assigned.insert(k, ip);
        }
        Ok(Self {
            db,
            base,
            size,
            assigned,
        })
    }

    pub fn get(&self, k: &ServiceKey) -> Option<Ipv4Addr> {
        self.assigned.get(k).copied()
    }

    pub fn all(&self) -> &BTreeMap<ServiceKey, Ipv4Addr> {
        &self.assigned
    }

    /// Makes the assigned set match `services`: new ones get an address, gone ones free theirs.
    pub async fn sync(
        &mut self,
        services: impl Iterator<Item = &ServiceKey>,
    ) -> Result<bool, String> {
        let wanted: Vec<ServiceKey> = services.cloned().collect();
        let mut ops = Vec::new();
        let gone: Vec<ServiceKey> = self
            .assigned
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        for k in gone {
            self.assigned.remove(&k);
            ops.push(Op::Delete(format!("{VIPS}{k}")));
        }
        let used: std::collections::HashSet<Ipv4Addr> = self.assigned.values().copied().collect();
        let mut used = used;
        for k in wanted {
            if self.assigned.contains_key(&k) {
                continue;
            }
            // Start from a hash of the name so addresses rarely move between clusters; probe on.
            let start = fnv(k.to_string().as_bytes()) % (self.size - 2) + 1;
            let ip = (0..self.size - 2)
                .map(|i| Ipv4Addr::from(self.base + 1 + (start - 1 + i) % (self.size - 2)))
                .find(|ip| !used.contains(ip))
                .ok_or("the clusterset CIDR is full; choose a larger --clusterset-cidr")?;
            used.insert(ip);
            self.assigned.insert(k.clone(), ip);
            ops.push(Op::Put(format!("{VIPS}{k}"), ip.to_string().into_bytes()));
        }
        if ops.is_empty() {
            return Ok(false);
        }
        for chunk in ops.chunks(10_000) {
            self.db
                .commit(Txn {
                    compares: vec![],
                    ops: chunk.to_vec(),
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(true)
    }
}

fn fnv(b: &[u8]) -> u32 {
    b.iter().fold(0x811c9dc5u32, |h, x| {
        (h ^ u32::from(*x)).wrapping_mul(0x01000193)
    })
}

/// The ServiceImport objects for the clusterset as this cluster sees it.
pub fn service_imports(cs: &ClusterSet, vips: &VipAllocator) -> Vec<ServiceImport> {
    cs.imports
        .iter()
        .map(|(k, i)| {
            let mut si = ServiceImport::new(
                k.name.as_str(),
                ServiceImportSpec {
                    ports: i
                        .ports
                        .iter()
                        .map(|p| ServicePort {
                            name: (!p.name.is_empty()).then(|| p.name.clone()),
                            protocol: Some(p.protocol.clone()),
                            app_protocol: (!p.app_protocol.is_empty())
                                .then(|| p.app_protocol.clone()),
                            port: p.port as i32,
                        })
                        .collect(),
                    ips: match (i.r#type, vips.get(k)) {
                        (t, Some(ip)) if t != pb::ServiceType::Headless as i32 => {
                            vec![ip.to_string()]
                        }
                        _ => vec![],
                    },
                    type_: if i.r#type == pb::ServiceType::Headless as i32 {
                        ServiceImportType::Headless
                    } else {
                        ServiceImportType::ClusterSetIP
                    },
                    session_affinity: Some(if i.session_affinity.is_empty() {
                        "None".into()
                    } else {
                        i.session_affinity.clone()
                    }),
                    session_affinity_config: None,
                },
            );
            si.metadata.namespace = Some(k.namespace.to_string());
            si.status = Some(ServiceImportStatus {
                clusters: i
                    .clusters
                    .iter()
                    .map(|c| ClusterStatus {
                        cluster: c.cluster.clone(),
                    })
                    .collect(),
            });
            si
        })
        .collect()
}

/// ServiceExport conditions, keeping `lastTransitionTime` when a condition did not change.
pub struct ConditionTracker {
    /// ServiceExport conditions, by export and type.
    exports: Tracked<(ServiceKey, String)>,
    /// Route conditions, by route and `kind/parent/type`.
    routes: Tracked<(ServiceKey, String)>,
    /// TrafficPolicy conditions, by policy and `kind/type`.
    policies: Tracked<(ServiceKey, String)>,
    /// FederatedTrustDomain conditions, by name and type.
    federated: Tracked<(String, &'static str)>,
}

/// Conditions as they were last written, by key, so a condition keeps its `lastTransitionTime`
/// while its status and reason stay; those not written again in a round are forgotten.
struct Tracked<K> {
    previous: BTreeMap<K, Condition>,
    seen: std::collections::BTreeSet<K>,
}

impl<K: Ord + Clone> Tracked<K> {
    fn new() -> Self {
        Self {
            previous: BTreeMap::new(),
            seen: Default::default(),
        }
    }

    /// The condition `type_` under `key` as it is now.
    fn condition(
        &mut self,
        key: K,
        type_: &str,
        c: &super::routes::Cond,
        generation: Option<i64>,
        now: &Time,
    ) -> Condition {
        self.track(
            key,
            type_,
            c.status,
            c.reason,
            c.message.clone(),
            generation,
            now,
        )
    }

    /// A condition as it is now, keeping its `lastTransitionTime` while its status and reason
    /// stay.
    #[allow(clippy::too_many_arguments)]
    fn track(
        &mut self,
        key: K,
        type_: &str,
        status: bool,
        reason: &str,
        message: String,
        generation: Option<i64>,
        now: &Time,
    ) -> Condition {
        let status = if status { "True" } else { "False" }.to_string();
        let last = match self.previous.get(&key) {
            Some(prev) if prev.status == status && prev.reason == reason => {
                prev.last_transition_time.clone()
            }
            _ => now.clone(),
        };
        let cond = Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: last,
            observed_generation: generation,
        };
        self.seen.insert(key.clone());
        self.previous.insert(key, cond.clone());
        cond
    }

    /// Ends a round: forgets the keys it did not write.
    fn end_round(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.previous.retain(|k, _| seen.contains(k));
    }
}

impl Default for ConditionTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ConditionTracker {
    pub fn new() -> Self {
        Self {
            exports: Tracked::new(),
            routes: Tracked::new(),
            policies: Tracked::new(),
            federated: Tracked::new(),
        }
    }

    /// Every route's status (`status.parents[]` with fedmesh's conditions), transition times
    /// kept while a condition does not change.
    pub fn route_statuses(
        &mut self,
        routes: &super::routes::CompiledRoutes,
    ) -> Vec<(&'static str, ServiceKey, fedmesh_api::gateway::RouteStatus)> {
        use fedmesh_api::gateway::{CONTROLLER_NAME, RouteParentStatus, RouteStatus, reason};
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut out = Vec::new();
        for r in &routes.reports {
            let mut parents = Vec::new();
            for p in &r.parents {
                let mut conditions = Vec::new();
                let mut list = vec![
                    (reason::ACCEPTED, &p.accepted),
                    (reason::RESOLVED_REFS, &p.resolved_refs),
                ];
                if let Some(pi) = &p.partially_invalid {
                    list.push((reason::PARTIALLY_INVALID, pi));
                }
                for (type_, c) in list {
                    let key = (
                        r.route.clone(),
                        format!(
                            "{}/{}/{}/{type_}",
                            r.kind,
                            p.parent_ref.name,
                            p.parent_ref.port.unwrap_or(0)
                        ),
                    );
                    conditions.push(self.routes.condition(key, type_, c, r.generation, &now));
                }
                parents.push(RouteParentStatus {
                    parent_ref: p.parent_ref.clone(),
                    controller_name: CONTROLLER_NAME.to_string(),
                    conditions,
                });
            }
            out.push((r.kind, r.route.clone(), RouteStatus { parents }));
        }
        self.routes.end_round();
        out
    }

    /// Every TrafficPolicy's and AuthorizationPolicy's status (`Accepted`, `ResolvedRefs`; the
    /// same shape for both), transition times kept while a
    /// condition does not change.
    pub fn policy_statuses(
        &mut self,
        policies: &super::policy::CompiledPolicies,
    ) -> Vec<(
        &'static str,
        ServiceKey,
        fedmesh_api::policy::TrafficPolicyStatus,
    )> {
        use fedmesh_api::gateway::reason;
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut out = Vec::new();
        for r in &policies.reports {
            let mut conditions = Vec::new();
            for (type_, c) in [
                (reason::ACCEPTED, &r.accepted),
                (reason::RESOLVED_REFS, &r.resolved_refs),
            ] {
                let key = (r.policy.clone(), format!("{}/{type_}", r.kind));
                conditions.push(self.policies.condition(key, type_, c, r.generation, &now));
            }
            out.push((
                r.kind,
                r.policy.clone(),
                fedmesh_api::policy::TrafficPolicyStatus { conditions },
            ));
        }
        self.policies.end_round();
        out
    }

    /// Every FederatedTrustDomain's status (`Accepted`, `Ready`), by name.
    pub fn federated_statuses(
        &mut self,
        reports: &[super::federated::Report],
    ) -> Vec<(String, fedmesh_api::federation::FederatedTrustDomainStatus)> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut out = Vec::new();
        for r in reports {
            let mut conditions = Vec::new();
            for (type_, c) in [("Accepted", &r.accepted), ("Ready", &r.ready)] {
                let key = (r.name.clone(), type_);
                conditions.push(self.federated.condition(key, type_, c, r.generation, &now));
            }
            out.push((
                r.name.clone(),
                fedmesh_api::federation::FederatedTrustDomainStatus { conditions },
            ));
        }
        self.federated.end_round();
        out
    }

    /// The ServiceExports of the source with their status filled in.
    pub fn export_statuses(
        &mut self,
        local: &LocalObjects,
        validity: &BTreeMap<ServiceKey, Result<(), Invalid>>,
        publish: &PublishStatus,
        cs: &ClusterSet,
        cluster: &ClusterName,
    ) -> Vec<ServiceExport> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut out = Vec::new();
        for (k, e) in &local.exports {
            let valid = validity.get(k).cloned().unwrap_or(Ok(()));
            let ready = if publish.accepted.contains_key(k) {
                Some(Ok(()))
            } else {
                publish.refused.clone().map(Err)
            };
            let conflicts: Vec<&pb::Conflict> = cs
                .imports
                .get(k)
                .map(|i| {
                    i.conflicts
                        .iter()
                        .filter(|c| c.cluster == cluster.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let mut conditions = Vec::new();
            for (type_, status, reason, message) in export_conditions(&valid, ready, &conflicts) {
                conditions.push(self.exports.track(
                    (k.clone(), type_.clone()),
                    &type_,
                    status,
                    &reason,
                    message,
                    e.metadata.generation,
                    &now,
                ));
            }
            let mut with_status = e.clone();
            with_status.metadata.namespace = Some(k.namespace.to_string());
            with_status.status = Some(ServiceExportStatus { conditions });
            out.push(with_status);
        }
        self.exports.end_round();
        out
    }
}

/// Writes the status YAML files when their content changed.
pub fn write_yaml_if_changed(
    path: &std::path::Path,
    docs: &[serde_json::Value],
) -> Result<bool, String> {
    let mut text = String::from("# Written by the fedmesh control plane; do not edit.\n");
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_saphyr::to_string(d).map_err(|e| e.to_string())?);
    }
    if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    fedmesh_trust::files::write_public(path, text.as_bytes()).map_err(|e| e.to_string())?;
    Ok(true)
}
