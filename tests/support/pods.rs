//! What a pod's app does in the network-namespace tests: publish and export a service,
//! resolve clusterset names with the cluster's DNS, and call through its sidecar.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fedmesh_testbed::apps::EchoResponse;
use fedmesh_testbed::yaml::{self, EndpointSpec};

use super::netns::{ClusterNet, Pod, http_get_with, in_ns};

/// Publishes `shop/<name>` in `c` with these pods as endpoints, port 80 → 8080, and exports it.
pub fn export(c: &ClusterNet, name: &str, pods: &[(&Pod, &str)]) {
    let eps: Vec<EndpointSpec> = pods
        .iter()
        .map(|(p, zone)| EndpointSpec {
            addr: p.app_addr(),
            zone: zone.to_string(),
            ready: true,
        })
        .collect();
    c.write(
        &format!("{name}.yaml"),
        &yaml::service("shop", name, &[("http", 80, "http")], &eps),
    );
    c.write(
        &format!("{name}-export.yaml"),
        &yaml::service_export("shop", name),
    );
}

/// Resolves a clusterset name with the cluster's DNS, from inside the pod's namespace.
pub fn resolve(pod: &Pod, dns: SocketAddr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let name = name.to_string();
    in_ns(&pod.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(fedmesh_test_support::dns_a(dns, &name))
    })
}

/// The clusterset IP of `shop/<svc>` as the pod's DNS answers it, once it is there.
pub fn clusterset_ip(pod: &Pod, c: &ClusterNet, svc: &str) -> Ipv4Addr {
    let name = format!("{svc}.shop.svc.clusterset.local.");
    let start = Instant::now();
    loop {
        match resolve(pod, c.dns(), &name) {
            Ok(ips) if !ips.is_empty() => return ips[0],
            r => assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} never resolved in {}: {r:?}",
                c.name
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One request from inside the pod, as its app would make it: to the service's clusterset IP,
/// intercepted by iptables and sent on by the sidecar.
pub fn call(pod: &Pod, ip: Ipv4Addr, host: &str) -> Result<EchoResponse, String> {
    call_with(pod, ip, host, "/", &[])
}

/// [`call`] of `path` with more request headers.
pub fn call_with(
    pod: &Pod,
    ip: Ipv4Addr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<EchoResponse, String> {
    let host = host.to_string();
    let path = path.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    in_ns(&pod.ns, move || {
        let (status, body) = http_get_with(SocketAddr::from((ip, 80)), &path, &host, &headers)
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("status {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    })
}

/// Calls until one answers from `cluster` (the route may still be converging).
pub fn wait_answer_from(pod: &Pod, ip: Ipv4Addr, host: &str, cluster: &str) -> EchoResponse {
    let start = Instant::now();
    loop {
        let r = call(pod, ip, host);
        if let Ok(e) = &r
            && e.cluster == cluster
        {
            return e.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no answer from {cluster} for {host}: last {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
