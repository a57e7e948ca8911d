//! Kubernetes workload attestation, as SPIRE's k8s workload attestor does it: the caller's pid
//! (from SO_PEERCRED; the agent runs with `hostPID`) leads to its cgroup, the cgroup path names
//! the pod's UID and the container's ID, and the pods on this node (watched through the API
//! server by the agent, see `fedmesh agent --k8s-node`) give the pod's namespace, service
//! account, labels and container names. Those become `k8s:*` selectors.
//!
//! The pod index also expands entry templates (`spiffe://td/ns/{ns}/sa/{sa}`) into one entry
//! per namespace and service account present on the node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::entries::{EntryFile, RegistrationEntry, Selector};

/// What the agent knows of one pod on its node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// Started containers (init and ephemeral ones included): container ID without its runtime
    /// scheme (`containerd://`), and name.
    pub containers: Vec<(String, String)>,
}

impl PodInfo {
    /// The pod's selectors, plus `k8s:container-name` when `container_id` is one of its
    /// containers.
    pub fn selectors(&self, container_id: Option<&str>) -> BTreeSet<Selector> {
        let k = |k: &str, v: &str| Selector::K8s(k.to_string(), v.to_string());
        let mut s = BTreeSet::from([
            k("ns", &self.namespace),
            k("sa", &self.service_account),
            k("pod-name", &self.name),
            k("pod-uid", &self.uid),
        ]);
        if !self.node.is_empty() {
            s.insert(k("node-name", &self.node));
        }
        for (key, value) in &self.labels {
            s.insert(k("pod-label", &format!("{key}:{value}")));
        }
        if let Some(name) = container_id.and_then(|id| self.container_name(id)) {
            s.insert(k("container-name", name));
        }
        s
    }

    pub fn container_name(&self, id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|(cid, _)| cid == id)
            .map(|(_, n)| n.as_str())
    }
}

/// The pod and container a process runs in, read from its cgroup paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// The pod's UID with dashes (`1b4e28ba-2fa1-11d2-883f-0016d3cca427`).
    pub pod_uid: String,
    /// The container's ID (64 hex digits), when the path names one.
    pub container_id: Option<String>,
}

/// Finds the pod UID and container ID in the contents of `/proc/<pid>/cgroup`, for the layouts
/// the kubelet creates: cgroupfs (`/kubepods/burstable/pod<uid>/<id>`) and systemd
/// (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
/// cri-containerd-<id>.scope`), under cgroup v1 or v2, nested (kind's `/kubelet.slice/...`) or
/// relative to a cgroup namespace (`/../..`). `None` for a process outside any pod.
pub fn pod_from_cgroup(text: &str) -> Option<PodRef> {
    let mut found: Option<PodRef> = None;
    for line in text.lines() {
        // hierarchy-id:controllers:path; the path may itself contain ':'.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some(pod_at) = segments.iter().rposition(|s| pod_uid_in(s).is_some()) else {
            continue;
        };
        let pod_uid = pod_uid_in(segments[pod_at])?;
        let container_id = segments.get(pod_at + 1).and_then(|s| container_id_in(s));
        let this = PodRef {
            pod_uid,
            container_id,
        };
        match &found {
            // Lines disagreeing on the pod: refuse to guess.
            Some(f) if f.pod_uid != this.pod_uid => return None,
            Some(f) if f.container_id.is_some() => {}
            _ => found = Some(this),
        }
    }
    found
}

