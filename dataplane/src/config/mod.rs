//! The data plane's view of the control plane's configuration stream.
//!
//! A task keeps a [`RoutingTable`] current (snapshot, then deltas, resumed after reconnects) and
//! publishes it through an `ArcSwap`: the data path reads it without locks. When the control plane
//! is unreachable the last table stays in force; with a cache file it also survives a restart.
//!
//! A sidecar receives the services of its own namespace; any other service it meets (by name or
//! by address) it asks for once with [`ConfigHandle::ensure`], and keeps receiving from then on.
//! What the control plane does not know is remembered as unknown for [`NOT_FOUND_TTL`], so traffic
//! to addresses outside the mesh asks once, not per connection.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::pb::dataplane::data_plane_client::DataPlaneClient;
use fedmesh_api::{DATAPLANE_PROTOCOL_VERSION, SpiffeId};
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

mod compile;
mod table;

pub use compile::compile;
pub use table::{AppProtocol, LocalCluster, PortSpec, RoutingTable, Scope, ServiceEntry};

/// How long a subscription the control plane could not answer is remembered as unknown.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(5);
/// How long a request waits for the answer to a subscription.
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct ConfigHandle {
    table: Arc<ArcSwap<RoutingTable>>,
    changes: watch::Receiver<u64>,
    connected: watch::Receiver<bool>,
    subscribe: Option<mpsc::Sender<String>>,
    report: Option<mpsc::Sender<pb::Demand>>,
    /// What outlier detection holds ejected, latest only: sent when it changes and on every
    /// new stream.
    health: Option<Arc<watch::Sender<pb::Health>>>,
}

