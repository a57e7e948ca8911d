//! An in-process clusterset: a hub and control planes on 127.0.0.1, each with a directory source.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::{ClusterName, TrustDomain};
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, Snapshot, SourceSpec};
use fedmesh_federation::hub::{self, Hub, HubConfig};
use fedmesh_federation::store::{KvStore, RedbStore};
use fedmesh_trust::ca::{CaOptions, TrustDomainCa};
use tokio_util::sync::CancellationToken;

pub struct HubHandle {
    pub hub: Arc<Hub>,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl HubHandle {
    /// Serves the hub's admin API on a free loopback port (plain HTTP) with `token` as the admin
    /// token, until the hub stops: its address.
    pub async fn serve_admin(&self, token: &str) -> SocketAddr {
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = admin.local_addr().unwrap();
        tokio::spawn(hub::serve_admin(
            hub::admin::AdminState {
                hub: self.hub.clone(),
                token: Arc::new(token.into()),
                admin_ids: Arc::new(Default::default()),
            },
            admin,
            None,
            self.shutdown.clone(),
        ));
        addr
    }

    /// Joins cluster `name` (trust domain `<name>.example`) with `token` as a control plane
    /// would, its credentials under `dir/name`, and waits until the hub's view has it.
    pub async fn join(
        &self,
        dir: &Path,
        name: &str,
        token: &str,
    ) -> fedmesh_federation::control_plane::hub_link::HubCredentials {
        let cluster = ClusterName::new(name).unwrap();
        let creds = fedmesh_federation::control_plane::hub_link::HubCredentials::join(
            &dir.join(name),
            &self.addr.to_string(),
            token,
            &cluster,
            &TrustDomain::new(&format!("{name}.example")).unwrap(),
        )
        .await
        .unwrap();
        let start = std::time::Instant::now();
        while self.hub.view().cluster(&cluster).is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} never joined"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        creds
    }

    /// Stops the hub and waits until its store and port are released.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        // Let background tasks drop their store handles.
        for _ in 0..100 {
            if Arc::strong_count(&self.hub) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(self.hub);
    }
}

/// Logs to the test output (shown for failing tests); RUST_LOG overrides the level.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,h2=warn,hickory=warn")
            }),
        )
        .with_test_writer()
        .try_init();
}

pub fn hub_config() -> HubConfig {
    HubConfig {
        stale_after: Duration::from_secs(1),
        ..HubConfig::default()
    }
}

pub fn hub_ca(dir: &Path) -> Arc<TrustDomainCa> {
    let ca_dir = dir.join("hub-ca");
    Arc::new(if ca_dir.join("ca.json").exists() {
        TrustDomainCa::open(&ca_dir).unwrap()
    } else {
        TrustDomainCa::init(
            &ca_dir,
            CaOptions::new(TrustDomain::new("hub.fedmesh").unwrap()),
        )
        .unwrap()
    })
}

/// Starts a hub on `store`, listening on `addr` (port 0 for any).
pub async fn start_hub(
    dir: &Path,
    store: Arc<dyn KvStore>,
    addr: SocketAddr,
    config: HubConfig,
) -> HubHandle {
    init_logs();
    let shutdown = CancellationToken::new();
    let hub = Hub::start(config, store, hub_ca(dir), shutdown.clone())
        .await
        .unwrap();
    // The port may still be in TIME_WAIT after a restart: retry briefly.
    let mut listener = None;
    for _ in 0..50 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let listener = listener.expect("bind hub port");
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(hub::serve_grpc(hub.clone(), listener, shutdown.clone()));
    let server = tokio::spawn(async move {
        let _ = server.await;
    });
    HubHandle {
        hub,
        addr,
        shutdown,
        server,
    }
}

pub async fn start_redb_hub(dir: &Path, addr: SocketAddr) -> HubHandle {
    let store: Arc<dyn KvStore> = Arc::new(RedbStore::open(&dir.join("hub.redb")).unwrap());
    start_hub(dir, store, addr, hub_config()).await
}

pub struct ClusterHandle {
    pub name: ClusterName,
    pub src: PathBuf,
    pub data: PathBuf,
    pub cp: Arc<ControlPlane>,
    pub shutdown: CancellationToken,
}

