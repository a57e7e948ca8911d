//! Sidecar injection, shared by `fedmesh inject` (YAML in, YAML out, like `linkerd inject`) and
//! the control plane's mutating admission webhook ([`webhook`]). Every Deployment, StatefulSet,
//! DaemonSet (and, through the webhook, bare Pod) gets
//!
//! - an init container `fedmesh-init` that installs the iptables interception
//!   (`fedmesh iptables`, NET_ADMIN and NET_RAW, nothing else), and
//! - a container `fedmesh-proxy` running `fedmesh sidecar --transparent` as uid 1337 (the uid the
//!   rules exempt), with the node agent's Workload API socket mounted read-only. The agent gives
//!   it the identity of the pod's service account (it selects the container by name).
//!
//! Injecting twice gives the same output as injecting once (the fedmesh parts are replaced, not
//! added again); `fedmesh.io/inject: disabled` on a pod template leaves it alone. Other objects
//! pass through unchanged. Output keys are sorted, as `kubectl get -o yaml` prints them.

use anyhow::{Context, bail};
use serde_json::{Value, json};

pub mod webhook;

pub const PROXY: &str = "fedmesh-proxy";
pub const INIT: &str = "fedmesh-init";
/// Where the image keeps `fedmesh-proxy` (deploy/multicluster/Dockerfile).
const PROXY_BIN: &str = "/usr/local/bin/fedmesh-proxy";
const SOCKET_VOLUME: &str = "fedmesh-agent-socket";
const ANNOTATION: &str = "fedmesh.io/inject";
const KINDS: [&str; 3] = ["Deployment", "StatefulSet", "DaemonSet"];

/// What the injected parts need to know.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    /// The fedmesh image for the sidecar and the init container.
    pub image: String,
    /// The cluster's control plane, as the sidecar reaches it.
    pub control_plane: String,
    /// The uid the sidecar runs as (exempt from interception).
    pub proxy_uid: u32,
    /// The sidecar's admin port (/metrics, /healthz, /readyz); not intercepted.
    pub admin_port: u16,
    /// The host directory holding the node agent's Workload API socket (`agent.sock`).
    pub agent_socket_dir: String,
    /// Run the sidecar as a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes 1.29+): it starts before the app's containers and stops after them.
    pub native_sidecar: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            image: "fedmesh:dev".into(),
            control_plane: "fedmesh-control-plane.fedmesh-system.svc.cluster.local:15012".into(),
            proxy_uid: 1337,
            admin_port: 15020,
            agent_socket_dir: "/run/fedmesh".into(),
            native_sidecar: false,
        }
    }
}

/// Injects every document of `text`; the YAML to print.
pub fn inject(text: &str, a: &InjectOptions) -> anyhow::Result<String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| anyhow::anyhow!("the input is not valid YAML: {e}"))?;
    let mut out = String::new();
    let mut injected = 0;
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        if !doc.is_object() {
            bail!(
                "document {} is not a Kubernetes object (a mapping with apiVersion and kind)",
                i + 1
            );
        }
        injected += inject_object(&mut doc, a).with_context(|| format!("document {}", i + 1))?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(&doc).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    if injected == 0 {
        tracing::warn!("no Pod, Deployment, StatefulSet or DaemonSet found to inject");
    }
    Ok(out)
}

/// Injects one object (recursing into a `List`); how many pod templates were injected.
pub fn inject_object(doc: &mut Value, a: &InjectOptions) -> anyhow::Result<usize> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    if kind == "List" || kind.ends_with("List") {
        let mut n = 0;
        if let Some(items) = doc["items"].as_array_mut() {
            for it in items {
                n += inject_object(it, a)?;
            }
        }
        return Ok(n);
    }
    let name = doc["metadata"]["name"]
        .as_str()
        .or_else(|| doc["metadata"]["generateName"].as_str())
        .unwrap_or("?")
        .to_string();
    let what = format!("{kind} {name}");
    let template = if kind == "Pod" {
        doc
    } else if KINDS.contains(&kind.as_str()) {
        doc.pointer_mut("/spec/template")
            .filter(|t| t.is_object())
            .with_context(|| format!("{what} has no spec.template"))?
    } else {
        return Ok(0);
    };
    Ok(usize::from(inject_pod(template, &what, a)?))
}

