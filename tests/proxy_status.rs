//! `fedmesh proxy-status`: every sidecar and gateway of the clusterset, as their control planes
//! report them to the hub, and `fedmesh control-plane proxy-status` for one control plane; in
//! the in-process testbed, read with the real CLI.

mod support;

use std::time::Duration;

use support::fedmesh;
use support::mesh::{client_workload, testbed};

/// `fedmesh proxy-status ARGS` against the testbed's hub: stdout, or stderr on failure.
fn proxy_status(tb: &fedmesh_testbed::Testbed, args: &[&str]) -> Result<String, String> {
    let admin = format!("http://{}", tb.hub_admin);
    let mut all = vec![
        "proxy-status",
        "--admin",
        &admin,
        "--admin-token",
        &tb.hub_admin_token,
    ];
    all.extend_from_slice(args);
    let out = fedmesh(&all);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Polls `cond` (a blocking check) every 200 ms for up to 30 s.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if tokio::task::block_in_place(&mut cond) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn listed(tb: &fedmesh_testbed::Testbed) -> Vec<(String, String, String, String)> {
    let doc: serde_json::Value =
        serde_json::from_str(&proxy_status(tb, &["-o", "json"]).unwrap()).unwrap();
    let mut v: Vec<_> = doc
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let f = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            (f("cluster"), f("identity"), f("role"), f("sync"))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_is_listed_with_its_sync_state_and_leaves_when_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let east = tb.cluster("east");
    let web = client_workload(east, "web", "e1").await;

    let want = vec![
        (
            "east".to_string(),
            "spiffe://east.fedmesh.test/ns/fedmesh-system/sa/east-west-gateway".to_string(),
            "gateway".to_string(),
            "SYNCED".to_string(),
        ),
        (
            "east".into(),
            "spiffe://east.fedmesh.test/ns/shop/sa/web".into(),
            "sidecar".into(),
            "SYNCED".into(),
        ),
        (
            "west".into(),
            "spiffe://west.fedmesh.test/ns/fedmesh-system/sa/east-west-gateway".into(),
            "gateway".into(),
            "SYNCED".into(),
        ),
    ];
    let mut last = Vec::new();
    let ok = eventually(|| {
        last = listed(&tb);
        last == want
    })
    .await;
    assert!(ok, "listed: {last:?}");

    // The table, as a person reads it (plain columns when piped).
    let table = tokio::task::block_in_place(|| proxy_status(&tb, &["--cluster", "east"])).unwrap();
    assert!(table.starts_with("CLUSTER"), "{table}");
    assert!(table.contains("SYNCED"), "{table}");
    assert!(
        table.lines().skip(1).all(|l| l.starts_with("east ")),
        "only east's proxies: {table}"
    );
    assert!(
        !table.contains('│'),
        "no box characters when piped: {table}"
    );

    // One control plane's own view, through its admin socket.
    let data = &east.data;
    let out = tokio::task::block_in_place(|| {
        fedmesh(&[
            "control-plane",
            "proxy-status",
            "-o",
            "json",
            "--data-dir",
            data.to_str().unwrap(),
        ])
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc.as_array().unwrap().len(), 2, "{doc}");
    assert!(
        doc.as_array()
            .unwrap()
            .iter()
            .all(|p| p["svid_not_after"].is_string() && p["acked_at"].is_string()),
        "{doc}"
    );

    // A sidecar that goes away leaves the list.
    web.stop_and_drain().await;
    drop(web);
    let ok = eventually(|| {
        last = listed(&tb);
        !last.iter().any(|p| p.1.ends_with("/sa/web"))
    })
    .await;
    assert!(ok, "listed: {last:?}");
    tb.shutdown().await;
}
