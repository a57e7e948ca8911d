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

/// What a process's cgroup paths say of its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPod {
    /// No path mentions the kubelet's cgroups: a process outside any pod.
    NotInPod,
    Pod(PodRef),
    /// A path mentions the kubelet's cgroups but not in a layout the kubelet makes: refused
    /// rather than guessed (a cgroup made to look like a pod's must not pass as one).
    Unrecognized(String),
}

/// The cgroups the kubelet nests pods under, from the root of the hierarchy down: cgroupfs
/// (`/kubepods/burstable`), systemd (`/kubepods.slice/kubepods-burstable.slice`), kind on cgroup
/// v1 (`/kubelet/kubepods`) and v2 (`/kubelet.slice/kubelet-kubepods.slice`).
const KUBELET_ANCESTORS: &[&str] = &[
    "kubelet",
    "kubepods",
    "besteffort",
    "burstable",
    "kubepods.slice",
    "kubepods-besteffort.slice",
    "kubepods-burstable.slice",
    "kubelet.slice",
    "kubelet-kubepods.slice",
    "kubelet-kubepods-besteffort.slice",
    "kubelet-kubepods-burstable.slice",
];

/// Reads the pod UID and container ID from the contents of `/proc/<pid>/cgroup`, for the
/// layouts the kubelet creates: cgroupfs (`/kubepods/burstable/pod<uid>/<id>`) and systemd
/// (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
/// cri-containerd-<id>.scope`), under cgroup v1 or v2, kind's, or seen from the agent's cgroup
/// namespace (`/../../kubepods-burstable.slice/...`). A path must run from the hierarchy's root
/// (or from above the agent's own cgroup) through the kubelet's cgroups only, to the pod and
/// at most one container below it; every hierarchy naming a pod must name the same pod and
/// container.
pub fn pod_from_cgroup(text: &str) -> CgroupPod {
    let mut found: Option<PodRef> = None;
    for line in text.lines() {
        // hierarchy-id:controllers:path; the path may itself contain ':'.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        if !path.contains("kubepods") {
            continue;
        }
        let this = match pod_in_path(path) {
            Ok(p) => p,
            Err(reason) => return CgroupPod::Unrecognized(format!("{path}: {reason}")),
        };
        match &found {
            Some(f) if *f != this => {
                return CgroupPod::Unrecognized(format!(
                    "its cgroup hierarchies disagree on its pod or container ({} / {:?} and {} / {:?})",
                    f.pod_uid, f.container_id, this.pod_uid, this.container_id
                ));
            }
            _ => found = Some(this),
        }
    }
    found.map_or(CgroupPod::NotInPod, CgroupPod::Pod)
}

fn pod_in_path(path: &str) -> Result<PodRef, String> {
    let mut segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .skip_while(|s| *s == "..")
        .peekable();
    while segments
        .next_if(|s| KUBELET_ANCESTORS.contains(s))
        .is_some()
    {}
    let pod = segments.next().ok_or("no pod cgroup below the kubelet's")?;
    let pod_uid = pod_uid_in(pod).ok_or_else(|| {
        format!("{pod:?} is not a pod's cgroup (static pods, named by a hash, are not attested)")
    })?;
    let container_id = match segments.next() {
        None => None,
        Some(c) if c.contains("conmon") => None,
        Some(c) => {
            Some(container_id_in(c).ok_or_else(|| format!("{c:?} is not a container's cgroup"))?)
        }
    };
    if let Some(extra) = segments.next() {
        return Err(format!("unexpected cgroup {extra:?} below the container"));
    }
    Ok(PodRef {
        pod_uid,
        container_id,
    })
}

