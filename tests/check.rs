//! `fedmesh check`, `fedmesh gateways` and `fedmesh explain` on the in-process testbed, read with
//! the real CLI: a healthy clusterset passes; a proxy that stops taking its configuration, a
//! cluster whose bundle never reached the hub and a stopped gateway each fail with the message
//! that names them; explain names the split, the Service an export lacks and the broken gateway,
//! and what the sidecars' outlier detection ejected.

mod support;

use std::time::{Duration, Instant};

use fedmesh_testbed::Testbed;
use fedmesh_testbed::client::ProxyClient;
use support::mesh::{
    client_workload, endpoints, get, http_workload, serve_http, testbed, url, wait_routable,
};
use support::{Proc, fedmesh};

/// `fedmesh ARGS --admin ... --admin-token ...` against the testbed's hub: (success, stdout + stderr).
fn cli(tb: &Testbed, args: &[&str]) -> (bool, String) {
    let admin = format!("http://{}", tb.hub_admin);
    let mut all = args.to_vec();
    all.extend_from_slice(&["--admin", &admin, "--admin-token", &tb.hub_admin_token]);
    let out = tokio::task::block_in_place(|| fedmesh(&all));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs `fedmesh ARGS` until `want` holds of its outcome (60 s at most); the last outcome.
async fn until(tb: &Testbed, args: &[&str], want: impl Fn(bool, &str) -> bool) -> (bool, String) {
    let start = Instant::now();
    loop {
        let (ok, out) = cli(tb, args);
        if want(ok, &out) || start.elapsed() > Duration::from_secs(60) {
            return (ok, out);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

const SPLIT: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-split, namespace: shop}
spec:
  parentRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews}]
  rules:
  - backendRefs:
    - {group: fedmesh.io, kind: Cluster, name: west, weight: 70}
    - {group: fedmesh.io, kind: Cluster, name: east, weight: 30}
"#;

const ORDERS_EXPORT_ONLY: &str = r#"apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: orders, namespace: shop}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_clusterset_and_names_each_broken_link() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api, _api_app) = http_workload(west, "api", "a").await;
    let (reviews_w, _rw_app) = http_workload(west, "reviews", "a").await;
    let (reviews_e, _re_app) = http_workload(east, "reviews", "a").await;
    serve_http(west, "api", &endpoints(&[&api]));
    serve_http(west, "reviews", &endpoints(&[&reviews_w]));
    serve_http(east, "reviews", &endpoints(&[&reviews_e]));
    let web = client_workload(east, "web", "a").await;
    wait_routable(&tb, &web, "api", &["west"]).await;

    // Healthy: every check passes, each gateway reached from the other cluster with mTLS.
    let (ok, out) = until(&tb, &["check", "--settle", "30s"], |ok, _| ok).await;
    assert!(ok, "check fails on a healthy clusterset:\n{out}");
    eprintln!("fedmesh check (healthy):\n{out}");
    for want in [
        "the hub answers at",
        "east is connected",
        "west holds every cluster's bundle and import",
        "east → west gateway",
        "west → east gateway",
        "mTLS in",
        "hold their latest configuration",
        "0 failed",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(
        !out.contains('\x1b') && !out.contains('│') && !out.contains('✓'),
        "piped output is plain: {out}"
    );
    // As YAML, for scripts: it parses, and says ok.
    let (ok, yaml) = cli(&tb, &["check", "-o", "yaml"]);
    assert!(ok, "{yaml}");
    let doc: serde_json::Value = serde_saphyr::from_str(&yaml).expect("check -o yaml parses");
    assert_eq!(doc["ok"], true, "{yaml}");
    assert!(
        doc["checks"].as_array().unwrap().len() >= 8,
        "every check listed: {yaml}"
    );
    // The gateways, as each cluster reaches the other's.
    let (ok, json) = cli(&tb, &["gateways", "-o", "json"]);
    assert!(ok, "{json}");
    let gws: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(gws.len(), 2, "{json}");
    for g in &gws {
        assert_eq!(g["state"], "reachable", "{json}");
        assert!(g["latency_ms"].as_f64().unwrap() > 0.0, "{json}");
        assert!(
            g["gateway_id"]
                .as_str()
                .unwrap()
                .ends_with("/ns/fedmesh-system/sa/east-west-gateway"),
            "{json}"
        );
    }
    let (_, table) = cli(&tb, &["gateways", "--from", "east"]);
    eprintln!("fedmesh gateways --from east:\n{table}");
    assert!(table.starts_with("FROM"), "{table}");
    assert!(
        table.contains(&format!("east  west     {}", west.gateway_addr)),
        "{table}"
    );

    // Every listing as YAML (it parses) and wide (more columns), plain when piped.
    for args in [
        &["status"][..],
        &["proxy-status"],
        &["gateways"],
        &["cluster", "list"],
        &["hub", "token", "list"],
    ] {
        let mut yaml_args = args.to_vec();
        yaml_args.extend(["-o", "yaml"]);
        let (ok, yaml) = cli(&tb, &yaml_args);
        assert!(ok, "{args:?}: {yaml}");
        serde_saphyr::from_str::<serde_json::Value>(&yaml)
            .unwrap_or_else(|e| panic!("{args:?} -o yaml does not parse: {e}\n{yaml}"));
        let mut wide_args = args.to_vec();
        wide_args.extend(["-o", "wide"]);
        let (ok, wide) = cli(&tb, &wide_args);
        assert!(ok, "{args:?}: {wide}");
        assert!(
            !wide.contains('\x1b') && !wide.contains('│') && !wide.contains('─'),
            "{args:?}: piped output is plain: {wide}"
        );
    }
    let (_, wide) = cli(&tb, &["gateways", "-o", "wide"]);
    assert!(
        wide.contains("GATEWAY ID") && wide.contains("/ns/fedmesh-system/sa/east-west-gateway"),
        "{wide}"
    );
    let (_, wide) = cli(&tb, &["cluster", "list", "-o", "wide"]);
    assert!(
        wide.contains("PROTOCOL") && wide.contains("REPLICA"),
        "{wide}"
    );
    let (_, wide) = cli(&tb, &["proxy-status", "-o", "wide"]);
    assert!(
        wide.contains("CONNECTED") && wide.contains("ACKED AT"),
        "{wide}"
    );

    // Explain names the split east applies to reviews.
    east.write("reviews-split.yaml", SPLIT).unwrap();
    let (_, out) = until(
        &tb,
        &["explain", "reviews.shop", "--from", "east"],
        |_, o| o.contains("HTTPRoute shop/reviews-split"),
    )
    .await;
    eprintln!("fedmesh explain reviews.shop --from east:\n{out}");
    assert!(
        out.contains(
            "HTTPRoute shop/reviews-split in east: any request → cluster west 70%, cluster east 30%"
        ),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "west's gateway {} answered east's mTLS probe",
            west.gateway_addr
        )),
        "{out}"
    );

    // A ServiceExport without its Service: explain says why nothing is exported.
    west.write("orders.yaml", ORDERS_EXPORT_ONLY).unwrap();
    let (ok, out) = until(
        &tb,
        &["explain", "shop/orders", "--from", "east"],
        |_, o| o.contains("cannot export it"),
    )
    .await;
    eprintln!("fedmesh explain shop/orders --from east:\n{out}");
    assert!(
        !ok,
        "explain exits non-zero for a service that is not routable"
    );
    assert!(
        out.contains("west has a ServiceExport shop/orders but cannot export it: there is no Service orders in namespace shop (NoService)"),
        "{out}"
    );
    assert!(
        out.contains("→ in west: create the Service orders in namespace shop"),
        "{out}"
    );

    // A proxy that stops taking its configuration (SIGSTOP) is behind once something changes.
    let agent = east.agent("shop", "stuck").await.unwrap();
    let cp = east.cp_addr.to_string();
    let stuck = Proc::start(
        "stuck-sidecar",
        &[
            "sidecar",
            "--control-plane",
            &cp,
            "--workload-api",
            &agent.endpoint,
            "--node",
            "stuck-pod",
            "--http-proxy",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    let stuck_id = "spiffe://east.fedmesh.test/ns/shop/sa/stuck";
    until(&tb, &["proxy-status", "--cluster", "east"], |_, o| {
        o.lines()
            .any(|l| l.contains(stuck_id) && l.contains("SYNCED"))
    })
    .await;
    let pid = stuck.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (more, _more_app) = http_workload(east, "more", "a").await;
    serve_http(east, "more", &endpoints(&[&more]));
    let (ok, out) = until(&tb, &["check", "--settle", "5s"], |ok, o| {
        !ok && o.contains("is behind")
    })
    .await;
    eprintln!("fedmesh check (a proxy stopped):\n{out}");
    assert!(!ok, "check passes with a proxy behind:\n{out}");
    assert!(
        out.contains(&format!(
            "sidecar {stuck_id} in east (stuck-pod) is behind: sent configuration version"
        )),
        "{out}"
    );
    assert!(
        out.contains("→ fedmesh proxy-status --cluster east; the proxy's log"),
        "{out}"
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let (ok, out) = until(&tb, &["check", "--settle", "20s"], |ok, _| ok).await;
    assert!(ok, "the proxy caught up, check passes again:\n{out}");
    drop(stuck);

    // A cluster that joined but never connected: the hub has no bundle of it.
    let (token, _) = tb
        .hub
        .create_token(
            &fedmesh_api::ClusterName::new("north").unwrap(),
            &fedmesh_api::TrustDomain::new("north.fedmesh.test").unwrap(),
            None,
        )
        .await
        .unwrap();
    fedmesh_federation::control_plane::hub_link::HubCredentials::join(
        &dir.path().join("north-hub"),
        &tb.hub_addr.to_string(),
        &token,
        &fedmesh_api::ClusterName::new("north").unwrap(),
        &fedmesh_api::TrustDomain::new("north.fedmesh.test").unwrap(),
    )
    .await
    .unwrap();
    let (ok, out) = cli(&tb, &["check", "--settle", "1s"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("the hub has no trust bundle of north.fedmesh.test (north): no other cluster can verify its workloads"),
        "{out}"
    );
    assert!(out.contains("north is not connected to the hub"), "{out}");
    let (ok, out) = cli(&tb, &["hub", "cluster", "remove", "north"]);
    assert!(ok, "{out}");

    // West's gateway stopped: east's probes fail, check and explain name it.
    west.stop_gateway();
    let gw = west.gateway_addr.to_string();
    let (ok, out) = until(&tb, &["check", "--settle", "1s"], |_, o| {
        o.contains(&format!("east → west gateway {gw} is unreachable"))
    })
    .await;
    eprintln!("fedmesh check (west's gateway stopped):\n{out}");
    assert!(!ok, "check passes with west's gateway stopped:\n{out}");
    assert!(
        out.contains(&format!(
            "→ fedmesh gateways --cluster west; is `fedmesh gateway` running in west and reachable from east at {gw}?"
        )),
        "{out}"
    );
    assert!(out.contains("check(s) failed"), "{out}");
    let (ok, out) = cli(&tb, &["explain", "shop/api", "--from", "east"]);
    eprintln!("fedmesh explain shop/api --from east (west's gateway stopped):\n{out}");
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("west's gateway {gw} is unreachable from east")),
        "{out}"
    );
    assert!(out.contains("NOT routable"), "{out}");
    tb.shutdown().await;
}

/// Explain shows the endpoints' health as the sidecars see it: east's sidecar, whose requests to
/// west fail, ejects west's gateway; west's own caller ejects the endpoint; explain and
/// `proxy-status -o wide` name both, and say none is ejected once the failures stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_what_the_sidecars_ejected() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api, _api_app) = http_workload(west, "api", "a").await;
    serve_http(west, "api", &endpoints(&[&api]));
    let remote = client_workload(east, "web", "a").await;
    let local = client_workload(west, "web", "a").await;
    wait_routable(&tb, &remote, "api", &["west"]).await;
    wait_routable(&tb, &local, "api", &["west"]).await;
    let (gw, endpoint) = (west.gateway_addr.to_string(), api.inbound.to_string());

    // The app answers 503 (three in a row eject) until explain shows both ejections.
    let (mut from_east, mut from_west) = (
        ProxyClient::new(remote.proxy),
        ProxyClient::new(local.proxy),
    );
    let start = Instant::now();
    let (east_view, west_view) = loop {
        for _ in 0..3 {
            let r = get(&mut from_east, &url("api", "/status/503"), &[]).await;
            assert_eq!(r.status, 503);
            let r = get(&mut from_west, &url("api", "/status/503"), &[]).await;
            assert_eq!(r.status, 503);
        }
        let e = cli(&tb, &["explain", "shop/api", "--from", "east"]);
        let w = cli(&tb, &["explain", "shop/api", "--from", "west"]);
        let shown = e.1.contains("ejected west's gateway") && w.1.contains("ejected endpoint");
        if shown || start.elapsed() > Duration::from_secs(60) {
            break (e, w);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!(
        "fedmesh explain shop/api --from east (west answers 503):\n{}",
        east_view.1
    );
    eprintln!(
        "fedmesh explain shop/api --from west (west answers 503):\n{}",
        west_view.1
    );
    assert!(
        east_view.1.contains(&format!(
            "1 of 1 sidecar(s) in east ejected west's gateway {gw} after requests to shop/api failed"
        )),
        "{}",
        east_view.1
    );
    assert!(
        east_view.1.contains("→ do shop/api's endpoints in west answer 5xx or refuse connections? fedmesh proxy-status --cluster east -o wide"),
        "{}",
        east_view.1
    );
    assert!(
        east_view.0,
        "an ejection is a warning, the service stays routable: {}",
        east_view.1
    );
    assert!(
        west_view.1.contains(&format!(
            "sidecar(s) in west ejected endpoint {endpoint} after requests to shop/api failed"
        )),
        "{}",
        west_view.1
    );
    // proxy-status shows them too: wide as a column, JSON with the time left.
    let (ok, wide) = until(
        &tb,
        &["proxy-status", "--cluster", "east", "-o", "wide"],
        |_, o| o.contains(&format!("west@{gw} (")),
    )
    .await;
    eprintln!("fedmesh proxy-status --cluster east -o wide (west answers 503):\n{wide}");
    assert!(ok && wide.contains("EJECTED"), "{wide}");
    let (_, json) = cli(&tb, &["proxy-status", "-o", "json"]);
    let proxies: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let ejected: Vec<&serde_json::Value> = proxies
        .iter()
        .filter_map(|p| p["ejected"].as_array())
        .flatten()
        .collect();
    assert!(
        ejected.iter().any(|e| e["remote"] == true
            && e["cluster"] == "west"
            && e["address"] == gw.as_str()
            && e["service"] == "shop/api"
            && e["remaining_seconds"].as_f64().is_some_and(|s| s > 0.0)),
        "{json}"
    );

    // The failures stop: the ejections end and explain says so.
    let (ok, out) = until(&tb, &["explain", "shop/api", "--from", "east"], |_, o| {
        o.contains("none ejected by east's 1 sidecar(s)")
    })
    .await;
    eprintln!("fedmesh explain shop/api --from east (failures stopped):\n{out}");
    assert!(
        ok && out.contains("none ejected by east's 1 sidecar(s)"),
        "{out}"
    );
    assert!(!out.contains("ejected west's gateway"), "{out}");
    tb.shutdown().await;
}
