//! Which service accounts run on which node, from the control plane's own watch of the pods
//! (Kubernetes source). Node-bound issuance ([`crate::control_plane::nodes`]) reads it: an agent
//! gets `spiffe://<td>/ns/<ns>/sa/<sa>` only while such a pod is scheduled on its node and has not
//! finished. RBAC: list and watch pods, cluster-wide.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control_plane::nodes::{NodePods, NodePodsWatch};

/// A pod's (node, namespace, service account), if it is scheduled and has not finished.
fn placement(pod: &Pod) -> Option<(String, String, String)> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if finished || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    Some((
        node,
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        spec.service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
    ))
}

fn index(pods: &HashMap<String, (String, String, String)>) -> NodePods {
    let mut out = NodePods::new();
    for (node, ns, sa) in pods.values() {
        out.entry(node.clone())
            .or_default()
            .insert((ns.clone(), sa.clone()));
    }
    out
}

/// Starts watching every pod; the index is empty (every pod-based request refused) until the
/// first list completes. A failed watch is retried with backoff and the last index is kept.
pub fn start(client: kube::Client, shutdown: CancellationToken) -> NodePodsWatch {
    let (tx, rx) = watch::channel(Arc::new(NodePods::new()));
    let api: Api<Pod> = Api::all(client);
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut pods: HashMap<String, (String, String, String)> = HashMap::new();
        let mut listing: HashMap<String, (String, String, String)> = HashMap::new();
        let mut listed = false;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = events.next() => e,
            };
            let uid = |p: &Pod| p.metadata.uid.clone().unwrap_or_default();
            match event {
                None => return,
                Some(Ok(Event::Init)) => listing.clear(),
                Some(Ok(Event::InitApply(pod))) => {
                    if let Some(p) = placement(&pod) {
                        listing.insert(uid(&pod), p);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    pods = std::mem::take(&mut listing);
                    listed = true;
                    tracing::info!(
                        pods = pods.len(),
                        "listed the pods: agents get the identities of their nodes' pods"
                    );
                }
                Some(Ok(Event::Apply(pod))) => match placement(&pod) {
                    Some(p) => {
                        pods.insert(uid(&pod), p);
                    }
                    None => {
                        pods.remove(&uid(&pod));
                    }
                },
                Some(Ok(Event::Delete(pod))) => {
                    pods.remove(&uid(&pod));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching pods failed; retrying with the last known pods (may the control plane list and watch pods?)");
                    continue;
                }
            }
            if listed {
                let next = index(&pods);
                tx.send_if_modified(|cur| {
                    if **cur == next {
                        false
                    } else {
                        *cur = Arc::new(next);
                        true
                    }
                });
            }
        }
    });
    rx
}
