//! The federation hub: registers clusters with one-time join tokens, accepts each cluster's
//! exports, bundle and gateways (and nothing else), merges them into the clusterset view, and
//! streams that view to every control plane — a snapshot, then deltas, resumable by version.
//!
//! Several hubs may share one etcd store: each keeps its view from the store's watch, and the
//! view version is the store revision, so a control plane can fail over between replicas and
//! resume where it was.

pub mod access;
pub mod admin;
pub mod api_json;
pub mod audit;
pub mod client;
mod explain;
pub mod gateways;
pub mod plaintext;
pub mod proxies;
mod publish;
pub mod quota;
pub mod records;
pub mod registration;
pub mod reports;
pub mod rollouts;
mod service;
pub mod traces;
pub mod ui;
pub mod view;

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, SpiffeId, TrustDomain};
use fedmesh_trust::ca::TrustDomainCa;
use fedmesh_trust::svid::new_key_and_csr;
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use futures::StreamExt;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::publish::{CheckedPublish, check_publish};
use self::records::*;
pub use self::service::HubService;
use self::view::{View, ViewKey, view_key_of};
use crate::metrics::HubMetrics;
use crate::store::{Compare, KvStore, Op, Revision, StoreError, Txn, TxnOutcome};

#[derive(Clone, Debug)]
pub struct HubConfig {
    /// This replica's name (shown in presence records and the admin API).
    pub replica: String,
    /// A cluster no hub heard from for this long is marked stale (its exports stay routable).
    pub stale_after: Duration,
    /// A cluster silent for this long has its exports withdrawn.
    pub expire_after: Duration,
    /// Lifetime of cluster identities; control planes renew at half of it.
    pub cluster_svid_ttl: Duration,
    /// Default lifetime of join tokens.
    pub token_ttl: Duration,
    /// What the window of recent traces keeps.
    pub traces: traces::TraceLimits,
    /// How long the audit log keeps a record.
    pub audit_retention: Duration,
    /// Also send every accepted span to this OTLP/HTTP traces endpoint (the operator's backend).
    pub otlp_forward: Option<String>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            replica: format!("hub-{}", std::process::id()),
            stale_after: Duration::from_secs(30),
            expire_after: Duration::from_secs(72 * 3600),
            cluster_svid_ttl: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(3600),
            traces: traces::TraceLimits::default(),
            audit_retention: Duration::from_secs(90 * 24 * 3600),
            otlp_forward: None,
        }
    }
}

impl HubConfig {
    fn heartbeat(&self) -> Duration {
        (self.stale_after / 3).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// How often a write computed from a cluster's record is recomputed when the record changed
/// under it (a sweep, a reconnect on another replica) before giving up for now.
const PUBLISH_ATTEMPTS: usize = 5;

/// Why a Publish was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The publish is wrong (not the cluster's own, malformed, stale); nothing was written.
    #[error("{0}")]
    Refused(String),
    /// The hub cannot apply it now (store unavailable, or the record kept changing); the cluster
    /// should reconnect and publish again.
    #[error("cannot apply the publish now: {0}")]
    Unavailable(String),
}

impl From<StoreError> for PublishError {
    fn from(e: StoreError) -> Self {
        PublishError::Unavailable(e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("hub identity: {0}")]
    Identity(String),
    #[error("{0}")]
    Config(String),
}

pub struct Hub {
    pub config: HubConfig,
    store: Arc<dyn KvStore>,
    ca: Arc<TrustDomainCa>,
    identity: MeshIdentity,
    view: RwLock<View>,
    revision: watch::Sender<Revision>,
    pub metrics: HubMetrics,
    /// Live acknowledged versions of the clusters streaming to this replica (the store's presence
    /// records carry them only at each heartbeat).
    acked: std::sync::Mutex<std::collections::HashMap<ClusterName, u64>>,
    /// Clusterset-wide rate limits: the clusters' demand and their shares.
    pub quotas: quota::Quotas,
    /// Rollouts in waves: each cluster's report, and which wave runs.
    pub rollouts: rollouts::Rollouts,
    /// What the PERMISSIVE services still get in plain text, per cluster.
    pub plaintext: plaintext::PlaintextShares,
    /// Every cluster's proxies, as its control plane last reported them.
    pub proxies: proxies::ProxyReports,
    /// Every cluster's probes of the others' gateways, as its control plane last reported them.
    pub probes: gateways::ProbeReports,
    /// Recent traces, from the clusters' OTLP exports.
    pub traces: traces::TraceWindow,
    /// The operator's trace backend, which gets every accepted span too.
    pub forward: Option<traces::forward::Forwarder>,
    shutdown: CancellationToken,
}

/// The SPIFFE ID of a cluster's hub identity.
pub fn cluster_id(hub_td: &TrustDomain, cluster: &ClusterName) -> SpiffeId {
    // Both parts are validated names, so this is always a valid ID.
    SpiffeId::new(&format!("spiffe://{hub_td}/cluster/{cluster}"))
        .unwrap_or_else(|_| hub_td.to_spiffe_id())
}

/// The cluster named by a hub-issued identity, if it is one.
pub fn cluster_of(hub_td: &TrustDomain, id: &SpiffeId) -> Option<ClusterName> {
    if id.trust_domain() != hub_td {
        return None;
    }
    let name = id.path().strip_prefix("/cluster/")?;
    ClusterName::new(name).ok()
}

/// A server chain with the CA's active (signing) authority appended, so a client holding a token
/// that pins it finds it. Upstream-mode chains already carry it (the intermediate).
pub(crate) fn with_active_ca(
    ca: &TrustDomainCa,
    mut chain: Vec<CertificateDer<'static>>,
) -> Vec<CertificateDer<'static>> {
    if let Some(active) = ca.active_certificate()
        && !chain.contains(&active)
    {
        chain.push(active);
    }
    chain
}

/// The hub's server SPIFFE ID path in its trust domain.
pub const HUB_SERVER_PATH: &str = "/hub";

pub fn hub_server_id(hub_td: &TrustDomain) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://{hub_td}{HUB_SERVER_PATH}"))
        .unwrap_or_else(|_| hub_td.to_spiffe_id())
}

