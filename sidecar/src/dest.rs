//! Which mesh service a request or connection is for.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use fedmesh_api::ServiceKey;
use fedmesh_dataplane::config::RoutingTable;
pub use fedmesh_dataplane::config::Scope;

/// A service port, in the clusterset or in this cluster only.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub service: ServiceKey,
    pub port: u16,
    pub scope: Scope,
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)?;
        if self.scope == Scope::Local {
            f.write_str(" (cluster.local)")?;
        }
        Ok(())
    }
}

/// `namespace/name:port`, as given to `--listen` (the clusterset when the service is in it,
/// else this cluster).
impl FromStr for Dest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (svc, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME:PORT"))?;
        let service: ServiceKey = svc.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: the port must be 1..65535"))?;
        Ok(Self {
            service,
            port,
            scope: Scope::Auto,
        })
    }
}

/// Reads a request's host (`Host` header or URI authority) as a mesh service:
/// `name.namespace.svc.clusterset.local` (the clusterset), `name.namespace.svc.cluster.local`
/// (this cluster), `name.namespace[.svc]` (the clusterset when the service is in it), each with an
/// optional `:port`, or a clusterset IP or cluster IP. Without a port, the service's port 80 is
/// used when it has one, otherwise its first port.
pub fn from_host(host: &str, table: &RoutingTable) -> Option<Dest> {
    let (name, port) = split_port(host)?;
    let (entry, scope) = match parse_name(name)? {
        Name::Ip(v4) => by_ip(v4, table)?,
        Name::Service(key, scope) => (table.service(&key)?.clone(), scope),
    };
    let port = match port {
        Some(p) => p,
        None => {
            if entry.has_port(80) {
                80
            } else {
                entry.default_port()?
            }
        }
    };
    entry.has_port(port).then(|| Dest {
        service: entry.key.clone(),
        port,
        scope,
    })
}

/// What a host names before the table is consulted.
enum Name {
    Service(ServiceKey, Scope),
    Ip(std::net::Ipv4Addr),
}

fn parse_name(name: &str) -> Option<Name> {
    let name = name.trim_end_matches('.');
    if let Ok(ip) = name.trim_matches(['[', ']']).parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(v4) => Some(Name::Ip(v4)),
            IpAddr::V6(_) => None,
        };
    }
    let labels: Vec<&str> = name.split('.').collect();
    let (svc, ns, scope) = match labels.as_slice() {
        [svc, ns] | [svc, ns, "svc"] => (*svc, *ns, Scope::Auto),
        [svc, ns, "svc", zone, "local"] if zone.eq_ignore_ascii_case("clusterset") => {
            (*svc, *ns, Scope::ClusterSet)
        }
        [svc, ns, "svc", zone, "local"] if zone.eq_ignore_ascii_case("cluster") => {
            (*svc, *ns, Scope::Local)
        }
        _ => return None,
    };
    let key = ServiceKey::new(&ns.to_ascii_lowercase(), &svc.to_ascii_lowercase()).ok()?;
    Some(Name::Service(key, scope))
}

/// What to ask the control plane for when a host is not in the table: its service key, or its
/// address.
pub fn subject_of_host(host: &str) -> Option<String> {
    let (name, _) = split_port(host)?;
    Some(match parse_name(name)? {
        Name::Service(key, _) => key.to_string(),
        Name::Ip(ip) => ip.to_string(),
    })
}

/// A clusterset IP (the clusterset) or a Service's cluster IP (this cluster).
fn by_ip(
    ip: std::net::Ipv4Addr,
    table: &RoutingTable,
) -> Option<(
    std::sync::Arc<fedmesh_dataplane::config::ServiceEntry>,
    Scope,
)> {
    if let Some(e) = table.by_vip.get(&ip) {
        return Some((e.clone(), Scope::ClusterSet));
    }
    table
        .by_cluster_ip
        .get(&ip)
        .map(|e| (e.clone(), Scope::Local))
}

/// A connection to `addr` (a clusterset IP or a cluster IP, and a port) as a mesh service.
pub fn from_vip(addr: SocketAddr, table: &RoutingTable) -> Option<Dest> {
    let IpAddr::V4(v4) = addr.ip() else {
        return None;
    };
    let (entry, scope) = by_ip(v4, table)?;
    entry.has_port(addr.port()).then(|| Dest {
        service: entry.key.clone(),
        port: addr.port(),
        scope,
    })
}

fn split_port(host: &str) -> Option<(&str, Option<u16>)> {
    if host.is_empty() {
        return None;
    }
    if let Some(rest) = host.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((ip, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((ip, None)),
            None => None,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((host, None)),
    }
}
