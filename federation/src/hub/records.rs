//! What the hub keeps in its store. JSON values, so `etcdctl get` shows something readable.
//!
//! ```text
//! clusters/<cluster>                 ClusterRecord   (registration + state)
//! presence/<cluster>                 Presence        (heartbeat of the hub holding the stream)
//! exports/<cluster>/<ns>/<name>      ExportRecord    (written only from that cluster's stream)
//! bundles/<trust domain>             BundleRecord    (written only by the cluster owning the domain)
//! trustdomains/<trust domain>        the cluster that registered it (one owner per trust domain)
//! tokens/<id>                        TokenRecord     (one-time join tokens)
//! ```

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};
use serde::{Deserialize, Serialize};

pub const CLUSTERS: &str = "clusters/";
pub const PRESENCE: &str = "presence/";
pub const EXPORTS: &str = "exports/";
pub const BUNDLES: &str = "bundles/";
pub const TOKENS: &str = "tokens/";
pub const TRUST_DOMAINS: &str = "trustdomains/";

pub fn cluster_key(c: &ClusterName) -> String {
    format!("{CLUSTERS}{c}")
}
pub fn presence_key(c: &ClusterName) -> String {
    format!("{PRESENCE}{c}")
}
pub fn export_key(c: &ClusterName, s: &ServiceKey) -> String {
    format!("{EXPORTS}{c}/{}/{}", s.namespace, s.name)
}
pub fn exports_prefix(c: &ClusterName) -> String {
    format!("{EXPORTS}{c}/")
}
pub fn bundle_key(td: &TrustDomain) -> String {
    format!("{BUNDLES}{td}")
}
pub fn token_key(id: &str) -> String {
    format!("{TOKENS}{id}")
}
pub fn trust_domain_key(td: &TrustDomain) -> String {
    format!("{TRUST_DOMAINS}{td}")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: ClusterName,
    pub trust_domain: TrustDomain,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub joined_unix: i64,
    /// Marked by a hub sweeper when no hub heard from the cluster within the grace period.
    #[serde(default)]
    pub stale: bool,
    /// Set when the cluster stayed silent past the expiry and its exports were withdrawn.
    #[serde(default)]
    pub expired: bool,
    #[serde(default)]
    pub protocol_version: u32,
    /// The last publish version of the cluster the hub applied.
    #[serde(default)]
    pub published_version: u64,
    /// Serial numbers (hex) of the identities this registration holds: the current one and,
    /// after a renewal, the next. A certificate of an earlier registration of the same name (the
    /// cluster was removed, or joined again) is not among them and is refused. Empty in records
    /// written before serials were kept: the first identity presented is adopted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_serials: Vec<String>,
    /// The cluster's routes and policies it could not fully accept (as it reported them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<ProblemRecord>,
    /// The routes in force in the cluster, rule by rule (as it reported them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteRecord>,
}

/// One rule of a route in force in a cluster: which service it binds, what it matches and where
/// it sends requests, with weights.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    pub service: String,
    pub source: String,
    pub matches: String,
    pub backends: Vec<(String, u32, bool)>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub consumer_namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub invalid: String,
}

/// At most this many route rules are kept per cluster.
pub const MAX_ROUTES: usize = 500;

impl From<&fedmesh_api::pb::federation::RouteSummary> for RouteRecord {
    fn from(r: &fedmesh_api::pb::federation::RouteSummary) -> Self {
        Self {
            service: cut(&r.service, 256),
            source: cut(&r.source, 300),
            matches: cut(&r.matches, 512),
            backends: r
                .backends
                .iter()
                .take(32)
                .map(|b| (cut(&b.name, 300), b.weight, b.unresolved))
                .collect(),
            consumer_namespace: cut(&r.consumer_namespace, 64),
            invalid: cut(&r.invalid, MAX_PROBLEM_MESSAGE),
        }
    }
}