impl ConfigHandle {
    /// A handle to one table that never changes: for tests and tools that run without a
    /// control plane.
    pub fn fixed(table: Arc<RoutingTable>) -> Self {
        let (_, changes) = watch::channel(1u64);
        let (_, connected) = watch::channel(false);
        Self {
            table: Arc::new(ArcSwap::new(table)),
            changes,
            connected,
            subscribe: None,
            report: None,
            health: None,
        }
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Ticks on every applied update.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Whether a table is loaded (from the control plane or the cache).
    pub fn is_ready(&self) -> bool {
        *self.changes.borrow() > 0
    }

    /// Resolves once a table is loaded (from the control plane or the cache).
    pub async fn ready(&self) {
        let mut rx = self.changes.clone();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Tells the control plane what this proxy saw of services with a clusterset-wide rate limit
    /// (never waits: a report that does not fit is dropped; the next one follows).
    pub fn report_demand(&self, d: pb::Demand) {
        if let Some(tx) = &self.report {
            let _ = tx.try_send(d);
        }
    }

    /// Tells the control plane what this proxy's outlier detection holds ejected now (sent only
    /// when the set of ejected targets changed: the time left is refreshed with it).
    pub fn report_health(&self, h: pb::Health) {
        if let Some(tx) = &self.health {
            tx.send_if_modified(|held| {
                let same = held.ejected.len() == h.ejected.len()
                    && held.ejected.iter().zip(&h.ejected).all(|(a, b)| {
                        (&a.cluster, &a.address, &a.service, a.ejections)
                            == (&b.cluster, &b.address, &b.service, b.ejections)
                    });
                if !same {
                    *held = h;
                }
                !same
            });
        }
    }

    /// Makes sure the table has `subject` (a service key `NAMESPACE/NAME` or an IPv4 address) if
    /// the control plane knows it: asks once and waits up to [`SUBSCRIBE_WAIT`] for the answer.
    /// Returns at once when the table knows it already (or knows that it does not exist).
    pub async fn ensure(&self, subject: &str) {
        if self.table().knows(subject) {
            return;
        }
        let Some(tx) = &self.subscribe else { return };
        if tx.try_send(subject.to_string()).is_err() {
            return;
        }
        let table = self.table.clone();
        let mut rx = self.changes.clone();
        let _ = tokio::time::timeout(SUBSCRIBE_WAIT, rx.wait_for(|_| table.load().knows(subject)))
            .await;
    }
}

/// A channel to this cluster's control plane at `addr`, with `identity`, that accepts only the
/// control plane of the identity's own trust domain.
pub fn control_plane_channel(
    addr: &str,
    identity: &MeshIdentity,
) -> Result<tonic::transport::Channel, String> {
    let id = identity.spiffe_id().ok_or("no SVID yet")?;
    let cp_id = SpiffeId::new(&format!(
        "spiffe://{}/fedmesh/control-plane",
        id.trust_domain()
    ))
    .map_err(|e| e.to_string())?;
    let cfg = identity.client_config(Authorizer::id(cp_id), vec![b"h2".to_vec()]);
    fedmesh_trust::grpc::channel(addr, cfg, "control-plane.fedmesh")
}

/// Starts following the control plane at `addr` with `identity`.
pub fn start(
    addr: String,
    identity: MeshIdentity,
    role: &str,
    node: &str,
    cache: Option<PathBuf>,
    shutdown: CancellationToken,
) -> ConfigHandle {
    let table = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
    let (changes_tx, changes) = watch::channel(0u64);
    let (connected_tx, connected) = watch::channel(false);
    let (subscribe_tx, subscriptions) = mpsc::channel::<String>(256);
    let (report_tx, reports) = mpsc::channel::<pb::Demand>(4);
    let (health_tx, health) = watch::channel(pb::Health::default());
    let mut outgoing = Outgoing {
        subscriptions,
        reports,
        health,
    };
    let mut state = State {
        map: HashMap::new(),
        epoch: 0,
        version: 0,
        cluster: pb::LocalCluster::default(),
        not_found: HashMap::new(),
        own_namespace: None,
    };
    if let Some(path) = &cache
        && let Ok(raw) = std::fs::read(path)
        && let Ok(u) = pb::ConfigUpdate::decode(raw.as_slice())
    {
        match state.apply(&u) {
            Ok(t) => {
                table.store(Arc::new(t));
                changes_tx.send_modify(|n| *n += 1);
                tracing::info!(path = %path.display(), services = state.map.len(), "loaded the last configuration from the cache");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a cached configuration this version cannot use");
            }
        }
    }
    let handle = ConfigHandle {
        table: table.clone(),
        changes,
        connected,
        subscribe: Some(subscribe_tx),
        report: Some(report_tx),
        health: Some(Arc::new(health_tx)),
    };
    let (role, node) = (role.to_string(), node.to_string());
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = session(
                &addr,
                &identity,
                &role,
                &node,
                &mut state,
                &table,
                &changes_tx,
                &connected_tx,
                &mut outgoing,
                cache.as_ref(),
                &shutdown,
            )
            .await;
            connected_tx.send_replace(false);
            if shutdown.is_cancelled() {
                return;
            }
            if let Err(e) = result {
                tracing::warn!(control_plane = %addr, error = %e, retry_in = ?backoff, "config stream down; routing with the last configuration");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    handle
}

/// What the data plane sends on the stream besides requests and acks.
struct Outgoing {
    subscriptions: mpsc::Receiver<String>,
    reports: mpsc::Receiver<pb::Demand>,
    health: watch::Receiver<pb::Health>,
}

struct State {
    map: HashMap<String, pb::Service>,
    epoch: u64,
    version: u64,
    cluster: pb::LocalCluster,
    /// Subscriptions the control plane could not answer, and when it said so.
    not_found: HashMap<String, Instant>,
    /// This proxy's namespace, once its SVID is known.
    own_namespace: Option<String>,
}

impl State {
    /// Applies an update and compiles the result; on a compile error nothing changes.
    fn apply(&mut self, u: &pb::ConfigUpdate) -> Result<RoutingTable, String> {
        let mut map = if u.snapshot {
            HashMap::new()
        } else {
            self.map.clone()
        };
        for s in &u.services {
            map.insert(s.key.clone(), s.clone());
        }
        for r in &u.removed_services {
            map.remove(r);
        }
        let cluster = u.cluster.clone().unwrap_or_else(|| self.cluster.clone());
        let mut table = compile(u.epoch, u.version, &cluster, &map)?;
        self.map = map;
        self.epoch = u.epoch;
        self.version = u.version;
        self.cluster = cluster;
        let now = Instant::now();
        self.not_found
            .retain(|_, at| now.duration_since(*at) < NOT_FOUND_TTL);
        for n in &u.not_found {
            self.not_found.insert(n.clone(), now);
        }
        table.not_found = self.not_found.keys().cloned().collect();
        table.own_namespace = self.own_namespace.clone();
        Ok(table)
    }

    /// What this proxy holds beyond its own namespace: it subscribed to those, and asks for
    /// them again when it reconnects.
    fn subscriptions(&self, own_namespace: Option<&str>) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| {
                own_namespace.is_none_or(|ns| k.split_once('/').is_none_or(|(n, _)| n != ns))
            })
            .cloned()
            .collect()
    }

    fn snapshot(&self) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            epoch: self.epoch,
            version: self.version,
            snapshot: true,
            cluster: Some(self.cluster.clone()),
            services: self.map.values().cloned().collect(),
            removed_services: vec![],
            not_found: vec![],
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    addr: &str,
    identity: &MeshIdentity,
    role: &str,
    node: &str,
    state: &mut State,
    table: &ArcSwap<RoutingTable>,
    changes: &watch::Sender<u64>,
    connected: &watch::Sender<bool>,
    outgoing: &mut Outgoing,
    cache: Option<&PathBuf>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let id = identity.spiffe_id().ok_or("no SVID yet")?;
    state.own_namespace = id
        .namespace_and_service_account()
        .map(|(ns, _)| ns.to_string());
    let channel = control_plane_channel(addr, identity)?;
    let mut client = DataPlaneClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::DataPlaneMessage {
        msg: Some(pb::data_plane_message::Msg::Request(pb::ConfigRequest {
            protocol_version: DATAPLANE_PROTOCOL_VERSION,
            role: role.to_string(),
            node: node.to_string(),
            resume_epoch: state.epoch,
            resume_version: state.version,
            subscriptions: state
                .subscriptions(id.namespace_and_service_account().map(|(ns, _)| ns)),
        })),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut inbound = client
        .stream_config(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    connected.send_replace(true);
    // A new stream starts with nothing ejected at the control plane's end.
    if !outgoing.health.borrow().ejected.is_empty() {
        outgoing.health.mark_changed();
    }
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = inbound.message() => m.map_err(|s| format!("{} ({:?})", s.message(), s.code()))?,
            Ok(()) = outgoing.health.changed() => {
                let h = outgoing.health.borrow_and_update().clone();
                tx.send(pb::DataPlaneMessage {
                    msg: Some(pb::data_plane_message::Msg::Health(h)),
                })
                .await
                .map_err(|e| e.to_string())?;
                continue;
            }
            Some(d) = outgoing.reports.recv() => {
                tx.send(pb::DataPlaneMessage {
                    msg: Some(pb::data_plane_message::Msg::Demand(d)),
                })
                .await
                .map_err(|e| e.to_string())?;
                continue;
            }
            Some(subject) = outgoing.subscriptions.recv() => {
                let mut sub = pb::Subscribe::default();
                if subject.contains('/') {
                    sub.services.push(subject);
                } else {
                    sub.addresses.push(subject);
                }
                // More queued asks go in the same message.
                while let Ok(more) = outgoing.subscriptions.try_recv() {
                    if more.contains('/') {
                        sub.services.push(more);
                    } else {
                        sub.addresses.push(more);
                    }
                }
                tx.send(pb::DataPlaneMessage {
                    msg: Some(pb::data_plane_message::Msg::Subscribe(sub)),
                })
                .await
                .map_err(|e| e.to_string())?;
                continue;
            }
        };
        let Some(u) = msg else { return Ok(()) };
        let compiled = match state.apply(&u) {
            Ok(t) => t,
            Err(error) => {
                tracing::warn!(version = u.version, %error, "refusing a configuration update; routing with the one in force");
                let _ = tx
                    .send(pb::DataPlaneMessage {
                        msg: Some(pb::data_plane_message::Msg::Ack(pb::ConfigAck {
                            version: u.version,
                            nack: true,
                            error,
                        })),
                    })
                    .await;
                continue;
            }
        };
        table.store(Arc::new(compiled));
        changes.send_modify(|n| *n += 1);
        tracing::debug!(
            version = u.version,
            snapshot = u.snapshot,
            services = u.services.len(),
            "config applied"
        );
        if let Some(path) = cache
            && let Err(e) =
                fedmesh_trust::files::write_public(path, &state.snapshot().encode_to_vec())
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the configuration");
        }
        let _ = tx
            .send(pb::DataPlaneMessage {
                msg: Some(pb::data_plane_message::Msg::Ack(pb::ConfigAck {
                    version: u.version,
                    nack: false,
                    error: String::new(),
                })),
            })
            .await;
    }
}
