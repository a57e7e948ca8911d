//! The per-cluster control plane: reads the cluster's Services, EndpointSlices and ServiceExports
//! (Kubernetes or a directory), hosts the trust domain's CA, publishes exports, bundle and gateway
//! addresses to the hub, and turns the clusterset view it receives into ServiceImports, clusterset
//! DNS and the data-plane configuration. Everything it received is kept on disk: when the hub is
//! unreachable it keeps serving the last state.

pub mod admin;
pub mod agents;
pub mod attest;
pub mod authn;
pub mod authz;
pub mod config_stream;
pub mod dns;
pub mod federated;
pub mod gateway_probe;
pub mod hub_link;
pub mod identity;
pub mod jwks;
pub mod locality;
pub mod nodes;
pub mod peer_traffic;
pub mod policy;
pub mod proxies;
pub mod ratelimit;
pub mod rollouts;
pub mod routes;
pub mod scope;
pub mod source;
pub mod state;
pub mod status;
pub mod traces;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};
use fedmesh_trust::ca::{CaOptions, TrustDomainCa};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use self::hub_link::{Desired, HubCredentials, PublishStatus};
use self::source::{Invalid, LocalObjects};
use self::state::{ClusterSet, ClusterSetStore};
use self::status::{ConditionTracker, VipAllocator};
use crate::store::{KvStore, RedbStore, Txn};

/// Where the control plane reads its cluster from.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// A directory of Kubernetes YAML, re-read on change.
    Dir(PathBuf),
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kubernetes,
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("dir:") {
            if p.is_empty() {
                return Err("dir: needs a path (dir:/etc/fedmesh/objects)".into());
            }
            Ok(SourceSpec::Dir(PathBuf::from(p)))
        } else if s == "kubernetes" || s == "k8s" {
            Ok(SourceSpec::Kubernetes)
        } else {
            Err(format!("source {s:?}: use dir:PATH or kubernetes"))
        }
    }
}

#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    pub cluster: ClusterName,
    pub trust_domain: TrustDomain,
    pub region: String,
    pub data_dir: PathBuf,
    pub source: SourceSpec,
    /// The hub's federation address (host:port); None runs without federation.
    pub hub: Option<String>,
    /// A one-time join token, needed on first start only.
    pub join_token: Option<String>,
    /// This cluster's east-west gateway addresses (host:port), published to the hub.
    pub gateways: Vec<String>,
    /// gRPC listen address for agents (identity) and data-plane components.
    pub listen: Option<SocketAddr>,
    /// DNS listen address for `*.svc.clusterset.local`.
    pub dns_listen: Option<SocketAddr>,
    pub clusterset_cidr: String,
    /// How often the directory source reads its whole directory even without a change event
    /// (it is watched; this is the safety net for missed events).
    pub rescan_interval: Duration,
    /// Default SVID TTL when the CA is created.
    pub svid_ttl: Duration,
    /// Longest SVID TTL when the CA is created (`None`: the default TTL or 24 h, whichever is
    /// longer). A retired authority stays in the bundle this long after a rotation activates
    /// its successor.
    pub max_svid_ttl: Option<Duration>,
    /// The namespace of fedmesh's own components: only its identities may stream a gateway's
    /// configuration.
    pub system_namespace: String,
    /// The node agents' service account (in the system namespace): on Kubernetes, only its
    /// pods' projected tokens may join as agents.
    pub agent_service_account: String,
    /// How often the JWK Sets RequestAuthentications name by `jwksUri` are fetched again.
    pub jwks_refresh: Duration,
    /// Serve the trust domain's bundle at a SPIFFE bundle endpoint here, for trust domains
    /// outside the clusterset (e.g. a SPIRE server) to federate with.
    pub bundle_endpoint: Option<SocketAddr>,
    /// The endpoint's `https_web` certificate chain and key (PEM files); without them it is
    /// `https_spiffe`, authenticated by the control plane's SVID.
    pub bundle_endpoint_web: Option<(PathBuf, PathBuf)>,
    /// Serve `/metrics`, `/healthz` and `/readyz` over HTTP here (for Prometheus and probes).
    pub admin_listen: Option<SocketAddr>,
    /// Serve the sidecar injection webhook (HTTPS, a certificate of this cluster's CA).
    pub webhook: Option<crate::inject::webhook::WebhookConfig>,
    /// Probe other clusters' gateways (`fedmesh gateways`, `check`, `explain`); on by default.
    pub probe_gateways: bool,
}

