//! `fedmesh inject` against golden files, the way a user pipes manifests through it.
//! `FEDMESH_UPDATE_GOLDEN=1 cargo nextest run --test inject` rewrites the expected output.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/inject")
        .join(name)
}

/// Runs `fedmesh inject ARGS` with `stdin`; (exit ok, stdout, stderr).
fn inject(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn inject_matches_the_golden_output_and_is_idempotent() {
    let input = std::fs::read_to_string(golden("input.yaml")).unwrap();
    let (ok, once, err) = inject(&["--image", "fedmesh:dev"], &input);
    assert!(ok, "{err}");
    let want_path = golden("output.yaml");
    if std::env::var_os("FEDMESH_UPDATE_GOLDEN").is_some() {
        std::fs::write(&want_path, &once).unwrap();
    }
    let want = std::fs::read_to_string(&want_path).unwrap();
    assert_eq!(
        once,
        want,
        "fedmesh inject output changed; see {}",
        want_path.display()
    );
    // From a file instead of stdin: the same.
    let (ok, from_file, _) = inject(
        &[
            golden("input.yaml").to_str().unwrap(),
            "--image",
            "fedmesh:dev",
        ],
        "",
    );
    assert!(ok);
    assert_eq!(from_file, once);
    // Injecting the output again changes nothing.
    let (ok, twice, err) = inject(&["--image", "fedmesh:dev"], &once);
    assert!(ok, "{err}");
    assert_eq!(twice, once, "inject is not idempotent");
    // Exactly one sidecar and one init container per injected template; the opted-out one none.
    assert_eq!(once.matches("name: fedmesh-proxy").count(), 2);
    assert_eq!(once.matches("name: fedmesh-init").count(), 2);
    assert!(
        !once.contains("fedmesh:old"),
        "the old sidecar was not replaced"
    );
}

#[test]
fn a_list_is_injected_item_by_item() {
    let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
      {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
       "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {
         "metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}}}}]}"#;
    let (ok, out, err) = inject(&[], list);
    assert!(ok, "{err}");
    assert!(out.contains("name: fedmesh-proxy") && out.contains("fedmesh.io/inject: injected"));
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let (ok, out, err) = inject(&[], "kind: [unclosed\n");
    assert!(!ok && out.is_empty());
    assert!(err.contains("not valid YAML"), "{err}");

    let (ok, _, err) = inject(&[], "- just\n- a list\n");
    assert!(!ok);
    assert!(err.contains("not a Kubernetes object"), "{err}");

    let host_net = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: node}\nspec:\n  template:\n    spec:\n      hostNetwork: true\n      containers: [{name: n, image: n}]\n";
    let (ok, _, err) = inject(&[], host_net);
    assert!(!ok);
    assert!(
        err.contains("hostNetwork") && err.contains("disabled"),
        "{err}"
    );

    let same_uid = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      containers: [{name: x, image: x, securityContext: {runAsUser: 1337}}]\n";
    let (ok, _, err) = inject(&[], same_uid);
    assert!(!ok);
    assert!(err.contains("uid 1337"), "{err}");
}

/// A container's `args`.
fn args_of(container: &serde_json::Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// `--control-plane`, `--proxy-uid` and `--admin-port` reach the injected pod as the README says:
/// the proxy container is told the control plane through the environment variable its flag
/// reads, runs under the proxy uid, and the init container exempts that uid and the admin port.
#[test]
fn the_control_plane_proxy_uid_and_admin_port_flags_reach_the_injected_pod() {
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec:\n  selector: {matchLabels: {app: a}}\n  template:\n    metadata: {labels: {app: a}}\n    spec: {containers: [{name: a, image: a}]}\n";
    let (ok, out, err) = inject(
        &[
            "--control-plane",
            "cp.east.example:15012",
            "--proxy-uid",
            "1400",
            "--admin-port",
            "15090",
        ],
        deployment,
    );
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    let spec = &doc["spec"]["template"]["spec"];
    let named = |list: &str, name: &str| -> serde_json::Value {
        spec[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {list} {name}: {out}"))
            .clone()
    };
    let proxy = named("containers", "fedmesh-proxy");
    let env = |name: &str| {
        proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .map(String::from)
    };
    assert_eq!(
        env("FEDMESH_CONTROL_PLANE").as_deref(),
        Some("cp.east.example:15012")
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 1400);
    let args = args_of(&proxy);
    assert!(
        args.windows(2).any(|w| w == ["--admin", "0.0.0.0:15090"]),
        "{args:?}"
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15090);
    // The sidecar takes its control plane from that variable (its --help says so).
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_fedmesh-proxy"))
        .args(["sidecar", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("[env: FEDMESH_CONTROL_PLANE="), "{help}");

    let init = named("initContainers", "fedmesh-init");
    let args = args_of(&init);
    assert!(
        args.windows(2).any(|w| w == ["--proxy-uid", "1400"]),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--exclude-inbound-ports" && w[1].split(',').any(|p| p == "15090")),
        "{args:?}"
    );
}
