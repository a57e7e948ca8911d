//! fedmesh against a real Kubernetes API server (kube-apiserver + etcd, built by `scripts/peers`):
//! our CRDs installed as the README installs them (`fedmesh crds | kubectl apply -f -`) and held
//! to the server's structural-schema rules; the README's examples accepted as written and bad
//! input refused with the field named; the kind manifests' RBAC, with `fedmesh control-plane
//! --source kubernetes` run as a process under its own service account's token, so a permission
//! missing from our manifests fails here, and a permission taken away shows in its log.

mod support;

use std::time::Duration;

use fedmesh_test_support::kube_apiserver::KubeApiServer;
use serde_json::Value;
use support::federation::*;
use support::*;

const GROUPS: [&str; 2] = ["fedmesh.io/", "multicluster.x-k8s.io/"];

/// The objects of the README's YAML examples whose kinds are ours (as YAML documents).
fn readme_examples() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut docs = Vec::new();
    for block in readme.split("```yaml\n").skip(1) {
        let block = block.split("```").next().unwrap();
        for doc in block.split("\n---\n") {
            let ours = doc.lines().any(|l| {
                l.strip_prefix("apiVersion: ")
                    .is_some_and(|v| GROUPS.iter().any(|g| v.starts_with(g)))
            });
            if ours {
                docs.push(doc.to_string());
            }
        }
    }
    docs
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

#[test]
fn our_crds_install_with_kubectl_and_the_api_server_holds_objects_to_their_schemas() {
    let Some(api) = KubeApiServer::start() else {
        return;
    };
    let crds = fedmesh(&["crds"]);
    assert!(crds.status.success());
    let applied = api.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&String::from_utf8(crds.stdout).unwrap()),
    );
    let names: Vec<&str> = applied
        .lines()
        .filter_map(|l| l.strip_prefix("customresourcedefinition.apiextensions.k8s.io/"))
        .map(|l| l.trim_end_matches(" created"))
        .collect();
    assert_eq!(names.len(), 8, "{applied}");
    api.wait_crds_established();
    for name in &names {
        let crd = api.get("crd", "", name).unwrap();
        for c in ["Established", "NamesAccepted"] {
            assert_eq!(
                condition(&crd, c).map(|c| &c["status"]),
                Some(&Value::from("True")),
                "{name}: {crd:#}"
            );
        }
        // A schema the server cannot prune or default by is flagged here (and its objects are
        // then stored unchecked).
        assert!(
            condition(&crd, "NonStructuralSchema").is_none(),
            "{name}: {crd:#}"
        );
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["served"], true);
        assert!(
            version["subresources"]["status"].is_object(),
            "{name} has a status subresource: the control plane writes status there"
        );
    }

    // Every example of ours in the README, as written, with strict field validation: no
    // unknown or duplicate field, every value of the type the schema says.
    let examples = readme_examples();
    assert!(examples.len() >= 8, "{examples:#?}");
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    for doc in &examples {
        let out = api.kubectl(
            &["apply", "--validate=strict", "--dry-run=server", "-f", "-"],
            Some(doc),
        );
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "the README's example is refused or warned about:\n{doc}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Bad input is refused by the API server itself, naming the field: the user sees it at
    // `kubectl apply`, not later in a status.
    let refused = [
        (
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceImport\nmetadata: {name: a, namespace: shop}\nspec: {type: Bogus, ports: [{port: 80}]}\n",
            r#"spec.type: Unsupported value: "Bogus""#,
        ),
        (
            "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: b, namespace: shop}\nspec: {retires: {attempts: 3}}\n",
            r#"unknown field "spec.retires""#,
        ),
        (
            "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: c, namespace: shop}\nspec: {circuitBreaker: {maxRequests: many}}\n",
            "spec.circuitBreaker.maxRequests: Invalid value: \"string\"",
        ),
        (
            "apiVersion: fedmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: shop}\nspec: {action: MAYBE}\n",
            r#"spec.action: Unsupported value: "MAYBE""#,
        ),
        (
            "apiVersion: fedmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: e, namespace: shop}\nspec: {mtls: {mode: strict}}\n",
            r#"spec.mtls.mode: Unsupported value: "strict""#,
        ),
        (
            "apiVersion: fedmesh.io/v1alpha1\nkind: Rollout\nmetadata: {name: f, namespace: shop}\nspec: {service: r, stable: {service: r1}, canary: {service: r2}, strategy: {canary: {steps: [{weight: lots}]}}}\n",
            "spec.strategy.canary.steps[0].weight: Invalid value: \"string\"",
        ),
    ];
    for (doc, want) in refused {
        let out = api.kubectl(&["apply", "-f", "-"], Some(doc));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{doc}\nwanted {want:?}, got: {err}"
        );
    }
    let stored = api.kubectl_ok(
        &[
            "get",
            "trafficpolicies,authorizationpolicies,peerauthentications,serviceimports",
            "-A",
            "-o",
            "name",
        ],
        None,
    );
    assert_eq!(stored.trim(), "", "nothing refused was stored");
}