impl ControlPlaneConfig {
    pub fn new(
        cluster: ClusterName,
        trust_domain: TrustDomain,
        data_dir: PathBuf,
        source: SourceSpec,
    ) -> Self {
        Self {
            cluster,
            trust_domain,
            region: String::new(),
            data_dir,
            source,
            hub: None,
            join_token: None,
            gateways: Vec::new(),
            listen: None,
            dns_listen: None,
            clusterset_cidr: "240.240.0.0/16".into(),
            rescan_interval: Duration::from_secs(10),
            svid_ttl: Duration::from_secs(3600),
            max_svid_ttl: None,
            system_namespace: "fedmesh-system".into(),
            agent_service_account: "fedmesh-agent".into(),
            jwks_refresh: Duration::from_secs(300),
            bundle_endpoint: None,
            bundle_endpoint_web: None,
            admin_listen: None,
            webhook: None,
            probe_gateways: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Ca(#[from] fedmesh_trust::ca::CaError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Link(#[from] hub_link::LinkError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the data plane and status writers read: local objects plus the clusterset.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub local: Arc<LocalObjects>,
    pub clusterset: Arc<ClusterSet>,
    pub vips: Arc<BTreeMap<ServiceKey, std::net::Ipv4Addr>>,
    pub validity: Arc<BTreeMap<ServiceKey, Result<(), Invalid>>>,
    /// The Gateway API routes, compiled against the local objects and the clusterset.
    pub routes: Arc<routes::CompiledRoutes>,
    /// The TrafficPolicies with the routes: the data plane's policy per service.
    pub policies: Arc<policy::CompiledPolicies>,
}

pub struct ControlPlane {
    pub config: ControlPlaneConfig,
    pub ca: Arc<TrustDomainCa>,
    db: Arc<RedbStore>,
    pub clusterset: Arc<ClusterSetStore>,
    local: watch::Receiver<Arc<LocalObjects>>,
    /// The directory source's files it could not read (their last good content stays in force).
    file_problems: Option<watch::Receiver<Arc<Vec<source::dir::FileProblem>>>>,
    desired: watch::Sender<Arc<Desired>>,
    publish: watch::Sender<PublishStatus>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    vips: Mutex<VipAllocator>,
    /// One snapshot is built at a time: two built at once could publish out of order (a
    /// rollout's rollback overtaken by a snapshot with the weights before it).
    publishing: Mutex<()>,
    /// Each TrafficPolicy's last valid version, in force while a newer one is invalid.
    policy_memory: Mutex<policy::Memory>,
    /// The JWK Sets RequestAuthentications fetch, and the uris the last snapshot used.
    jwks: jwks::Jwks,
    jwks_wanted: std::sync::Mutex<Vec<String>>,
    /// Trust domains outside the clusterset this cluster federates with (FederatedTrustDomain).
    pub federated: Arc<federated::Federated>,
    /// Clusterset-wide rate limits: declared here, demand of the sidecars, shares from the hub.
    pub rate_limits: Arc<ratelimit::ClustersetLimits>,
    /// Requests to PERMISSIVE services, mTLS or plain text, as the sidecars count them.
    pub peer_traffic: Arc<peer_traffic::PeerTraffic>,
    /// This cluster's Rollouts: where each stands, and the signals of its versions.
    pub rollouts: Arc<rollouts::Rollouts>,
    /// The sidecars and gateways with a configuration stream open now.
    pub proxies: Arc<proxies::Proxies>,
    /// The latest probe of every other cluster's gateways.
    pub gateway_probes: Arc<gateway_probe::GatewayProbes>,
    /// With the Kubernetes source: each proxy's zone, from its pod's node.
    pub pod_locality: Option<locality::PodLocality>,
    pub credentials: Option<Arc<HubCredentials>>,
    pub dns_addr: Option<SocketAddr>,
    pub listen_addr: Option<SocketAddr>,
    /// Where the SPIFFE bundle endpoint listens (`--bundle-endpoint`), once bound.
    pub bundle_endpoint_addr: Option<SocketAddr>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`--admin-listen`).
    pub admin_addr: Option<SocketAddr>,
    kube_writer: Option<Arc<source::kube::KubeWriter>>,
    /// With the Kubernetes source: the service accounts of the pods on each node, for
    /// node-bound issuance.
    node_pods: Option<nodes::NodePodsWatch>,
    /// With the Kubernetes source: checks agents' service-account tokens and nodes.
    k8s_attestor: Option<attest::K8sAttestor>,
    pub metrics: Arc<crate::metrics::ControlPlaneMetrics>,
    /// The data-plane configuration, versioned within `config_epoch`.
    dataplane: watch::Sender<Arc<config_stream::ConfigState>>,
    pub config_epoch: u64,
    shutdown: CancellationToken,
}

impl ControlPlane {
    pub async fn start(
        config: ControlPlaneConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        let client = match config.source {
            SourceSpec::Kubernetes => Some(::kube::Client::try_default().await.map_err(|e| {
                StartError::Config(format!(
                    "cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {e}"
                ))
            })?),
            SourceSpec::Dir(_) => None,
        };
        Self::start_inner(config, client, shutdown).await
    }

    /// Starts with the Kubernetes source on the given client (tests pass one that acts as the
    /// control plane's service account on a real API server).
    pub async fn start_with_kube_client(
        config: ControlPlaneConfig,
        client: ::kube::Client,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        Self::start_inner(config, Some(client), shutdown).await
    }

    async fn start_inner(
        config: ControlPlaneConfig,
        client: Option<::kube::Client>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        fedmesh_trust::files::create_private_dir(&config.data_dir)
            .map_err(|e| StartError::Config(e.to_string()))?;
        let ca_dir = config.data_dir.join("ca");
        let ca = if ca_dir.join(fedmesh_trust::ca::STATE_FILE).exists() {
            TrustDomainCa::open(&ca_dir)?
        } else {
            let mut opts = CaOptions::new(config.trust_domain.clone());
            opts.default_svid_ttl = config.svid_ttl;
            opts.max_svid_ttl = match config.max_svid_ttl {
                Some(max) if max < config.svid_ttl => {
                    return Err(StartError::Config(format!(
                        "--max-svid-ttl {}s is shorter than --svid-ttl {}s: raise it, or lower --svid-ttl",
                        max.as_secs(),
                        config.svid_ttl.as_secs()
                    )));
                }
                Some(max) => max,
                None => config.svid_ttl.max(Duration::from_secs(24 * 3600)),
            };
            TrustDomainCa::init(&ca_dir, opts)?
        };
        if ca.trust_domain() != config.trust_domain {
            return Err(StartError::Config(format!(
                "{} holds the CA of trust domain {}, not {}; use another --data-dir",
                ca_dir.display(),
                ca.trust_domain(),
                config.trust_domain
            )));
        }
        let ca = Arc::new(ca);
        tokio::spawn(
            ca.clone()
                .run_rotation(Duration::from_secs(60), shutdown.clone().cancelled_owned()),
        );

        let db = Arc::new(RedbStore::open(&config.data_dir.join("state.redb"))?);
        let clusterset = Arc::new(ClusterSetStore::load(db.clone()).await?);
        let vips = VipAllocator::load(db.clone(), &config.clusterset_cidr)
            .await
            .map_err(StartError::Config)?;

        let (local, file_problems) = match &config.source {
            SourceSpec::Dir(path) => {
                if !path.is_dir() {
                    return Err(StartError::Config(format!(
                        "source directory {} does not exist",
                        path.display()
                    )));
                }
                let dir =
                    source::dir::DirSource::start(path, config.rescan_interval, shutdown.clone());
                (dir.subscribe(), Some(dir.problems()))
            }
            SourceSpec::Kubernetes => {
                let client = client
                    .clone()
                    .ok_or_else(|| StartError::Config("no Kubernetes client".into()))?;
                let source = source::kube::KubeSource::start(client, shutdown.clone());
                (source.subscribe(), None)
            }
        };
        let webhook_client = config.webhook.as_ref().and(client.clone());
        let pod_locality = client.clone().map(locality::PodLocality::new);
        // The webhook injects native sidecars where the API server runs them.
        let native_sidecars = match (&config.webhook, &client) {
            (Some(_), Some(c)) => c.apiserver_version().await.is_ok_and(|v| {
                crate::inject::webhook::supports_native_sidecars(&v.major, &v.minor)
            }),
            _ => false,
        };
        let node_pods = client
            .clone()
            .map(|c| source::pods::start(c, shutdown.clone()));
        let k8s_attestor = client.clone().map(|c| {
            attest::publish_bundle(
                c.clone(),
                config.system_namespace.clone(),
                ca.clone(),
                shutdown.clone(),
            );
            attest::K8sAttestor::new(c, &config.system_namespace, &config.agent_service_account)
        });
        let kube_writer =
            client.map(|c| Arc::new(source::kube::KubeWriter::new(c, config.cluster.clone())));

        let credentials = match (
            &config.hub,
            HubCredentials::load(&config.data_dir.join("hub"))?,
        ) {
            (None, _) => None,
            (Some(_), Some(c)) => Some(Arc::new(c)),
            (Some(addr), None) => {
                let token = config
                    .join_token
                    .as_deref()
                    .ok_or(hub_link::LinkError::NotJoined)?;
                Some(Arc::new(
                    HubCredentials::join(
                        &config.data_dir.join("hub"),
                        addr,
                        token,
                        &config.cluster,
                        &config.trust_domain,
                    )
                    .await?,
                ))
            }
        };

        let bundle_web = match &config.bundle_endpoint_web {
            Some((chain, key)) => Some(
                fedmesh_trust::files::read_chain_and_key(chain, key).map_err(|e| {
                    StartError::Config(format!("--bundle-endpoint-cert/--bundle-endpoint-key: {e}"))
                })?,
            ),
            None => None,
        };
        let mut bundle_endpoint_addr = None;
        let bundle_listener = match config.bundle_endpoint {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?;
                bundle_endpoint_addr = l.local_addr().ok();
                Some(l)
            }
            None => None,
        };
        let admin_listener = match config.admin_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?,
            ),
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let mut listen_addr = None;
        let listener = match config.listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?;
                listen_addr = l.local_addr().ok();
                Some(l)
            }
            None => None,
        };
        let mut dns_addr = None;
        let dns_sockets = match config.dns_listen {
            Some(addr) => {
                let (udp, tcp) = bind_dns(addr).await?;
                dns_addr = udp.local_addr().ok();
                Some((udp, tcp))
            }
            None => None,
        };

        let cp = Arc::new(Self {
            ca,
            db,
            clusterset,
            local,
            file_problems,
            desired: watch::Sender::new(Arc::new(Desired::default())),
            publish: watch::Sender::new(PublishStatus::default()),
            snapshot: watch::Sender::new(Arc::new(Snapshot::default())),
            vips: Mutex::new(vips),
            policy_memory: Mutex::new(policy::Memory::new()),
            jwks: jwks::Jwks::new(config.jwks_refresh),
            jwks_wanted: std::sync::Mutex::default(),
            federated: federated::Federated::new(&config.data_dir),
            rate_limits: Arc::default(),
            peer_traffic: Arc::default(),
            rollouts: Arc::default(),
            publishing: Mutex::new(()),
            proxies: Arc::default(),
            gateway_probes: Arc::default(),
            pod_locality,
            credentials,
            dns_addr,
            listen_addr,
            bundle_endpoint_addr,
            admin_addr,
            kube_writer,
            node_pods,
            k8s_attestor,
            metrics: Arc::default(),
            dataplane: watch::Sender::new(Arc::new(config_stream::ConfigState::default())),
            config_epoch: {
                use ring::rand::SecureRandom;
                let mut b = [0u8; 8];
                let _ = ring::rand::SystemRandom::new().fill(&mut b);
                u64::from_be_bytes(b).max(1)
            },
            shutdown: shutdown.clone(),
            config,
        });

        match cp.db.list(rollouts::SAVED_PREFIX).await {
            Ok((kvs, _)) => cp.rollouts.restore(
                kvs.iter()
                    .filter_map(|kv| {
                        let key = kv.key.strip_prefix(rollouts::SAVED_PREFIX)?.parse().ok()?;
                        Some((key, serde_json::from_slice(&kv.value).ok()?))
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the saved rollouts: they start again")
            }
        }
        admin::serve(cp.clone(), shutdown.clone()).map_err(|e| {
            StartError::Config(format!(
                "cannot serve the admin socket in {}: {e}",
                cp.config.data_dir.display()
            ))
        })?;
        cp.clone().derive_desired().await;
        tokio::spawn(cp.clone().derive_loop());
        tokio::spawn(cp.clone().jwks_loop());
        tokio::spawn(cp.clone().snapshot_loop());
        tokio::spawn(cp.clone().rollout_loop());
        tokio::spawn(config_stream::run(
            cp.clone(),
            cp.dataplane.clone(),
            shutdown.clone(),
        ));
        if let Some(creds) = &cp.credentials {
            tokio::spawn(hub_link::run(
                creds.clone(),
                cp.config.cluster.clone(),
                cp.config.region.clone(),
                cp.clusterset.clone(),
                cp.desired.subscribe(),
                cp.publish.clone(),
                hub_link::Reports {
                    limits: cp.rate_limits.clone(),
                    traffic: cp.peer_traffic.clone(),
                    proxies: cp.proxies.clone(),
                    probes: cp.gateway_probes.clone(),
                    rollouts: cp.rollouts.clone(),
                    config: cp.dataplane_config(),
                },
                shutdown.clone(),
            ));
            tokio::spawn(renew_loop(creds.clone(), shutdown.clone()));
            match identity::own_identity(&cp, &shutdown) {
                Ok(_) if !cp.config.probe_gateways => {}
                Ok(own) => {
                    tokio::spawn(gateway_probe::run(
                        cp.config.cluster.clone(),
                        own,
                        cp.clusterset.clone(),
                        cp.gateway_probes.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot issue the identity gateway probes use; other clusters' gateways go unprobed")
                }
            }
        }
        if let Some((udp, tcp)) = dns_sockets {
            dns::serve(cp.snapshot.subscribe(), udp, tcp, shutdown.clone());
        }
        if let Some(l) = listener {
            identity::serve(cp.clone(), l, shutdown.clone());
        }
        if let Some(mut w) = cp.config.webhook.clone() {
            w.inject.native_sidecar = native_sidecars;
            crate::inject::webhook::serve(
                w.clone(),
                cp.ca.clone(),
                identity::control_plane_id(&cp),
                shutdown.clone(),
            )
            .await
            .map_err(StartError::Config)?;
            if let Some(client) = webhook_client {
                tokio::spawn(crate::inject::webhook::keep_ca_bundle(
                    client,
                    w.configuration.clone(),
                    cp.ca.clone(),
                    shutdown.clone(),
                ));
            }
        }
        if let Some(l) = admin_listener {
            admin::serve_http(cp.clone(), l, shutdown.clone());
        }
        if let Some(l) = bundle_listener {
            identity::serve_bundle_endpoint(cp.clone(), l, bundle_web, shutdown.clone())
                .map_err(|e| StartError::Config(format!("the bundle endpoint: {e}")))?;
        }
        tracing::info!(cluster = %cp.config.cluster, trust_domain = %cp.config.trust_domain, hub = ?cp.config.hub, dns = ?cp.dns_addr, listen = ?cp.listen_addr, "control plane started");
        Ok(cp)
    }

    pub fn snapshot(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn publish_status(&self) -> watch::Receiver<PublishStatus> {
        self.publish.subscribe()
    }

    pub fn desired(&self) -> watch::Receiver<Arc<Desired>> {
        self.desired.subscribe()
    }

    /// The data-plane configuration as sidecars and gateways receive it.
    pub fn dataplane_config(&self) -> watch::Receiver<Arc<config_stream::ConfigState>> {
        self.dataplane.subscribe()
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// `<data-dir>/admin.sock`: node tokens, entries, nodes, metrics.
    pub fn admin_socket(&self) -> PathBuf {
        admin::socket_path(&self.config.data_dir)
    }

    pub fn status_dir(&self) -> PathBuf {
        self.config.data_dir.join("status")
    }

    /// When an export was first seen here (its age decides conflicts), persisted.
    async fn created_unix(&self, key: &ServiceKey, from_k8s: Option<i64>) -> i64 {
        if let Some(t) = from_k8s {
            return t;
        }
        let k = format!("export-created/{key}");
        if let Ok(Some(kv)) = self.db.get(&k).await {
            return i64::from_be_bytes(kv.value.as_slice().try_into().unwrap_or([0; 8]));
        }
        let now = crate::hub::records::now_unix();
        let _ = self
            .db
            .commit(Txn::new().put(k, now.to_be_bytes().to_vec()))
            .await;
        now
    }

    /// Recomputes what we publish from the source and the CA's bundle.
    async fn derive_desired(self: Arc<Self>) -> BTreeMap<ServiceKey, Result<(), Invalid>> {
        let local = self.local.borrow().clone();
        let mut exports = BTreeMap::new();
        let mut validity = BTreeMap::new();
        for (k, e) in &local.exports {
            let created = e
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second());
            let created = self.created_unix(k, created).await;
            let checked = local.export(k, &self.config.region, created).and_then(|x| {
                // The hub's own validation: an export it would refuse would take the whole
                // publish down with it, so it is left out here and its status says why.
                crate::hub::records::export_from_pb(&x)
                    .map(|_| x)
                    .map_err(|message| Invalid {
                        reason: source::INVALID_EXPORT,
                        message,
                    })
            });
            match checked {
                Ok(x) => {
                    exports.insert(k.clone(), x);
                    validity.insert(k.clone(), Ok(()));
                }
                Err(i) => {
                    if i.reason == source::INVALID_EXPORT {
                        tracing::warn!(service = %k, error = %i.message, "not exporting: the hub would refuse it");
                    }
                    validity.insert(k.clone(), Err(i));
                }
            }
        }
        let bundle = self.ca.bundle();
        let desired = Desired {
            exports,
            bundle: Some(pb::Bundle {
                trust_domain: bundle.trust_domain().to_string(),
                jwks: bundle.to_json().into_bytes(),
                sequence: bundle.sequence(),
            }),
            gateways: self.config.gateways.clone(),
            problems: self.desired.borrow().problems.clone(),
            routes: self.desired.borrow().routes.clone(),
        };
        self.desired.send_if_modified(|cur| {
            if **cur == desired {
                false
            } else {
                *cur = Arc::new(desired);
                true
            }
        });
        validity
    }

    async fn derive_loop(self: Arc<Self>) {
        let mut local = self.local.clone();
        let mut bundle = self.ca.subscribe_bundle();
        let mut files = self.file_problems.clone();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = local.changed() => if r.is_err() { return },
                r = bundle.changed() => if r.is_err() { return },
                // A file that fails to parse changes no object (its last good content stays),
                // only what the cluster reports.
                r = async { files.as_mut().unwrap().changed().await }, if files.is_some() => {
                    if r.is_err() { return }
                    self.publish_snapshot(None).await;
                    continue;
                }
            }
            let validity = self.clone().derive_desired().await;
            self.publish_snapshot(Some(validity)).await;
        }
    }

    /// Fetches the JWK Sets in use when they are new or due, and republishes when one changed.
    async fn jwks_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let wanted = self
                .jwks_wanted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if self.jwks.refresh_due(&wanted).await {
                self.publish_snapshot(None).await;
            }
        }
    }

    /// Rebuilds the snapshot for consumers, allocating clusterset IPs for new imports.
    async fn publish_snapshot(&self, validity: Option<BTreeMap<ServiceKey, Result<(), Invalid>>>) {
        let _one_at_a_time = self.publishing.lock().await;
        let cs = self.clusterset.current();
        let vips = {
            let mut v = self.vips.lock().await;
            if let Err(e) = v.sync(cs.imports.keys()).await {
                tracing::error!(error = %e, "cannot allocate clusterset IPs");
            }
            Arc::new(v.all().clone())
        };
        let local = self.local.borrow().clone();
        let validity = match validity {
            Some(v) => Arc::new(v),
            None => self.snapshot.borrow().validity.clone(),
        };
        self.rollouts.sync(&local.rollouts, &self.config.cluster);
        let mut routes = routes::compile(&local, &cs, &self.config.cluster);
        let world = routes::World {
            local: &local,
            cs: &cs,
            own: &self.config.cluster,
        };
        self.rollouts.set_conflicts(rollouts::apply(
            &mut routes,
            &self.rollouts.wanted(),
            &world,
        ));
        let routes = Arc::new(routes);
        let mut policies = policy::compile(
            &local,
            &routes,
            &cs,
            &self.config.cluster,
            &mut *self.policy_memory.lock().await,
        );
        let authz = authz::compile(&local, &cs, &self.config.cluster, &self.config.trust_domain);
        for (service, list) in authz.by_service {
            policies
                .by_service
                .entry(service)
                .or_default()
                .authorization = list;
        }
        policies.reports.extend(authz.reports);
        let authn = authn::compile(&local, &self.jwks);
        for (service, mode) in authn.mtls {
            policies.by_service.entry(service).or_default().mtls_mode = mode as i32;
        }
        for (service, list) in authn.request {
            policies
                .by_service
                .entry(service)
                .or_default()
                .request_authn = list;
        }
        policies.reports.extend(authn.reports);
        *self.jwks_wanted.lock().unwrap_or_else(|p| p.into_inner()) = authn.jwks_uris;
        let mut reserved: std::collections::BTreeSet<TrustDomain> =
            cs.bundles.keys().cloned().collect();
        reserved.insert(self.config.trust_domain.clone());
        self.federated.sync(&local, &reserved, &self.shutdown);
        let policies = Arc::new(policies);
        self.rate_limits
            .set_declared(policies.clusterset_limits.clone());
        let mut problems = problems_of(&routes, &policies);
        problems.extend(export_problems(&validity));
        if let (Some(files), SourceSpec::Dir(root)) = (&self.file_problems, &self.config.source) {
            problems.extend(file_problems(root, &files.borrow()));
        }
        let summaries = routes::summaries(&routes);
        self.desired.send_if_modified(|cur| {
            if cur.problems == problems && cur.routes == summaries {
                false
            } else {
                let mut d = (**cur).clone();
                d.problems = problems;
                d.routes = summaries;
                *cur = Arc::new(d);
                true
            }
        });
        self.snapshot.send_replace(Arc::new(Snapshot {
            local,
            clusterset: cs,
            vips,
            validity,
            routes,
            policies,
        }));
    }

    /// Judges the rollouts every [`rollouts::TICK`]; a share that moves is compiled into the
    /// routes and streamed to the sidecars at once.
    /// Where each rollout stands is saved whenever it changes.
    async fn rollout_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(rollouts::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut written: BTreeMap<ServiceKey, rollouts::machine::Saved> = self.rollouts.to_save();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let moved = self.rollouts.tick();
            // Saved before it is published: a restart never finds an older step than the
            // sidecars were sent.
            let now = self.rollouts.to_save();
            if now == written {
                if moved {
                    self.publish_snapshot(None).await;
                }
                continue;
            }
            let mut txn = Txn::new();
            for (k, s) in &now {
                if written.get(k) != Some(s) {
                    txn = txn.put(
                        format!("{}{k}", rollouts::SAVED_PREFIX),
                        serde_json::to_vec(s).unwrap_or_default(),
                    );
                }
            }
            for k in written.keys().filter(|k| !now.contains_key(*k)) {
                txn = txn.delete(format!("{}{k}", rollouts::SAVED_PREFIX));
            }
            match self.db.commit(txn).await {
                Ok(_) => written = now,
                Err(e) => tracing::error!(error = %e, "cannot save where the rollouts stand"),
            }
            if moved {
                self.publish_snapshot(None).await;
            }
        }
    }

    /// A user's command on a rollout (the admin socket): applied to the routes at once.
    pub async fn rollout_command(
        &self,
        key: &ServiceKey,
        command: rollouts::machine::Command,
        by: &str,
    ) -> Result<rollouts::RolloutView, rollouts::CommandError> {
        let (view, moved) = self.rollouts.command(key, command, by)?;
        if moved {
            self.publish_snapshot(None).await;
        }
        Ok(view)
    }

    /// Keeps the snapshot and the status files current.
    async fn snapshot_loop(self: Arc<Self>) {
        let mut cs = self.clusterset.subscribe();
        let mut publish = self.publish.subscribe();
        let mut tracker = ConditionTracker::new();
        let validity = self.clone().derive_desired().await;
        self.publish_snapshot(Some(validity)).await;
        let mut snap = self.snapshot.subscribe();
        let mut federated = self.federated.subscribe();
        let mut rollouts = self.rollouts.subscribe();
        loop {
            // A failed write to the API server is tried again even if nothing changes.
            let retry = self.write_status(&mut tracker).await;
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry.unwrap_or(Duration::from_secs(3600))), if retry.is_some() => {}
                r = cs.changed() => {
                    if r.is_err() { return }
                    self.publish_snapshot(None).await;
                }
                r = publish.changed() => if r.is_err() { return },
                r = snap.changed() => if r.is_err() { return },
                r = federated.changed() => if r.is_err() { return },
                r = rollouts.changed() => if r.is_err() { return },
            }
        }
    }

    /// Writes the status of what the cluster holds (and, on Kubernetes, its ServiceImports);
    /// returns when to write again if a write failed.
    async fn write_status(&self, tracker: &mut ConditionTracker) -> Option<Duration> {
        let snap = self.snapshot.borrow().clone();
        let publish = self.publish.borrow().clone();
        let vips = self.vips.lock().await;
        let imports = status::service_imports(&snap.clusterset, &vips);
        drop(vips);
        let exports = tracker.export_statuses(
            &snap.local,
            &snap.validity,
            &publish,
            &snap.clusterset,
            &self.config.cluster,
        );
        let routes = tracker.route_statuses(&snap.routes);
        let policies = tracker.policy_statuses(&snap.policies);
        let federated = tracker.federated_statuses(&self.federated.reports(&snap.local));
        let rollouts = self.rollouts.views();
        if let Some(w) = &self.kube_writer {
            w.sync_rollout_status(&rollouts).await;
            w.sync_federated_status(&federated).await;
            w.sync_imports(&imports, &snap.clusterset).await;
            w.sync_export_status(&exports).await;
            w.sync_route_status(&routes).await;
            w.sync_policy_status(&policies).await;
            return w.retry_after();
        }
        if matches!(self.config.source, SourceSpec::Dir(_)) {
            let dir = self.status_dir();
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::error!(dir = %dir.display(), error = %e, "cannot write status");
                return None;
            }
            let to_values = |v: Vec<serde_json::Value>| v;
            let imports: Vec<serde_json::Value> = imports
                .iter()
                .filter_map(|i| serde_json::to_value(i).ok())
                .collect();
            let exports: Vec<serde_json::Value> = exports
                .iter()
                .filter_map(|e| serde_json::to_value(e).ok())
                .collect();
            let route_docs = |kind: &str| -> Vec<serde_json::Value> {
                routes
                    .iter()
                    .filter(|(k, _, _)| *k == kind)
                    .map(|(kind, key, status)| {
                        serde_json::json!({
                            "apiVersion": "gateway.networking.k8s.io/v1",
                            "kind": kind,
                            "metadata": {"name": key.name.to_string(), "namespace": key.namespace.to_string()},
                            "status": status,
                        })
                    })
                    .collect()
            };
            let policy_docs = |kind: &str| -> Vec<serde_json::Value> {
                policies
                    .iter()
                    .filter(|(k, _, _)| *k == kind)
                    .map(|(kind, key, status)| {
                        serde_json::json!({
                            "apiVersion": "fedmesh.io/v1alpha1",
                            "kind": kind,
                            "metadata": {"name": key.name.to_string(), "namespace": key.namespace.to_string()},
                            "status": status,
                        })
                    })
                    .collect()
            };
            let rollout_docs: Vec<serde_json::Value> = rollouts
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "apiVersion": "fedmesh.io/v1alpha1",
                        "kind": "Rollout",
                        "metadata": {"name": r.name, "namespace": r.namespace},
                        "status": r.status,
                    })
                })
                .collect();
            for (name, docs) in [
                ("serviceimports.yaml", to_values(imports)),
                ("rollouts.yaml", rollout_docs),
                ("serviceexports.yaml", exports),
                ("httproutes.yaml", route_docs("HTTPRoute")),
                ("grpcroutes.yaml", route_docs("GRPCRoute")),
                ("trafficpolicies.yaml", policy_docs("TrafficPolicy")),
                (
                    "authorizationpolicies.yaml",
                    policy_docs("AuthorizationPolicy"),
                ),
                (
                    "peerauthentications.yaml",
                    policy_docs("PeerAuthentication"),
                ),
                (
                    "requestauthentications.yaml",
                    policy_docs("RequestAuthentication"),
                ),
                (
                    "federatedtrustdomains.yaml",
                    federated
                        .iter()
                        .map(|(name, status)| {
                            serde_json::json!({
                                "apiVersion": "fedmesh.io/v1alpha1",
                                "kind": "FederatedTrustDomain",
                                "metadata": {"name": name},
                                "status": status,
                            })
                        })
                        .collect(),
                ),
            ] {
                if let Err(e) = status::write_yaml_if_changed(&dir.join(name), &docs) {
                    tracing::error!(file = name, error = %e, "cannot write status");
                }
            }
        }
        None
    }
}

