//! The control plane's protobuf services compiled into the typed [`RoutingTable`], once per
//! update and off the data path (as ztunnel turns its xDS protos into `state/` types): names
//! parsed into `ClusterName`/`TrustDomain`/`ServiceKey`, addresses into `SocketAddr`, targets
//! carrying their SNI and server name, policies into [`Policy`]. An update that does not compile
//! is refused whole (NACKed) and the table in force stays: a half-understood policy must not
//! route traffic somewhere else.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};

use super::table::{AppProtocol, LocalCluster, PortSpec, RoutingTable, ServiceEntry};
use crate::policy::{HashKey, LoadBalancing, Policy};
use crate::sni::MeshSni;
use crate::target::Target;

fn local_cluster(c: &pb::LocalCluster) -> Result<Option<LocalCluster>, String> {
    if c.name.is_empty() {
        return Ok(None);
    }
    Ok(Some(LocalCluster {
        name: ClusterName::new(&c.name).map_err(|e| format!("cluster {:?}: {e}", c.name))?,
        trust_domain: TrustDomain::new(&c.trust_domain)
            .map_err(|e| format!("trust domain {:?}: {e}", c.trust_domain))?,
        region: c.region.clone(),
        zone: c.zone.clone(),
    }))
}

/// The port of endpoint `e` that serves service port `port` (matched by port name, or the
/// endpoint's only port, or the service port itself).
fn target_port(svc: &pb::Service, e: &pb::Endpoint, port: u32) -> u32 {
    let name = svc
        .ports
        .iter()
        .find(|p| p.port == port)
        .map(|p| p.name.as_str());
    e.ports
        .iter()
        .find(|p| Some(p.name.as_str()) == name)
        .or_else(|| (e.ports.len() == 1).then(|| &e.ports[0]))
        .map(|p| p.port)
        .unwrap_or(port)
}

fn endpoint_addr(svc: &pb::Service, e: &pb::Endpoint, port: u32) -> Option<SocketAddr> {
    let ip: IpAddr = e.address.parse().ok()?;
    let p = u16::try_from(target_port(svc, e, port)).ok()?;
    Some(SocketAddr::new(ip, p))
}

