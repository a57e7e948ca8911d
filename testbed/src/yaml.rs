//! The objects a cluster's directory source reads, as YAML: a Service with one EndpointSlice per
//! endpoint (on loopback every workload has its own port), a ServiceExport, a TrafficPolicy.

use std::net::SocketAddr;

/// An endpoint of a service: the address of its sidecar's inbound listener, its zone, readiness.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub zone: String,
    pub ready: bool,
}

/// `ports`: (name, port, appProtocol or ""). Each endpoint gets a slice whose ports all point at
/// the endpoint's inbound port.
pub fn service(
    ns: &str,
    name: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[EndpointSpec],
) -> String {
    let port_list: Vec<String> = ports
        .iter()
        .map(|(n, p, app)| {
            if app.is_empty() {
                format!("{{name: {n}, port: {p}, protocol: TCP}}")
            } else {
                format!("{{name: {n}, port: {p}, protocol: TCP, appProtocol: {app}}}")
            }
        })
        .collect();
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{}]\n",
        port_list.join(", ")
    );
    for (i, e) in endpoints.iter().enumerate() {
        let slice_ports: Vec<String> = ports
            .iter()
            .map(|(n, _, _)| format!("{{name: {n}, port: {}}}", e.addr.port()))
            .collect();
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{i}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{}]\nendpoints:\n- addresses: [\"{}\"]\n  zone: \"{}\"\n  conditions: {{ready: {}}}\n",
            slice_ports.join(", "),
            e.addr.ip(),
            e.zone,
            e.ready
        ));
    }
    out
}

pub fn service_export(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: {ns}}}\n"
    )
}

/// A TrafficPolicy with a service-wide split (cluster, weight) and optional allowed callers.
pub fn traffic_policy(
    ns: &str,
    name: &str,
    split: &[(&str, u32)],
    allowed_callers: &[&str],
) -> String {
    let mut out = format!(
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n"
    );
    if !split.is_empty() {
        out.push_str("  backendRefs:\n");
        for (c, w) in split {
            out.push_str(&format!("  - {{cluster: {c}, weight: {w}}}\n"));
        }
    }
    if !allowed_callers.is_empty() {
        out.push_str("  authorization:\n    allowedCallers:\n");
        for c in allowed_callers {
            out.push_str(&format!("    - \"{c}\"\n"));
        }
    }
    if split.is_empty() && allowed_callers.is_empty() {
        out.push_str("  {}\n");
    }
    out
}