/// The routes and policies this cluster could not fully accept, as the hub shows them: each
/// condition that says so (`Accepted` or `ResolvedRefs` False, `PartiallyInvalid` True).
fn problems_of(
    routes: &routes::CompiledRoutes,
    policies: &policy::CompiledPolicies,
) -> Vec<pb::ObjectProblem> {
    let mut out = Vec::new();
    for r in &routes.reports {
        for p in &r.parents {
            let service = format!(
                "{}/{}",
                p.parent_ref
                    .namespace
                    .as_deref()
                    .unwrap_or(r.route.namespace.as_str()),
                p.parent_ref.name
            );
            let conds = [
                ("Accepted", Some(&p.accepted), false),
                ("ResolvedRefs", Some(&p.resolved_refs), false),
                ("PartiallyInvalid", p.partially_invalid.as_ref(), true),
            ];
            for (condition, c, bad_when) in conds {
                if let Some(c) = c.filter(|c| c.status == bad_when) {
                    out.push(pb::ObjectProblem {
                        kind: r.kind.to_string(),
                        name: r.route.to_string(),
                        condition: condition.into(),
                        reason: c.reason.to_string(),
                        message: c.message.clone(),
                        services: vec![service.clone()],
                    });
                }
            }
        }
    }
    for r in &policies.reports {
        for (condition, c) in [
            ("Accepted", &r.accepted),
            ("ResolvedRefs", &r.resolved_refs),
        ] {
            if !c.status {
                out.push(pb::ObjectProblem {
                    kind: r.kind.into(),
                    name: r.policy.to_string(),
                    condition: condition.into(),
                    reason: c.reason.to_string(),
                    message: c.message.clone(),
                    services: r.target.iter().cloned().collect(),
                });
            }
        }
    }
    out
}

