//! A whole clusterset in one process, on loopback: a federation hub, and per cluster a control
//! plane (directory source), an east-west gateway, and workloads — each with its own Workload API
//! agent (so its own SPIFFE ID), its sidecar and an app.
//!
//! Everything is the real thing — the hub's store, the CAs, the mTLS, the gateways' SNI routing,
//! the sidecars' balancing — only sharing a process. `fedmesh demo`, `fedmesh bench dataplane` and
//! the data-plane tests stand on it.

pub mod apps;
pub mod client;
pub mod yaml;

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("fedmesh.testbed.v1");
}

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fedmesh_api::{ClusterName, SpiffeId, TrustDomain};
use fedmesh_dataplane::admin::{self, AdminState};
use fedmesh_dataplane::config::{self as dpconfig, ConfigHandle};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::telemetry::{self, ExportConfig, SamplerArg, Spans};
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, SourceSpec};
use fedmesh_federation::hub::{self, Hub, HubConfig};
use fedmesh_federation::store::{KvStore, RedbStore};
use fedmesh_gateway::{Gateway, GatewayOptions};
use fedmesh_sidecar::{Sidecar, SidecarOptions};
use fedmesh_trust::ca::{CaOptions, TrustDomainCa};
use fedmesh_trust::source::WorkloadApiFollower;
use fedmesh_trust::tls::MeshIdentity;
use fedmesh_trust::workload::{
    self, ControlPlaneSigner, JoinCredential, RegistrationEntry, Selector, SvidCache,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use yaml::EndpointSpec;

/// A cluster to create.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub name: String,
    pub region: String,
    /// Publish this gateway address instead of the in-process gateway's (for a gateway run as
    /// its own process, e.g. by the benchmark).
    pub publish_gateway: Option<SocketAddr>,
    /// Proxies send spans to the hub through the control plane, keeping this share of new
    /// traces (and every failed or slow request); `None`: no spans.
    pub traces: Option<f64>,
    /// How often the control plane fetches JWK Sets again (`None`: its default).
    pub jwks_refresh: Option<Duration>,
    /// The cluster's CA is an intermediate under this authority (e.g. a root SPIRE also signs
    /// under), instead of a self-signed root.
    pub upstream: Option<fedmesh_trust::ca::UpstreamAuthority>,
    /// The `spiffe_refresh_hint` of the cluster's bundle (`None`: the CA's default).
    pub bundle_refresh_hint: Option<Duration>,
    /// The control plane serves its SPIFFE bundle endpoint (`https_spiffe`) on a loopback port.
    pub bundle_endpoint: bool,
    /// The lifetime of the SVIDs the cluster's CA issues (`None`: the control plane's default);
    /// they are renewed at half of it.
    pub svid_ttl: Option<Duration>,
    /// The control plane probes other clusters' gateways (its default); a benchmark that
    /// measures a gateway's cost per request turns this periodic cost off.
    pub probe_gateways: bool,
}

impl ClusterSpec {
    pub fn new(name: &str, region: &str) -> Self {
        Self {
            name: name.into(),
            region: region.into(),
            publish_gateway: None,
            traces: None,
            jwks_refresh: None,
            upstream: None,
            bundle_refresh_hint: None,
            bundle_endpoint: false,
            svid_ttl: None,
            probe_gateways: true,
        }
    }
}