/// Injects a pod, or a pod template (`metadata` and `spec`); whether it did (a pod annotated
/// `fedmesh.io/inject: disabled` is left alone).
pub fn inject_pod(template: &mut Value, what: &str, a: &InjectOptions) -> anyhow::Result<bool> {
    let annotations = &template["metadata"]["annotations"];
    if annotations[ANNOTATION] == "disabled" {
        return Ok(false);
    }
    let pod = template
        .get_mut("spec")
        .filter(|s| s.is_object())
        .with_context(|| format!("{what} has no pod spec"))?;
    if pod["hostNetwork"] == true {
        bail!(
            "{what} uses hostNetwork: interception would capture the node's traffic; \
             annotate it (a pod template, or the pod) with {ANNOTATION}: disabled"
        );
    }
    let containers = pod["containers"]
        .as_array()
        .with_context(|| format!("{what} has no containers"))?;
    if containers.iter().all(|c| c["name"] == PROXY) {
        bail!("{what} has no app container");
    }
    if containers
        .iter()
        .any(|c| c["name"] != PROXY && c["securityContext"]["runAsUser"] == a.proxy_uid)
    {
        bail!(
            "{what} runs an app container as uid {}, the sidecar's uid: its traffic would \
             bypass the mesh; choose another --proxy-uid",
            a.proxy_uid
        );
    }
    upsert(pod, "initContainers", init_container(a));
    if a.native_sidecar {
        // After the iptables init container: the interception is in place before it starts.
        remove(pod, "containers", PROXY);
        let mut proxy = proxy_container(a);
        proxy["restartPolicy"] = json!("Always");
        upsert(pod, "initContainers", proxy);
    } else {
        remove(pod, "initContainers", PROXY);
        upsert(pod, "containers", proxy_container(a));
    }
    upsert(
        pod,
        "volumes",
        json!({
            "name": SOCKET_VOLUME,
            "hostPath": {"path": a.agent_socket_dir, "type": "Directory"},
        }),
    );
    let meta = template
        .as_object_mut()
        .expect("template is an object")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let ann = meta
        .as_object_mut()
        .with_context(|| format!("{what}: its metadata is not a mapping"))?
        .entry("annotations")
        .or_insert_with(|| json!({}));
    ann.as_object_mut()
        .with_context(|| format!("{what}: annotations are not a mapping"))?
        .insert(ANNOTATION.into(), json!("injected"));
    Ok(true)
}

/// Removes the element named `name` from the array `pod[field]`, if there.
fn remove(pod: &mut Value, field: &str, name: &str) {
    if let Some(arr) = pod[field].as_array_mut() {
        arr.retain(|x| x["name"] != name);
    }
}

/// Puts `item` into the array `pod[field]`, replacing an element of the same name.
fn upsert(pod: &mut Value, field: &str, item: Value) {
    let obj = pod.as_object_mut().expect("pod spec is an object");
    let arr = obj.entry(field).or_insert_with(|| json!([]));
    if !arr.is_array() {
        *arr = json!([]);
    }
    let arr = arr.as_array_mut().expect("just made an array");
    match arr.iter_mut().find(|x| x["name"] == item["name"]) {
        Some(x) => *x = item,
        None => arr.push(item),
    }
}

fn init_container(a: &InjectOptions) -> Value {
    json!({
        "name": INIT,
        "image": a.image,
        "args": [
            "iptables",
            "--proxy-uid", a.proxy_uid.to_string(),
            "--exclude-inbound-ports", a.admin_port.to_string(),
        ],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
    })
}

fn proxy_container(a: &InjectOptions) -> Value {
    let socket = format!("{}/agent.sock", a.agent_socket_dir.trim_end_matches('/'));
    let probe =
        |path: &str| json!({"httpGet": {"path": path, "port": a.admin_port}, "periodSeconds": 5});
    json!({
        "name": PROXY,
        "image": a.image,
        // The data plane's own binary: a third the size of `fedmesh`, fewer pages in memory.
        "command": [PROXY_BIN],
        "args": ["sidecar", "--transparent", "--admin", format!("0.0.0.0:{}", a.admin_port)],
        "env": [
            {"name": "FEDMESH_CONTROL_PLANE", "value": a.control_plane},
            {"name": "SPIFFE_ENDPOINT_SOCKET", "value": format!("unix:{socket}")},
            // The pod's name: the control plane reads the pod's node and sends the sidecar
            // that node's zone (never a label on the pod, which its owner could set).
            {"name": "FEDMESH_NODE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "K8S_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "K8S_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            // The proxy's spans carry the pod and node they come from (OpenTelemetry's k8s.*).
            {"name": "OTEL_RESOURCE_ATTRIBUTES", "value":
                "k8s.pod.name=$(FEDMESH_NODE),k8s.pod.uid=$(K8S_POD_UID),k8s.node.name=$(K8S_NODE_NAME)"},
        ],
        "ports": [{"name": "fedmesh-admin", "containerPort": a.admin_port}],
        "readinessProbe": probe("/readyz"),
        "livenessProbe": probe("/healthz"),
        "securityContext": {
            "runAsUser": a.proxy_uid,
            "runAsGroup": a.proxy_uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": "50m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        },
        "volumeMounts": [{"name": SOCKET_VOLUME, "mountPath": a.agent_socket_dir, "readOnly": true}],
    })
}