/// The ServiceExports that cannot be exported (no Service, an ExternalName, ...), as problems the
/// hub shows: `fedmesh explain` says why a service no cluster exports is not exported.
fn export_problems(validity: &BTreeMap<ServiceKey, Result<(), Invalid>>) -> Vec<pb::ObjectProblem> {
    validity
        .iter()
        .filter_map(|(k, v)| v.as_ref().err().map(|i| (k, i)))
        .map(|(k, i)| pb::ObjectProblem {
            kind: "ServiceExport".into(),
            name: k.to_string(),
            condition: fedmesh_api::mcs::condition::VALID.into(),
            reason: i.reason.to_string(),
            message: i.message.clone(),
            services: vec![k.to_string()],
        })
        .collect()
}

/// The directory source's unreadable files as problems the hub shows (`fedmesh status`): kind
/// `File`, named by their path under the source directory.
fn file_problems(root: &Path, files: &[source::dir::FileProblem]) -> Vec<pb::ObjectProblem> {
    files
        .iter()
        .map(|f| pb::ObjectProblem {
            kind: "File".into(),
            name: f
                .file
                .strip_prefix(root)
                .unwrap_or(&f.file)
                .display()
                .to_string(),
            condition: "Valid".into(),
            reason: "Invalid".into(),
            // The first line: a YAML error goes on with a drawing of the spot, which the log
            // keeps and a table cannot show.
            message: format!(
                "{} (its last good content stays in force)",
                f.message.lines().next().unwrap_or_default()
            ),
            services: Vec::new(),
        })
        .collect()
}

async fn renew_loop(creds: Arc<HubCredentials>, shutdown: CancellationToken) {
    loop {
        let wait = match creds.renew_if_due().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the hub identity yet; retrying");
                Duration::from_secs(10)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
        }
    }
}

/// Binds DNS on UDP and TCP at the same address. With port 0 the kernel picks a free UDP port,
/// which may already be taken on TCP (by a listener or a connection's local end); then another
/// port is tried, a bounded number of times, instead of failing the start.
async fn bind_dns(
    addr: SocketAddr,
) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener), StartError> {
    const ATTEMPTS: usize = 32;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let bound = udp
            .local_addr()
            .map_err(|source| StartError::Listen { addr, source })?;
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < ATTEMPTS =>
            {
                continue;
            }
            Err(source) => {
                return Err(StartError::Listen {
                    addr: bound,
                    source,
                });
            }
        }
    }
}