/// The pod UID in a segment like `pod<uid>` or `kubepods-besteffort-pod<uid_>.slice`.
fn pod_uid_in(segment: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = segment[from..].find("pod") {
        let start = from + i + 3;
        if let Some(candidate) = segment.get(start..start + 36)
            && is_uuid(candidate)
        {
            let (before, rest) = (&segment[..start - 3], &segment[start + 36..]);
            let cgroupfs = before.is_empty() && rest.is_empty();
            let systemd = rest == ".slice" && (before.ends_with('-'));
            if cgroupfs || systemd {
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
/// service account with pods on the node. A service account whose names do not make a valid ID
/// gets none; the reasons are returned for the caller to report (once, not on every change).
/// Duplicates are dropped.
pub fn expand_entries(
    file: &EntryFile,
    pods: &BTreeMap<String, Arc<PodInfo>>,
) -> (Vec<RegistrationEntry>, BTreeSet<String>) {
    let mut out = file.entries.clone();
    let mut problems = BTreeSet::new();
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
                    problems.insert(format!("{}: {ns}/{sa}: {reason}", t.spiffe_id));
                }
            }
        }
    }
    (out, problems)
}

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error(
        "the caller runs in pod {pod_uid}, which this agent does not know after {waited:?} (check the agent's pod watch: its RBAC, its --k8s-node)"
    )]
    UnknownPod { pod_uid: String, waited: Duration },
    #[error(
        "the caller's pid is not visible to the agent: it runs in another PID namespace (run the agent in the host's, hostPID: true)"
    )]
    NoPid,
    #[error("cannot read /proc/{pid}/cgroup: {reason}")]
    Unreadable { pid: i32, reason: String },
    #[error("the caller's cgroup is not a pod's as the kubelet makes them: {0}")]
    Unrecognized(String),
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

    /// The caller's `k8s:*` selectors: none for a process outside any pod, the pod's for a
    /// process in a known pod. Anything unsure is an error, so the caller is refused rather than
    /// taken for a process outside any pod: a pid the agent cannot see (no hostPID), a cgroup it
    /// cannot read or that looks like the kubelet's without being a pod's, a pod that stays
    /// unknown for the wait.
    pub async fn selectors(&self, pid: Option<i32>) -> Result<BTreeSet<Selector>, AttestError> {
        let pid = pid.filter(|p| *p > 0).ok_or(AttestError::NoPid)?;
        let text =
            std::fs::read_to_string(self.proc_root.join(format!("{pid}/cgroup"))).map_err(|e| {
                AttestError::Unreadable {
                    pid,
                    reason: e.to_string(),
                }
            })?;
        let pod = match pod_from_cgroup(&text) {
            CgroupPod::NotInPod => return Ok(BTreeSet::new()),
            CgroupPod::Unrecognized(reason) => return Err(AttestError::Unrecognized(reason)),
            CgroupPod::Pod(pod) => pod,
        };
        let mut changes = self.pods.subscribe();
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut waiting = false;
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
            if !waiting {
                waiting = true;
                tracing::info!(pod_uid = %pod.pod_uid, container_id = ?pod.container_id, known = known.is_some(), wait = ?self.wait, "the caller's pod or container is not in the pod watch yet; waiting for it");
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

    fn pod_ref(container: Option<&str>) -> CgroupPod {
        CgroupPod::Pod(PodRef {
            pod_uid: UID.into(),
            container_id: container.map(str::to_string),
        })
    }

    #[test]
    fn cgroup_layouts_of_the_kubelet_are_understood() {
        let under = UID.replace('-', "_");
        let cases = [
            // cgroup v1, cgroupfs driver: every hierarchy names the container.
            format!(
                "12:pids:/kubepods/burstable/pod{UID}/{CID}\n11:rdma:/\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n"
            ),
            // cgroup v1, systemd driver, containerd.
            format!(
                "4:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{under}.slice/cri-containerd-{CID}.scope\n"
            ),
            // cgroup v2, systemd driver, CRI-O.
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice/crio-{CID}.scope\n"
            ),
            // kind on cgroup v2, seen from the agent's cgroup namespace.
            format!(
                "0::/../../kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{under}.slice/cri-containerd-{CID}.scope\n"
            ),
            format!("0::/../../kubepods-besteffort-pod{under}.slice/cri-containerd-{CID}.scope\n"),
            // kind on cgroup v1 (cgroup root /kubelet); Guaranteed QoS with docker.
            format!("3:cpu:/kubelet/kubepods/besteffort/pod{UID}/{CID}\n"),
            format!("0::/kubepods.slice/kubepods-pod{under}.slice/docker-{CID}.scope\n"),
        ];
        for text in cases {
            assert_eq!(pod_from_cgroup(&text), pod_ref(Some(CID)), "{text}");
        }
        // The pod's own cgroup (no container), or its runtime monitor: the pod, no container.
        for text in [
            format!("0::/kubepods/pod{UID}\n"),
            format!("0::/kubepods.slice/kubepods-pod{under}.slice/crio-conmon-{CID}.scope\n"),
        ] {
            assert_eq!(pod_from_cgroup(&text), pod_ref(None), "{text}");
        }
    }

    #[test]
    fn processes_outside_pods_have_no_pod() {
        for text in [
            "0::/\n",
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "",
            "garbage",
            "\u{0}:::\n::\n",
        ] {
            assert_eq!(pod_from_cgroup(text), CgroupPod::NotInPod, "{text:?}");
        }
    }

    #[test]
    fn cgroups_made_to_look_like_a_pods_are_refused() {
        let other = "2b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let cases = [
            // A pod's path under a cgroup a user or a container may create.
            format!("0::/user.slice/user-1000.slice/kubepods/besteffort/pod{UID}/{CID}\n"),
            format!("0::/fmtest1/kubepods/pod{UID}/{CID}\n"),
            format!("0::/kubepods/pod{UID}/{CID}/nested\n"),
            format!("0::/kubepods/burstable/pod{UID}/evil/{CID}\n"),
            format!("0::/kubepods/xpod{UID}/{CID}\n"),
            format!("0::/kubepods/pod{UID}x/{CID}\n"),
            "0::/kubepods/podnot-a-uid/x\n".into(),
            // A static pod: its cgroup is named by a hash, not the mirror pod's UID.
            "0::/kubepods/besteffort/pod0123456789abcdef0123456789abcdef/x\n".into(),
            // Hierarchies naming different pods, or different containers of one pod.
            format!("1:pids:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{other}/{CID}\n"),
            format!(
                "1:pids:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{UID}/{}\n",
                "a".repeat(64)
            ),
        ];
        for text in cases {
            assert!(
                matches!(pod_from_cgroup(&text), CgroupPod::Unrecognized(_)),
                "{text}: {:?}",
                pod_from_cgroup(&text)
            );
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
                .0
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
        // Not in a pod: no k8s selectors, no error.
        assert!(a.selectors(Some(43)).await.unwrap().is_empty());
        // A pid the agent cannot see, or whose cgroup it cannot read: refused, not "no pod".
        let err = a.selectors(None).await.unwrap_err().to_string();
        assert!(err.contains("hostPID"), "{err}");
        let err = a.selectors(Some(999_999)).await.unwrap_err().to_string();
        assert!(err.contains("/proc/999999/cgroup"), "{err}");
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