/// Spans of an in-process proxy, sent to its control plane (which relays them to the hub);
/// off when `ratio` is `None`. The export task stops with `shutdown`.
fn proxy_spans(
    ratio: Option<f64>,
    cp_addr: SocketAddr,
    identity: &MeshIdentity,
    (role, node): (&str, &str),
    metrics: &Arc<ProxyMetrics>,
    config: &ConfigHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<Spans> {
    let Some(ratio) = ratio else {
        return Ok(Spans::off());
    };
    let id = identity
        .spiffe_id()
        .ok_or_else(|| anyhow::anyhow!("the {role} on {node} has no SVID yet"))?;
    let export = ExportConfig {
        sampling: SamplerArg(ratio),
        control_plane: Some(
            dpconfig::control_plane_channel(&cp_addr.to_string(), identity)
                .map_err(anyhow::Error::msg)?,
        ),
        ..ExportConfig::default()
    }
    .for_proxy(role, &id, node);
    let (spans, exporting) = telemetry::start(
        &export,
        metrics.clone(),
        config.clone(),
        Duration::from_secs(2),
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(e) = exporting {
        tokio::spawn(async move {
            shutdown.cancelled().await;
            e.finish().await;
        });
    }
    Ok(spans)
}

pub struct Testbed {
    pub dir: PathBuf,
    pub hub: Arc<Hub>,
    pub hub_addr: SocketAddr,
    /// The hub's admin API (plain HTTP on loopback) and its bearer token.
    pub hub_admin: SocketAddr,
    pub hub_admin_token: String,
    pub clusters: Vec<Cluster>,
    shutdown: CancellationToken,
}

async fn bind_local(port: u16) -> anyhow::Result<TcpListener> {
    // A port just released may linger briefly: retry for a moment.
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("bind failed")))
    .with_context(|| format!("binding 127.0.0.1:{port}"))
}

impl Testbed {
    /// Starts the hub and the clusters, and waits until every cluster has joined.
    pub async fn start(dir: &Path, specs: &[ClusterSpec]) -> anyhow::Result<Self> {
        Self::start_with_hub(dir, specs, |_| {}).await
    }

    /// [`Testbed::start`] with the hub's configuration adjusted by `adjust` first.
    pub async fn start_with_hub(
        dir: &Path,
        specs: &[ClusterSpec],
        adjust: impl FnOnce(&mut HubConfig),
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let shutdown = CancellationToken::new();
        let store: Arc<dyn KvStore> = Arc::new(RedbStore::open(&dir.join("hub.redb"))?);
        let ca_dir = dir.join("hub-ca");
        let ca = Arc::new(if ca_dir.join("ca.json").exists() {
            TrustDomainCa::open(&ca_dir)?
        } else {
            TrustDomainCa::init(&ca_dir, CaOptions::new(TrustDomain::new("hub.fedmesh")?))?
        });
        let mut config = HubConfig {
            stale_after: Duration::from_secs(5),
            ..HubConfig::default()
        };
        adjust(&mut config);
        let hub = Hub::start(config, store, ca, shutdown.clone()).await?;
        let listener = bind_local(0).await?;
        let hub_addr = listener.local_addr()?;
        tokio::spawn(hub::serve_grpc(hub.clone(), listener, shutdown.clone()));
        let admin_listener = bind_local(0).await?;
        let hub_admin = admin_listener.local_addr()?;
        let hub_admin_token = hex::encode(rand_bytes());
        tokio::spawn(hub::serve_admin(
            hub::admin::AdminState {
                hub: hub.clone(),
                token: Arc::new(hub_admin_token.clone()),
                admin_ids: Arc::new(BTreeSet::new()),
            },
            admin_listener,
            None,
            shutdown.clone(),
        ));
        let mut clusters = Vec::new();
        for s in specs {
            clusters.push(Cluster::start(dir, s, &hub, hub_addr, &shutdown).await?);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            hub,
            hub_addr,
            hub_admin,
            hub_admin_token,
            clusters,
            shutdown,
        })
    }

    pub fn cluster(&self, name: &str) -> &Cluster {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no cluster {name} in the testbed"))
    }

    /// Stops everything.
    pub async fn shutdown(self) {
        for c in &self.clusters {
            c.gateway_shutdown.cancel();
            c.stop_control_plane().await;
        }
        self.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b
}

