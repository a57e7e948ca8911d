//! The data-plane configuration stream: what sidecars and gateways of this cluster route by.
//!
//! One task turns each control-plane snapshot into a map of services (versioned within an epoch
//! that changes at every start) and keeps the last few versions; each stream then sends a snapshot
//! or — when the data plane resumes from a version still held — only what changed.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::pb::dataplane::data_plane_server::{DataPlane, DataPlaneServer};
use fedmesh_api::pb::federation as fpb;
use fedmesh_api::{ClusterName, DATAPLANE_PROTOCOL_VERSION, ServiceKey};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{ControlPlane, Snapshot};

/// How many past versions are kept for resuming data planes.
const HISTORY: usize = 64;

pub type ServiceMap = BTreeMap<String, pb::Service>;

#[derive(Default)]
pub struct ConfigState {
    pub version: u64,
    pub services: Arc<ServiceMap>,
    /// The clusters of the clusterset (sent whole with every update; it is small).
    pub peers: Arc<Vec<pb::Peer>>,
    history: VecDeque<(u64, Arc<ServiceMap>)>,
}

/// The clusters of a snapshot, this one included.
pub fn peers_of(
    cp_cluster: &ClusterName,
    trust_domain: &str,
    region: &str,
    snap: &Snapshot,
) -> Vec<pb::Peer> {
    let mut out: Vec<pb::Peer> = snap
        .clusterset
        .clusters
        .iter()
        .filter(|(n, _)| *n != cp_cluster)
        .map(|(n, c)| pb::Peer {
            cluster: n.to_string(),
            trust_domain: c.trust_domain.clone(),
            region: c.region.clone(),
        })
        .collect();
    out.push(pb::Peer {
        cluster: cp_cluster.to_string(),
        trust_domain: trust_domain.to_string(),
        region: region.to_string(),
    });
    out.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    out
}

impl ConfigState {
    fn at(&self, version: u64) -> Option<Arc<ServiceMap>> {
        if version == self.version {
            return Some(self.services.clone());
        }
        self.history
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, m)| m.clone())
    }
}