/// A control plane of cluster `name` joined to `hub`, its gateway at `gateway` (the API server
/// refuses loopback addresses in the EndpointSlices other clusters derive from it), with
/// `source` and extra environment: a directory source, or `kubernetes` with `KUBECONFIG`.
fn start_cp_with(
    dir: &std::path::Path,
    hub: &Hub,
    name: &str,
    gateway: &str,
    source: Option<&str>,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Proc {
    let token_file = join_token_file(dir, hub, name);
    let mut args = cp_args(
        dir,
        hub,
        name,
        &format!("{name}-data"),
        &token_file,
        free_port(),
    );
    let mut set = |flag: &str, value: &str| {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.into();
    };
    set("--gateway", gateway);
    if let Some(source) = source {
        set("--source", source);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start_with_env(name, &args, env, dir)
}

/// West (a directory source) exports `shop/<name>`.
fn west_exports(dir: &std::path::Path, name: &str) {
    std::fs::write(
        dir.join("west-src").join(format!("{name}.yaml")),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ports: [{{name: tcp, port: 7000, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: tcp, port: 7000, protocol: TCP}}]\nendpoints:\n  - addresses: [10.2.0.9]\n    conditions: {{ready: true}}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: shop}}\n"
        ),
    )
    .unwrap();
}

/// Waits until the control plane has written `kind` `ns/name` (read back as admin).
fn wait_for_object(api: &KubeApiServer, kind: &str, ns: &str, name: &str) -> Value {
    let mut found = None;
    wait_until(
        &format!("{kind} {ns}/{name} written by the control plane"),
        Duration::from_secs(60),
        || {
            found = api.get(kind, ns, name);
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
            found.is_some()
        },
    );
    found.unwrap()
}