/// A Workload API agent serving one identity on its own socket.
pub struct Agent {
    pub endpoint: String,
    shutdown: CancellationToken,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What an operator does for a new node, through the control plane's admin socket: registers
/// `id` for `node` and makes the node's one-time join token. `None` (with the reason logged)
/// when the control plane is not running; an agent that joined before needs no token.
async fn enroll(cp_data: &Path, node: &str, id: &SpiffeId) -> Option<String> {
    let admin = fedmesh_federation::control_plane::admin::AdminSocketClient::new(cp_data);
    let enrolled = async {
        admin.add_entry(node, &id.to_string()).await?;
        admin.create_token(node, Duration::from_secs(600)).await
    }
    .await;
    match enrolled {
        Ok(t) => Some(t.token),
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot enroll the node");
            None
        }
    }
}

impl Agent {
    async fn start(
        cp_addr: SocketAddr,
        dir: &Path,
        cp_data: &Path,
        node: &str,
        id: SpiffeId,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        std::fs::create_dir_all(dir)?;
        let token = enroll(cp_data, node, &id).await;
        let signer = ControlPlaneSigner::start(
            &cp_addr.to_string(),
            dir,
            node,
            token.map(JoinCredential::Token).as_ref(),
            shutdown.clone(),
        )
        .await?;
        // In process every workload has the test's uid, so attestation cannot tell them apart:
        // each workload gets an agent of its own with its one entry, and no agent holds another
        // workload's identity to hand out. Attestation of workloads apart (one node agent, a
        // uid per service account) is what the network-namespace harness tests
        // (tests/support/netns: every sidecar under its account's uid).
        let entry = RegistrationEntry {
            spiffe_id: id,
            selectors: BTreeSet::from([Selector::UnixUid(unsafe { libc::getuid() })]),
            hint: String::new(),
            ttl: None,
        };
        let cache = SvidCache::new(signer, vec![entry]);
        tokio::spawn(cache.clone().run(shutdown.clone().cancelled_owned()));
        let socket = dir.join("agent.sock");
        let listener = workload::bind_socket(&socket)?;
        tokio::spawn(workload::serve(
            listener,
            socket.clone(),
            cache,
            shutdown.clone().cancelled_owned(),
        ));
        Ok(Self {
            endpoint: format!("unix:{}", socket.display()),
            shutdown,
        })
    }
}

pub struct Cluster {
    /// The share of new traces the cluster's proxies keep (`None`: no spans).
    traces: Option<f64>,
    pub name: String,
    pub trust_domain: String,
    pub region: String,
    /// The directory source: write Services, EndpointSlices, ServiceExports, TrafficPolicies here.
    pub src: PathBuf,
    pub data: PathBuf,
    pub cp_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub gateway_admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    /// The in-process gateway's configuration.
    pub gateway_config: ConfigHandle,
    cp_config: ControlPlaneConfig,
    cp: Mutex<Option<(Arc<ControlPlane>, CancellationToken)>>,
    gateway_shutdown: CancellationToken,
    _gateway_agent: Agent,
    _gateway_follower: WorkloadApiFollower,
}

impl Cluster {
    /// Stops this cluster's east-west gateway (its listener closes): other clusters can no
    /// longer reach the services it exports.
    pub fn stop_gateway(&self) {
        self.gateway_shutdown.cancel();
    }

    /// Waits until this cluster's gateway admits connections for `service` ("ns/name") and has
    /// a ready endpoint for it.
    pub async fn wait_gateway_serves(&self, service: &str) -> anyhow::Result<()> {
        wait_table(
            &self.gateway_config,
            &format!("the gateway of {}", self.name),
            &format!("{service} exported with a ready endpoint"),
            |t| {
                t.service_named(service).is_some_and(|e| {
                    e.svc.exported && e.local_targets.values().any(|v| !v.is_empty())
                })
            },
        )
        .await
    }