impl Hub {
    /// Loads the view from the store and starts the background work (store watch, staleness
    /// sweeper, hub certificate renewal). Stops when `shutdown` is cancelled.
    pub async fn start(
        config: HubConfig,
        store: Arc<dyn KvStore>,
        ca: Arc<TrustDomainCa>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, HubError> {
        let identity = MeshIdentity::new();
        let (kvs, revision) = store.list("").await?;
        let view = View::from_listing(kvs, revision);
        let traces = traces::TraceWindow::new(config.traces.clone());
        let metrics = HubMetrics::default();
        let forward = match &config.otlp_forward {
            Some(url) => Some(
                traces::forward::Forwarder::start(url, metrics.spans.clone(), shutdown.clone())
                    .map_err(HubError::Config)?,
            ),
            None => None,
        };
        let hub = Arc::new(Self {
            config,
            store,
            ca,
            identity,
            view: RwLock::new(view),
            revision: watch::Sender::new(revision),
            metrics,
            acked: Default::default(),
            quotas: Default::default(),
            rollouts: Default::default(),
            plaintext: Default::default(),
            proxies: Default::default(),
            probes: Default::default(),
            traces,
            forward,
            shutdown,
        });
        hub.renew_identity()?;
        hub.index_trust_domains().await;
        tokio::spawn(hub.clone().follow_store());
        tokio::spawn(hub.clone().sweep());
        tokio::spawn(hub.clone().expire_audit());
        tokio::spawn(hub.clone().keep_identity_fresh());
        tracing::info!(replica = %hub.config.replica, backend = hub.store.backend(), revision, trust_domain = %hub.trust_domain(), "hub started");
        Ok(hub)
    }

    pub fn trust_domain(&self) -> TrustDomain {
        self.ca.trust_domain()
    }

    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    pub fn ca(&self) -> &Arc<TrustDomainCa> {
        &self.ca
    }

    /// The pin that join tokens carry: SHA-256 of the hub's active CA certificate (the one that
    /// signs the hub's certificate; a prepared next authority is in the bundle but signs nothing).
    pub fn ca_pin(&self) -> String {
        self.ca
            .active_certificate()
            .map(|c| fedmesh_trust::grpc::ca_pin(&c))
            .unwrap_or_default()
    }

    pub fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    pub(crate) fn record_ack(&self, cluster: &ClusterName, version: u64) {
        self.acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cluster.clone(), version);
    }

