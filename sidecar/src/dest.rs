//! Which mesh service a request or connection is for.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use fedmesh_api::ServiceKey;
use fedmesh_dataplane::config::RoutingTable;

/// A service port in the clusterset.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub service: ServiceKey,
    pub port: u16,
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

/// `namespace/name:port`, as given to `--listen`.
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
        Ok(Self { service, port })
    }
}

/// Reads a request's host (`Host` header or URI authority) as a mesh service:
/// `name.namespace[.svc[.clusterset.local|.cluster.local]][:port]`, or a clusterset VIP.
/// Without a port, the service's port 80 is used when it has one, otherwise its first port.
pub fn from_host(host: &str, table: &RoutingTable) -> Option<Dest> {
    let (name, port) = split_port(host)?;
    let name = name.trim_end_matches('.');
    let entry = if let Ok(ip) = name.trim_matches(['[', ']']).parse::<IpAddr>() {
        match ip {
            IpAddr::V4(v4) => table.by_vip.get(&v4)?.clone(),
            IpAddr::V6(_) => return None,
        }
    } else {
        let labels: Vec<&str> = name.split('.').collect();
        let (svc, ns) = match labels.as_slice() {
            [svc, ns] | [svc, ns, "svc"] => (*svc, *ns),
            [svc, ns, "svc", "clusterset" | "cluster", "local"] => (*svc, *ns),
            _ => return None,
        };
        let key = format!("{}/{}", ns.to_ascii_lowercase(), svc.to_ascii_lowercase());
        table.service(&key)?.clone()
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
    })
}

/// A connection to `addr` (a clusterset VIP and port) as a mesh service.
pub fn from_vip(addr: SocketAddr, table: &RoutingTable) -> Option<Dest> {
    let IpAddr::V4(v4) = addr.ip() else {
        return None;
    };
    let entry = table.by_vip.get(&v4)?;
    entry.has_port(addr.port()).then(|| Dest {
        service: entry.key.clone(),
        port: addr.port(),
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
