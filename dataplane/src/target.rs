//! Where a request or connection goes: an endpoint of this cluster, or another cluster through
//! one of its east-west gateways — with everything a connection to it needs, computed when the
//! configuration arrives and never on the request path: its address, the SNI that names the
//! destination service, the server name rustls sends, the trust domain its server must belong to,
//! and the keys that health, load and the connection pool are kept under.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_api::{ClusterName, TrustDomain};
use rustls_pki_types::ServerName;

use crate::sni::MeshSni;

/// Where a target is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// An endpoint in this cluster: the address of its sidecar's inbound.
    Local { addr: SocketAddr, zone: Box<str> },
    /// Another cluster, through one of its gateways (`host:port`, resolved when connecting).
    Remote { region: Box<str>, gateway: Box<str> },
}

/// A place a connection can go. Cheap to clone; equal when it is the same place.
#[derive(Clone)]
pub struct Target(Arc<Inner>);

struct Inner {
    /// The endpoint (`ip:port`) or `cluster@gateway`: health and load are kept per key.
    key: Box<str>,
    /// `key|sni`: one pooled connection per target and destination.
    pool_key: Box<str>,
    place: Place,
    cluster: ClusterName,
    trust_domain: TrustDomain,
    sni: MeshSni,
    server_name: ServerName<'static>,
}

impl Target {
    fn new(
        place: Place,
        key: String,
        cluster: ClusterName,
        trust_domain: TrustDomain,
        sni: MeshSni,
    ) -> Self {
        let sni_text = sni.to_string();
        // A MeshSni is a valid DNS name by construction (its labels are checked names).
        let server_name = ServerName::try_from(sni_text.clone())
            .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()));
        Self(Arc::new(Inner {
            pool_key: format!("{key}|{sni_text}").into(),
            key: key.into(),
            place,
            cluster,
            trust_domain,
            sni,
            server_name,
        }))
    }

    /// An endpoint of this cluster (`cluster`, `trust_domain`) at `addr`.
    pub fn local(
        addr: SocketAddr,
        zone: &str,
        cluster: ClusterName,
        trust_domain: TrustDomain,
        sni: MeshSni,
    ) -> Self {
        Self::new(
            Place::Local {
                addr,
                zone: zone.into(),
            },
            addr.to_string(),
            cluster,
            trust_domain,
            sni,
        )
    }

    /// Cluster `cluster` through its gateway `gateway` (`host:port`).
    pub fn remote(
        cluster: ClusterName,
        trust_domain: TrustDomain,
        region: &str,
        gateway: &str,
        sni: MeshSni,
    ) -> Self {
        Self::new(
            Place::Remote {
                region: region.into(),
                gateway: gateway.into(),
            },
            format!("{cluster}@{gateway}"),
            cluster,
            trust_domain,
            sni,
        )
    }

    pub fn key(&self) -> &str {
        &self.0.key
    }

    pub fn pool_key(&self) -> &str {
        &self.0.pool_key
    }

    pub fn place(&self) -> &Place {
        &self.0.place
    }

    pub fn is_local(&self) -> bool {
        matches!(self.0.place, Place::Local { .. })
    }

    /// The address of a local target (an endpoint of this cluster).
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.0.place {
            Place::Local { addr, .. } => Some(*addr),
            Place::Remote { .. } => None,
        }
    }

    /// The cluster that serves: this one for a local target.
    pub fn cluster(&self) -> &ClusterName {
        &self.0.cluster
    }

    /// The trust domain the server's SVID must belong to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.0.trust_domain
    }

    /// The destination as the TLS SNI names it.
    pub fn sni(&self) -> &MeshSni {
        &self.0.sni
    }

    /// The SNI as rustls sends it.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.0.server_name
    }

    /// Where to connect: an address, or the gateway's `host:port`.
    pub fn connect_to(&self) -> ConnectTo<'_> {
        match &self.0.place {
            Place::Local { addr, .. } => ConnectTo::Addr(*addr),
            Place::Remote { gateway, .. } => ConnectTo::HostPort(gateway),
        }
    }
}

/// Where a connection to a target goes.
#[derive(Clone, Copy, Debug)]
pub enum ConnectTo<'a> {
    Addr(SocketAddr),
    HostPort(&'a str),
}

impl fmt::Display for ConnectTo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectTo::Addr(a) => write!(f, "{a}"),
            ConnectTo::HostPort(h) => f.write_str(h),
        }
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.key == other.0.key
    }
}

impl Eq for Target {}

impl Hash for Target {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.key.hash(state);
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("key", &self.0.key)
            .field("place", &self.0.place)
            .field("sni", &self.0.sni.to_string())
            .finish()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.key)
    }
}