/// The services of a snapshot, as the data plane sees them: every Service of this cluster (with
/// its endpoints, for `cluster.local` routing) and every service of the clusterset.
///
/// Whether this cluster exports a service comes from its own valid ServiceExport, not from the
/// hub's answer: the gateway admits connections, and the sidecars serve them, as soon as the
/// export exists here, so a peer that learns of the export through the hub never arrives first.
pub fn services_of(
    cp_cluster: &ClusterName,
    region: &str,
    snap: &Snapshot,
    policies: &BTreeMap<String, pb::TrafficPolicy>,
    limits: &super::ratelimit::ClustersetLimits,
) -> ServiceMap {
    let mut keys: std::collections::BTreeSet<&ServiceKey> =
        snap.clusterset.imports.keys().collect();
    keys.extend(snap.local.services.keys());
    let mut local_endpoints = snap.local.endpoints_by_service();
    let mut out = ServiceMap::new();
    for key in keys {
        let import = snap.clusterset.imports.get(key);
        let local = snap.local.services.get(key);
        let exported_here = local.is_some()
            && snap.local.exports.contains_key(key)
            && matches!(snap.validity.get(key), Some(Ok(())));
        let exported = exported_here
            || import.is_some_and(|i| i.clusters.iter().any(|c| c.cluster == cp_cluster.as_str()));
        let spec = local.and_then(|s| s.spec.as_ref());
        let endpoints = if local.is_some() {
            local_endpoints
                .remove(key)
                .unwrap_or_default()
                .into_iter()
                .map(|e| pb::Endpoint {
                    address: e.address,
                    region: region.to_string(),
                    zone: e.zone,
                    ready: e.ready,
                    ports: e
                        .ports
                        .into_iter()
                        .map(|(name, port)| pb::NamedPort {
                            name,
                            port: u32::from(port),
                        })
                        .collect(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let remote = import
            .map(|i| i.clusters.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|c| c.cluster != cp_cluster.as_str())
            .filter_map(|c| {
                let name = ClusterName::new(&c.cluster).ok()?;
                let info = snap.clusterset.clusters.get(&name);
                Some(pb::RemoteCluster {
                    cluster: c.cluster.clone(),
                    trust_domain: info.map(|i| i.trust_domain.clone()).unwrap_or_default(),
                    region: info.map(|i| i.region.clone()).unwrap_or_default(),
                    gateways: info.map(|i| i.gateways.clone()).unwrap_or_default(),
                    ready: c
                        .endpoints
                        .iter()
                        .map(|l| l.ready)
                        .fold(0, u32::saturating_add),
                    localities: c
                        .endpoints
                        .iter()
                        .map(|l| pb::Locality {
                            region: l.region.clone(),
                            zone: l.zone.clone(),
                            ready: l.ready,
                        })
                        .collect(),
                    stale: info.is_some_and(|i| i.stale),
                })
            })
            .collect();
        // The clusterset's ports (the union over exporters), else the local Service's.
        let ports = match import {
            Some(i) => i
                .ports
                .iter()
                .map(|p| pb::Port {
                    name: p.name.clone(),
                    protocol: p.protocol.clone(),
                    port: p.port,
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            None => spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| pb::Port {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    port: p.port.max(0) as u32,
                    app_protocol: p.app_protocol.clone().unwrap_or_default(),
                })
                .collect(),
        };
        let vip = match import {
            Some(i) if i.r#type != fpb::ServiceType::Headless as i32 => snap
                .vips
                .get(key)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let cluster_ip = spec
            .and_then(|s| s.cluster_ip.clone())
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            .unwrap_or_default();
        out.insert(
            key.to_string(),
            pb::Service {
                key: key.to_string(),
                vip,
                ports,
                exported,
                endpoints,
                remote,
                policy: {
                    let mut p = policies.get(&key.to_string()).cloned();
                    let clusters = import.map_or(1, |i| i.clusters.len());
                    if let Some(share) = limits.share_of(key, clusters) {
                        p.get_or_insert_default().clusterset_rate_limit = Some(share);
                    }
                    p
                },
                session_affinity: import
                    .map(|i| i.session_affinity.clone())
                    .unwrap_or_default(),
                cluster_ip,
                in_clusterset: import.is_some() || exported_here,
            },
        );
    }
    out
}

/// Keeps the versioned service map in step with the control plane's snapshots.
pub async fn run(
    cp: Arc<ControlPlane>,
    state: watch::Sender<Arc<ConfigState>>,
    shutdown: CancellationToken,
) {
    let mut snap = cp.snapshot();
    let mut shares = cp.rate_limits.subscribe();
    loop {
        let s = snap.borrow_and_update().clone();
        shares.borrow_and_update();
        let services = services_of(
            &cp.config.cluster,
            &cp.config.region,
            &s,
            &s.policies.by_service,
            &cp.rate_limits,
        );
        let peers = peers_of(
            &cp.config.cluster,
            cp.config.trust_domain.as_str(),
            &cp.config.region,
            &s,
        );
        state.send_if_modified(|cur| {
            if *cur.services == services && *cur.peers == peers {
                return false;
            }
            let mut history = cur.history.clone();
            history.push_back((cur.version, cur.services.clone()));
            while history.len() > HISTORY {
                history.pop_front();
            }
            *cur = Arc::new(ConfigState {
                version: cur.version + 1,
                services: Arc::new(services),
                peers: Arc::new(peers),
                history,
            });
            true
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = snap.changed() => if r.is_err() { return },
            r = shares.changed() => if r.is_err() { return },
        }
    }
}

pub struct ConfigService {
    pub cp: Arc<ControlPlane>,
    pub epoch: u64,
    pub state: watch::Receiver<Arc<ConfigState>>,
}

impl ConfigService {
    pub fn into_server(self) -> DataPlaneServer<Self> {
        DataPlaneServer::new(self)
            .max_encoding_message_size(64 * 1024 * 1024)
            .max_decoding_message_size(super::identity::REQUEST_LIMIT)
    }
}

fn diff(from: &ServiceMap, to: &ServiceMap) -> (Vec<pb::Service>, Vec<String>) {
    let changed = to
        .iter()
        .filter(|(k, v)| from.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let removed = from
        .keys()
        .filter(|k| !to.contains_key(*k))
        .cloned()
        .collect();
    (changed, removed)
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl DataPlane for ConfigService {
    type StreamConfigStream = UpdateStream;

    async fn stream_config(
        &self,
        request: Request<Streaming<pb::DataPlaneMessage>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let caller = fedmesh_trust::grpc::peer_id(&request).ok_or_else(|| {
            Status::unauthenticated("data-plane components authenticate with their SVID")
        })?;
        let svid_not_after = fedmesh_trust::grpc::peer_info(&request).and_then(|p| p.not_after);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no ConfigRequest within 10s"))??;
        let Some(pb::DataPlaneMessage {
            msg: Some(pb::data_plane_message::Msg::Request(req)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message must be a ConfigRequest",
            ));
        };
        if req.protocol_version > DATAPLANE_PROTOCOL_VERSION || req.protocol_version == 0 {
            return Err(Status::failed_precondition(format!(
                "data-plane protocol v{} is not supported by this control plane (v1..v{DATAPLANE_PROTOCOL_VERSION}); upgrade the control plane first",
                req.protocol_version
            )));
        }
        let mut scope = super::scope::ProxyScope::for_caller(
            &caller,
            &req.role,
            &self.cp.config.system_namespace,
            &req.subscriptions,
        )?;
        let zone = match &self.cp.pod_locality {
            Some(l) => l.zone_of(&caller, &req.node).await.unwrap_or_default(),
            None => String::new(),
        };
        let local = pb::LocalCluster {
            name: self.cp.config.cluster.to_string(),
            trust_domain: self.cp.config.trust_domain.to_string(),
            region: self.cp.config.region.clone(),
            peers: vec![],
            zone,
        };
        let cluster = move |peers: &Arc<Vec<pb::Peer>>| pb::LocalCluster {
            peers: peers.as_ref().clone(),
            ..local.clone()
        };
        let (tx, rx) = mpsc::channel(16);
        let (epoch, mut state) = (self.epoch, self.state.clone());
        let shutdown = self.cp.shutdown.clone();
        tracing::info!(%caller, role = %req.role, node = %req.node, "data plane connected");
        // Demand reports count per stream: replicas of one workload share its identity.
        static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let stream_id = format!(
            "{caller}|{}|{}",
            req.node,
            STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let caller_ns = caller
            .namespace_and_service_account()
            .map(|(ns, _)| ns.to_string());
        let cp = self.cp.clone();
        tokio::spawn(async move {
            // Listed while the stream lasts (`fedmesh proxy-status`).
            let entry =
                cp.proxies
                    .connected(&caller.to_string(), &req.role, &req.node, svid_not_after);
            let current = state.borrow_and_update().clone();
            let now = scope.view(&current.services);
            let held = (req.resume_epoch == epoch)
                .then(|| current.at(req.resume_version))
                .flatten();
            let first = match held {
                Some(from) => {
                    let (mut services, removed_services) = diff(&scope.view(&from), &now);
                    // Subscriptions go whole: the proxy may have made one after the version it
                    // holds, and lost the answer with the connection.
                    for k in scope.subscribed() {
                        if let Some(s) = now.get(k)
                            && !services.iter().any(|x| &x.key == k)
                        {
                            services.push(s.clone());
                        }
                    }
                    pb::ConfigUpdate {
                        epoch,
                        version: current.version,
                        snapshot: false,
                        cluster: Some(cluster(&current.peers)),
                        services,
                        removed_services,
                        not_found: vec![],
                    }
                }
                None => pb::ConfigUpdate {
                    epoch,
                    version: current.version,
                    snapshot: true,
                    cluster: Some(cluster(&current.peers)),
                    services: now.values().cloned().collect(),
                    removed_services: vec![],
                    not_found: vec![],
                },
            };
            let first_version = first.version;
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            entry.sent(first_version);
            let mut sent = now;
            let mut sent_peers = current.peers.clone();
            loop {
                let mut not_found = Vec::new();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    msg = inbound.message() => match msg {
                        Ok(Some(pb::DataPlaneMessage { msg: Some(pb::data_plane_message::Msg::Ack(a)) })) => {
                            if a.nack {
                                tracing::warn!(%caller, version = a.version, error = %a.error, "data plane could not apply a config update");
                            }
                            entry.acked(a.version, a.nack.then_some(a.error.as_str()));
                            continue;
                        }
                        Ok(Some(pb::DataPlaneMessage { msg: Some(pb::data_plane_message::Msg::Demand(d)) })) => {
                            cp.rate_limits.record(&stream_id, caller_ns.as_deref(), &d);
                            cp.peer_traffic.record(&stream_id, caller_ns.as_deref(), &d.permissive);
                            if !d.signals.is_empty() {
                                // Only a proxy sent the rollout's service may report on it.
                                let cur = state.borrow().clone();
                                cp.rollouts.record(&d.signals, |svc| {
                                    cur.services.get(svc).is_some_and(|s| scope.sees(svc, s))
                                });
                            }
                            continue;
                        }
                        Ok(Some(pb::DataPlaneMessage { msg: Some(pb::data_plane_message::Msg::Health(h)) })) => {
                            entry.health(&h);
                            continue;
                        }
                        Ok(Some(pb::DataPlaneMessage { msg: Some(pb::data_plane_message::Msg::Subscribe(s)) })) => {
                            not_found = scope.subscribe(&s, &state.borrow().services);
                            tracing::debug!(%caller, services = ?s.services, addresses = ?s.addresses, ?not_found, "subscription");
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => return,
                    },
                    r = state.changed() => {
                        if r.is_err() {
                            return;
                        }
                    }
                }
                let cur = state.borrow_and_update().clone();
                let view = scope.view(&cur.services);
                let (services, removed_services) = diff(&sent, &view);
                sent = view;
                let peers_changed = sent_peers != cur.peers;
                sent_peers = cur.peers.clone();
                if services.is_empty()
                    && removed_services.is_empty()
                    && !peers_changed
                    && not_found.is_empty()
                {
                    continue;
                }
                let u = pb::ConfigUpdate {
                    epoch,
                    version: cur.version,
                    snapshot: false,
                    cluster: Some(cluster(&cur.peers)),
                    services,
                    removed_services,
                    not_found,
                };
                let version = u.version;
                if tx.send(Ok(u)).await.is_err() {
                    return;
                }
                entry.sent(version);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