    /// The last view version `cluster` acknowledged: live when it streams to this replica, else
    /// as of its last heartbeat.
    pub fn acked_version(&self, cluster: &ClusterName) -> u64 {
        let live = self
            .acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cluster)
            .copied()
            .unwrap_or(0);
        let stored = self
            .view()
            .presence(cluster)
            .map(|p| p.acked_version)
            .unwrap_or(0);
        live.max(stored)
    }

    /// Whether `cluster` is registered. The view may lag the store by a moment (e.g. right after
    /// a join, or when another replica registered it), so on a miss the store decides, and we
    /// wait for the view to catch up before the caller reads it.
    pub async fn ensure_registered(&self, cluster: &ClusterName) -> Result<bool, StoreError> {
        if self.view().cluster(cluster).is_some() {
            return Ok(true);
        }
        let Some(kv) = self.store.get(&cluster_key(cluster)).await? else {
            return Ok(false);
        };
        let mut rx = self.subscribe();
        let caught_up = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|r| *r >= kv.mod_revision),
        )
        .await;
        Ok(caught_up.is_ok() && self.view().cluster(cluster).is_some())
    }

    /// The hub's server TLS config: clients present hub-issued cluster identities, except for Join.
    pub fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        let td = self.trust_domain();
        let authorizer = Authorizer::Custom {
            description: format!(
                "only clusters joined to {td} (spiffe://{td}/cluster/*) may connect"
            ),
            allow: Arc::new(move |id| cluster_of(&td, id).is_some()),
        };
        self.identity
            .server_config_optional_client_auth(authorizer, vec![b"h2".to_vec()])
    }

    /// Issues the hub's own SVID, with the signing CA appended so joining clusters can pin it.
    fn renew_identity(&self) -> Result<(), HubError> {
        let id = hub_server_id(&self.trust_domain());
        let (key, csr) = new_key_and_csr(&id).map_err(|e| HubError::Identity(e.to_string()))?;
        let issued = self
            .ca
            .sign_csr(&csr, Some(&id), None)
            .map_err(|e| HubError::Identity(e.to_string()))?;
        let bundle = self.ca.bundle();
        let chain = with_active_ca(&self.ca, issued.chain);
        let mut set = fedmesh_trust::bundle::BundleSet::new();
        set.update((*bundle).clone());
        self.identity.set_bundles(set);
        self.identity
            .set_svid_parts(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| HubError::Identity(e.to_string()))
    }

    /// Renews the hub's certificate at half its life, and at once when the CA rotates (so the
    /// served chain carries the authority join tokens pin).
    async fn keep_identity_fresh(self: Arc<Self>) {
        let mut rotations = self.ca.subscribe_bundle();
        loop {
            let wait = self
                .identity
                .svid()
                .and_then(|s| {
                    s.not_after
                        .duration_since(std::time::SystemTime::now())
                        .ok()
                })
                .map(|left| left / 2)
                .unwrap_or(Duration::from_secs(10))
                .max(Duration::from_secs(1));
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                r = rotations.changed() => if r.is_err() { return },
            }
            if let Err(e) = self.renew_identity() {
                tracing::error!(error = %e, "cannot renew the hub's certificate; retrying");
            }
        }
    }

    /// Keeps the view in step with the store; relists when the watch breaks.
    async fn follow_store(self: Arc<Self>) {
        loop {
            let from = self.view().revision;
            let mut stream = self.store.watch("", from);
            loop {
                let next = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(batch)) => {
                        let changed = {
                            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
                            v.apply(&batch)
                        };
                        let _ = changed;
                        self.revision.send_replace(batch.revision);
                        self.metrics.view_revision.set(batch.revision as i64);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "store watch failed; relisting");
                        break;
                    }
                    None => break,
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            match self.store.list("").await {
                Ok((kvs, revision)) => {
                    *self.view.write().unwrap_or_else(|p| p.into_inner()) =
                        View::from_listing(kvs, revision);
                    self.revision.send_replace(revision);
                }
                Err(e) => tracing::warn!(error = %e, "store unavailable; will retry"),
            }
        }
    }

    /// The Update that brings a cluster from `since` to now, or `None` when it needs a snapshot.
    ///
    /// The changed keys and their state are read under one view guard: the update's version must
    /// cover every change it claims to, or a change applied in between would be skipped for good.
    pub async fn delta_since(&self, since: Revision) -> Option<pb::Update> {
        let floor = {
            let v = self.view();
            if since > v.revision {
                return None;
            }
            if let Some(keys) = v.changed_since(since) {
                return Some(v.update_for(&keys));
            }
            v.floor
        };
        // Older than our in-memory index (e.g. we restarted): ask the store's history for what
        // changed up to the floor, then take the rest and the state from one guard.
        let mut keys = self.history_keys(since, floor).await?;
        let v = self.view();
        keys.extend(v.changed_since(floor)?);
        Some(v.update_for(&keys))
    }

    async fn history_keys(&self, since: Revision, upto: Revision) -> Option<BTreeSet<ViewKey>> {
        let mut keys = BTreeSet::new();
        if since >= upto {
            return Some(keys);
        }
        let mut stream = self.store.watch("", since);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                Ok(Some(Ok(batch))) => {
                    keys.extend(batch.events.iter().filter_map(|e| view_key_of(e.key())));
                    if batch.revision >= upto {
                        return Some(keys);
                    }
                }
                Ok(Some(Err(e))) => {
                    tracing::info!(since, error = %e, "history unavailable; sending a snapshot");
                    return None;
                }
                _ => return None,
            }
        }
    }

    /// Drops audit records past their retention, at start and then hourly (every replica; a
    /// record deleted twice is deleted once).
    async fn expire_audit(self: Arc<Self>) {
        let period = (self.config.audit_retention / 24)
            .clamp(Duration::from_secs(1), Duration::from_secs(3600));
        loop {
            match audit::expire(&**self.store(), self.config.audit_retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "audit records past their retention deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot expire audit records (will retry)"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }

    /// Marks clusters stale after `stale_after` of silence, and withdraws the exports of those
    /// silent past `expire_after`. Every replica runs it; compare-and-swap keeps them from fighting.
    async fn sweep(self: Arc<Self>) {
        let period = (self.config.stale_after / 10)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let now = now_ms();
            let todo: Vec<(ClusterRecord, i64)> = {
                let v = self.view();
                v.clusters()
                    .map(|c| {
                        let seen = v
                            .presence(&c.name)
                            .map(|p| p.last_seen_ms)
                            .unwrap_or(c.joined_unix * 1000);
                        (c.clone(), seen)
                    })
                    .collect()
            };
            for (mut record, last_seen) in todo {
                let silent = Duration::from_millis((now - last_seen).max(0) as u64);
                if silent >= self.config.stale_after && !record.stale {
                    tracing::warn!(cluster = %record.name, silent_for = ?silent, "cluster is stale; its exports stay routable");
                    let mut r = record.clone();
                    r.stale = true;
                    if let Ok(true) = self.update_cluster_record(&record, r.clone()).await {
                        record = r;
                    }
                }
                if silent >= self.config.expire_after && !record.expired {
                    match self.expire_cluster(&record).await {
                        Ok(true) => {
                            tracing::warn!(cluster = %record.name, silent_for = ?silent, "cluster expired; withdrew its exports")
                        }
                        // It changed meanwhile (e.g. reconnected); the next sweep looks again.
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(cluster = %record.name, error = %e, "cannot expire the cluster; will retry")
                        }
                    }
                }
            }
        }
    }

    /// A cluster's record as the store holds it now, with its mod revision. The view may lag the
    /// store; whatever is written back must be computed from this.
    pub(crate) async fn stored_cluster(
        &self,
        cluster: &ClusterName,
    ) -> Result<Option<(ClusterRecord, Revision)>, StoreError> {
        let Some(kv) = self.store.get(&cluster_key(cluster)).await? else {
            return Ok(None);
        };
        let record =
            serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some((record, kv.mod_revision)))
    }

    /// A cluster's exports as the store holds them now, by store key (`None`: unreadable).
    async fn stored_exports(
        &self,
        cluster: &ClusterName,
    ) -> Result<std::collections::BTreeMap<String, Option<ExportRecord>>, StoreError> {
        let (kvs, _) = self.store.list(&exports_prefix(cluster)).await?;
        Ok(kvs
            .into_iter()
            .map(|kv| {
                let record = serde_json::from_slice(&kv.value).ok();
                (kv.key, record)
            })
            .collect())
    }

    /// The publish version the hub holds for `cluster`, from the store (0 when unknown, which
    /// makes the cluster publish in full).
    pub(crate) async fn published_version(&self, cluster: &ClusterName) -> u64 {
        match self.stored_cluster(cluster).await {
            Ok(Some((r, _))) => r.published_version,
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!(%cluster, error = %e, "cannot read the cluster record; asking for a full publish");
                0
            }
        }
    }

    async fn update_cluster_record(
        &self,
        old: &ClusterRecord,
        new: ClusterRecord,
    ) -> Result<bool, StoreError> {
        let Some((current, revision)) = self.stored_cluster(&old.name).await? else {
            return Ok(false);
        };
        if &current != old {
            return Ok(false); // someone else changed it meanwhile; the next sweep looks again
        }
        let key = cluster_key(&old.name);
        let ops = vec![Op::Put(
            key.clone(),
            serde_json::to_vec(&new).unwrap_or_default(),
        )];
        Ok(self.commit_guarded(&key, revision, ops).await?.is_some())
    }

    /// Withdraws the exports of a cluster silent past the expiry. Returns false, writing nothing,
    /// when its record is no longer `seen` (it reconnected, or another replica expired it).
    async fn expire_cluster(&self, seen: &ClusterRecord) -> Result<bool, StoreError> {
        let Some((current, revision)) = self.stored_cluster(&seen.name).await? else {
            return Ok(false);
        };
        if &current != seen {
            return Ok(false);
        }
        let key = cluster_key(&seen.name);
        let mut r = current;
        r.expired = true;
        r.stale = true;
        // The hub no longer holds what the cluster published: when it comes back it must publish
        // in full, not a delta against state that was withdrawn.
        r.published_version = 0;
        // The record first: a reconnect racing a withdrawal of many chunks already sees version 0.
        let mut ops = vec![Op::Put(
            key.clone(),
            serde_json::to_vec(&r).unwrap_or_default(),
        )];
        ops.extend(
            self.stored_exports(&seen.name)
                .await?
                .into_keys()
                .map(Op::Delete),
        );
        Ok(self.commit_guarded(&key, revision, ops).await?.is_some())
    }

    /// Commits ops in chunks the backend accepts; the last chunk carries the last ops.
    async fn commit_chunked(&self, ops: Vec<Op>) -> Result<Revision, StoreError> {
        let mut revision = 0;
        for chunk in ops.chunks(crate::store::MAX_TXN_OPS) {
            match self
                .store
                .commit(Txn {
                    compares: vec![],
                    ops: chunk.to_vec(),
                })
                .await?
            {
                TxnOutcome::Committed(r) => revision = r,
                TxnOutcome::Failed => {
                    return Err(StoreError::Corrupt("unconditional commit failed".into()));
                }
            }
        }
        Ok(revision)
    }

    /// Commits ops in chunks, each only while `key` is still at `revision` (moved along when a
    /// chunk writes `key` itself). `None` when someone else changed `key` first: the chunks before
    /// are committed, the rest not; callers recompute from the store and try again.
    async fn commit_guarded(
        &self,
        key: &str,
        mut revision: Revision,
        ops: Vec<Op>,
    ) -> Result<Option<Revision>, StoreError> {
        let mut last = revision;
        for chunk in ops.chunks(crate::store::MAX_TXN_OPS) {
            let writes_key = chunk.iter().any(|op| match op {
                Op::Put(k, _) | Op::Delete(k) => k == key,
            });
            let txn = Txn {
                compares: vec![Compare::ModRevision(key.to_string(), revision)],
                ops: chunk.to_vec(),
            };
            match self.store.commit(txn).await? {
                TxnOutcome::Committed(r) => {
                    last = r;
                    if writes_key {
                        revision = r;
                    }
                }
                TxnOutcome::Failed => return Ok(None),
            }
        }
        Ok(Some(last))
    }

    /// Applies a cluster's Publish. Refusals say what was refused and why; nothing is written then.
    ///
    /// Computed against the store, not the view (which lags it): a publish right after another
    /// must see what that one wrote. The cluster record is written last and only if unchanged
    /// since it was read, so a concurrent sweep, expiry or removal is never overwritten.
    pub async fn apply_publish(
        &self,
        cluster: &ClusterName,
        p: &pb::Publish,
    ) -> Result<Revision, PublishError> {
        use PublishError::Refused;
        let CheckedPublish {
            upserts,
            removals,
            bundle,
        } = check_publish(cluster, p).map_err(Refused)?;
        let key = cluster_key(cluster);
        for _ in 0..PUBLISH_ATTEMPTS {
            let Some((record, revision)) = self.stored_cluster(cluster).await? else {
                return Err(Refused(format!(
                    "cluster {cluster} is not registered with this hub"
                )));
            };
            if p.version <= record.published_version
                && !(p.full && p.version == record.published_version)
            {
                return Err(Refused(format!(
                    "publish version {} is not newer than version {} already applied",
                    p.version, record.published_version
                )));
            }
            let mut ops = Vec::new();
            if let Some(br) = &bundle {
                if br.trust_domain != record.trust_domain {
                    return Err(Refused(format!(
                        "cluster {cluster} may publish only the bundle of its own trust domain {}, not {}",
                        record.trust_domain, br.trust_domain
                    )));
                }
                let held = self
                    .store
                    .get(&bundle_key(&br.trust_domain))
                    .await?
                    .and_then(|kv| serde_json::from_slice::<BundleRecord>(&kv.value).ok());
                if held.as_ref() != Some(br) {
                    ops.push(Op::Put(
                        bundle_key(&br.trust_domain),
                        serde_json::to_vec(br).unwrap_or_default(),
                    ));
                }
            }
            let current = self.stored_exports(cluster).await?;
            if p.full {
                let keep: BTreeSet<String> = upserts
                    .iter()
                    .map(|e| export_key(cluster, &e.service))
                    .collect();
                for k in current.keys().filter(|k| !keep.contains(*k)) {
                    ops.push(Op::Delete(k.clone()));
                }
            }
            let (now, now_ms) = (now_unix(), now_ms());
            for e in &upserts {
                let k = export_key(cluster, &e.service);
                let held = current.get(&k).and_then(Option::as_ref);
                // An export's age decides conflicts (oldest wins), so the hub's clock sets it when
                // the export first arrives: a cluster claiming the past would always win.
                let mut e = e.clone();
                e.created_unix = held.map(|h| h.created_unix).unwrap_or(now);
                e.created_unix_ms = held.map(|h| h.first_received_ms()).unwrap_or(now_ms);
                // Unchanged exports are not rewritten: a reconnecting cluster's full publish costs nothing.
                if held != Some(&e) {
                    ops.push(Op::Put(k, serde_json::to_vec(&e).unwrap_or_default()));
                }
            }
            for s in &removals {
                let k = export_key(cluster, s);
                if current.contains_key(&k) {
                    ops.push(Op::Delete(k));
                }
            }
            let mut new_record = record;
            if let Some(g) = &p.gateways {
                new_record.gateways = g.addresses.clone();
            }
            if let Some(problems) = &p.problems {
                new_record.problems = problems
                    .items
                    .iter()
                    .take(records::MAX_PROBLEMS)
                    .map(records::ProblemRecord::from)
                    .collect();
            }
            if let Some(routes) = &p.routes {
                new_record.routes = routes
                    .items
                    .iter()
                    .take(records::MAX_ROUTES)
                    .map(records::RouteRecord::from)
                    .collect();
            }
            new_record.published_version = p.version;
            // Last: the hub claims a publish version only once the state it stands for is written.
            ops.push(Op::Put(
                key.clone(),
                serde_json::to_vec(&new_record).unwrap_or_default(),
            ));
            if let Some(r) = self.commit_guarded(&key, revision, ops).await? {
                return Ok(r);
            }
            tracing::debug!(%cluster, version = p.version, "cluster record changed during a publish; recomputing");
        }
        Err(PublishError::Unavailable(format!(
            "the record of cluster {cluster} kept changing during the publish"
        )))
    }

    /// Records that a cluster (re)connected through this replica.
    pub async fn mark_connected(
        &self,
        cluster: &ClusterName,
        hello: &pb::Hello,
    ) -> Result<(), StoreError> {
        let key = cluster_key(cluster);
        for _ in 0..PUBLISH_ATTEMPTS {
            let Some((record, revision)) = self.stored_cluster(cluster).await? else {
                return Ok(());
            };
            let mut r = record.clone();
            r.stale = false;
            r.expired = false;
            r.protocol_version = hello.protocol_version;
            if !hello.region.is_empty() {
                r.region = hello.region.clone();
            }
            if r == record {
                break;
            }
            let ops = vec![Op::Put(
                key.clone(),
                serde_json::to_vec(&r).unwrap_or_default(),
            )];
            if self.commit_guarded(&key, revision, ops).await?.is_some() {
                break;
            }
        }
        self.write_presence(cluster, 0, true).await
    }

    pub async fn write_presence(
        &self,
        cluster: &ClusterName,
        acked: u64,
        connected: bool,
    ) -> Result<(), StoreError> {
        let p = Presence {
            hub: self.config.replica.clone(),
            last_seen_ms: now_ms(),
            acked_version: acked,
            connected,
        };
        crate::store::put(
            &*self.store,
            &presence_key(cluster),
            serde_json::to_vec(&p).unwrap_or_default(),
        )
        .await
        .map(|_| ())
    }

    /// Removes a cluster and everything it published (operator action).
    pub async fn remove_cluster(&self, cluster: &ClusterName) -> Result<bool, StoreError> {
        let Some((record, _)) = self.stored_cluster(cluster).await? else {
            return Ok(false);
        };
        // The record first: a publish racing the removal then fails its compare and is refused,
        // instead of writing exports after they were deleted.
        let mut ops = vec![
            Op::Delete(cluster_key(cluster)),
            Op::Delete(presence_key(cluster)),
        ];
        let bundle = self
            .store
            .get(&bundle_key(&record.trust_domain))
            .await?
            .and_then(|kv| serde_json::from_slice::<BundleRecord>(&kv.value).ok());
        if bundle.is_some_and(|b| &b.cluster == cluster) {
            ops.push(Op::Delete(bundle_key(&record.trust_domain)));
        }
        let owner = self
            .store
            .get(&trust_domain_key(&record.trust_domain))
            .await?;
        if owner.is_some_and(|kv| kv.value == cluster.as_str().as_bytes()) {
            ops.push(Op::Delete(trust_domain_key(&record.trust_domain)));
        }
        ops.extend(
            self.stored_exports(cluster)
                .await?
                .into_keys()
                .map(Op::Delete),
        );
        self.commit_chunked(ops).await?;
        Ok(true)
    }

    /// Withdraws one export of a cluster (operator action).
    pub async fn withdraw_export(
        &self,
        cluster: &ClusterName,
        service: &fedmesh_api::ServiceKey,
    ) -> Result<bool, StoreError> {
        let key = export_key(cluster, service);
        let exists = self.store.get(&key).await?.is_some();
        if exists {
            self.commit_chunked(vec![Op::Delete(key)]).await?;
        }
        Ok(exists)
    }
}