/// The kind manifests, applied as a user applies them, give the control plane every permission
/// it uses: it runs as a process with only its service account's token, and each thing it
/// writes is read back. The other components' accounts hold nothing beyond what they need. Then
/// one permission is taken away: the control plane names the refusal in its log, and once the
/// permission is back it writes what it could not, without anything else changing.
#[test]
fn the_kind_manifests_give_each_component_what_it_uses_and_a_missing_permission_shows() {
    let Some(api) = KubeApiServer::start() else {
        return;
    };
    api.install_fedmesh("east");
    api.apply(&KubeApiServer::exported_service(
        "shop", "web", "10.1.0.7", "east-1a",
    ));

    // Least privilege, as the API server itself answers it for each service account.
    let can = |sa: &str, verb: &str, resource: &str, ns: Option<&str>| {
        let who = format!("--as=system:serviceaccount:fedmesh-system:{sa}");
        let mut args = vec!["auth", "can-i", verb, resource, who.as_str()];
        match ns {
            Some(ns) => args.extend(["-n", ns]),
            None => args.push("-A"),
        }
        let out = api.kubectl(&args, None);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let cp = "fedmesh-control-plane";
    assert!(can(
        cp,
        "patch",
        "serviceimports.multicluster.x-k8s.io",
        Some("shop")
    ));
    assert!(can(
        cp,
        "create",
        "tokenreviews.authentication.k8s.io",
        None
    ));
    assert!(
        !can(
            cp,
            "patch",
            "serviceexports.multicluster.x-k8s.io",
            Some("shop")
        ),
        "status only"
    );
    assert!(!can(cp, "get", "secrets", Some("fedmesh-system")));
    assert!(!can(cp, "create", "pods", Some("shop")));
    assert!(can("fedmesh-agent", "watch", "pods", None));
    assert!(!can(
        "fedmesh-agent",
        "get",
        "secrets",
        Some("fedmesh-system")
    ));
    assert!(!can(
        "fedmesh-agent",
        "list",
        "serviceexports.multicluster.x-k8s.io",
        None
    ));
    assert!(
        !can("fedmesh-gateway", "list", "pods", None),
        "the gateway needs no API access"
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d);
    let mut west = start_cp_with(d, &hub, "west", "192.0.2.20:15443", None, &[], &[]);
    west_exports(d, "db");
    let token = api.token("fedmesh-system", cp, None, None);
    let kubeconfig = api.kubeconfig_for_token("control-plane", &token);
    let webhook = format!("127.0.0.1:{}", free_port());
    let east = start_cp_with(
        d,
        &hub,
        "east",
        "192.0.2.10:15443",
        Some("kubernetes"),
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
        &["--webhook-listen", &webhook, "--webhook-host", "127.0.0.1"],
    );

    // Everything the control plane writes, read back from the API server.
    let ca = wait_for_object(&api, "configmap", "fedmesh-system", "fedmesh-ca-bundle");
    assert_eq!(ca["data"]["trust-domain"], "east.example");
    // The webhook configuration the manifests install gets the control plane's CA as caBundle.
    wait_until("the webhook's caBundle", Duration::from_secs(60), || {
        let set = api
            .get(
                "mutatingwebhookconfiguration",
                "",
                "fedmesh-sidecar-injector",
            )
            .is_some_and(|m| m["webhooks"][0]["clientConfig"]["caBundle"].is_string());
        if !set {
            std::thread::sleep(Duration::from_millis(250));
        }
        set
    });
    let export = wait_for_object(&api, "serviceexport", "shop", "web");
    wait_until("east's export Ready", Duration::from_secs(60), || {
        api.get("serviceexport", "shop", "web")
            .and_then(|e| condition(&e, "Ready").map(|c| c["status"] == "True"))
            .unwrap_or(false)
    });
    assert!(export["spec"].is_object() || export["spec"].is_null());
    wait_for_object(&api, "serviceimport", "shop", "db");
    let slice = wait_for_object(&api, "endpointslice", "shop", "db-west");
    assert_eq!(
        slice["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "west"
    );
    // A Rollout is read from the API server and its status written there: its versions do not
    // exist yet, so it waits and says why.
    api.apply(
        "apiVersion: fedmesh.io/v1alpha1\nkind: Rollout\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  service: web\n  stable: {service: web-v1}\n  canary: {service: web-v2}\n  \
         strategy: {canary: {steps: [{weight: 10}]}}\n",
    );
    let mut rollout = Value::Null;
    wait_until("the Rollout's status", Duration::from_secs(60), || {
        rollout = api.get("rollout", "shop", "web").unwrap_or_default();
        let done = condition(&rollout, "RouteConflict").is_some();
        if !done {
            std::thread::sleep(Duration::from_millis(200));
        }
        done
    });
    assert_eq!(rollout["status"]["phase"], "Progressing", "{rollout:#}");
    assert!(
        condition(&rollout, "RouteConflict").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("there is no Service web-v1 or web-v2"),
        "{rollout:#}"
    );
    let log = east.log();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "{log}"
    );

    // Take ServiceImport writes away from the control plane's role, as a too-tight edit would.
    let mut role = api.get("clusterrole", "", cp).unwrap();
    let rules = role["rules"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|r| r["resources"] != serde_json::json!(["serviceimports"]));
    assert_eq!(rules.len(), before - 1);
    role["metadata"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| k == "name");
    api.kubectl_ok(&["replace", "-f", "-"], Some(&role.to_string()));
    west_exports(d, "cache");
    wait_until(
        "the control plane to report the refused write",
        Duration::from_secs(60),
        || east.log().contains("cannot write ServiceImport"),
    );
    let log = east.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("cannot write ServiceImport"))
        .unwrap();
    assert!(
        refusal.contains("shop/cache")
            && refusal.contains("forbidden")
            && refusal.contains("system:serviceaccount:fedmesh-system:fedmesh-control-plane")
            && refusal.contains("serviceimports"),
        "the log names the service, the account and the resource: {refusal}"
    );
    assert!(api.get("serviceimport", "shop", "cache").is_none());

    // The manifests again: the control plane retries by itself and writes the import.
    api.install_fedmesh("east");
    let si = wait_for_object(&api, "serviceimport", "shop", "cache");
    assert_eq!(si["spec"]["ports"][0]["port"], 7000);
    west.terminate(Duration::from_secs(10));
}

