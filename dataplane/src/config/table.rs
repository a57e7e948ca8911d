//! The routing table a proxy reads on every request: typed, compiled once per configuration
//! ([`super::compile`]), shared through an `ArcSwap` snapshot.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};

use crate::policy::Policy;
use crate::target::Target;

/// Which of a service's names a request used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `NAME.NAMESPACE.svc.clusterset.local` or the clusterset IP: every exporting cluster.
    ClusterSet,
    /// `NAME.NAMESPACE.svc.cluster.local` or the Service's cluster IP: this cluster only.
    Local,
    /// A short name (`NAME.NAMESPACE`, `--listen`): the clusterset when the service is in it,
    /// else this cluster.
    #[default]
    Auto,
}

/// What a service port speaks, as declared (`appProtocol`, else the port name's prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1, HTTP/2, gRPC.
    Http,
    /// Opaque TCP (TLS, databases, WebSocket): carried unparsed.
    Opaque,
    /// Not declared: the sidecar detects it from the client's first bytes.
    Undeclared,
}

impl AppProtocol {
    pub fn of(name: &str, app_protocol: &str) -> Self {
        let hint = if app_protocol.is_empty() {
            name.split('-').next().unwrap_or_default()
        } else {
            app_protocol
        };
        match hint.to_ascii_lowercase().as_str() {
            "http" | "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => Self::Http,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws"
            | "kubernetes.io/wss" => Self::Opaque,
            _ => Self::Undeclared,
        }
    }
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub port: u16,
    pub name: String,
    pub protocol: AppProtocol,
}

/// A service as the data path needs it.
#[derive(Debug)]
pub struct ServiceEntry {
    pub key: ServiceKey,
    /// As the control plane sent it: for `/config` and the cache, never read per request.
    pub svc: pb::Service,
    pub ports: Vec<PortSpec>,
    /// Clusterset targets per service port: this cluster's endpoints when it exports the
    /// service, and the gateways of the other exporting clusters.
    pub targets: HashMap<u16, Arc<[Target]>>,
    /// This cluster's ready endpoints per service port.
    pub local_targets: HashMap<u16, Arc<[Target]>>,
    /// Every address (ready or not) at which this cluster serves a service port: what an
    /// inbound connection may have been addressed to.
    pub served: HashMap<u16, HashSet<SocketAddr>>,
    pub policy: Arc<Policy>,
    /// This cluster exports it: its gateway admits it and other clusters may call it.
    pub exported: bool,
    pub in_clusterset: bool,
}

impl ServiceEntry {
    /// The clusterset targets for `port`.
    pub fn targets(&self, port: u16) -> &[Target] {
        self.targets.get(&port).map(|t| &t[..]).unwrap_or(&[])
    }

    /// This cluster's endpoints for `port`.
    pub fn local_targets(&self, port: u16) -> &[Target] {
        self.local_targets.get(&port).map(|t| &t[..]).unwrap_or(&[])
    }

    /// The targets a name of `scope` reaches.
    pub fn targets_for(&self, scope: Scope, port: u16) -> &[Target] {
        match self.resolve(scope) {
            Scope::Local => self.local_targets(port),
            _ => self.targets(port),
        }
    }

    /// `Auto` made concrete for this service.
    pub fn resolve(&self, scope: Scope) -> Scope {
        match scope {
            Scope::Auto if self.in_clusterset => Scope::ClusterSet,
            Scope::Auto => Scope::Local,
            s => s,
        }
    }

    pub fn has_port(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.port == port)
    }

    pub fn port(&self, port: u16) -> Option<&PortSpec> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The service's only port, or its first.
    pub fn default_port(&self) -> Option<u16> {
        self.ports.first().map(|p| p.port)
    }

    /// Whether this cluster serves `port` of the service at `addr`.
    pub fn serves(&self, port: u16, addr: SocketAddr) -> bool {
        self.served.get(&port).is_some_and(|a| a.contains(&addr))
    }
}

/// This cluster, once the control plane has said which it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCluster {
    pub name: ClusterName,
    pub trust_domain: TrustDomain,
    pub region: String,
    /// This proxy's zone as the control plane knows it (its pod's node's), "" when unknown.
    pub zone: String,
}

/// Everything a proxy routes by.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub epoch: u64,
    pub version: u64,
    /// As the control plane sent it (for `/config`).
    pub cluster: pb::LocalCluster,
    /// `None` until the first configuration.
    pub local: Option<LocalCluster>,
    pub services: HashMap<ServiceKey, Arc<ServiceEntry>>,
    /// Clusterset IPs.
    pub by_vip: HashMap<Ipv4Addr, Arc<ServiceEntry>>,
    /// The cluster IPs of this cluster's Services.
    pub by_cluster_ip: HashMap<Ipv4Addr, Arc<ServiceEntry>>,
    /// Which cluster a trust domain belongs to (callers are named by their SPIFFE ID's).
    pub cluster_of: HashMap<TrustDomain, ClusterName>,
    /// Services and addresses asked for that the control plane does not know (recently).
    pub not_found: HashSet<String>,
    /// The namespace of this proxy's workload (its SPIFFE ID's), for consumer routes.
    pub own_namespace: Option<String>,
    /// This cluster's ready endpoints by address: a connection to a pod's own address goes to
    /// that endpoint (with mTLS), past the Service's routes.
    pub by_endpoint: HashMap<SocketAddr, (Arc<ServiceEntry>, Target)>,
    /// The addresses of `by_endpoint`.
    pub endpoint_ips: HashSet<Ipv4Addr>,
    /// Some service is PERMISSIVE: inbound connections may be plain text.
    pub permissive: bool,
}

impl RoutingTable {
    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// The endpoint of this cluster at `addr` (a pod's own address), with the mesh target that
    /// reaches it.
    pub fn endpoint_at(&self, addr: SocketAddr) -> Option<&(Arc<ServiceEntry>, Target)> {
        self.by_endpoint.get(&addr)
    }

    /// The service `namespace/name` (for tools and tests; the data path looks up by key).
    pub fn service_named(&self, key: &str) -> Option<&Arc<ServiceEntry>> {
        key.parse::<ServiceKey>()
            .ok()
            .and_then(|k| self.services.get(&k))
    }

    /// This cluster's name ("" before the first configuration).
    pub fn cluster_name(&self) -> &str {
        self.local.as_ref().map(|l| l.name.as_str()).unwrap_or("")
    }

    /// This proxy's zone: `own` (its --zone) when given, else the one its control plane sent
    /// (its pod's node's), else "".
    pub fn zone<'a>(&'a self, own: &'a str) -> &'a str {
        if !own.is_empty() {
            return own;
        }
        self.local.as_ref().map(|l| l.zone.as_str()).unwrap_or("")
    }

    /// Whether `subject` (a service key or an address) needs no question to the control plane:
    /// it is in the table, or was recently found not to exist.
    pub fn knows(&self, subject: &str) -> bool {
        self.not_found.contains(subject)
            || subject
                .parse::<ServiceKey>()
                .is_ok_and(|k| self.services.contains_key(&k))
            || subject.parse::<Ipv4Addr>().is_ok_and(|ip| {
                self.by_vip.contains_key(&ip)
                    || self.by_cluster_ip.contains_key(&ip)
                    || self.endpoint_ips.contains(&ip)
            })
    }
}
