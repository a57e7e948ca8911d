//! The clusterset view a hub serves: built from the store (list, then watch), identical on every
//! hub replica because it is a pure function of the store's contents at a revision.
//!
//! Merging follows KEP-1645: a service's ServiceImport exposes the union of its exporters' ports;
//! where exporters disagree (a port name with different number/protocol, the service type, session
//! affinity) the oldest export wins and the others are marked in conflict. Endpoints of every
//! exporter stay routable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};

use super::records::*;
use crate::store::{Event, KeyValue, Revision, WatchBatch};

/// A unit of the view that changes as a whole and is sent as a whole.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViewKey {
    Import(ServiceKey),
    Cluster(ClusterName),
    Bundle(TrustDomain),
}

/// Maps a store key to the view key it affects (presence and tokens affect none).
pub fn view_key_of(store_key: &str) -> Option<ViewKey> {
    if let Some(rest) = store_key.strip_prefix(EXPORTS) {
        let mut parts = rest.splitn(3, '/');
        let (_cluster, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
        return ServiceKey::new(ns, name).ok().map(ViewKey::Import);
    }
    if let Some(name) = store_key.strip_prefix(CLUSTERS) {
        return ClusterName::new(name).ok().map(ViewKey::Cluster);
    }
    if let Some(td) = store_key.strip_prefix(BUNDLES) {
        return TrustDomain::new(td).ok().map(ViewKey::Bundle);
    }
    None
}

/// How many revisions of change index the view keeps in memory; older resumes use store history.
const INDEX_RETENTION: usize = 100_000;

#[derive(Default)]
pub struct View {
    /// Applied up to this store revision.
    pub revision: Revision,
    /// Deltas can be computed in memory for any `since >= floor`.
    pub floor: Revision,
    /// The last revision that changed what clusters see (presence and tokens do not).
    pub last_change: Revision,
    exports: BTreeMap<ServiceKey, BTreeMap<ClusterName, ExportRecord>>,
    imports: BTreeMap<ServiceKey, Arc<pb::Import>>,
    clusters: BTreeMap<ClusterName, ClusterRecord>,
    presence: BTreeMap<ClusterName, Presence>,
    bundles: BTreeMap<TrustDomain, BundleRecord>,
    by_revision: BTreeMap<Revision, Vec<ViewKey>>,
}

impl View {
    /// Builds the view from a full listing taken at `revision`.
    pub fn from_listing(kvs: Vec<KeyValue>, revision: Revision) -> Self {
        let mut v = View {
            revision,
            floor: revision,
            last_change: revision,
            ..Default::default()
        };
        let mut touched = BTreeSet::new();
        for kv in kvs {
            if let Some(k) = v.apply_put(&kv.key, &kv.value) {
                touched.insert(k);
            }
        }
        for k in touched {
            if let ViewKey::Import(s) = k {
                v.recompute(&s);
            }
        }
        v
    }

    /// Applies one revision's events; returns the view keys that changed.
    pub fn apply(&mut self, batch: &WatchBatch) -> BTreeSet<ViewKey> {
        let mut changed = BTreeSet::new();
        if batch.revision <= self.revision {
            return changed;
        }
        for ev in &batch.events {
            let k = match ev {
                Event::Put(kv) => self.apply_put(&kv.key, &kv.value),
                Event::Delete { key, .. } => self.apply_delete(key),
            };
            changed.extend(k);
        }
        for k in &changed {
            if let ViewKey::Import(s) = k {
                self.recompute(s);
            }
        }
        self.revision = batch.revision;
        if !changed.is_empty() {
            self.last_change = batch.revision;
            self.by_revision
                .insert(batch.revision, changed.iter().cloned().collect());
            while self.by_revision.len() > INDEX_RETENTION {
                if let Some((r, _)) = self.by_revision.pop_first() {
                    self.floor = r;
                }
            }
        }
        changed
    }

    fn apply_put(&mut self, key: &str, value: &[u8]) -> Option<ViewKey> {
        if let Some(name) = key.strip_prefix(PRESENCE) {
            if let (Ok(c), Ok(p)) = (ClusterName::new(name), serde_json::from_slice(value)) {
                self.presence.insert(c, p);
            }
            return None;
        }
        let vk = view_key_of(key)?;
        match &vk {
            ViewKey::Import(s) => {
                let cluster = key
                    .strip_prefix(EXPORTS)?
                    .split('/')
                    .next()
                    .and_then(|c| ClusterName::new(c).ok())?;
                match serde_json::from_slice::<ExportRecord>(value) {
                    Ok(r) => {
                        self.exports
                            .entry(s.clone())
                            .or_default()
                            .insert(cluster, r);
                    }
                    Err(e) => {
                        tracing::error!(key, error = %e, "ignoring unreadable export record");
                        return None;
                    }
                }
            }
            ViewKey::Cluster(c) => match serde_json::from_slice::<ClusterRecord>(value) {
                Ok(r) => {
                    self.clusters.insert(c.clone(), r);
                }
                Err(e) => {
                    tracing::error!(key, error = %e, "ignoring unreadable cluster record");
                    return None;
                }
            },
            ViewKey::Bundle(td) => match serde_json::from_slice::<BundleRecord>(value) {
                Ok(r) => {
                    self.bundles.insert(td.clone(), r);
                }
                Err(e) => {
                    tracing::error!(key, error = %e, "ignoring unreadable bundle record");
                    return None;
                }
            },
        }
        Some(vk)
    }

    fn apply_delete(&mut self, key: &str) -> Option<ViewKey> {
        if let Some(name) = key.strip_prefix(PRESENCE) {
            if let Ok(c) = ClusterName::new(name) {
                self.presence.remove(&c);
            }
            return None;
        }
        let vk = view_key_of(key)?;
        match &vk {
            ViewKey::Import(s) => {
                let cluster = key
                    .strip_prefix(EXPORTS)?
                    .split('/')
                    .next()
                    .and_then(|c| ClusterName::new(c).ok())?;
                if let Some(m) = self.exports.get_mut(s) {
                    m.remove(&cluster);
                    if m.is_empty() {
                        self.exports.remove(s);
                    }
                }
            }
            ViewKey::Cluster(c) => {
                self.clusters.remove(c);
            }
            ViewKey::Bundle(td) => {
                self.bundles.remove(td);
            }
        }
        Some(vk)
    }

    fn recompute(&mut self, s: &ServiceKey) {
        match self.exports.get(s) {
            Some(exports) if !exports.is_empty() => {
                self.imports.insert(s.clone(), Arc::new(merge(s, exports)));
            }
            _ => {
                self.imports.remove(s);
            }
        }
    }

    /// View keys changed after `since`, or `None` when `since` predates the in-memory index.
    pub fn changed_since(&self, since: Revision) -> Option<BTreeSet<ViewKey>> {
        if since < self.floor {
            return None;
        }
        Some(
            self.by_revision
                .range(since + 1..)
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect(),
        )
    }

    /// The current state of `keys` as an Update (present keys upserted, absent ones removed).
    pub fn update_for(&self, keys: &BTreeSet<ViewKey>) -> pb::Update {
        let mut u = pb::Update {
            version: self.revision,
            ..Default::default()
        };
        for k in keys {
            match k {
                ViewKey::Import(s) => match self.imports.get(s) {
                    Some(i) => u.imports.push((**i).clone()),
                    None => u.removed_imports.push(s.to_string()),
                },
                ViewKey::Cluster(c) => match self.clusters.get(c) {
                    Some(r) => u.clusters.push(self.cluster_info(r)),
                    None => u.removed_clusters.push(c.to_string()),
                },
                ViewKey::Bundle(td) => match self.bundles.get(td) {
                    Some(b) => u.bundles.push(bundle_to_pb(b)),
                    None => u.removed_bundles.push(td.to_string()),
                },
            }
        }
        u
    }

    /// Everything, for a cluster that cannot resume.
    pub fn snapshot(&self) -> pb::Update {
        pb::Update {
            version: self.revision,
            snapshot: true,
            imports: self.imports.values().map(|i| (**i).clone()).collect(),
            clusters: self
                .clusters
                .values()
                .map(|r| self.cluster_info(r))
                .collect(),
            bundles: self.bundles.values().map(bundle_to_pb).collect(),
            ..Default::default()
        }
    }

    fn cluster_info(&self, r: &ClusterRecord) -> pb::ClusterInfo {
        pb::ClusterInfo {
            name: r.name.to_string(),
            trust_domain: r.trust_domain.to_string(),
            region: r.region.clone(),
            gateways: r.gateways.clone(),
            connected: !r.stale && !r.expired,
            stale: r.stale,
            last_seen_unix: 0,
        }
    }

    pub fn cluster(&self, c: &ClusterName) -> Option<&ClusterRecord> {
        self.clusters.get(c)
    }
    pub fn clusters(&self) -> impl Iterator<Item = &ClusterRecord> {
        self.clusters.values()
    }
    pub fn presence(&self, c: &ClusterName) -> Option<&Presence> {
        self.presence.get(c)
    }
    pub fn imports(&self) -> impl Iterator<Item = &Arc<pb::Import>> {
        self.imports.values()
    }
    pub fn import(&self, s: &ServiceKey) -> Option<&Arc<pb::Import>> {
        self.imports.get(s)
    }
    pub fn exports_of(&self, s: &ServiceKey) -> Option<&BTreeMap<ClusterName, ExportRecord>> {
        self.exports.get(s)
    }
    pub fn bundles(&self) -> impl Iterator<Item = &BundleRecord> {
        self.bundles.values()
    }
    pub fn bundle(&self, td: &TrustDomain) -> Option<&BundleRecord> {
        self.bundles.get(td)
    }
    /// The services a cluster exports (for expiry).
    pub fn services_exported_by(&self, c: &ClusterName) -> Vec<ServiceKey> {
        self.exports
            .iter()
            .filter(|(_, m)| m.contains_key(c))
            .map(|(s, _)| s.clone())
            .collect()
    }
}

pub fn bundle_to_pb(b: &BundleRecord) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.to_string(),
        jwks: b.jwks.clone().into_bytes(),
        sequence: b.sequence,
    }
}