/// `fedmesh ARGS` with the API server's admin kubeconfig: (success, stdout and stderr).
fn fedmesh_as_admin(api: &KubeApiServer, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(fedmesh_bin())
        .args(args)
        .env("KUBECONFIG", &api.admin_kubeconfig)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `fedmesh check --pre` against a real API server: before fedmesh's CRDs are installed it fails
/// naming each and the command that installs them; once they are, it passes (the Gateway API
/// CRDs, which fedmesh reads when present, only warn).
#[test]
fn check_pre_flight_names_the_missing_crds_and_passes_once_they_are_installed() {
    let Some(api) = KubeApiServer::start() else {
        return;
    };
    let check = || fedmesh_as_admin(&api, &["check", "--pre"]);
    let (ok, out) = check();
    eprintln!("before the CRDs:\n{out}");
    assert!(!ok, "{out}");
    assert!(out.contains("answers"), "the API server's version: {out}");
    for crd in [
        "serviceexports.multicluster.x-k8s.io",
        "serviceimports.multicluster.x-k8s.io",
    ] {
        assert!(
            out.contains(&format!("FAIL CRD {crd} is not installed")),
            "{crd}: {out}"
        );
    }
    // The control plane reads no policies when their CRDs are missing: a warning.
    assert!(
        out.contains(
            "warn CRD trafficpolicies.fedmesh.io is not installed: no TrafficPolicy can be created"
        ),
        "{out}"
    );
    assert!(
        out.contains("→ kubectl apply -k deploy/multicluster/base/crds "),
        "{out}"
    );
    // The command the hint names, as written.
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/multicluster/base/crds");
    api.kubectl_ok(&["apply", "-k", crds], None);
    api.wait_crds_established();
    let (ok, out) = check();
    eprintln!("after:\n{out}");
    assert!(ok, "{out}");
    assert!(
        out.contains("ok   CRD serviceexports.multicluster.x-k8s.io serves v1alpha1"),
        "{out}"
    );
    assert!(
        out.contains("warn CRD httproutes.gateway.networking.k8s.io is not installed: no HTTPRoute can be created"),
        "{out}"
    );
    assert!(out.contains("0 failed"), "{out}");
}

/// `fedmesh cluster link --kubernetes` against a real API server: one command creates the join
/// token on the hub and writes the Secret and ConfigMap the control plane's manifest reads (the
/// namespace too); a second link of the same cluster is refused before any token is made.
#[test]
fn cluster_link_writes_the_secret_and_configmap_the_control_plane_reads() {
    let Some(api) = KubeApiServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let link = || {
        let mut args: Vec<String> = [
            "cluster",
            "link",
            "--kubernetes",
            "--cluster",
            "west",
            "--trust-domain",
            "west.example",
            "--hub",
            "hub.example:7443",
            "--gateway",
            "172.18.0.3:30443",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(admin_args(&hub));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fedmesh_as_admin(&api, &args)
    };
    let (ok, said) = link();
    eprintln!("{said}");
    assert!(ok, "{said}");
    assert!(
        said.contains("linked west (west.example): wrote secret fedmesh-system/fedmesh-join-token"),
        "{said}"
    );
    let secret = api
        .get("secret", "fedmesh-system", "fedmesh-join-token")
        .unwrap();
    let token = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        secret["data"]["token"].as_str().unwrap(),
    )
    .unwrap();
    let token = String::from_utf8(token).unwrap();
    assert!(token.starts_with("fmj1."), "{token}");
    assert!(!said.contains(&token), "the token is never printed");
    let cm = api
        .get("configmap", "fedmesh-system", "fedmesh-federation")
        .unwrap();
    assert_eq!(cm["data"]["hub"], "hub.example:7443", "{cm}");
    assert_eq!(cm["data"]["gateway"], "172.18.0.3:30443", "{cm}");
    // The hub knows the token: for west, not used yet.
    let mut list = vec![
        "hub".to_string(),
        "token".into(),
        "list".into(),
        "-o".into(),
        "json".into(),
    ];
    list.extend(admin_args(&hub));
    let out = run(&list);
    let tokens: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 1, "{tokens}");
    assert_eq!(tokens[0]["cluster"], "west", "{tokens}");
    // Linked already: refused, and no second token made.
    let (ok, said) = link();
    assert!(!ok, "{said}");
    assert!(said.contains("exists already"), "{said}");
    let out = run(&list);
    let tokens: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        tokens.as_array().unwrap().len(),
        1,
        "no second token: {tokens}"
    );
}