/// The pod UID in a segment like `pod<uid>` or `kubepods-besteffort-pod<uid_>.slice`.
fn pod_uid_in(segment: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = segment[from..].find("pod") {
        let start = from + i + 3;
        if let Some(candidate) = segment.get(start..start + 36)
            && is_uuid(candidate)
        {
            let rest = &segment[start + 36..];
            if rest.is_empty() || rest == ".slice" {
                return Some(candidate.replace('_', "-").to_ascii_lowercase());
            }
        }
        from = start;
    }
    None
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-' || c == '_',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The container ID in a segment like `<id>`, `cri-containerd-<id>.scope`, `crio-<id>.scope` or
/// `docker-<id>.scope` (64 hex digits). `crio-conmon-<id>` is the runtime's monitor, not the
/// container.
fn container_id_in(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    if s.contains("conmon") {
        return None;
    }
    let id = s.rsplit('-').next()?;
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The pods on this node by UID, kept current by a watcher (the agent's `--k8s-node`). Readers
/// wait on it for a pod they do not know yet.
#[derive(Clone)]
pub struct PodIndex {
    pods: watch::Sender<Arc<BTreeMap<String, Arc<PodInfo>>>>,
}

impl Default for PodIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl PodIndex {
    pub fn new() -> Self {
        Self {
            pods: watch::Sender::new(Arc::new(BTreeMap::new())),
        }
    }

    /// Replaces every pod (after a full list).
    pub fn replace(&self, pods: impl IntoIterator<Item = PodInfo>) {
        let map: BTreeMap<_, _> = pods
            .into_iter()
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        self.pods.send_if_modified(|cur| {
            let changed = **cur != map;
            if changed {
                *cur = Arc::new(map);
            }
            changed
        });
    }

    pub fn upsert(&self, pod: PodInfo) {
        self.pods.send_if_modified(|cur| {
            if cur.get(&pod.uid).is_some_and(|p| **p == pod) {
                return false;
            }
            Arc::make_mut(cur).insert(pod.uid.clone(), Arc::new(pod));
            true
        });
    }

    pub fn remove(&self, uid: &str) {
        self.pods
            .send_if_modified(|cur| Arc::make_mut(cur).remove(uid).is_some());
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.pods.borrow().get(uid).cloned()
    }

    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<PodInfo>>> {
        self.pods.borrow().clone()
    }

    /// Ticks on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<BTreeMap<String, Arc<PodInfo>>>> {
        self.pods.subscribe()
    }
}

/// The concrete entries: the file's fixed entries, and its templates expanded for every
/// namespace and service account of the pods on the node. A pod whose names do not make a valid
/// ID is skipped with a warning; duplicates are dropped.
pub fn expand_entries(
    file: &EntryFile,
    pods: &BTreeMap<String, Arc<PodInfo>>,
) -> Vec<RegistrationEntry> {
    let mut out = file.entries.clone();
    let mut seen: BTreeSet<String> = out.iter().map(|e| e.key()).collect();
    let accounts: BTreeSet<(&str, &str)> = pods
        .values()
        .map(|p| (p.namespace.as_str(), p.service_account.as_str()))
        .collect();
    for t in &file.templates {
        for (ns, sa) in &accounts {
            match t.expand(ns, sa) {
                Ok(e) => {
                    if seen.insert(e.key()) {
                        out.push(e);
                    }
                }
                Err(reason) => {
                    tracing::warn!(template = %t.spiffe_id, namespace = ns, service_account = sa, %reason, "pods of this service account get no identity from the template")
                }
            }
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error(
        "the caller runs in pod {pod_uid}, which this agent does not know after {waited:?} (check the agent's pod watch: its RBAC, its --k8s-node)"
    )]
    UnknownPod { pod_uid: String, waited: Duration },
}

/// Adds `k8s:*` selectors to callers that run in a pod on this node.
pub struct K8sAttestor {
    pods: PodIndex,
    /// Where `/proc` is (tests may point elsewhere).
    proc_root: PathBuf,
    /// How long to wait for a pod, or its container's status, to reach the index: a container
    /// can ask for its identity before the API server has told the agent it started.
    wait: Duration,
}

impl K8sAttestor {
    pub fn new(pods: PodIndex, wait: Duration) -> Self {
        Self {
            pods,
            proc_root: PathBuf::from("/proc"),
            wait,
        }
    }

    pub fn pods(&self) -> &PodIndex {
        &self.pods
    }

    /// The caller's `k8s:*` selectors: none for a process outside any pod (or whose pid this
    /// agent cannot see), the pod's for a process in a known pod. A pod that stays unknown for
    /// the wait is an error, so the caller is refused rather than given a non-pod identity.
    pub async fn selectors(&self, pid: Option<i32>) -> Result<BTreeSet<Selector>, AttestError> {
        let Some(pid) = pid.filter(|p| *p > 0) else {
            return Ok(BTreeSet::new());
        };
        let Ok(text) = std::fs::read_to_string(self.proc_root.join(format!("{pid}/cgroup"))) else {
            return Ok(BTreeSet::new());
        };
        let Some(pod) = pod_from_cgroup(&text) else {
            return Ok(BTreeSet::new());
        };
        let mut changes = self.pods.subscribe();
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let known = self.pods.get(&pod.pod_uid);
            let complete = known.as_ref().is_some_and(|p| match &pod.container_id {
                Some(id) => p.container_name(id).is_some(),
                None => true,
            });
            if complete {
                let p = known.expect("checked above");
                return Ok(p.selectors(pod.container_id.as_deref()));
            }
            let timed_out = tokio::time::timeout_at(deadline, changes.changed())
                .await
                .map_or(true, |r| r.is_err());
            if timed_out {
                return match known.or_else(|| self.pods.get(&pod.pod_uid)) {
                    // The pod, but not (yet) its container: no container-name selector.
                    Some(p) => {
                        tracing::warn!(pod = %p.name, namespace = %p.namespace, container_id = ?pod.container_id, "the caller's container is not in its pod's status; attesting without k8s:container-name");
                        Ok(p.selectors(None))
                    }
                    None => Err(AttestError::UnknownPod {
                        pod_uid: pod.pod_uid,
                        waited: self.wait,
                    }),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const CID: &str = "4c0e4d5bdc8c2a7c1b1f0c3c0a9d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d";

    #[test]
    fn cgroup_layouts_of_the_kubelet_are_understood() {
        let under = UID.replace('-', "_");
        let cases = [
            // cgroup v1, cgroupfs driver.
            format!(
                "12:pids:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n"
            ),
            // cgroup v1, systemd driver, containerd.
            format!(
                "4:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{under}.slice/cri-containerd-{CID}.scope\n"
            ),
            // cgroup v2, systemd driver, CRI-O.
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice/crio-{CID}.scope\n"
            ),
            // kind: the node's kubelet nests under kubelet.slice, seen from a cgroup namespace.
            format!(
                "0::/../../kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{under}.slice/cri-containerd-{CID}.scope\n"
            ),
            // Guaranteed QoS, docker.
            format!("0::/kubepods.slice/kubepods-pod{under}.slice/docker-{CID}.scope\n"),
        ];
        for text in cases {
            assert_eq!(
                pod_from_cgroup(&text),
                Some(PodRef {
                    pod_uid: UID.into(),
                    container_id: Some(CID.into())
                }),
                "{text}"
            );
        }
        // The pod's own cgroup (no container), or its runtime monitor: the pod, no container.
        for text in [
            format!("0::/kubepods/pod{UID}\n"),
            format!("0::/kubepods.slice/kubepods-pod{under}.slice/crio-conmon-{CID}.scope\n"),
        ] {
            assert_eq!(
                pod_from_cgroup(&text),
                Some(PodRef {
                    pod_uid: UID.into(),
                    container_id: None
                })
            );
        }
    }

    #[test]
    fn processes_outside_pods_and_odd_paths_have_no_pod() {
        let other = "2b4e28ba-2fa1-11d2-883f-0016d3cca427";
        for text in [
            "0::/\n".to_string(),
            "0::/system.slice/containerd.service\n".into(),
            "0::/user.slice/user-1000.slice/session-2.scope\n".into(),
            "0::/kubepods/podnot-a-uid/x\n".into(),
            format!("0::/kubepods/pod{UID}x/{CID}\n"),
            // Two hierarchies naming different pods: no guess.
            format!("1:pids:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{other}/{CID}\n"),
            String::new(),
            "garbage".into(),
            "\u{0}:::\n::\n".into(),
        ] {
            assert_eq!(pod_from_cgroup(&text), None, "{text:?}");
        }
    }

    fn pod(uid: &str, ns: &str, sa: &str) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("{sa}-1"),
            service_account: sa.into(),
            node: "n1".into(),
            labels: BTreeMap::from([("app".into(), sa.into())]),
            containers: vec![(CID.into(), "fedmesh-proxy".into())],
        }
    }

    #[test]
    fn templates_follow_the_pods_on_the_node() {
        let td = fedmesh_api::TrustDomain::new("east.example").unwrap();
        let file = super::super::entries::parse_entry_file(
            "entries:\n  - spiffe_id: spiffe://east.example/ns/{ns}/sa/{sa}\n    selectors: [\"k8s:container-name:fedmesh-proxy\"]\n  - spiffe_id: spiffe://east.example/gw\n    selectors: [\"unix:uid:1338\"]\n",
            std::path::Path::new("e.yaml"),
            &td,
        )
        .unwrap();
        let index = PodIndex::new();
        let ids = |index: &PodIndex| -> Vec<String> {
            expand_entries(&file, &index.snapshot())
                .iter()
                .map(|e| e.spiffe_id.to_string())
                .collect()
        };
        assert_eq!(ids(&index), ["spiffe://east.example/gw"]);
        index.replace([pod("u1", "shop", "api"), pod("u2", "shop", "api")]);
        index.upsert(pod("u3", "shop", "web"));
        // Names that make no valid ID are skipped, not fatal.
        index.upsert(pod("u4", "shop", "a%b"));
        assert_eq!(
            ids(&index),
            [
                "spiffe://east.example/gw",
                "spiffe://east.example/ns/shop/sa/api",
                "spiffe://east.example/ns/shop/sa/web"
            ]
        );
        index.remove("u3");
        assert_eq!(ids(&index).len(), 2);
        let sels = pod("u1", "shop", "api").selectors(Some(CID));
        let strs: Vec<String> = sels.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            strs,
            [
                "k8s:container-name:fedmesh-proxy",
                "k8s:node-name:n1",
                "k8s:ns:shop",
                "k8s:pod-label:app:api",
                "k8s:pod-name:api-1",
                "k8s:pod-uid:u1",
                "k8s:sa:api"
            ]
        );
    }

    #[tokio::test]
    async fn attestation_waits_for_the_pod_and_refuses_an_unknown_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("42")).unwrap();
        std::fs::write(
            dir.path().join("42/cgroup"),
            format!("0::/kubepods/pod{UID}/{CID}\n"),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("43")).unwrap();
        std::fs::write(dir.path().join("43/cgroup"), "0::/system.slice/x.service\n").unwrap();
        let index = PodIndex::new();
        let mut a = K8sAttestor::new(index.clone(), Duration::from_millis(300));
        a.proc_root = dir.path().to_path_buf();
        // Not a pod, or no pid: no k8s selectors, no error.
        assert!(a.selectors(Some(43)).await.unwrap().is_empty());
        assert!(a.selectors(None).await.unwrap().is_empty());
        assert!(a.selectors(Some(999_999)).await.unwrap().is_empty());
        // A pod the index never learns of: refused.
        let err = a.selectors(Some(42)).await.unwrap_err().to_string();
        assert!(err.contains(UID) && err.contains("RBAC"), "{err}");
        // The pod arrives while the caller waits.
        let later = index.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            later.upsert(pod(UID, "shop", "api"));
        });
        let s = a.selectors(Some(42)).await.unwrap();
        assert!(s.contains(&Selector::K8s(
            "container-name".into(),
            "fedmesh-proxy".into()
        )));
        assert!(s.contains(&Selector::K8s("sa".into(), "api".into())));
        // Its container is not in the status: the pod's selectors without the container name.
        let mut p = pod(UID, "shop", "api");
        p.containers.clear();
        index.upsert(p);
        let s = a.selectors(Some(42)).await.unwrap();
        assert!(s.contains(&Selector::K8s("ns".into(), "shop".into())));
        assert!(
            !s.iter()
                .any(|x| matches!(x, Selector::K8s(k, _) if k == "container-name"))
        );
    }
}
