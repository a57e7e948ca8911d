//! A running control plane's CA, operated as the README shows (`fedmesh control-plane ca status
//! | rotate --step ...` through its admin socket), and its own certificate kept fresh when SVIDs
//! are short-lived. Real hub, control plane and agent processes on loopback.
//! `tests/trust_faults.rs` rotates CAs this way in three clusters under load.

mod support;

use std::path::Path;
use std::time::Duration;

use support::federation::*;
use support::*;

/// `fedmesh control-plane ca ARGS --data-dir <data>`.
fn ca(data: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["control-plane", "ca"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", data.to_str().unwrap()]);
    fedmesh(&all)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The authorities as `ca status -o json` lists them: (id, state, retire_at).
fn authorities(data: &Path) -> (serde_json::Value, Vec<(String, String, Option<String>)>) {
    let out = ca(data, &["status", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = support::ca_authorities(&v);
    (v, list)
}

#[test]
fn a_running_control_planes_ca_rotates_from_the_cli_and_its_own_certificate_follows_short_svids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = start_hub(d);
    let port = free_port();
    let token = join_token_file(d, &hub, "east");
    let mut args = cp_args(d, &hub, "east", "east-data", &token, port);
    let admin = format!("127.0.0.1:{}", free_port());
    args.extend(["--svid-ttl", "4s", "--max-svid-ttl", "4s"].map(String::from));
    args.extend(["--admin-listen".to_string(), admin.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _cp = Proc::start("east", &args, d);
    let data = d.join("east-data");
    wait_until(
        "the control plane's admin socket",
        Duration::from_secs(30),
        || data.join("admin.sock").exists(),
    );

    // Its HTTP admin port, for Prometheus and the kubelet's probes.
    let admin_addr: std::net::SocketAddr = admin.parse().unwrap();
    let get =
        |path: &str| support::netns::http_get(admin_addr, path, "cp").unwrap_or((0, String::new()));
    wait_until(
        "the control plane joined to the hub",
        Duration::from_secs(30),
        || get("/readyz").1.contains("connected to the hub"),
    );
    assert_eq!(get("/healthz"), (200, "ok\n".to_string()));
    let (code, metrics) = get("/metrics");
    assert_eq!(code, 200);
    for series in [
        "fedmesh_control_plane_hub_connected 1",
        "fedmesh_control_plane_ca_authorities{state=\"active\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }

    let (v, list) = authorities(&data);
    assert_eq!(v["trust_domain"], "east.example");
    assert_eq!(v["max_svid_ttl_secs"], 4);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].1, "active");
    let first = list[0].0.clone();
    let sequence = v["bundle_sequence"].as_u64().unwrap();

    // The CA's files belong to the running process: the offline command says where to go.
    let out = fedmesh(&[
        "ca",
        "rotate",
        "--dir",
        data.join("ca").to_str().unwrap(),
        "--step",
        "prepare",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("a running control plane owns this CA")
            && text(&out.stderr).contains("fedmesh control-plane ca rotate --step STEP"),
        "{}",
        text(&out.stderr)
    );
    // Steps out of order are refused, saying what comes first.
    let out = ca(&data, &["rotate", "--step", "activate"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no prepared authority to activate; prepare one first"),
        "{}",
        text(&out.stderr)
    );
    let out = ca(&data, &["rotate", "--step", "prune"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nothing to prune: no authority is retired"),
        "{}",
        text(&out.stderr)
    );

    // Prepare: a second authority in the bundle (a new sequence), signing nothing yet.
    let out = ca(&data, &["rotate", "--step", "prepare"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("AUTHORITY") && table.contains("prepared"),
        "{table}"
    );
    let (v, list) = authorities(&data);
    assert_eq!(v["bundle_sequence"].as_u64().unwrap(), sequence + 1);
    let next = list.iter().find(|a| a.1 == "prepared").unwrap().0.clone();

    // Activate: the next one signs; the first is retired, with the time it leaves the bundle.
    let out = ca(&data, &["rotate", "--step", "activate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, list) = authorities(&data);
    let retired = list.iter().find(|a| a.0 == first).unwrap();
    assert_eq!(retired.1, "retired");
    let leaves = retired
        .2
        .clone()
        .expect("a retired authority says when it goes");
    assert!(text(&out.stdout).contains(&leaves), "{}", text(&out.stdout));
    assert_eq!(list.iter().find(|a| a.0 == next).unwrap().1, "active");

    // Pruning now would strand SVIDs the first authority signed: refused, saying until when.
    let out = ca(&data, &["rotate", "--step", "prune"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "nothing to prune yet: retired authority {first} may still vouch for SVIDs it signed until {leaves}"
        )),
        "{err}"
    );

    // Several SVID lifetimes later, a new agent still reaches the control plane (whose own
    // certificate is renewed at half its 4 s) and gets its workload's SVID.
    std::thread::sleep(Duration::from_secs(9));
    const WEB: &str = "spiffe://east.example/ns/shop/sa/web";
    let node_token = enroll(&data, "node-1", WEB, &d.join("node-1.token"));
    let entries = d.join("entries.yaml");
    entries_for_me(&entries, WEB);
    let (_agent, socket) = start_agent(d, "agent", port, "node-1", &node_token, &entries);
    let mut got = None;
    wait_until(
        "an SVID from the new agent",
        Duration::from_secs(30),
        || {
            got = fetched_id(&socket);
            got.is_some()
        },
    );
    assert_eq!(got.as_deref(), Some(WEB));

    // Once every SVID of the first authority has expired (4 s, plus 30 s for clock skew), it
    // goes: by the operator's prune, or the control plane's own schedule if that comes first.
    wait_until(
        "the retired authority pruned",
        Duration::from_secs(90),
        || {
            let out = ca(&data, &["rotate", "--step", "prune"]);
            let gone =
                out.status.success() || text(&out.stderr).contains("no authority is retired");
            if !gone {
                std::thread::sleep(Duration::from_secs(1));
            }
            gone
        },
    );
    let (v, list) = authorities(&data);
    assert_eq!(list, vec![(next, "active".to_string(), None)]);
    assert_eq!(v["bundle_sequence"].as_u64().unwrap(), sequence + 2);
}