/// The control plane's sidecar injection webhook, called by a real API server: a bare Pod created
/// in a namespace labelled `fedmesh.io/inject=enabled` is stored with the sidecar (a native
/// sidecar: this API server is 1.29+), one in another namespace is not, one that cannot be
/// injected (host network) is refused with what to do; and a Deployment sent as an
/// AdmissionReview, as the API server would send it, gets its pod template injected. TLS is the
/// cluster CA's: the control plane sets the webhook configuration's caBundle to it (`fedmesh ca
/// bundle --format pem`).
#[test]
fn the_webhook_injects_pods_the_api_server_sends_it() {
    let Some(api) = KubeApiServer::start() else {
        return;
    };
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/multicluster/base/crds");
    api.kubectl_ok(&["apply", "-k", crds], None);
    api.wait_crds_established();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d);
    let token_file = join_token_file(d, &hub, "east");
    let mut args = cp_args(d, &hub, "east", "east-data", &token_file, free_port());
    let i = args.iter().position(|a| a == "--source").unwrap();
    args[i + 1] = "kubernetes".into();
    let port = free_port();
    args.extend([
        "--webhook-listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--webhook-host".into(),
        "127.0.0.1".into(),
        "--inject-image".into(),
        "registry.example/fedmesh:1.2.3".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = api.admin_kubeconfig.to_str().unwrap().to_string();
    let cp = Proc::start_with_env("east", &args, &[("KUBECONFIG", &kubeconfig)], d);
    wait_until("the webhook listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let bundle = fedmesh_ok(&[
        "ca",
        "bundle",
        "--dir",
        d.join("east-data/ca").to_str().unwrap(),
        "--format",
        "pem",
    ]);
    let bundle_file = d.join("bundle.pem");
    std::fs::write(&bundle_file, &bundle.stdout).unwrap();
    let ca_bundle =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bundle.stdout);
    api.apply(&format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: fedmesh-sidecar-injector}}