    async fn start(
        dir: &Path,
        spec: &ClusterSpec,
        hub: &Arc<Hub>,
        hub_addr: SocketAddr,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let name = ClusterName::new(&spec.name)?;
        let td = TrustDomain::new(&format!("{}.fedmesh.test", spec.name))?;
        let src = dir.join(&spec.name).join("src");
        let data = dir.join(&spec.name).join("data");
        std::fs::create_dir_all(&src)?;
        let gw_listener = bind_local(0).await?;
        let gateway_addr = gw_listener.local_addr()?;
        let mut config = ControlPlaneConfig::new(
            name.clone(),
            td.clone(),
            data.clone(),
            SourceSpec::Dir(src.clone()),
        );
        config.region = spec.region.clone();
        if let Some(r) = spec.jwks_refresh {
            config.jwks_refresh = r;
        }
        if spec.bundle_endpoint {
            config.bundle_endpoint = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        if let Some(ttl) = spec.svid_ttl {
            config.svid_ttl = ttl;
        }
        config.probe_gateways = spec.probe_gateways;
        let ca_dir = data.join("ca");
        if (spec.upstream.is_some() || spec.bundle_refresh_hint.is_some())
            && !ca_dir.join(fedmesh_trust::ca::STATE_FILE).exists()
        {
            let mut opts = CaOptions::new(td.clone());
            opts.upstream = spec.upstream.clone();
            if let Some(h) = spec.bundle_refresh_hint {
                opts.refresh_hint = h;
            }
            TrustDomainCa::init(&ca_dir, opts)?;
        }
        config.hub = Some(hub_addr.to_string());
        config.gateways = vec![spec.publish_gateway.unwrap_or(gateway_addr).to_string()];
        // Port 0: the control plane binds, and a restart reuses the ports it got (no window
        // between picking a free port and binding it).
        config.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.dns_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut first = config.clone();
        if !data.join("hub/hub.json").exists() {
            let (token, _) = hub.create_token(&name, &td, None).await?;
            first.join_token = Some(token);
        }
        let cp_shutdown = shutdown.child_token();
        let cp = ControlPlane::start(first, cp_shutdown.clone()).await?;
        let cp_addr = cp
            .listen_addr
            .context("the control plane has no listener")?;
        let dns_addr = cp.dns_addr.context("the control plane serves no DNS")?;
        config.listen = Some(cp_addr);
        config.dns_listen = Some(dns_addr);
        config.bundle_endpoint = cp.bundle_endpoint_addr;

        // The gateway: its identity (for the config stream), its configuration, its listener.
        let gw_id = SpiffeId::new(&format!(
            "spiffe://{td}/ns/fedmesh-system/sa/east-west-gateway"
        ))?;
        let agent = Agent::start(
            cp_addr,
            &data.join("agents/gateway"),
            &data,
            "gateway",
            gw_id,
        )
        .await?;
        let identity = MeshIdentity::new();
        let follower =
            WorkloadApiFollower::start(&agent.endpoint, identity.clone(), Duration::from_secs(30))
                .await?;
        let gateway_shutdown = shutdown.child_token();
        let config_handle = dpconfig::start(
            cp_addr.to_string(),
            identity.clone(),
            "gateway",
            "gateway",
            Some(data.join("gateway-config.pb")),
            gateway_shutdown.clone(),
        );
        let metrics = Arc::new(ProxyMetrics::new("fedmesh_gateway"));
        let spans = proxy_spans(
            spec.traces,
            cp_addr,
            &identity,
            ("gateway", &format!("{}-gateway", spec.name)),
            &metrics,
            &config_handle,
            gateway_shutdown.clone(),
        )?;
        let gateway = Arc::new(Gateway::new(
            GatewayOptions {
                spans,
                identity: Some(identity.clone()),
                ..GatewayOptions::default()
            },
            config_handle.clone(),
            metrics.clone(),
        ));
        let admin_listener = bind_local(0).await?;
        let gateway_admin = admin_listener.local_addr()?;
        tokio::spawn(admin::serve(
            admin_listener,
            AdminState {
                role: "gateway",
                metrics,
                config: config_handle.clone(),
                identity,
                draining: gateway.draining(),
            },
            gateway_shutdown.clone(),
        ));
        tokio::spawn(gateway.clone().serve(gw_listener, gateway_shutdown.clone()));
        tokio::time::timeout(Duration::from_secs(30), config_handle.ready())
            .await
            .context("the gateway got no configuration from its control plane")?;
        Ok(Self {
            traces: spec.traces,
            name: spec.name.clone(),
            trust_domain: td.to_string(),
            region: spec.region.clone(),
            src,
            data,
            cp_addr,
            dns_addr,
            gateway_addr,
            gateway_admin,
            gateway,
            cp_config: config,
            cp: Mutex::new(Some((cp, cp_shutdown))),
            gateway_config: config_handle,
            gateway_shutdown,
            _gateway_agent: agent,
            _gateway_follower: follower,
        })
    }

    /// The running control plane (None while stopped).
    pub fn control_plane(&self) -> Option<Arc<ControlPlane>> {
        self.cp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(c, _)| c.clone())
    }