/// `s` cut to at most `n` bytes, on a character boundary.
fn cut(s: &str, n: usize) -> String {
    let mut end = s.len().min(n);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// A route or policy a cluster could not fully accept, and why (its status condition).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemRecord {
    pub kind: String,
    pub name: String,
    pub condition: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

/// At most this many problems are kept per cluster, each message cut to this many bytes: a
/// cluster cannot fill the hub's store with them.
pub const MAX_PROBLEMS: usize = 200;
pub const MAX_PROBLEM_MESSAGE: usize = 1024;

impl From<&fedmesh_api::pb::federation::ObjectProblem> for ProblemRecord {
    fn from(p: &fedmesh_api::pb::federation::ObjectProblem) -> Self {
        Self {
            kind: cut(&p.kind, 32),
            name: cut(&p.name, 256),
            condition: cut(&p.condition, 32),
            reason: cut(&p.reason, 64),
            message: cut(&p.message, MAX_PROBLEM_MESSAGE),
            services: p.services.iter().take(16).map(|s| cut(s, 256)).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Which hub replica holds the cluster's stream.
    pub hub: String,
    /// Milliseconds since the epoch.
    pub last_seen_ms: i64,
    /// The last view version the cluster acknowledged.
    #[serde(default)]
    pub acked_version: u64,
    #[serde(default)]
    pub connected: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRecord {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub protocol: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_protocol: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalityCount {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    pub ready: u32,
    pub total: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterSetIP,
    Headless,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub service: ServiceKey,
    #[serde(rename = "type")]
    pub type_: ServiceType,
    pub ports: Vec<PortRecord>,
    /// "" (None) or "ClientIP".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_affinity: String,
    #[serde(default)]
    pub session_affinity_timeout_seconds: u32,
    #[serde(default)]
    pub endpoints: Vec<LocalityCount>,
    pub created_unix: i64,
    /// When the hub first received it, in milliseconds: the age that decides conflicts. Records
    /// stored before it existed have 0 and are aged by `created_unix`.
    #[serde(default)]
    pub created_unix_ms: i64,
}

impl ExportRecord {
    /// When the hub first received this export (ms since the epoch).
    pub fn first_received_ms(&self) -> i64 {
        if self.created_unix_ms > 0 {
            self.created_unix_ms
        } else {
            self.created_unix.saturating_mul(1000)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub trust_domain: TrustDomain,
    pub cluster: ClusterName,
    /// The SPIFFE bundle document (JWK Set JSON).
    pub jwks: String,
    pub sequence: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Who may use it (a cluster name); `None` for node bootstrap tokens any agent may use.
    pub subject: Option<String>,
    /// The trust domain a cluster join token registers, and no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<TrustDomain>,
    /// Bootstrap tokens may be used until they expire; join tokens only once.
    #[serde(default)]
    pub reusable: bool,
    /// SHA-256 of the token's secret, hex. The secret itself is never stored.
    pub secret_sha256: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    #[serde(default)]
    pub used_unix: Option<i64>,
}

// ----- conversions between protocol messages and records -----

pub fn service_type_from_pb(t: i32) -> Result<ServiceType, String> {
    match pb::ServiceType::try_from(t) {
        Ok(pb::ServiceType::ClusterSetIp) => Ok(ServiceType::ClusterSetIP),
        Ok(pb::ServiceType::Headless) => Ok(ServiceType::Headless),
        _ => Err(format!(
            "service type {t} is not ClusterSetIP (1) or Headless (2)"
        )),
    }
}

pub fn service_type_to_pb(t: ServiceType) -> i32 {
    match t {
        ServiceType::ClusterSetIP => pb::ServiceType::ClusterSetIp as i32,
        ServiceType::Headless => pb::ServiceType::Headless as i32,
    }
}

/// Validates a published export; the error names the service and the problem.
pub fn export_from_pb(e: &pb::Export) -> Result<ExportRecord, String> {
    let service: ServiceKey = e
        .service
        .parse()
        .map_err(|err| format!("export {:?}: {err}", e.service))?;
    let bad = |msg: String| format!("export {service}: {msg}");
    let type_ = service_type_from_pb(e.r#type).map_err(bad)?;
    if e.ports.is_empty() && type_ == ServiceType::ClusterSetIP {
        return Err(bad("a ClusterSetIP service needs at least one port".into()));
    }
    let mut ports = Vec::with_capacity(e.ports.len());
    let mut names = std::collections::BTreeSet::new();
    for p in &e.ports {
        let protocol = if p.protocol.is_empty() {
            "TCP".to_string()
        } else {
            p.protocol.clone()
        };
        if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(bad(format!(
                "port {}: protocol {protocol:?} is not TCP, UDP or SCTP",
                p.port
            )));
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("port {} is not in 1..65535", p.port)))?;
        if !p.name.is_empty() {
            fedmesh_api::names::check_dns_label("port name", &p.name)
                .map_err(|e| bad(e.to_string()))?;
            if !names.insert(p.name.clone()) {
                return Err(bad(format!("port name {:?} is used twice", p.name)));
            }
        }
        ports.push(PortRecord {
            name: p.name.clone(),
            protocol,
            port,
            app_protocol: p.app_protocol.clone(),
        });
    }
    let session_affinity = match e.session_affinity.as_str() {
        "" | "None" => String::new(),
        "ClientIP" => "ClientIP".to_string(),
        other => {
            return Err(bad(format!(
                "session affinity {other:?} is not None or ClientIP"
            )));
        }
    };
    let endpoints = e
        .endpoints
        .iter()
        .map(|l| {
            if l.ready > l.total {
                Err(bad(format!(
                    "locality {}/{}: {} ready of {} total endpoints",
                    l.region, l.zone, l.ready, l.total
                )))
            } else {
                Ok(LocalityCount {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    ready: l.ready,
                    total: l.total,
                })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    endpoints
        .iter()
        .try_fold(0u32, |sum, l| sum.checked_add(l.total))
        .ok_or_else(|| bad("its localities count more than 2^32 endpoints".into()))?;
    Ok(ExportRecord {
        service,
        type_,
        ports,
        session_affinity,
        session_affinity_timeout_seconds: e.session_affinity_timeout_seconds,
        endpoints,
        created_unix: e.created_unix,
        created_unix_ms: 0,
    })
}

pub fn export_to_pb(r: &ExportRecord) -> pb::Export {
    pb::Export {
        service: r.service.to_string(),
        r#type: service_type_to_pb(r.type_),
        ports: r.ports.iter().map(port_to_pb).collect(),
        session_affinity: r.session_affinity.clone(),
        session_affinity_timeout_seconds: r.session_affinity_timeout_seconds,
        endpoints: r.endpoints.iter().map(locality_to_pb).collect(),
        created_unix: r.created_unix,
    }
}

pub fn port_to_pb(p: &PortRecord) -> pb::Port {
    pb::Port {
        name: p.name.clone(),
        protocol: p.protocol.clone(),
        port: u32::from(p.port),
        app_protocol: p.app_protocol.clone(),
    }
}

pub fn locality_to_pb(l: &LocalityCount) -> pb::LocalityEndpoints {
    pb::LocalityEndpoints {
        region: l.region.clone(),
        zone: l.zone.clone(),
        ready: l.ready,
        total: l.total,
    }
}

pub fn now_unix() -> i64 {
    now_ms() / 1000
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
