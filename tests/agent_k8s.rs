//! The agent's Kubernetes attestation as it runs on a node: `fedmesh agent --k8s-node` watches
//! the node's pods through a real API server (kube-apiserver from `scripts/peers`, with fedmesh
//! installed from the kind manifests), as its own service account. No kubelet runs here, so the
//! test writes the pods' status as the kubelet would, and the callers are real processes placed
//! in real cgroups laid out as the kubelet lays them out
//! (`/kubepods/besteffort/pod<uid>/<container-id>`), asking for their SVID with the PyPI `spiffe`
//! client. Needs root and a writable cgroup hierarchy (required in CI, like the
//! network-namespace tests).

mod support;

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedmesh_test_support::kube_apiserver::KubeApiServer;
use serde_json::{Value, json};
use support::*;

const NODE: &str = "node-a";

/// Cgroups made for the test where the kubelet makes them (`<hierarchy>/kubepods/besteffort/
/// pod<uid>/<container-id>`), plus one elsewhere; all removed at the end, and only those.
struct Cgroups {
    base: PathBuf,
    created: Vec<PathBuf>,
}

impl Cgroups {
    /// A writable hierarchy: cgroup v1's pids controller, else cgroup v2 at /sys/fs/cgroup.
    fn create() -> Result<Self, String> {
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let base = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists())
            .ok_or("no cgroup hierarchy at /sys/fs/cgroup")?;
        let mut c = Self {
            base: base.to_path_buf(),
            created: Vec::new(),
        };
        c.mkdir(&base.join("kubepods/besteffort"))
            .map_err(|e| format!("{}: {e}", base.display()))?;
        Ok(c)
    }

    fn mkdir(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut d = dir;
        while !d.exists() {
            missing.push(d.to_path_buf());
            d = d.parent().expect("below the hierarchy");
        }
        for m in missing.into_iter().rev() {
            std::fs::create_dir(&m)?;
            self.created.push(m);
        }
        Ok(())
    }

    /// The cgroup of a container of a pod, as the kubelet's cgroupfs driver names it.
    fn container(&mut self, pod_uid: &str, container_id: &str) -> PathBuf {
        let dir = self
            .base
            .join("kubepods/besteffort")
            .join(format!("pod{pod_uid}"))
            .join(container_id);
        self.mkdir(&dir).unwrap();
        dir
    }

    /// The same names under a cgroup of the test's own, outside the kubelet's.
    fn lookalike(&mut self, pod_uid: &str, container_id: &str) -> PathBuf {
        let dir = self
            .base
            .join(format!("fmtest{}", std::process::id()))
            .join("kubepods/besteffort")
            .join(format!("pod{pod_uid}"))
            .join(container_id);
        self.mkdir(&dir).unwrap();
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // Deepest first; a cgroup is removed with rmdir once it has no processes.
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn skip_unavailable(why: String) {
    assert!(
        !support::netns::privileged_required(),
        "privileged tests are required here (FEDMESH_REQUIRE_NETNS) but cannot run: {why}"
    );
    eprintln!("SKIPPED: the Kubernetes attestation test needs root and a writable cgroup: {why}");
}

/// Runs the Python `spiffe` client in `cgroup` (None: the test's own cgroup) and returns its
/// JSON answer.
fn fetch_svid(socket: &Path, cgroup: Option<&Path>) -> Value {
    let mut cmd = python_with("spiffe");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/fetch_svid.py"))
        .arg(socket);
    if let Some(cg) = cgroup {
        let procs = CString::new(cg.join("cgroup.procs").to_str().unwrap()).unwrap();
        // Between fork and exec: only async-signal-safe calls (open, write, close).
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("run the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "python client printed no JSON:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A local CA in `dir` and `fedmesh agent --k8s-node NODE` with it, talking to the API server of
/// `kubeconfig`, with one template entry: each service account's identity for its pods'
/// `fedmesh-proxy` containers. Returns the agent and its socket once it serves.
fn start_k8s_agent(dir: &Path, node: &str, kubeconfig: &str, extra: &[&str]) -> (Proc, PathBuf) {
    let ca = dir.join("ca");
    ca_init(&ca, "east.example", &[]);
    std::fs::write(
        dir.join("entries.yaml"),
        "entries:\n  - spiffe_id: spiffe://east.example/ns/{ns}/sa/{sa}\n    selectors: [\"k8s:container-name:fedmesh-proxy\"]\n",
    )
    .unwrap();
    let socket = dir.join("agent.sock");
    let entries = dir.join("entries.yaml");
    let mut args = vec![
        "agent",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--entries",
        entries.to_str().unwrap(),
        "--k8s-node",
        node,
    ];
    args.extend_from_slice(extra);
    let agent = Proc::start_with_env("agent", &args, &[("KUBECONFIG", kubeconfig)], dir);
    wait_until("the agent socket", Duration::from_secs(20), || {
        socket.exists()
    });
    (agent, socket)
}

/// Creates pod `shop/NAME` of service account `sa` on `node` with `containers` (name, container
/// ID), and writes the status the kubelet would once they run. Returns the pod's uid.
fn pod(
    api: &KubeApiServer,
    name: &str,
    sa: &str,
    node: &str,
    containers: &[(&str, &str)],
) -> String {
    let specs: Vec<Value> = containers
        .iter()
        .map(|(name, _)| json!({"name": name, "image": "registry.invalid/x"}))
        .collect();
    api.apply(
        &json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": "shop"}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "namespace": "shop", "labels": {"app": sa}},
             "spec": {"nodeName": node, "serviceAccountName": sa, "containers": specs}}
        ]})
        .to_string(),
    );
    let patched = write_running_status(&api.admin_kubeconfig, name, containers);
    assert!(patched.status.success(), "{patched:?}");
    api.get("pod", "shop", name).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Writes the status the kubelet writes once pod `shop/NAME`'s `containers` (name, container ID)
/// run, through the status subresource, as the user of `kubeconfig`.
fn write_running_status(
    kubeconfig: &Path,
    name: &str,
    containers: &[(&str, &str)],
) -> std::process::Output {
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(name, id)| {
            json!({"name": name, "containerID": format!("containerd://{id}"), "image": "registry.invalid/x",
                   "imageID": "", "ready": true, "restartCount": 0, "started": true,
                   "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}})
        })
        .collect();
    let status = json!({"status": {"phase": "Running", "containerStatuses": statuses}});
    fedmesh_test_support::kube_apiserver::kubectl_with(
        kubeconfig,
        &[
            "patch",
            "pod",
            name,
            "-n",
            "shop",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
        None,
    )
}

fn cid(n: u8) -> String {
    format!("{n:x}").repeat(64)[..64].to_string()
}

#[test]
fn pods_get_their_service_accounts_identity_and_only_their_proxy_container_does() {
    let mut cgroups = match Cgroups::create() {
        Ok(c) => c,
        Err(why) => {
            skip_unavailable(why);
            return;
        }
    };
    let Some(api) = KubeApiServer::start() else {
        return;
    };
    api.install_fedmesh("east");
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    let (api_proxy, api_app, web_proxy, other_proxy, db_proxy) =
        (cid(1), cid(2), cid(3), cid(4), cid(5));
    let api_uid = pod(
        &api,
        "api-1",
        "api",
        NODE,
        &[("app", &api_app), ("fedmesh-proxy", &api_proxy)],
    );
    let web_uid = pod(&api, "web-1", "web", NODE, &[("fedmesh-proxy", &web_proxy)]);
    // On another node: this agent must not know it (the watch is limited to its node).
    let other_uid = pod(
        &api,
        "api-2",
        "api",
        "node-b",
        &[("fedmesh-proxy", &other_proxy)],
    );
    let (api_uid, web_uid, other_uid) = (api_uid.as_str(), web_uid.as_str(), other_uid.as_str());

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // What the agent's pod mounts: a token of its service account (RBAC: list/watch pods).
    let token = api.token("fedmesh-system", "fedmesh-agent", None, None);
    let kubeconfig = api.kubeconfig_for_token("agent", &token);
    let (agent, socket) = start_k8s_agent(
        d,
        NODE,
        kubeconfig.to_str().unwrap(),
        &["--k8s-attest-wait", "5s"],
    );
    let id = |v: &Value| v["spiffe_id"].as_str().map(str::to_string);

    // The proxy containers of two pods: the identities of their service accounts.
    let got = fetch_svid(&socket, Some(&cgroups.container(api_uid, &api_proxy)));
    assert_eq!(
        id(&got).as_deref(),
        Some("spiffe://east.example/ns/shop/sa/api"),
        "{got}\n{}",
        agent.log()
    );
    let got = fetch_svid(&socket, Some(&cgroups.container(web_uid, &web_proxy)));
    assert_eq!(
        id(&got).as_deref(),
        Some("spiffe://east.example/ns/shop/sa/web"),
        "{got}\n{}",
        agent.log()
    );
    // The app container of the same pod, same uid and same service account: nothing.
    let got = fetch_svid(&socket, Some(&cgroups.container(api_uid, &api_app)));
    assert!(
        got["error"]
            .as_str()
            .is_some_and(|e| e.contains("no identity issued")),
        "{got}"
    );
    // The proxy's pod and container IDs, in a cgroup made to look like the kubelet's
    // elsewhere: refused, with the reason in the log.
    let got = fetch_svid(&socket, Some(&cgroups.lookalike(api_uid, &api_proxy)));
    assert!(
        got["error"]
            .as_str()
            .is_some_and(|e| e.contains("no identity issued")),
        "refused for want of an identity, not another failure: {got}"
    );
    assert!(
        agent
            .log()
            .contains("is not a pod's as the kubelet makes them"),
        "{}",
        agent.log()
    );
    // A pod of another node, and a process in no pod: nothing.
    let got = fetch_svid(&socket, Some(&cgroups.container(other_uid, &other_proxy)));
    assert!(
        got["error"]
            .as_str()
            .is_some_and(|e| e.contains("no identity issued")),
        "refused for want of an identity, not another failure: {got}"
    );
    let got = fetch_svid(&socket, None);
    assert!(
        got["error"]
            .as_str()
            .is_some_and(|e| e.contains("no identity issued")),
        "refused for want of an identity, not another failure: {got}"
    );
    let log = agent.log();
    assert!(
        log.contains(other_uid) && log.contains("does not know"),
        "the refusal names the unknown pod:\n{log}"
    );

    // A pod scheduled while the agent runs: its container asks before the watch event arrives,
    // waits, and gets the identity of its (new) service account.
    // The pod object comes first (its uid names the cgroup); its status, with the container
    // running, only after the caller asks.
    api.apply(
        &json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "db", "namespace": "shop"}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "db-1", "namespace": "shop"},
             "spec": {"nodeName": NODE, "serviceAccountName": "db",
                      "containers": [{"name": "fedmesh-proxy", "image": "registry.invalid/x"}]}}
        ]})
        .to_string(),
    );
    let db_uid = api.get("pod", "shop", "db-1").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let db_cgroup = cgroups.container(&db_uid, &db_proxy);
    // Its status arrives once the agent says it waits for it (no sleep: the agent's own log).
    let kubectl = std::thread::spawn({
        let (kubeconfig, proxy, log) = (
            api.admin_kubeconfig.clone(),
            db_proxy.clone(),
            agent.log_path(),
        );
        let uid = db_uid.clone();
        move || {
            wait_until(
                "the agent to wait for db-1",
                Duration::from_secs(20),
                || {
                    std::fs::read_to_string(&log).is_ok_and(|l| {
                        l.lines()
                            .any(|l| l.contains("waiting for it") && l.contains(&uid))
                    })
                },
            );
            write_running_status(&kubeconfig, "db-1", &[("fedmesh-proxy", &proxy)])
        }
    });
    let got = fetch_svid(&socket, Some(&db_cgroup));
    assert_eq!(
        id(&got).as_deref(),
        Some("spiffe://east.example/ns/shop/sa/db"),
        "{got}\n{}",
        agent.log()
    );

    assert!(kubectl.join().unwrap().status.success());
    let log = agent.log();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "the agent's service account may do all it does:\n{log}"
    );
}
