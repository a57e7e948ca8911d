//! The objects a cluster's directory source reads, as YAML: a Service with one EndpointSlice per
//! endpoint (on loopback every workload has its own port), a ServiceExport, an HTTPRoute that
//! splits a service across clusters, a TrafficPolicy.

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

/// An HTTPRoute (named `<name>-split`) that splits the clusterset service `<ns>/<name>` across
/// clusters by weight. Its parent is the ServiceImport, so the service need not run here.
pub fn cluster_split(ns: &str, name: &str, split: &[(&str, u32)]) -> String {
    let mut out = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}-split, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: multicluster.x-k8s.io, kind: ServiceImport, name: {name}}}]\n  rules:\n  - backendRefs:\n"
    );
    for (c, w) in split {
        out.push_str(&format!(
            "    - {{group: fedmesh.io, kind: Cluster, name: {c}, weight: {w}}}\n"
        ));
    }
    out
}

/// A TrafficPolicy for service `<ns>/<name>` allowing only `allowed_callers`.
pub fn traffic_policy(ns: &str, name: &str, allowed_callers: &[&str]) -> String {
    let mut out = format!(
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  authorization:\n    allowedCallers:\n"
    );
    for c in allowed_callers {
        out.push_str(&format!("    - \"{c}\"\n"));
    }
    out
}