webhooks:
- name: inject.fedmesh.io
  clientConfig: {{url: "https://127.0.0.1:{port}/inject"}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}]
  namespaceSelector: {{matchLabels: {{fedmesh.io/inject: enabled}}}}
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{fedmesh.io/inject: enabled}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: plain}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: default, namespace: shop}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: default, namespace: plain}}
"#
    ));
    // The control plane sets the configuration's caBundle to its CA.
    wait_until(
        "the caBundle set by the control plane",
        Duration::from_secs(90),
        || {
            let mwc = api.get(
                "mutatingwebhookconfiguration",
                "",
                "fedmesh-sidecar-injector",
            );
            let set = mwc.is_some_and(|m| {
                m["webhooks"][0]["clientConfig"]["caBundle"] == ca_bundle.as_str()
            });
            if !set {
                std::thread::sleep(Duration::from_millis(250));
            }
            set
        },
    );
    let pod = |ns: &str, name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  {extra}containers: [{{name: app, image: nginx}}]\n"
        )
    };
    api.apply(&pod("shop", "web", ""));
    let web = api.get("pod", "shop", "web").unwrap();
    let init: Vec<&str> = web["spec"]["initContainers"]
        .as_array()
        .unwrap_or_else(|| panic!("not injected: {web}"))
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["fedmesh-init", "fedmesh-proxy"], "{web}");
    let proxy = &web["spec"]["initContainers"][1];
    assert_eq!(
        proxy["restartPolicy"], "Always",
        "a native sidecar: {proxy}"
    );
    assert_eq!(proxy["image"], "registry.example/fedmesh:1.2.3");
    assert_eq!(
        web["metadata"]["annotations"]["fedmesh.io/inject"],
        "injected"
    );
    let containers = web["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "the app alone: {web}");

    api.apply(&pod("plain", "web", ""));
    let plain = api.get("pod", "plain", "web").unwrap();
    assert!(plain["spec"]["initContainers"].is_null(), "{plain}");

    let refused = api.kubectl(
        &["apply", "-f", "-"],
        Some(&pod("shop", "node-agent", "hostNetwork: true\n  ")),
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    eprintln!("kubectl apply (a host-network pod): {said}");
    eprintln!(
        "injected pod's init containers: {}",
        web["spec"]["initContainers"]
    );
    assert!(!refused.status.success(), "a host-network pod was admitted");
    assert!(
        said.contains("uses hostNetwork") && said.contains("fedmesh.io/inject: disabled"),
        "{said}"
    );

    // A Deployment, as an AdmissionReview (what an API server sends), over the webhook's TLS.
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f0a4c5e-0000-4000-8000-000000000001",
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "api", "namespace": "shop"},
                "spec": {"template": {"metadata": {"labels": {"app": "api"}},
                    "spec": {"containers": [{"name": "app", "image": "api:1"}]}}}
            }
        }
    });
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&bundle_file)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &review.to_string(),
        ])
        .arg(format!("https://127.0.0.1:{port}/inject"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer["response"]["uid"],
        "7f0a4c5e-0000-4000-8000-000000000001"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let patch = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        answer["response"]["patch"].as_str().unwrap(),
    )
    .unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    let template = &patch[0]["value"]["template"];
    assert_eq!(patch[0]["path"], "/spec", "{patch}");
    assert_eq!(
        template["spec"]["initContainers"][1]["name"], "fedmesh-proxy",
        "{patch}"
    );
    assert_eq!(
        template["metadata"]["annotations"]["fedmesh.io/inject"],
        "injected"
    );
    assert!(cp.log().contains("injected the sidecar"), "{}", cp.log());
}

/// A proxy's zone comes from its pod's node, as the control plane reads them with its own
/// service account (the kind manifests' RBAC): only for a pod that runs as the proxy's service
/// account, never from a label on the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_zone_comes_from_its_pods_node() {
    use fedmesh_federation::control_plane::locality::PodLocality;
    let Some(api) = tokio::task::block_in_place(KubeApiServer::start) else {
        return;
    };
    tokio::task::block_in_place(|| {
        api.install_fedmesh("east");
        api.apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: us-east-1a}}\n",
        );
        api.create_pod("shop", "web-1", "web", "node-a", "Running");
        // A label on the pod claiming another zone changes nothing.
        api.kubectl_ok(
            &[
                "label",
                "pod",
                "web-1",
                "-n",
                "shop",
                "topology.kubernetes.io/zone=us-east-1z",
            ],
            None,
        );
    });
    let client = api
        .client_as("fedmesh-system", "fedmesh-control-plane")
        .await;
    let locality = PodLocality::new(client);
    let web = fedmesh_api::SpiffeId::new("spiffe://east.fedmesh.test/ns/shop/sa/web").unwrap();
    assert_eq!(
        locality.zone_of(&web, "web-1").await.as_deref(),
        Some("us-east-1a")
    );
    let other = fedmesh_api::SpiffeId::new("spiffe://east.fedmesh.test/ns/shop/sa/other").unwrap();
    assert_eq!(
        locality.zone_of(&other, "web-1").await,
        None,
        "another service account's pod lends no zone"
    );
    assert_eq!(locality.zone_of(&web, "no-such-pod").await, None);
}