fn compile_service(
    key: &ServiceKey,
    svc: &pb::Service,
    here: &LocalCluster,
) -> Result<ServiceEntry, String> {
    let ports = svc
        .ports
        .iter()
        .map(|p| {
            Ok(PortSpec {
                port: u16::try_from(p.port)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("port {} is not in 1..65535", p.port))?,
                name: p.name.clone(),
                protocol: AppProtocol::of(&p.name, &p.app_protocol),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let remotes = svc
        .remote
        .iter()
        .map(|r| {
            Ok((
                ClusterName::new(&r.cluster)
                    .map_err(|e| format!("cluster {:?}: {e}", r.cluster))?,
                TrustDomain::new(&r.trust_domain)
                    .map_err(|e| format!("trust domain {:?}: {e}", r.trust_domain))?,
                r,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut targets = HashMap::new();
    let mut local_targets = HashMap::new();
    let mut served = HashMap::new();
    for p in &ports {
        let here_sni = MeshSni::new(p.port, key.clone(), here.name.clone());
        let mut addrs = HashSet::new();
        let mut local = Vec::new();
        for e in &svc.endpoints {
            // An endpoint given by host name cannot be an inbound address; it is skipped.
            let Some(addr) = endpoint_addr(svc, e, u32::from(p.port)) else {
                continue;
            };
            addrs.insert(addr);
            if e.ready {
                local.push(Target::local(
                    addr,
                    &e.zone,
                    here.name.clone(),
                    here.trust_domain.clone(),
                    here_sni.clone(),
                ));
            }
        }
        // A Service that is not exported is not part of the clusterset service, even with the
        // same name.
        let mut all = if svc.exported {
            local.clone()
        } else {
            Vec::new()
        };
        for (cluster, td, r) in remotes.iter().filter(|(_, _, r)| r.ready > 0) {
            let sni = MeshSni::new(p.port, key.clone(), cluster.clone());
            for g in &r.gateways {
                all.push(Target::remote(
                    cluster.clone(),
                    td.clone(),
                    &r.region,
                    g,
                    sni.clone(),
                ));
            }
        }
        served.insert(p.port, addrs);
        local_targets.insert(p.port, Arc::from(local));
        targets.insert(p.port, Arc::from(all));
    }
    let mut policy = match &svc.policy {
        Some(p) => Policy::try_from(p)?,
        None => Policy::default(),
    };
    // `sessionAffinity: ClientIP` on the Service (or its ServiceImport): each caller sticks to
    // one endpoint, unless a policy chose how to balance.
    let balances = svc
        .policy
        .as_ref()
        .is_some_and(|p| p.load_balancer.is_some());
    if svc.session_affinity == "ClientIP" && !balances {
        policy.load_balancing = LoadBalancing::ConsistentHash(HashKey::SourceIdentity);
    }
    Ok(ServiceEntry {
        key: key.clone(),
        svc: svc.clone(),
        ports,
        targets,
        local_targets,
        served,
        policy: Arc::new(policy),
        exported: svc.exported,
        in_clusterset: svc.in_clusterset,
    })
}

/// Compiles a whole configuration. `Err` names the service and what is wrong with it.
pub fn compile(
    epoch: u64,
    version: u64,
    cluster: &pb::LocalCluster,
    services: &HashMap<String, pb::Service>,
) -> Result<RoutingTable, String> {
    let local = local_cluster(cluster)?;
    let mut table = RoutingTable {
        epoch,
        version,
        cluster: cluster.clone(),
        local: local.clone(),
        ..Default::default()
    };
    for p in &cluster.peers {
        if let (Ok(td), Ok(name)) = (
            TrustDomain::new(&p.trust_domain),
            ClusterName::new(&p.cluster),
        ) {
            table.cluster_of.insert(td, name);
        }
    }
    // Before the control plane says which cluster this is, nothing can be routed.
    let Some(here) = local else {
        return Ok(table);
    };
    table
        .cluster_of
        .insert(here.trust_domain.clone(), here.name.clone());
    for (k, svc) in services {
        let key: ServiceKey = k.parse().map_err(|e| format!("service {k:?}: {e}"))?;
        let entry =
            Arc::new(compile_service(&key, svc, &here).map_err(|e| format!("service {k}: {e}"))?);
        if let Ok(ip) = svc.vip.parse::<Ipv4Addr>() {
            table.by_vip.insert(ip, entry.clone());
        }
        if let Ok(ip) = svc.cluster_ip.parse::<Ipv4Addr>() {
            table.by_cluster_ip.insert(ip, entry.clone());
        }
        table.services.insert(key, entry);
    }
    // By key, so an address two services share always maps to the same one.
    let mut keys: Vec<&ServiceKey> = table.services.keys().collect();
    keys.sort();
    let mut by_endpoint = HashMap::new();
    for k in keys {
        let entry = &table.services[k];
        let mut ports: Vec<(&u16, &Arc<[Target]>)> = entry.local_targets.iter().collect();
        ports.sort_by_key(|(p, _)| **p);
        for (_, targets) in ports {
            for t in targets.iter() {
                if let Some(addr) = t.addr() {
                    by_endpoint
                        .entry(addr)
                        .or_insert_with(|| (entry.clone(), t.clone()));
                }
            }
        }
    }
    table.endpoint_ips = by_endpoint
        .keys()
        .filter_map(|a: &std::net::SocketAddr| match a.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    table.by_endpoint = by_endpoint;
    table.permissive = table.services.values().any(|e| e.policy.permissive);
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> pb::LocalCluster {
        pb::LocalCluster {
            name: "east".into(),
            trust_domain: "east.example".into(),
            region: "us-east".into(),
            zone: String::new(),
            peers: vec![pb::Peer {
                cluster: "west".into(),
                trust_domain: "west.example".into(),
                region: "us-west".into(),
            }],
        }
    }

    fn web() -> pb::Service {
        pb::Service {
            key: "shop/web".into(),
            vip: "240.240.0.5".into(),
            ports: vec![pb::Port {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 80,
                app_protocol: String::new(),
            }],
            exported: true,
            endpoints: vec![
                pb::Endpoint {
                    address: "10.0.0.1".into(),
                    zone: "a".into(),
                    ready: true,
                    ports: vec![pb::NamedPort {
                        name: "http".into(),
                        port: 8080,
                    }],
                    ..Default::default()
                },
                pb::Endpoint {
                    address: "10.0.0.2".into(),
                    zone: "b".into(),
                    ready: false,
                    ports: vec![pb::NamedPort {
                        name: "http".into(),
                        port: 8080,
                    }],
                    ..Default::default()
                },
            ],
            remote: vec![pb::RemoteCluster {
                cluster: "west".into(),
                trust_domain: "west.example".into(),
                region: "us-west".into(),
                gateways: vec!["gw.west.example:15443".into()],
                ready: 2,
                ..Default::default()
            }],
            in_clusterset: true,
            ..Default::default()
        }
    }

    #[test]
    fn targets_carry_their_address_sni_and_trust_domain() {
        let services = [("shop/web".to_string(), web())].into();
        let t = compile(1, 2, &cluster(), &services).unwrap();
        let key: ServiceKey = "shop/web".parse().unwrap();
        let e = t.service(&key).unwrap();
        let local = e.local_targets(80);
        assert_eq!(local.len(), 1, "the ready endpoint only");
        assert_eq!(local[0].key(), "10.0.0.1:8080");
        assert_eq!(local[0].sni().to_string(), "p80.web.shop.east.fedmesh");
        assert_eq!(local[0].trust_domain().as_str(), "east.example");
        let all = e.targets(80);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].key(), "west@gw.west.example:15443");
        assert_eq!(all[1].sni().to_string(), "p80.web.shop.west.fedmesh");
        assert_eq!(all[1].trust_domain().as_str(), "west.example");
        assert!(
            e.serves(80, "10.0.0.2:8080".parse().unwrap()),
            "not ready, still served here"
        );
        assert!(!e.serves(80, "10.0.0.3:8080".parse().unwrap()));
        assert_eq!(t.by_vip.len(), 1);
        assert_eq!(
            t.cluster_of[&TrustDomain::new("west.example").unwrap()].as_str(),
            "west"
        );
    }

    #[test]
    fn a_proxys_own_zone_wins_over_the_one_its_control_plane_sends() {
        let services = [("shop/web".to_string(), web())].into();
        let t = compile(1, 2, &cluster(), &services).unwrap();
        assert_eq!(t.zone(""), "", "none known");
        let sent = pb::LocalCluster {
            zone: "us-east-1a".into(),
            ..cluster()
        };
        let t = compile(1, 2, &sent, &services).unwrap();
        assert_eq!(
            t.zone(""),
            "us-east-1a",
            "its pod's node's, from the control plane"
        );
        assert_eq!(t.zone("us-east-1b"), "us-east-1b", "its own --zone first");
    }

    #[test]
    fn a_service_that_does_not_compile_refuses_the_update_and_names_it() {
        let mut bad = web();
        bad.remote[0].cluster = "Bad_Name".into();
        let services = [("shop/web".to_string(), bad)].into();
        let err = compile(1, 2, &cluster(), &services).unwrap_err();
        assert!(
            err.contains("service shop/web") && err.contains("Bad_Name"),
            "{err}"
        );
        let mut bad = web();
        bad.policy = Some(pb::TrafficPolicy {
            allowed_callers: vec!["not an id".into()],
            ..Default::default()
        });
        let services = [("shop/web".to_string(), bad)].into();
        assert!(compile(1, 2, &cluster(), &services).is_err());
    }
}