fn port_identity(p: &PortRecord) -> String {
    // Unnamed ports are identified by number and protocol.
    if p.name.is_empty() {
        format!("{}/{}", p.port, p.protocol)
    } else {
        p.name.clone()
    }
}

/// Merges the exports of one service per KEP-1645 (oldest export wins conflicts).
pub fn merge(s: &ServiceKey, exports: &BTreeMap<ClusterName, ExportRecord>) -> pb::Import {
    let mut ordered: Vec<(&ClusterName, &ExportRecord)> = exports.iter().collect();
    ordered.sort_by_key(|(cluster, e)| (e.first_received_ms(), *cluster));
    let (oldest_cluster, oldest) = ordered[0];
    let mut conflicts = Vec::new();
    let mut ports: BTreeMap<String, (&ClusterName, &PortRecord)> = BTreeMap::new();
    for (cluster, e) in &ordered {
        for p in &e.ports {
            match ports.get(&port_identity(p)) {
                None => {
                    ports.insert(port_identity(p), (cluster, p));
                }
                Some((winner, held)) if *held != p => conflicts.push(pb::Conflict {
                    cluster: cluster.to_string(),
                    field: "ports".into(),
                    winner: winner.to_string(),
                    message: format!(
                        "port {:?} is {}/{} in {cluster} but {}/{} in {winner}, whose export is older and wins",
                        port_identity(p),
                        p.port,
                        p.protocol,
                        held.port,
                        held.protocol
                    ),
                }),
                Some(_) => {}
            }
        }
        if *cluster != oldest_cluster {
            if e.type_ != oldest.type_ {
                conflicts.push(pb::Conflict {
                    cluster: cluster.to_string(),
                    field: "type".into(),
                    winner: oldest_cluster.to_string(),
                    message: format!(
                        "{cluster} exports {s} as {:?} but {oldest_cluster} (older) as {:?}",
                        e.type_, oldest.type_
                    ),
                });
            }
            if e.session_affinity != oldest.session_affinity {
                conflicts.push(pb::Conflict {
                    cluster: cluster.to_string(),
                    field: "sessionAffinity".into(),
                    winner: oldest_cluster.to_string(),
                    message: format!(
                        "{cluster} exports {s} with session affinity {:?} but {oldest_cluster} (older) with {:?}",
                        or_none(&e.session_affinity),
                        or_none(&oldest.session_affinity)
                    ),
                });
            }
        }
    }
    let mut merged_ports: Vec<&PortRecord> = ports.values().map(|(_, p)| *p).collect();
    merged_ports.sort();
    pb::Import {
        service: s.to_string(),
        r#type: service_type_to_pb(oldest.type_),
        ports: merged_ports.into_iter().map(port_to_pb).collect(),
        session_affinity: oldest.session_affinity.clone(),
        session_affinity_timeout_seconds: oldest.session_affinity_timeout_seconds,
        clusters: ordered
            .iter()
            .map(|(c, e)| pb::ImportCluster {
                cluster: c.to_string(),
                endpoints: e.endpoints.iter().map(locality_to_pb).collect(),
                exported_unix: e.created_unix,
            })
            .collect(),
        conflicts,
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "None" } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(
        created: i64,
        ports: &[(&str, u16)],
        type_: ServiceType,
        affinity: &str,
    ) -> ExportRecord {
        ExportRecord {
            service: "default/web".parse().unwrap(),
            type_,
            ports: ports
                .iter()
                .map(|(n, p)| PortRecord {
                    name: n.to_string(),
                    protocol: "TCP".into(),
                    port: *p,
                    app_protocol: String::new(),
                })
                .collect(),
            session_affinity: affinity.into(),
            session_affinity_timeout_seconds: 0,
            endpoints: vec![],
            created_unix: created,
            created_unix_ms: 0,
        }
    }

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    #[test]
    fn ports_are_unioned_and_the_oldest_export_wins_conflicts() {
        let s: ServiceKey = "default/web".parse().unwrap();
        let mut m = BTreeMap::new();
        m.insert(
            c("west"),
            export(
                200,
                &[("http", 8080), ("grpc", 9090)],
                ServiceType::ClusterSetIP,
                "",
            ),
        );
        m.insert(
            c("east"),
            export(100, &[("http", 80)], ServiceType::ClusterSetIP, ""),
        );
        m.insert(
            c("central"),
            export(300, &[("http", 80)], ServiceType::Headless, "ClientIP"),
        );
        let i = merge(&s, &m);
        let ports: Vec<_> = i.ports.iter().map(|p| (p.name.as_str(), p.port)).collect();
        assert_eq!(ports, vec![("grpc", 9090), ("http", 80)]);
        assert_eq!(i.clusters[0].cluster, "east", "ordered oldest first");
        assert_eq!(i.clusters.len(), 3, "every exporter stays routable");
        let fields: Vec<_> = i
            .conflicts
            .iter()
            .map(|c| (c.cluster.as_str(), c.field.as_str(), c.winner.as_str()))
            .collect();
        assert_eq!(
            fields,
            vec![
                ("west", "ports", "east"),
                ("central", "type", "east"),
                ("central", "sessionAffinity", "east")
            ]
        );
        assert!(
            i.conflicts[0].message.contains("8080"),
            "{}",
            i.conflicts[0].message
        );
    }

    #[test]
    fn store_keys_map_to_view_keys() {
        assert_eq!(
            view_key_of("exports/east/default/web"),
            Some(ViewKey::Import("default/web".parse().unwrap()))
        );
        assert_eq!(
            view_key_of("clusters/east"),
            Some(ViewKey::Cluster(c("east")))
        );
        assert_eq!(
            view_key_of("bundles/east.example"),
            Some(ViewKey::Bundle(TrustDomain::new("east.example").unwrap()))
        );
        assert_eq!(view_key_of("presence/east"), None);
        assert_eq!(view_key_of("tokens/abc"), None);
        assert_eq!(view_key_of("exports/east/Bad/web"), None);
    }
}
