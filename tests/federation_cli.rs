//! The hub and control planes as users run them: real processes on loopback, joined with tokens
//! from `fedmesh hub token create`, inspected with `fedmesh status` and `fedmesh explain`, and the
//! admin API's authentication, OpenAPI document and health endpoints.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use support::federation::*;
use support::*;

/// A raw HTTP/1.1 GET; returns (status code, body).
fn http_get(base: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"10.0.0.1\"]\n  zone: a\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: shop}\n";

#[test]
fn status_and_explain_show_the_clusterset_as_the_hub_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let _east = start_cp(dir.path(), &hub, "east");
    let _west = start_cp(dir.path(), &hub, "west");
    std::fs::write(dir.path().join("east-src/web.yaml"), WEB).unwrap();

    let status = || {
        let mut a = vec!["status".to_string(), "-o".into(), "json".into()];
        a.extend(admin_args(&hub));
        let out = run(&a);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    wait_until(
        "both clusters and the export",
        Duration::from_secs(30),
        || {
            let s = status();
            s["clusters"].as_array().unwrap().len() == 2
                && s["services"].as_array().unwrap().len() == 1
        },
    );
    let s = status();
    let east = s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "east")
        .unwrap();
    assert_eq!(east["trust_domain"], "east.example");
    assert_eq!(east["connected"], true);
    assert_eq!(east["exports"], 1);
    assert!(east["bundle_sequence"].as_u64().is_some());
    assert_eq!(s["services"][0]["service"], "shop/web");
    assert_eq!(s["services"][0]["clusters"][0]["cluster"], "east");

    // The table form is for people; piped (as here), it is plain columns that awk can split.
    let mut a = vec!["status".to_string()];
    a.extend(admin_args(&hub));
    let table = String::from_utf8(run(&a).stdout).unwrap();
    assert!(
        table.contains("east.example") && table.contains("shop/web"),
        "{table}"
    );
    assert!(
        !table.contains(['│', '─', '┌', '╭', '|']),
        "no borders when piped: {table}"
    );
    let east_row: Vec<&str> = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("east"))
        .unwrap_or_else(|| panic!("a row starting with east: {table}"))
        .split_whitespace()
        .collect();
    assert_eq!(east_row[1], "east.example", "{table}");
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.split_whitespace().next() == Some("CLUSTER")),
        "{table}"
    );

    // YAML says what JSON says.
    let mut a = vec!["status".to_string(), "-o".into(), "yaml".into()];
    a.extend(admin_args(&hub));
    let out = run(&a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let y: serde_json::Value =
        serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(y["services"], s["services"]);
    assert_eq!(y["clusters"].as_array().unwrap().len(), 2);

    let mut a = vec![
        "explain".to_string(),
        "shop/web".into(),
        "--from".into(),
        "west".into(),
    ];
    a.extend(admin_args(&hub));
    let out = run(&a);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("reachable through gateway") && text.contains("routable"),
        "{text}"
    );

    let mut a = vec![
        "explain".to_string(),
        "shop/db".into(),
        "--from".into(),
        "west".into(),
    ];
    a.extend(admin_args(&hub));
    let mut bad = a.clone();
    bad[1] = "db".into();
    let out = run(&bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NAME.NAMESPACE.svc.clusterset.local"),
        "a service it cannot read says which forms it takes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&a);
    assert_eq!(out.status.code(), Some(2), "not routable exits 2");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not exported by any cluster"));

    // As the README shows: the hub and the token from the environment, no flags; JSON for scripts;
    // the service by its DNS name, as a user copies it from an app's config.
    let out = std::process::Command::new(fedmesh_bin())
        .args([
            "explain",
            "web.shop.svc.clusterset.local",
            "--from",
            "west",
            "-o",
            "json",
        ])
        .env("FEDMESH_ADMIN", &hub.admin)
        .env(
            "FEDMESH_ADMIN_TOKEN",
            std::fs::read_to_string(&hub.token_file).unwrap().trim(),
        )
        // The default token file must not be what answered.
        .env("HOME", dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["routable"], true, "{e}");
    assert_eq!(e["service"], "shop/web", "{e}");
    let out = std::process::Command::new(fedmesh_bin())
        .args(["status"])
        .env("FEDMESH_ADMIN", &hub.admin)
        .env("FEDMESH_ADMIN_TOKEN", "not-the-token")
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("the admin token is wrong"),
        "FEDMESH_ADMIN_TOKEN is the token used: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_admin_api_requires_the_token_and_documents_itself() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let token = std::fs::read_to_string(&hub.token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        std::fs::metadata(&hub.token_file)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o777
            })
            .unwrap(),
        0o600
    );
    let (code, body) = http_get(&hub.admin, "/api/v1/clusters", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Authorization"), "{body}");
    let (code, _) = http_get(
        &hub.admin,
        "/api/v1/clusters",
        Some("wrong-token-wrong-token"),
    );
    assert_eq!(code, 401);
    let (code, body) = http_get(&hub.admin, "/api/v1/clusters", Some(&token));
    assert_eq!((code, body.trim()), (200, "[]"));

    let (code, body) = http_get(&hub.admin, "/api/openapi.json", None);
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/clusters",
        "/api/v1/services",
        "/api/v1/bundles",
        "/api/v1/explain",
        "/api/v1/tokens",
        "/api/v1/clusters/{name}/imports",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    assert_eq!(http_get(&hub.admin, "/healthz", None).0, 200);
    let (code, body) = http_get(&hub.admin, "/readyz", None);
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(&hub.admin, "/metrics", None);
    assert_eq!(code, 200);
    assert!(body.contains("fedmesh_hub_connected_clusters"), "{body}");

    // Bad requests say what is wrong.
    let (code, body) = http_get(
        &hub.admin,
        "/api/v1/explain?service=web&from=east",
        Some(&token),
    );
    assert_eq!(code, 400);
    assert!(body.contains("NAMESPACE/NAME"), "{body}");
    let mut a = vec![
        "hub".to_string(),
        "token".into(),
        "create".into(),
        "--cluster".into(),
        "Not_A_Label".into(),
        "--trust-domain".into(),
        "x.example".into(),
    ];
    a.extend(admin_args(&hub));
    let out = run(&a);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DNS label"));
    // A token names the trust domain it registers.
    a[4] = "east".into();
    a.drain(5..7);
    let out = run(&a);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--trust-domain"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(hub.proc);
}

