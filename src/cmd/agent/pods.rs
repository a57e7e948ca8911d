//! The pods on this node, watched through the API server for the Kubernetes attestor
//! (`fedmesh agent --k8s-node`). Needs `list` and `watch` on pods (a ClusterRole; the field
//! selector keeps it to this node's pods).

use fedmesh_trust::workload::{PodIndex, PodInfo};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

/// Keeps `index` equal to the pods bound to `node` until `shutdown`. A failed watch is retried
/// with backoff; the last known pods are kept meanwhile.
pub async fn watch(client: Client, node: String, index: PodIndex, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut listing: Vec<PodInfo> = Vec::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Ok(Event::Init)) => listing.clear(),
            Some(Ok(Event::InitApply(pod))) => listing.extend(pod_info(&pod, &node)),
            Some(Ok(Event::InitDone)) => {
                if listing.is_empty() {
                    tracing::warn!(node = %node, "no running pods are bound to this node: is --k8s-node the node's name (spec.nodeName)?");
                } else {
                    tracing::info!(node = %node, pods = listing.len(), "listed the pods on this node");
                }
                index.replace(std::mem::take(&mut listing));
            }
            Some(Ok(Event::Apply(pod))) => match pod_info(&pod, &node) {
                Some(info) => index.upsert(info),
                // Finished, or not (any longer) on this node.
                None => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        index.remove(uid);
                    }
                }
            },
            Some(Ok(Event::Delete(pod))) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    index.remove(uid);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(node = %node, error = %e, "watching this node's pods failed; retrying, the last known pods are kept (does the agent's service account may list and watch pods?)")
            }
        }
    }
}

/// What the attestor needs of a pod bound to `node` that has not finished; `None` for any other
/// (a pod another node runs, should a server ignore the field selector; a pod that Succeeded
/// or Failed, whose service account must not keep an identity here for it; a pod without a UID).
pub fn pod_info(pod: &Pod, node: &str) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if spec.and_then(|s| s.node_name.as_deref()) != Some(node) {
        return None;
    }
    if status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed")
    {
        return None;
    }
    let containers = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .chain(s.ephemeral_container_statuses.iter().flatten())
        })
        .filter_map(|c| {
            // "containerd://<id>", "cri-o://<id>", "docker://<id>"
            let id = c.container_id.as_deref()?;
            let id = id.rsplit_once("://").map_or(id, |(_, id)| id);
            Some((id.to_ascii_lowercase(), c.name.clone()))
        })
        .collect();
    Some(PodInfo {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        containers,
    })
}
