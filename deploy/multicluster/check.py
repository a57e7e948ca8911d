"""Offline checks of the kind deployment; check.sh runs this after rendering every kustomization.

    python3 check.py --rendered DIR --k8s-version 1.31

DIR holds one file per kustomization directory (`kubectl kustomize` output), named after the
directory with "/" replaced by "__", and optionally injected__sample__<cluster>.yaml (the sample
overlays through `fedmesh inject`: checked for schemas and flags only, the injected parts being
`fedmesh inject`'s own). Every problem is printed as `FAIL <where>: <what>`; the exit
status is 1 when there was any.

Checks:
  1. every object validates against the Kubernetes OpenAPI schema of --k8s-version
     (kubernetes-validate, strict: unknown fields fail), and objects of our CRDs against the
     openAPIV3Schema in base/crds/fedmesh-crds.yaml; a kind with neither schema fails;
  2. workload hygiene: resources, probes, securityContext, labels, selectors, Service ports;
  3. every ConfigMap, Secret, PVC and ServiceAccount a cluster overlay's pods use is in the
     overlay or created by up.sh;
  4. every `fedmesh` command line in a manifest uses a subcommand and flags that exist in the
     binary's source (src/main.rs, src/cmd/*.rs);
  5. the kind configs: fields, distinct non-overlapping subnets, region/zone labels, and that the
     overlays and sample overlays agree with them;
  6. the registration entries; the Dockerfile's context filter covers every workspace member;
  7. node attestation: the agents join with a projected service-account token for audience
     fedmesh (never a Secret token), verify the control plane with the bundle ConfigMap it
     publishes, and the control plane's RBAC lets it review tokens and read pods and nodes.
"""

import argparse
import ipaddress
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
CLUSTERS = ["east", "west", "central"]
# Created at deploy time by up.sh (their values exist only once the clusters do).
RUNTIME_OBJECTS = {
    ("ConfigMap", "fedmesh-federation"),
    ("Secret", "fedmesh-join-token"),
}
# Written by the control plane itself once it runs (name, the source that writes it).
CONTROL_PLANE_OBJECTS = {
    ("ConfigMap", "fedmesh-ca-bundle"): "federation/src/control_plane/attest.rs",
}
AGENT_AUDIENCE = "fedmesh"
# Containers allowed to run as root, and why (each still drops every capability it does not need).
ROOT_CONTAINERS = {
    ("DaemonSet", "fedmesh-agent", "agent"): "owns the socket in the host's /run/fedmesh",
}
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}
CLUSTERSET_CIDR = ipaddress.ip_network("240.240.0.0/16")  # control plane --clusterset-cidr default

failures = []


def fail(where, what):
    failures.append(f"FAIL {where}: {what}")


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def rel(path):
    return os.path.relpath(path, ROOT)


# --- 1. schemas -----------------------------------------------------------------------------------