impl ClusterHandle {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.cp.snapshot().borrow().clone()
    }

    /// Waits until `cond` holds for this cluster's snapshot.
    pub async fn wait_for(
        &self,
        what: &str,
        mut cond: impl FnMut(&Snapshot) -> bool,
    ) -> Arc<Snapshot> {
        let mut rx = self.cp.snapshot();
        let result = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let s = rx.borrow_and_update().clone();
                if cond(&s) {
                    return s;
                }
                if rx.changed().await.is_err() {
                    panic!("control plane {} stopped", self.name);
                }
            }
        })
        .await;
        result.unwrap_or_else(|_| panic!("{}: timed out waiting for {what}", self.name))
    }

    pub fn write(&self, file: &str, yaml: &str) {
        let tmp = self.src.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.src.join(file)).unwrap();
    }

    /// Serves `shop/web` (port `http`/`port`, endpoints `(ip, zone)`) and exports it: the files
    /// `web.yaml` and `export.yaml`.
    pub fn export_web(&self, port: u16, endpoints: &[(&str, &str)]) {
        self.write(
            "web.yaml",
            &web_service("shop", "web", "http", port, endpoints),
        );
        self.write("export.yaml", &service_export("shop", "web"));
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.src.join(file));
    }

    /// Enrolls `node` as an operator does through the admin socket: registers `ids` for it and
    /// returns a one-time join token for its agent.
    pub async fn enroll(&self, node: &str, ids: &[&str]) -> String {
        let admin = fedmesh_federation::control_plane::admin::AdminSocketClient::new(&self.data);
        for id in ids {
            admin.add_entry(node, id).await.unwrap();
        }
        admin
            .create_token(node, Duration::from_secs(600))
            .await
            .unwrap()
            .token
    }

    /// An agent of `node` joined with `token`, its credentials in `dir`.
    pub async fn agent(
        &self,
        dir: &Path,
        node: &str,
        token: &str,
    ) -> Result<Arc<fedmesh_trust::workload::ControlPlaneSigner>, String> {
        fedmesh_trust::workload::ControlPlaneSigner::start(
            &self.cp.listen_addr.unwrap().to_string(),
            dir,
            node,
            Some(&fedmesh_trust::workload::JoinCredential::Token(
                token.to_string(),
            )),
            self.shutdown.clone(),
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// Stops the control plane and waits until its tasks let go of it (and of its database).
    pub async fn stop(self) {
        self.shutdown.cancel();
        for _ in 0..500 {
            if Arc::strong_count(&self.cp) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            Arc::strong_count(&self.cp),
            1,
            "the control plane of {} did not stop within 10s",
            self.name
        );
        drop(self.cp);
    }
}

pub fn cluster_config(dir: &Path, name: &str, hub: Option<SocketAddr>) -> ControlPlaneConfig {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    let mut c = ControlPlaneConfig::new(
        ClusterName::new(name).unwrap(),
        TrustDomain::new(&format!("{name}.example")).unwrap(),
        dir.join(format!("{name}-data")),
        SourceSpec::Dir(src),
    );
    c.region = format!("{name}-region");
    c.hub = hub.map(|a| a.to_string());
    c.gateways = vec![format!("127.0.0.1:{}", 15443)];
    c.listen = Some("127.0.0.1:0".parse().unwrap());
    c.dns_listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// Starts a control plane, joining the hub with a fresh token if it has not joined yet.
pub async fn start_cluster(dir: &Path, name: &str, hub: &HubHandle) -> ClusterHandle {
    let mut config = cluster_config(dir, name, Some(hub.addr));
    if !config.data_dir.join("hub/hub.json").exists() {
        let (token, _) = hub
            .hub
            .create_token(&config.cluster, &config.trust_domain, None)
            .await
            .unwrap();
        config.join_token = Some(token);
    }
    start_with(config).await
}

pub async fn start_with(config: ControlPlaneConfig) -> ClusterHandle {
    let shutdown = CancellationToken::new();
    let (name, data) = (config.cluster.clone(), config.data_dir.clone());
    let SourceSpec::Dir(src) = config.source.clone() else {
        panic!("directory sources only")
    };
    let cp = ControlPlane::start(config, shutdown.clone()).await.unwrap();
    ClusterHandle {
        name,
        src,
        data,
        cp,
        shutdown,
    }
}

pub fn web_service(
    ns: &str,
    name: &str,
    port_name: &str,
    port: u16,
    zones: &[(&str, &str)],
) -> String {
    let endpoints: String = zones
        .iter()
        .map(|(ip, zone)| {
            format!("- addresses: [\"{ip}\"]\n  zone: {zone}\n  conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: {port_name}, port: 8080}}]\nendpoints:\n{endpoints}"
    )
}

pub fn service_export(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: {ns}}}\n"
    )
}

#[allow(unused_imports)] // not every test binary that includes this module asks DNS
pub use fedmesh_test_support::dns_a;

/// What a hub needs to reach an etcd started by `EtcdServer::start_secure`: its CA, the client
/// certificate and the `root` user.
pub fn etcd_security(
    etcd: &fedmesh_test_support::EtcdServer,
) -> fedmesh_federation::store::EtcdSecurity {
    let c = etcd.secure.as_ref().expect("a secure etcd");
    fedmesh_federation::store::EtcdSecurity {
        ca_pem: Some(c.ca_pem.clone()),
        client_cert_pem: Some(c.client_cert_pem.clone()),
        client_key_pem: Some(c.client_key_pem.clone()),
        user: Some((c.user.clone(), c.password.clone())),
        allow_plaintext: false,
    }
}

/// One admin API call over plain HTTP/1.1 (`token`: the bearer token, if any): status and body.
pub async fn admin_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: hub\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