/// Serves the Federation gRPC service on `listener` (SPIFFE mTLS) until `shutdown`.
pub async fn serve_grpc(
    hub: Arc<Hub>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = fedmesh_trust::grpc::incoming(listener, hub.server_tls());
    // The hub records a cluster's presence while its stream lives, so a stream whose peer went
    // silent (a partition drops packets; nothing closes) must end well inside --stale-after:
    // PING after a heartbeat of silence, and give up after another.
    // (At least a second each: a PING answered late on a busy machine must not cut a live
    // stream.)
    let keepalive = hub.config.heartbeat().max(Duration::from_secs(1));
    fedmesh_trust::grpc::server()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive))
        .layer(fedmesh_trust::grpc::UnauthenticatedLimitLayer::new(&[
            "/fedmesh.federation.v1.Federation/Join",
        ]))
        .layer(tower::util::MapRequestLayer::new(
            service::limit_unary_requests,
        ))
        .add_service(HubService::new(hub.clone()))
        .add_service(traces::intake::server(hub))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Serves the admin API on `listener` until `shutdown`. With `tls`, clients may authenticate with
/// an admin SPIFFE ID instead of the token.
pub async fn serve_admin(
    state: admin::AdminState,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use fedmesh_trust::http_server::{HttpListener, Versions, serve};
    let listener = HttpListener::new(listener, tls, "admin API")?;
    serve(
        listener,
        admin::router(state),
        Versions::Http1,
        "admin API",
        shutdown,
    )
    .await;
    Ok(())
}

impl Hub {
    /// A TLS config for the admin port: the hub's certificate; client certificates optional and,
    /// when presented, verified against the hub's and every federated bundle.
    pub fn admin_tls(&self) -> Arc<rustls::ServerConfig> {
        self.identity
            .server_config_optional_client_auth(Authorizer::AnyTrusted, vec![b"http/1.1".to_vec()])
    }

    /// A TLS config for the hub's OTLP listener: as [`Hub::admin_tls`], with HTTP/2 for OTLP/gRPC.
    /// Only a joined cluster's identity may send ([`traces::intake`] checks the client's SVID).
    pub fn otlp_tls(&self) -> Arc<rustls::ServerConfig> {
        self.identity.server_config_optional_client_auth(
            Authorizer::AnyTrusted,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )
    }
}