def strict_crd_schema(schema, root=True):
    """openAPIV3Schema -> JSON Schema as the API server applies it: unknown fields are errors
    (kubectl's default field validation is Strict), nullable allows null, int-or-string."""
    s = dict(schema)
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        props = {k: strict_crd_schema(v, False) for k, v in s["properties"].items()}
        if root:
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props.setdefault(
                "metadata",
                {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            )
        s["properties"] = props
        if not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
    if isinstance(s.get("items"), dict):
        s["items"] = strict_crd_schema(s["items"], False)
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_crd_schema(s["additionalProperties"], False)
    return s


def crd_schemas():
    out = {}
    path = os.path.join(HERE, "base", "crds", "fedmesh-crds.yaml")
    for crd in load_all(path):
        spec = crd["spec"]
        for v in spec["versions"]:
            key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
            out[key] = strict_crd_schema(v["schema"]["openAPIV3Schema"])
    return out


def check_schemas(where, obj, version, crds):
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        return "k8s"
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        fail(where, f"{name} does not validate against Kubernetes {version}: {path}: {e.message}")
        return "error"
    except SchemaNotFoundError:
        pass
    schema = crds.get((obj.get("apiVersion"), obj.get("kind")))
    if schema is None:
        fail(where, f"{name}: no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                    "(neither Kubernetes nor base/crds/fedmesh-crds.yaml)")
        return "error"
    for e in jsonschema.Draft7Validator(schema).iter_errors(obj):
        path = ".".join(str(p) for p in e.path)
        fail(where, f"{name} does not validate against its CRD: {path}: {e.message}")
        return "error"
    return "crd"


# --- 2. workload hygiene --------------------------------------------------------------------------


def pod_spec(obj):
    return obj.get("spec", {}).get("template", {}).get("spec", {})


def check_container(where, obj, c, pod, init):
    wname = f"{obj['kind']}/{obj['metadata']['name']} container {c.get('name')}"
    res = c.get("resources", {})
    for k in ("cpu", "memory"):
        if k not in res.get("requests", {}):
            fail(where, f"{wname}: no resources.requests.{k}")
    if "memory" not in res.get("limits", {}):
        fail(where, f"{wname}: no resources.limits.memory")
    sc = c.get("securityContext", {})
    if sc.get("allowPrivilegeEscalation") is not False:
        fail(where, f"{wname}: securityContext.allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail(where, f"{wname}: securityContext.readOnlyRootFilesystem must be true")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        fail(where, f"{wname}: securityContext.capabilities.drop must include ALL")
    if sc.get("privileged"):
        fail(where, f"{wname}: privileged")
    uid = sc.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
    non_root = sc.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot"))
    if uid == 0 or not non_root:
        if (obj["kind"], obj["metadata"]["name"], c.get("name")) not in ROOT_CONTAINERS:
            fail(where, f"{wname}: runs as root (or runAsNonRoot unset) and is not an allowed exception")
    if not init:
        for p in ("readinessProbe", "livenessProbe"):
            if p not in c:
                fail(where, f"{wname}: no {p}")
    image = c.get("image", "")
    if not image:
        fail(where, f"{wname}: no image")
    if image.startswith("fedmesh:") and c.get("imagePullPolicy") != "IfNotPresent":
        fail(where, f"{wname}: imagePullPolicy must be IfNotPresent (the image is loaded with `kind load`)")
    # A probe or Service may only name a port the container declares.
    names = {p.get("name") for p in c.get("ports", []) if p.get("name")}
    for probe in ("readinessProbe", "livenessProbe"):
        for kind in ("httpGet", "tcpSocket"):
            port = c.get(probe, {}).get(kind, {}).get("port")
            if isinstance(port, str) and port not in names:
                fail(where, f"{wname}: {probe} uses port {port!r}, which the container does not declare")


def check_workloads(where, objs):
    pods = []
    for obj in objs:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        labels = obj.get("metadata", {}).get("labels", {})
        if labels.get("app.kubernetes.io/part-of") != "fedmesh":
            fail(where, f"{kind}/{name}: no label app.kubernetes.io/part-of=fedmesh")
        if kind not in WORKLOAD_KINDS:
            continue
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/component"):
            if label not in labels:
                fail(where, f"{kind}/{name}: no label {label}")
        tmpl_labels = obj["spec"]["template"].get("metadata", {}).get("labels", {})
        for k, v in obj["spec"]["selector"].get("matchLabels", {}).items():
            if tmpl_labels.get(k) != v:
                fail(where, f"{kind}/{name}: selector {k}={v} does not match the pod template")
        pod = pod_spec(obj)
        psc = pod.get("securityContext", {})
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(where, f"{kind}/{name}: pod securityContext.seccompProfile.type must be RuntimeDefault")
        for c in pod.get("containers", []):
            check_container(where, obj, c, pod, init=False)
        for c in pod.get("initContainers", []):
            check_container(where, obj, c, pod, init=True)
        pods.append((obj, tmpl_labels, pod))
    for svc in (o for o in objs if o.get("kind") == "Service"):
        sel = svc["spec"].get("selector", {})
        ns = svc["metadata"].get("namespace")
        matches = [
            (o, pod) for o, tl, pod in pods
            if o["metadata"].get("namespace") == ns and all(tl.get(k) == v for k, v in sel.items())
        ]
        if not matches:
            fail(where, f"Service/{svc['metadata']['name']}: its selector matches no pod template here")
            continue
        declared = {}
        for _, pod in matches:
            for c in pod.get("containers", []):
                for p in c.get("ports", []):
                    declared[p.get("name")] = p
                    declared[p.get("containerPort")] = p
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p.get("port"))
            if target not in declared:
                fail(where, f"Service/{svc['metadata']['name']} port {p.get('name')}: targetPort "
                            f"{target!r} is no container port of the pods it selects")
            elif declared[target].get("protocol", "TCP") != p.get("protocol", "TCP"):
                fail(where, f"Service/{svc['metadata']['name']} port {p.get('name')}: protocol "
                            f"differs from the container port {target!r}")


# --- 3. references in a cluster overlay -----------------------------------------------------------


def check_references(where, objs):
    present = {(o["kind"], o["metadata"]["name"]) for o in objs}
    present |= RUNTIME_OBJECTS | set(CONTROL_PLANE_OBJECTS)
    present.add(("ServiceAccount", "default"))
    for obj in (o for o in objs if o.get("kind") in WORKLOAD_KINDS):
        pod = pod_spec(obj)
        wname = f"{obj['kind']}/{obj['metadata']['name']}"
        refs = [("ServiceAccount", pod.get("serviceAccountName", "default"))]
        for v in pod.get("volumes", []):
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"]))
            if "secret" in v:
                refs.append(("Secret", v["secret"]["secretName"]))
            if "persistentVolumeClaim" in v:
                refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
            for src in v.get("projected", {}).get("sources", []):
                if "configMap" in src:
                    refs.append(("ConfigMap", src["configMap"]["name"]))
                if "secret" in src:
                    refs.append(("Secret", src["secret"]["name"]))
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "configMapKeyRef" in src:
                    refs.append(("ConfigMap", src["configMapKeyRef"]["name"]))
                if "secretKeyRef" in src:
                    refs.append(("Secret", src["secretKeyRef"]["name"]))
        for ref in refs:
            if ref not in present:
                fail(where, f"{wname} uses {ref[0]} {ref[1]}, which is neither in this overlay nor created by up.sh")
    up = open(os.path.join(HERE, "up.sh")).read()
    for kind, name in RUNTIME_OBJECTS:
        if name not in up:
            fail("up.sh", f"does not create {kind} {name}, which the overlays expect")
    for (kind, name), source in CONTROL_PLANE_OBJECTS.items():
        if f'"{name}"' not in open(os.path.join(ROOT, source)).read():
            fail(source, f"does not write {kind} {name}, which the overlays expect")



# --- 7b. the sidecar injection webhook --------------------------------------------------------------

INJECT_LABEL = ("fedmesh.io/inject", "enabled")


def check_webhook(where, objs):
    """The webhook configuration reaches the control plane's webhook port, the control plane may
    keep its caBundle, and it sends only labelled namespaces."""
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    mwc = by.get(("MutatingWebhookConfiguration", "fedmesh-sidecar-injector"))
    if mwc is None:
        fail(where, "no MutatingWebhookConfiguration fedmesh-sidecar-injector: pods are not injected")
        return
    cp = by.get(("Deployment", "fedmesh-control-plane"))
    svc = by.get(("Service", "fedmesh-control-plane"))
    if cp is None or svc is None:
        fail(where, "no control plane Deployment or Service for the webhook")
        return
    container = pod_spec(cp)["containers"][0]
    listen = flag_value(container.get("args", []), "--webhook-listen")
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    for w in mwc.get("webhooks", []):
        ref = w.get("clientConfig", {}).get("service", {})
        if ref.get("name") != "fedmesh-control-plane" or ref.get("namespace") != "fedmesh-system":
            fail(where, f"webhook {w['name']} calls service {ref.get('namespace')}/{ref.get('name')}, not fedmesh-system/fedmesh-control-plane")
        if ref.get("path") != "/inject":
            fail(where, f"webhook {w['name']} calls path {ref.get('path')!r}; the control plane serves /inject")
        sport = next((p for p in svc["spec"]["ports"] if p["port"] == ref.get("port", 443)), None)
        if sport is None:
            fail(where, f"service fedmesh-control-plane has no port {ref.get('port', 443)} for webhook {w['name']}")
        else:
            target = sport.get("targetPort")
            target = ports.get(target, target)
            if listen is None or not listen.endswith(f":{target}"):
                fail(where, f"the webhook's service port leads to {target}, but the control plane's --webhook-listen is {listen}")
        labels = w.get("namespaceSelector", {}).get("matchLabels", {})
        if labels.get(INJECT_LABEL[0]) != INJECT_LABEL[1]:
            fail(where, f"webhook {w['name']} is not limited to namespaces labelled {INJECT_LABEL[0]}={INJECT_LABEL[1]}")
        if w.get("failurePolicy") not in ("Fail", "Ignore"):
            fail(where, f"webhook {w['name']} states no failurePolicy")
        if w.get("clientConfig", {}).get("caBundle"):
            fail(where, f"webhook {w['name']} carries a caBundle; the control plane sets its own CA")
    role = by.get(("ClusterRole", "fedmesh-control-plane"), {})
    may = any(
        "mutatingwebhookconfigurations" in r.get("resources", [])
        and {"get", "update"} <= set(r.get("verbs", []))
        and "fedmesh-sidecar-injector" in r.get("resourceNames", [])
        for r in role.get("rules", [])
    )
    if not may:
        fail(where, "the control plane may not get and update MutatingWebhookConfiguration fedmesh-sidecar-injector (its caBundle)")


def check_sample_injected(where, objs):
    """The sample app's namespace is labelled for the webhook."""
    for o in objs:
        if o.get("kind") == "Namespace" and o["metadata"]["name"] == "shop":
            if o["metadata"].get("labels", {}).get(INJECT_LABEL[0]) != INJECT_LABEL[1]:
                fail(where, f"namespace shop is not labelled {INJECT_LABEL[0]}={INJECT_LABEL[1]}: the webhook would not inject the sample app")
            return

# --- 7. node attestation --------------------------------------------------------------------------


def flag_value(args, flag):
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_agent_join(where, objs):
    """The agent joins with its pod's projected token (audience fedmesh), never a shared secret."""
    agents = [o for o in objs if o.get("kind") == "DaemonSet" and o["metadata"]["name"] == "fedmesh-agent"]
    if not agents:
        fail(where, "no DaemonSet fedmesh-agent")
        return
    pod = pod_spec(agents[0])
    if pod.get("automountServiceAccountToken") is False:
        fail(where, "the agent needs its service account (pod watch)")
    c = next((c for c in pod["containers"] if c["name"] == "agent"), None)
    if c is None:
        fail(where, "DaemonSet fedmesh-agent has no container agent")
        return
    args = c.get("args", [])
    if any(a.startswith("--join-token") for a in args):
        fail(where, "the agent must not join with a shared join token: use --service-account-token-file")
    token = flag_value(args, "--service-account-token-file")
    bundle = flag_value(args, "--control-plane-bundle")
    if not token or not bundle or not flag_value(args, "--trust-domain"):
        fail(where, "the agent needs --service-account-token-file, --control-plane-bundle and --trust-domain")
        return
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def source_of(path):
        for m in c.get("volumeMounts", []):
            prefix = m["mountPath"].rstrip("/") + "/"
            if path.startswith(prefix):
                return volumes.get(m["name"]), path[len(prefix):]
        return None, None

    vol, rel_path = source_of(token)
    sat = None
    for src in (vol or {}).get("projected", {}).get("sources", []):
        t = src.get("serviceAccountToken")
        if t and t.get("path") == rel_path:
            sat = t
    if sat is None:
        fail(where, f"{token} is not a projected serviceAccountToken")
    else:
        if sat.get("audience") != AGENT_AUDIENCE:
            fail(where, f"the agent's token must be for audience {AGENT_AUDIENCE!r}, not {sat.get('audience')!r}")
        if sat.get("expirationSeconds", 3600) > 3600:
            fail(where, "the agent's token should live an hour at most")
    vol, rel_path = source_of(bundle)
    found = False
    for src in (vol or {}).get("projected", {}).get("sources", []) + ([{"configMap": vol["configMap"]}] if vol and "configMap" in vol else []):
        cm = src.get("configMap")
        if cm and cm["name"] == "fedmesh-ca-bundle":
            items = cm.get("items")
            found = items is None or any(i["path"] == rel_path and i["key"] == "bundle.spiffe" for i in items)
    if not found:
        fail(where, f"{bundle} is not the key bundle.spiffe of the ConfigMap fedmesh-ca-bundle")

    rules = [r for o in objs if o.get("kind") in ("ClusterRole", "Role")
             and o["metadata"]["name"] == "fedmesh-control-plane" for r in o.get("rules", [])]

    def allowed(group, resource, verb):
        return any(group in r.get("apiGroups", []) and resource in r.get("resources", [])
                   and verb in r.get("verbs", []) for r in rules)

    for group, resource, verb in [("authentication.k8s.io", "tokenreviews", "create"),
                                  ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
                                  ("", "nodes", "get"), ("", "configmaps", "patch")]:
        if not allowed(group, resource, verb):
            fail(where, f"the control plane's RBAC does not allow {verb} {resource} ({group or 'core'})")


# --- 4. fedmesh command lines ---------------------------------------------------------------------


def kebab(s):
    return re.sub(r"(?<!^)(?=[A-Z])", "-", s).lower().replace("_", "-")


def clap_structs(sources):
    """struct name -> (set of --long flags, list of flattened struct names), from clap derives."""
    structs = {}
    for text in sources:
        for m in re.finditer(r"^(?:pub )?struct (\w+) \{\n(.*?)^\}", text, re.S | re.M):
            flags, flattened, attrs = set(), [], ""
            for line in m.group(2).splitlines():
                stripped = line.strip()
                if stripped.startswith("///") or not stripped:
                    continue
                field = re.match(r"(?:pub(?:\(crate\))? )?(\w+): (.+),$", stripped)
                if field and attrs.count("[") == attrs.count("]"):
                    if "command(flatten)" in attrs:
                        flattened.append(re.sub(r"^Option<(.*)>$", r"\1", field.group(2)).split("::")[-1])
                    elif re.search(r"#\[arg\((?:[^\]]*\W)?long\b", attrs, re.S):
                        explicit = re.search(r'long\s*=\s*"([^"]+)"', attrs)
                        flags.add(explicit.group(1) if explicit else field.group(1).replace("_", "-"))
                    attrs = ""
                else:
                    attrs += stripped + "\n"
            structs[m.group(1)] = (flags, flattened)
    return structs


def cli_flags():
    """binary -> subcommand -> set of --flags: `fedmesh` (src/main.rs) and `fedmesh-proxy`
    (src/bin/fedmesh-proxy.rs, its commands from proxy/src)."""
    sources = [open(os.path.join(d, f)).read()
               for top in (os.path.join(ROOT, "src"), os.path.join(ROOT, "proxy", "src"))
               for d, _, files in sorted(os.walk(top)) for f in sorted(files) if f.endswith(".rs")]
    structs = clap_structs(sources)

    def flags_of(name, seen=()):
        if name not in structs or name in seen:
            return set()
        own, flattened = structs[name]
        out = set(own)
        for f in flattened:
            out |= flags_of(f, seen + (name,))
        return out

    out = {}
    for binary, path in (("fedmesh", ("src", "main.rs")), ("fedmesh-proxy", ("src", "bin", "fedmesh-proxy.rs"))):
        main = open(os.path.join(ROOT, *path)).read()
        enum = re.search(r"enum Command \{(.*?)^\}", main, re.S | re.M).group(1)
        subs = {}
        for variant, struct in re.findall(r"^\s*(\w+)\((?:Box<)?(?:cmd|fedmesh_proxy)::(?:\w+::)?(\w+)>?\),", enum, re.M):
            subs[kebab(variant)] = flags_of(struct) | {"help"}
        out[binary] = subs
    return out


def check_command_lines(where, objs, cli):
    for obj in (o for o in objs if o.get("kind") in WORKLOAD_KINDS):
        pod = pod_spec(obj)
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if not c.get("image", "").startswith("fedmesh:"):
                continue
            wname = f"{obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            command = c.get("command", [])
            binary = os.path.basename(command[0]) if command else "fedmesh"
            if binary not in cli:
                fail(where, f"{wname}: the image has no binary {command[0]!r} (it has {', '.join(f'/usr/local/bin/{b}' for b in sorted(cli))})")
                continue
            subs = cli[binary]
            args = command[1:] + c.get("args", [])
            if not args or args[0] not in subs:
                fail(where, f"{wname}: `{binary} {args[0] if args else ''}` is not a subcommand "
                            f"of the binary (it has: {', '.join(sorted(subs))})")
                continue
            ports = {p.get("containerPort") for p in c.get("ports", [])}
            for a in args[1:]:
                if not a.startswith("--"):
                    continue
                flag, _, value = a[2:].partition("=")
                if flag not in subs[args[0]]:
                    fail(where, f"{wname}: `{binary} {args[0]}` has no flag --{flag}")
                # A listener on all interfaces is meant to be reached: declare its port.
                m = re.fullmatch(r"0\.0\.0\.0:(\d+)", value)
                if m and int(m.group(1)) not in ports:
                    fail(where, f"{wname}: --{flag}={value} listens on a port the container does not declare")


# --- 5. kind configs and the overlays built on them -----------------------------------------------


def check_kind(rendered):
    subnets = []
    regions, zones = {}, {}
    for c in CLUSTERS:
        path = os.path.join(HERE, "kind", f"{c}.yaml")
        where = rel(path)
        try:
            docs = load_all(path)
        except (OSError, yaml.YAMLError) as e:
            fail(where, f"does not parse: {e}")
            continue
        if len(docs) != 1:
            fail(where, f"expected one document, found {len(docs)}")
            continue
        cfg = docs[0]
        if cfg.get("kind") != "Cluster" or cfg.get("apiVersion") != "kind.x-k8s.io/v1alpha4":
            fail(where, "must be kind: Cluster, apiVersion: kind.x-k8s.io/v1alpha4")
        if cfg.get("name") != c:
            fail(where, f"name must be {c!r} (kubectl contexts are kind-<name>)")
        known = {"kind", "apiVersion", "name", "networking", "nodes", "featureGates", "runtimeConfig",
                 "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902", "containerdConfigPatches"}
        for k in set(cfg) - known:
            fail(where, f"unknown top-level field {k!r}")
        net = cfg.get("networking", {})
        for key in ("podSubnet", "serviceSubnet"):
            try:
                subnets.append((f"{c} {key}", ipaddress.ip_network(net[key])))
            except (KeyError, ValueError) as e:
                fail(where, f"networking.{key}: missing or not a CIDR ({e})")
        nodes = cfg.get("nodes", [])
        roles = [n.get("role") for n in nodes]
        if roles.count("control-plane") != 1 or roles.count("worker") < 1:
            fail(where, f"needs one control-plane and at least one worker node, has {roles}")
        for i, n in enumerate(nodes):
            for k in set(n) - {"role", "labels", "image", "extraMounts", "extraPortMappings", "kubeadmConfigPatches"}:
                fail(where, f"nodes[{i}]: unknown field {k!r}")
            labels = n.get("labels", {})
            r, z = labels.get("topology.kubernetes.io/region"), labels.get("topology.kubernetes.io/zone")
            if not r or not z:
                fail(where, f"nodes[{i}] ({n.get('role')}): needs topology.kubernetes.io/region and zone labels")
                continue
            if regions.setdefault(c, r) != r:
                fail(where, f"nodes[{i}]: region {r} differs from the cluster's {regions[c]}")
            if not z.startswith(r + "-"):
                fail(where, f"nodes[{i}]: zone {z} is not in region {r}")
            if n.get("role") == "worker":
                zones.setdefault(c, set()).add(z)
    subnets.append(("fedmesh clusterset IPs", CLUSTERSET_CIDR))
    for i, (a, na) in enumerate(subnets):
        for b, nb in subnets[i + 1:]:
            if na.overlaps(nb):
                fail("kind/*.yaml", f"{a} {na} overlaps {b} {nb}")
    if len(set(regions.values())) != len(regions):
        fail("kind/*.yaml", f"every cluster needs its own region: {regions}")

    # The overlays must agree with the kind configs.
    for c in CLUSTERS:
        where = f"overlays/{c}"
        objs = rendered.get(f"overlays__{c}", [])
        cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("fedmesh-cluster")]
        if len(cms) != 1:
            fail(where, "needs exactly one fedmesh-cluster ConfigMap")
            continue
        data = cms[0].get("data", {})
        want = {"cluster": c, "trust-domain": f"{c}.fedmesh.test", "region": regions.get(c)}
        for k, v in want.items():
            if data.get(k) != v:
                fail(where, f"fedmesh-cluster {k}={data.get(k)!r}, expected {v!r} (kind/{c}.yaml)")
        check_entries(c, os.path.join(HERE, "overlays", c, "entries.yaml"), objs)
        where = f"sample/{c}"
        for obj in (o for o in rendered.get(f"sample__{c}", []) if o["kind"] == "Deployment"):
            t = obj["spec"]["template"]
            z = t["metadata"].get("labels", {}).get("topology.kubernetes.io/zone")
            sel = t["spec"].get("nodeSelector", {}).get("topology.kubernetes.io/zone")
            if z is None or z != sel or z not in zones.get(c, set()):
                fail(where, f"{obj['metadata']['name']}: zone label {z!r} and nodeSelector {sel!r} must "
                            f"both name a worker zone of kind/{c}.yaml {sorted(zones.get(c, []))}")
            env = {e["name"]: e.get("value") for c2 in t["spec"]["containers"] for e in c2.get("env", [])}
            if env.get("FEDMESH_CLUSTER") != c:
                fail(where, f"{obj['metadata']['name']}: FEDMESH_CLUSTER={env.get('FEDMESH_CLUSTER')!r}, expected {c!r}")


# --- 6. entries and the image build ---------------------------------------------------------------


def check_entries(cluster, path, objs):
    where = rel(path)
    try:
        entries = load_all(path)[0]["entries"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as e:
        fail(where, f"not a registration entries file: {e}")
        return
    selector = re.compile(r"unix:(uid|gid):\d+|unix:path:/.+|k8s:(ns|sa|pod-name|pod-uid|container-name|node-name):.+"
                          r"|k8s:pod-label:[^:]+:.*")
    given = []  # (spiffe_id, set of selectors)
    for i, e in enumerate(entries):
        sid = e.get("spiffe_id", "")
        if not sid.startswith(f"spiffe://{cluster}.fedmesh.test/") or "/fedmesh/" in sid:
            fail(where, f"entries[{i}]: {sid!r} must be in trust domain {cluster}.fedmesh.test and "
                        "outside /fedmesh/ (reserved for fedmesh's own components)")
        if re.sub(r"\{(ns|sa)\}", "", sid).count("{") or "}" in re.sub(r"\{(ns|sa)\}", "", sid):
            fail(where, f"entries[{i}]: {sid!r}: the only placeholders are {{ns}} and {{sa}}")
        sels = e.get("selectors", [])
        if not sels:
            fail(where, f"entries[{i}]: no selectors (every caller would match)")
        for s in sels:
            if not selector.fullmatch(s):
                fail(where, f"entries[{i}]: selector {s!r} is not unix:uid|gid:N, unix:path:/PATH or "
                            "k8s:ns|sa|pod-name|pod-uid|container-name|node-name:VALUE, k8s:pod-label:KEY:VALUE")
        given.append((sid, set(sels)))
    # Injected sidecars (container fedmesh-proxy) get their service account's identity, and the
    # gateway its own, by its namespace, service account and container.
    if not any("{sa}" in sid and "k8s:container-name:fedmesh-proxy" in sels for sid, sels in given):
        fail(where, "no template entry (.../ns/{ns}/sa/{sa}) for container fedmesh-proxy (injected sidecars)")
    gw = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "fedmesh-gateway"]
    if gw:
        spec = gw[0]["spec"]["template"]["spec"]
        want = {f"k8s:ns:{gw[0]['metadata'].get('namespace', 'default')}",
                f"k8s:sa:{spec.get('serviceAccountName', 'default')}",
                f"k8s:container-name:{spec['containers'][0]['name']}"}
        if not any(sels == want for _, sels in given):
            fail(where, f"no entry for the gateway with selectors {sorted(want)}")


def check_image_build():
    where = "Dockerfile.dockerignore"
    try:
        ignore = open(os.path.join(HERE, "Dockerfile.dockerignore")).read().split("\n")
    except OSError as e:
        fail(where, str(e))
        return
    allowed = {l[1:].strip("/") for l in ignore if l.startswith("!")}
    cargo = open(os.path.join(ROOT, "Cargo.toml")).read()
    members = re.search(r"^members\s*=\s*\[(.*?)\]", cargo, re.S | re.M)
    needed = set(re.findall(r'"([^"]+)"', members.group(1) if members else "")) | {"Cargo.toml", "Cargo.lock", "src"}
    for n in sorted(needed - allowed):
        fail(where, f"{n} is needed by the build (Cargo workspace) but left out of the context (add !{n}/)")
    docker = open(os.path.join(HERE, "Dockerfile")).read()
    if "--bin fedmesh " not in docker or "--bin fedmesh-proxy" not in docker or "--locked" not in docker:
        fail("Dockerfile", "must build with `cargo build --release --locked --bin fedmesh --bin fedmesh-proxy`")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rendered", required=True)
    ap.add_argument("--k8s-version", required=True)
    a = ap.parse_args()

    crds = crd_schemas()
    cli = cli_flags()
    for sub in ("hub", "control-plane", "agent", "gateway", "sidecar", "inject", "iptables", "sample-app"):
        if sub not in cli["fedmesh"]:
            fail("src/main.rs", f"no subcommand {sub!r}, which the deployment uses")
    for sub in ("gateway", "sidecar"):
        if sub not in cli["fedmesh-proxy"]:
            fail("src/bin/fedmesh-proxy.rs", f"no subcommand {sub!r}, which the deployment uses")
    rendered = {}
    counts = {"k8s": 0, "crd": 0, "error": 0}
    for f in sorted(os.listdir(a.rendered)):
        name = f[:-5]
        where = name.replace("__", "/")
        objs = load_all(os.path.join(a.rendered, f))
        rendered[name] = objs
        for obj in objs:
            counts[check_schemas(where, obj, a.k8s_version, crds)] += 1
        check_command_lines(where, objs, cli)
        if name.startswith("injected__"):
            continue
        check_workloads(where, objs)
        if name in {f"overlays__{c}" for c in CLUSTERS} | {"overlays__hub", "overlays__hub-etcd", "overlays__east-loadbalancer"}:
            check_references(where, objs)
        if name in {f"overlays__{c}" for c in CLUSTERS}:
            check_agent_join(where, objs)
            check_webhook(where, objs)
        if name.startswith("sample__"):
            check_sample_injected(where, objs)
    check_kind(rendered)
    check_image_build()

    print(f"  {sum(len(v) for v in rendered.values())} objects in {len(rendered)} renders: "
          f"{counts['k8s']} validated against Kubernetes {a.k8s_version} (strict), "
          f"{counts['crd']} against fedmesh's CRD schemas")
    print(f"  fedmesh command lines checked against src/ and proxy/src/: {', '.join(f'{b} ({len(s)} commands)' for b, s in sorted(cli.items()))}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        print(f"{len(failures)} problem(s)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