    /// Publishes service `<ns>/<name>` with `ports` ([`yaml::service`]) and `eps` in this
    /// cluster, not exported (file `<name>.yaml`).
    pub fn serve(
        &self,
        ns: &str,
        name: &str,
        ports: &[(&str, u16, &str)],
        eps: &[EndpointSpec],
    ) -> anyhow::Result<()> {
        self.write(
            &format!("{name}.yaml"),
            &yaml::service(ns, name, ports, eps),
        )
    }

    /// Exports service `<ns>/<name>` (file `<name>-export.yaml`).
    pub fn export(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        self.write(
            &format!("{name}-export.yaml"),
            &yaml::service_export(ns, name),
        )
    }

    /// Publishes service `<ns>/<name>` (HTTP on port 80) with `eps` in this cluster and exports it.
    pub fn serve_http(&self, ns: &str, name: &str, eps: &[EndpointSpec]) -> anyhow::Result<()> {
        self.serve(ns, name, &[("http", 80, "")], eps)?;
        self.export(ns, name)
    }

    /// The sample app (HTTP echo and gRPC echo on one port, answering with this cluster, `zone`
    /// and `name`) behind a workload `<ns>/<name>` whose inbound listener is on `port` (0: any
    /// free port).
    pub async fn http_echo_workload(
        &self,
        ns: &str,
        name: &str,
        zone: &str,
        port: u16,
    ) -> anyhow::Result<(Workload, apps::RunningApp)> {
        let app = apps::sample_app(
            bind_local(0).await?,
            apps::AppInfo {
                cluster: self.name.clone(),
                zone: zone.into(),
                workload: name.into(),
            },
        )
        .await;
        let mut spec = WorkloadSpec::new(ns, name, zone);
        spec.inbound_port = port;
        let w = self.workload(&spec, app.addr).await?;
        Ok((w, app))
    }

