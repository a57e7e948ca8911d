//! A proxy's zone from its pod's node (Kubernetes): the proxy names its pod (`--node`, the pod's
//! name in injected pods) and proves its service account by its SPIFFE ID; the control plane
//! reads the pod's `spec.nodeName` and that node's `topology.kubernetes.io/zone` label — never a
//! label on the pod, which its owner could set to anything — and sends it in the proxy's
//! configuration. Nodes are cached for a few minutes (a node's zone does not change while it
//! runs pods).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fedmesh_api::SpiffeId;
use k8s_openapi::api::core::v1::{Node, Pod};

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const NODE_TTL: Duration = Duration::from_secs(300);

pub struct PodLocality {
    client: kube::Client,
    nodes: Mutex<HashMap<String, (String, Instant)>>,
}

impl PodLocality {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            nodes: Mutex::default(),
        }
    }

    /// The zone of the node running pod `pod` of the caller's namespace, when the pod runs as
    /// the caller's service account (`spiffe://TD/ns/NS/sa/SA`); `None` when unknown.
    pub async fn zone_of(&self, caller: &SpiffeId, pod: &str) -> Option<String> {
        let mut parts = caller.path().trim_start_matches('/').split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        if pod.is_empty() {
            return None;
        }
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), ns);
        let p = match pods.get_opt(pod).await {
            Ok(p) => p?,
            Err(e) => {
                tracing::debug!(namespace = ns, pod, error = %e, "cannot read the proxy's pod for its zone");
                return None;
            }
        };
        let spec = p.spec?;
        if spec.service_account_name.as_deref().unwrap_or("default") != sa {
            tracing::debug!(namespace = ns, pod, caller = %caller, "the pod does not run as the caller's service account; no zone from it");
            return None;
        }
        let node = spec.node_name?;
        if let Some((zone, at)) = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            && at.elapsed() < NODE_TTL
        {
            return Some(zone.clone());
        }
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let zone = match nodes.get_opt(&node).await {
            Ok(Some(n)) => n
                .metadata
                .labels
                .and_then(|l| l.get(ZONE_LABEL).cloned())
                .unwrap_or_default(),
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(node, error = %e, "cannot read the node for its zone");
                return None;
            }
        };
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, (zone.clone(), Instant::now()));
        Some(zone)
    }
}