#[test]
fn the_checked_in_crds_are_what_fedmesh_crds_prints() {
    let out = fedmesh(&["crds"]);
    assert!(out.status.success());
    let checked_in = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/multicluster/base/crds/fedmesh-crds.yaml"),
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        checked_in,
        "regenerate with: fedmesh crds > deploy/multicluster/base/crds/fedmesh-crds.yaml"
    );
}

#[test]
fn a_control_plane_without_a_join_token_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    // East's control plane, joining the hub with `token` (flags), on ports it never opens.
    let control_plane = |token: &[&str]| {
        let data = dir.path().join("data");
        let source = format!("dir:{}", dir.path().join("src").display());
        let mut args = vec![
            "control-plane",
            "--cluster",
            "east",
            "--trust-domain",
            "east.example",
            "--data-dir",
            data.to_str().unwrap(),
            "--source",
            &source,
            "--hub",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(token);
        fedmesh(&args)
    };
    let out = control_plane(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fedmesh hub token create"), "{err}");
    // A token file others can read, or an empty one, is refused before anything starts.
    let token = dir.path().join("east.token");
    std::fs::write(&token, "fmj1.x\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let with_file =
        |f: &std::path::Path| control_plane(&["--join-token-file", f.to_str().unwrap()]);
    let out = with_file(&token);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("chmod 600") && err.contains("east.token"),
        "{err}"
    );
    std::fs::write(&token, "\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let err = String::from_utf8_lossy(&with_file(&token).stderr).to_string();
    assert!(err.contains("is empty"), "{err}");
    let out = fedmesh(&[
        "control-plane",
        "--cluster",
        "East",
        "--trust-domain",
        "e",
        "--source",
        "dir:/x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("DNS label"));
    let out = fedmesh(&[
        "control-plane",
        "--cluster",
        "east",
        "--trust-domain",
        "e",
        "--source",
        "s3:/x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("dir:PATH or kubernetes"));
}

/// `fedmesh ARGS` with the hub's admin API and an admin token from `token_file`; (ok, stdout,
/// stderr).
fn as_token(hub: &Hub, token_file: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--admin",
        hub.admin.as_str(),
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ]);
    let out = fedmesh(&all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Named admin tokens with roles: a read-only token reads status but changes nothing and sees no
/// tokens; an admin token creates, lists and revokes join tokens; a revoked token stops working;
/// the audit log names the token behind each change; a revoked join token cannot join.
#[test]
fn admin_tokens_have_names_and_roles_and_tokens_can_be_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d);
    let root = hub.token_file.clone();

    let reader = d.join("reader.token");
    let (ok, _, err) = as_token(
        &hub,
        &root,
        &[
            "hub",
            "admin-token",
            "create",
            "--name",
            "ci-readonly",
            "--role",
            "read-only",
            "--out",
            reader.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("wrote admin token ci-readonly (read-only)"),
        "{err}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&reader).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, ops_token, err) = as_token(
        &hub,
        &root,
        &[
            "hub",
            "admin-token",
            "create",
            "--name",
            "ops",
            "--role",
            "admin",
        ],
    );
    assert!(ok && ops_token.trim().starts_with("fma1.ops."), "{err}");
    let ops = d.join("ops.token");
    write_secret(&ops, ops_token.trim());
    let (ok, _, err) = as_token(
        &hub,
        &root,
        &[
            "hub",
            "admin-token",
            "create",
            "--name",
            "ops",
            "--role",
            "read-only",
        ],
    );
    assert!(
        !ok && err.contains("an admin token named ops exists"),
        "{err}"
    );

    // Read-only: reads, never changes, never lists tokens.
    let (ok, _, err) = as_token(&hub, &reader, &["status"]);
    assert!(ok, "a read-only token reads status: {err}");
    let (ok, _, err) = as_token(
        &hub,
        &reader,
        &[
            "hub",
            "token",
            "create",
            "--cluster",
            "east",
            "--trust-domain",
            "east.example",
        ],
    );
    assert!(
        !ok && err.contains("admin token ci-readonly is read-only"),
        "{err}"
    );
    let (ok, _, err) = as_token(&hub, &reader, &["hub", "token", "list"]);
    assert!(!ok && err.contains("is read-only"), "{err}");

    // Admin: creates a join token, lists it, revokes it; the revoked token cannot join.
    let (ok, join_token, err) = as_token(
        &hub,
        &ops,
        &[
            "hub",
            "token",
            "create",
            "--cluster",
            "east",
            "--trust-domain",
            "east.example",
        ],
    );
    assert!(ok, "{err}");
    let join_token = join_token.trim().to_string();
    let id = join_token.split('.').nth(1).unwrap().to_string();
    let (ok, list, err) = as_token(&hub, &ops, &["hub", "token", "list"]);
    assert!(ok, "{err}");
    assert!(
        list.lines()
            .any(|l| l.starts_with(&format!("{id}\teast\teast.example\t"))
                && l.ends_with("\tunused")),
        "{list}"
    );
    assert!(
        !list.contains(join_token.split('.').nth(2).unwrap()),
        "no secret listed: {list}"
    );
    let (ok, out, err) = as_token(&hub, &ops, &["hub", "token", "revoke", &id]);
    assert!(
        ok && out.contains(&format!("revoked join token {id}")),
        "{err}"
    );
    let (ok, _, err) = as_token(&hub, &ops, &["hub", "token", "revoke", &id]);
    assert!(
        !ok && err.contains(&format!("no join token has ID {id}")),
        "{err}"
    );
    let token_file = d.join("east.token");
    write_secret(&token_file, &join_token);
    let args = cp_args(d, &hub, "east", "east-data", &token_file, free_port());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cp = Proc::start("east", &args, d);
    assert!(
        cp.wait_exit(Duration::from_secs(30))
            .is_some_and(|s| !s.success()),
        "a revoked join token does not join: {}",
        cp.log()
    );
    assert!(
        cp.log().contains(&format!("join token {id} is unknown")),
        "{}",
        cp.log()
    );

    let (ok, list, err) = as_token(&hub, &ops, &["hub", "admin-token", "list"]);
    assert!(ok, "{err}");
    assert!(list.contains("ci-readonly\tread-only\t"), "{list}");
    assert!(list.contains("ops\tadmin\t"), "{list}");

    // The audit log names the token that made each change.
    let root_token = std::fs::read_to_string(&root).unwrap();
    let (code, audit) = http_get(&hub.admin, "/api/v1/audit", Some(root_token.trim()));
    assert_eq!(code, 200, "{audit}");
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let by = |action: &str| -> Vec<String> {
        audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == action)
            .map(|r| {
                format!(
                    "{} {}",
                    r["actor"].as_str().unwrap(),
                    r["target"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        by("admin-token.create"),
        vec!["admin token ops", "admin token ci-readonly"]
    );
    assert_eq!(by("token.create"), vec!["admin token ops east"]);
    assert_eq!(by("token.revoke"), vec![format!("admin token ops {id}")]);

    // Revoked: the next request with it is refused.
    let (ok, out, err) = as_token(
        &hub,
        &root,
        &["hub", "admin-token", "revoke", "ci-readonly"],
    );
    assert!(
        ok && out.contains("revoked admin token ci-readonly"),
        "{err}"
    );
    let (ok, _, err) = as_token(&hub, &reader, &["status"]);
    assert!(!ok && err.contains("the admin token is wrong"), "{err}");
}

/// An admin token file others can read is refused before anything is sent, as a key would be;
/// the error says how to fix it.
#[test]
fn an_admin_token_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    std::fs::write(&file, "fma1.ops.secret\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(fedmesh_bin())
        .args([
            "status",
            "--admin",
            "http://127.0.0.1:9",
            "--admin-token-file",
        ])
        .arg(&file)
        .env_remove("FEDMESH_ADMIN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("must exist and be readable only by its owner (chmod 600)"),
        "{err}"
    );
    assert!(!err.contains("secret"), "the token never appears: {err}");
}

/// A node whose agent joins again (a reinstall, a stolen disk image) gets a new registration:
/// the earlier agent of that node can have no new SVID signed, and says why in its log; the new
/// one serves. Both are `fedmesh agent` processes.
#[test]
fn an_agent_joining_again_leaves_the_nodes_earlier_agent_unable_to_sign() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d);
    let port = free_port();
    let _cp = start_cp_on(d, &hub, "east", port);
    let data = d.join("east-data");
    wait_until(
        "the control plane's admin socket",
        Duration::from_secs(30),
        || data.join("admin.sock").exists(),
    );
    const WEB: &str = "spiffe://east.example/ns/shop/sa/web";
    const API: &str = "spiffe://east.example/ns/shop/sa/api";
    let first_entries = d.join("first.yaml");
    entries_for_me(&first_entries, WEB);
    let token = enroll(&data, "node-1", WEB, &d.join("first.token"));
    let (first, first_socket) = start_agent(d, "first", port, "node-1", &token, &first_entries);
    assert_eq!(fetched_id(&first_socket).as_deref(), Some(WEB));

    // The node joins again with a new token.
    cp_admin(
        &data,
        &[
            "token",
            "create",
            "--node",
            "node-1",
            "--out",
            d.join("second.token").to_str().unwrap(),
        ],
    );
    let second_entries = d.join("second.yaml");
    entries_for_me(&second_entries, WEB);
    let (_second, second_socket) = start_agent(
        d,
        "second",
        port,
        "node-1",
        &d.join("second.token"),
        &second_entries,
    );
    assert_eq!(fetched_id(&second_socket).as_deref(), Some(WEB));

    // The node may now host api too; the first agent, told to serve it, cannot get it signed.
    cp_admin(
        &data,
        &["entry", "create", "--node", "node-1", "--spiffe-id", API],
    );
    entries_for_me(&first_entries, API);
    wait_until(
        "the first agent to be refused",
        Duration::from_secs(30),
        || first.log().contains("earlier registration of this node"),
    );
    assert_ne!(fetched_id(&first_socket).as_deref(), Some(API));
    // The second agent gets it.
    entries_for_me(&second_entries, API);
    wait_until(
        "the second agent to serve api",
        Duration::from_secs(30),
        || fetched_id(&second_socket).as_deref() == Some(API),
    );
}

/// Each cluster's node agent, run as an operator runs it (`fedmesh agent --control-plane`,
/// enrolled with `fedmesh control-plane entry create` and `token create`), hands its workload an
/// SVID of its own cluster and the bundles of every cluster in the clusterset, which its control
/// plane received through the hub. Read with the Rust `spiffe` crate's X509Source.
#[test]
fn each_clusters_agent_serves_its_workloads_every_clusters_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d);
    let names = ["east", "west", "central"];
    let mut procs = Vec::new();
    let mut sockets = Vec::new();
    for name in names {
        let port = free_port();
        procs.push(start_cp_on(d, &hub, name, port));
        let cp_data = d.join(format!("{name}-data"));
        wait_until(
            "the control plane's admin socket",
            Duration::from_secs(30),
            || cp_data.join("admin.sock").exists(),
        );
        let id = format!("spiffe://{name}.example/ns/shop/sa/web");
        let token = enroll(
            &cp_data,
            "node-1",
            &id,
            &d.join(format!("{name}-agent-token")),
        );
        let entries = d.join(format!("{name}-entries.yaml"));
        entries_for_me(&entries, &id);
        let (agent, socket) = start_agent(
            d,
            &format!("{name}-agent"),
            port,
            "node-1",
            &token,
            &entries,
        );
        procs.push(agent);
        sockets.push((name, id, socket));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, id, socket) in sockets {
        rt.block_on(async {
            let source = spiffe::X509Source::builder()
                .endpoint(format!("unix:{}", socket.display()))
                .build()
                .await
                .unwrap();
            assert_eq!(source.svid().unwrap().spiffe_id().to_string(), id);
            let tds = || {
                let mut t: Vec<String> = source
                    .bundle_set()
                    .unwrap()
                    .iter()
                    .map(|(td, _)| td.to_string())
                    .collect();
                t.sort();
                t
            };
            // The federated bundles come from the hub through the control plane.
            for _ in 0..600 {
                if tds().len() == 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                tds(),
                ["central.example", "east.example", "west.example"],
                "{name}"
            );
            source.shutdown().await;
        });
    }
}

/// `fedmesh cluster link` on hosts: one command creates the join token (written 0600, never
/// printed) and prints the control plane's command line, which — run as printed — joins; `fedmesh
/// cluster list` shows the cluster and `fedmesh cluster remove` removes it.
#[test]
fn cluster_link_prints_the_line_that_joins_and_cluster_list_shows_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let token_file = dir.path().join("west.token");
    std::fs::create_dir_all(dir.path().join("west-src")).unwrap();
    let cp_port = free_port();
    let mut args: Vec<String> = [
        "cluster",
        "link",
        "--cluster",
        "west",
        "--trust-domain",
        "west.example",
        "--hub",
        &hub.grpc,
        "--gateway",
        "127.0.0.1:25443",
        "--out",
        token_file.to_str().unwrap(),
        "--source",
        &format!("dir:{}", dir.path().join("west-src").display()),
        "--data-dir",
        dir.path().join("west").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(admin_args(&hub));
    let out = run(&args);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{said}");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(token.starts_with("fmj1."), "{token}");
    assert!(!said.contains(&token), "the token is never printed: {said}");
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The line to run, as printed.
    let line = said
        .lines()
        .find(|l| l.starts_with("fedmesh control-plane "))
        .unwrap_or_else(|| panic!("no command printed: {said}"));
    assert!(line.contains("--join-token-file") && line.contains("--gateway 127.0.0.1:25443"));
    let mut cp_args: Vec<String> = line.split_whitespace().skip(1).map(String::from).collect();
    // On loopback ports this test chose (the printed line leaves the listeners at their defaults).
    cp_args.extend([
        "--listen".into(),
        format!("127.0.0.1:{cp_port}"),
        "--dns-listen".into(),
        format!("127.0.0.1:{}", free_port()),
    ]);
    let cp_args: Vec<&str> = cp_args.iter().map(String::as_str).collect();
    let _cp = Proc::start("west-cp", &cp_args, dir.path());
    let list = || {
        let mut a = vec!["cluster".to_string(), "list".into()];
        a.extend(admin_args(&hub));
        String::from_utf8_lossy(&run(&a).stdout).into_owned()
    };
    // Connected comes first, its first publish (with the gateway) a moment later.
    wait_until(
        "west joined, connected and published",
        Duration::from_secs(30),
        || {
            list().lines().any(|l| {
                l.starts_with("west ") && l.contains("connected") && l.contains("127.0.0.1:25443")
            })
        },
    );
    let table = list();
    assert!(table.starts_with("CLUSTER"), "{table}");
    assert!(table.contains("127.0.0.1:25443"), "{table}");
    // Again: the token file exists, nothing is created.
    let again = run(&args);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let mut rm = vec!["cluster".to_string(), "remove".into(), "west".into()];
    rm.extend(admin_args(&hub));
    let out = run(&rm);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!list().contains("west "), "{}", list());
}