    /// Writes a source object file atomically.
    pub fn write(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.src.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(tmp, self.src.join(file))?;
        Ok(())
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.src.join(file));
    }

    /// Stops the control plane (the data plane keeps its last configuration).
    pub async fn stop_control_plane(&self) {
        let taken = self.cp.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((cp, token)) = taken {
            token.cancel();
            // Wait for its listener to close and its tasks to let go of the state store.
            for _ in 0..200 {
                if Arc::strong_count(&cp) == 1
                    && tokio::net::TcpStream::connect(self.cp_addr).await.is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// Starts the control plane again, on the same address and data.
    pub async fn start_control_plane(&self) -> anyhow::Result<()> {
        let token = CancellationToken::new();
        let mut last = None;
        for _ in 0..50 {
            match ControlPlane::start(self.cp_config.clone(), token.clone()).await {
                Ok(cp) => {
                    *self.cp.lock().unwrap_or_else(|p| p.into_inner()) = Some((cp, token));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow::anyhow!("restarting the control plane: {last:?}"))
    }

    /// A Workload API agent serving `spiffe://<td>/ns/<ns>/sa/<name>` to this user's processes
    /// (e.g. a `fedmesh sidecar` process started with `--workload-api <endpoint>`).
    pub async fn agent(&self, ns: &str, name: &str) -> anyhow::Result<Agent> {
        let id = SpiffeId::new(&format!("spiffe://{}/ns/{ns}/sa/{name}", self.trust_domain))?;
        let dir = self.data.join("agents").join(format!("{ns}-{name}"));
        Agent::start(self.cp_addr, &dir, &self.data, name, id).await
    }

    /// Starts a workload's agent and sidecar in front of `app`. The sidecar's inbound listener
    /// (its endpoint address) is on `spec.inbound_port` (0: any free port).
    pub async fn workload(&self, spec: &WorkloadSpec, app: SocketAddr) -> anyhow::Result<Workload> {
        let id = SpiffeId::new(&format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, spec.namespace, spec.name
        ))?;
        let (agent, endpoint) = match &spec.workload_api {
            Some(endpoint) => (None, endpoint.clone()),
            None => {
                let agent_dir = self
                    .data
                    .join("agents")
                    .join(format!("{}-{}", spec.namespace, spec.name));
                let agent =
                    Agent::start(self.cp_addr, &agent_dir, &self.data, &spec.name, id.clone())
                        .await?;
                let endpoint = agent.endpoint.clone();
                (Some(agent), endpoint)
            }
        };
        let identity = MeshIdentity::new();
        let follower =
            WorkloadApiFollower::start(&endpoint, identity.clone(), Duration::from_secs(30))
                .await?;
        let shutdown = CancellationToken::new();
        let config = dpconfig::start(
            self.cp_addr.to_string(),
            identity.clone(),
            "sidecar",
            &spec.name,
            None,
            shutdown.clone(),
        );
        let metrics = Arc::new(ProxyMetrics::new("fedmesh_sidecar"));
        let spans = proxy_spans(
            self.traces,
            self.cp_addr,
            &identity,
            ("sidecar", &spec.name),
            &metrics,
            &config,
            shutdown.clone(),
        )?;
        let options = SidecarOptions {
            zone: spec.zone.clone(),
            drain_timeout: Duration::from_secs(2),
            spans,
            ..spec.options.clone().unwrap_or_default()
        };
        let sidecar = Sidecar::new(options, identity.clone(), config.clone(), metrics.clone());
        let inbound = bind_local(spec.inbound_port).await?;
        let inbound_addr = inbound.local_addr()?;
        let proxy = bind_local(0).await?;
        let proxy_addr = proxy.local_addr()?;
        let admin_l = bind_local(0).await?;
        let admin_addr = admin_l.local_addr()?;
        let inbound_task = tokio::spawn(sidecar.clone().serve_inbound(
            inbound,
            Some(app),
            shutdown.clone(),
        ));
        tokio::spawn(sidecar.clone().serve_http_proxy(proxy, shutdown.clone()));
        tokio::spawn(admin::serve(
            admin_l,
            AdminState {
                role: "sidecar",
                metrics: metrics.clone(),
                config: config.clone(),
                identity: identity.clone(),
                draining: sidecar.draining(),
            },
            shutdown.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(30), config.ready())
            .await
            .context("the sidecar got no configuration from its control plane")?;
        Ok(Workload {
            id,
            cluster: self.name.clone(),
            zone: spec.zone.clone(),
            inbound: inbound_addr,
            proxy: proxy_addr,
            admin: admin_addr,
            sidecar,
            metrics,
            config,
            identity,
            shutdown,
            inbound_task: Mutex::new(Some(inbound_task)),
            _follower: follower,
            _agent: agent,
        })
    }
}

/// A workload to start in a cluster.
#[derive(Clone, Debug, Default)]
pub struct WorkloadSpec {
    pub namespace: String,
    /// Its service account: its SPIFFE ID is `spiffe://<td>/ns/<namespace>/sa/<name>`.
    pub name: String,
    pub zone: String,
    pub inbound_port: u16,
    pub options: Option<SidecarOptions>,
    /// Take the identity from this Workload API (e.g. `unix:/run/spire/agent.sock`, a SPIRE
    /// agent) instead of an agent of the testbed's own.
    pub workload_api: Option<String>,
}

impl WorkloadSpec {
    pub fn new(namespace: &str, name: &str, zone: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            zone: zone.into(),
            ..Self::default()
        }
    }
}

/// A workload's sidecar (and its identity), running.
pub struct Workload {
    pub id: SpiffeId,
    pub cluster: String,
    pub zone: String,
    /// The sidecar's inbound mTLS listener: this workload's endpoint address.
    pub inbound: SocketAddr,
    /// The sidecar's HTTP proxy for the app's outbound calls.
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub sidecar: Arc<Sidecar>,
    pub metrics: Arc<ProxyMetrics>,
    pub config: ConfigHandle,
    /// The sidecar's SVID and trust bundles, as its Workload API delivers them.
    pub identity: MeshIdentity,
    shutdown: CancellationToken,
    inbound_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    _follower: WorkloadApiFollower,
    _agent: Option<Agent>,
}

impl Workload {
    /// This workload as an endpoint of a service.
    pub fn endpoint(&self) -> EndpointSpec {
        EndpointSpec {
            addr: self.inbound,
            zone: self.zone.clone(),
            ready: true,
        }
    }

    /// Opens a local listener on the sidecar for one service port (`ns/name:port`): the app
    /// connects there as if to the service.
    pub async fn listen(&self, dest: &str) -> anyhow::Result<SocketAddr> {
        let dest: fedmesh_sidecar::Dest = dest.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let l = bind_local(0).await?;
        let addr = l.local_addr()?;
        tokio::spawn(
            self.sidecar
                .clone()
                .serve_service(l, dest, self.shutdown.clone()),
        );
        Ok(addr)
    }

    /// Stops the sidecar (its listeners close; open requests get its drain time).
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Stops the sidecar and waits until its inbound side has drained: the requests it had
    /// accepted are answered (as a pod's sidecar finishes before its app is killed).
    pub async fn stop_and_drain(&self) {
        self.shutdown.cancel();
        let task = self
            .inbound_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Waits until this sidecar holds the trust bundle of `trust_domain`.
    pub async fn wait_trusts(&self, trust_domain: &str) -> anyhow::Result<()> {
        let mut rx = self.identity.subscribe();
        tokio::time::timeout(Duration::from_secs(30), async {
            while !self.identity.trust().trusts(trust_domain) {
                if rx.changed().await.is_err() {
                    // The identity is gone: the bundle can no longer arrive.
                    return Err(anyhow::anyhow!(
                        "{}: its identity stopped changing before it trusted {trust_domain}",
                        self.id
                    ));
                }
            }
            Ok(())
        })
        .await
        .with_context(|| {
            // Which trust domains it did get, to tell where the bundle's way stopped (the hub,
            // the control plane, the agent or the Workload API stream).
            let held: Vec<String> = self
                .identity
                .trust()
                .bundles()
                .trust_domains()
                .map(|td| td.to_string())
                .collect();
            format!(
                "{}: no trust bundle for {trust_domain} within 30 s (it holds {held:?})",
                self.id
            )
        })?
    }

    /// Waits until this sidecar's configuration satisfies `f`.
    pub async fn wait_config(
        &self,
        what: &str,
        f: impl Fn(&fedmesh_dataplane::config::RoutingTable) -> bool,
    ) -> anyhow::Result<()> {
        wait_table(&self.config, &self.id.to_string(), what, f).await
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits (up to 30s) until the routing table of `config` satisfies `f`.
pub async fn wait_table(
    config: &ConfigHandle,
    who: &str,
    what: &str,
    f: impl Fn(&fedmesh_dataplane::config::RoutingTable) -> bool,
) -> anyhow::Result<()> {
    let mut rx = config.changes();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if f(&config.table()) {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                // The configuration task ended: the condition can no longer come true.
                return Err(anyhow::anyhow!(
                    "{who}: the configuration stream ended before {what}"
                ));
            }
        }
    })
    .await
    .with_context(|| format!("{who}: timed out waiting for {what}"))?
}
