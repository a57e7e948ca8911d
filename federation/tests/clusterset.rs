//! A hub and three control planes in-process, on loopback, with directory sources: exports
//! propagate as ServiceImports (status, DNS), conflicts are reported. (Bundles reaching every
//! cluster's Workload API and an agent joining again, with agent processes:
//! tests/federation_cli.rs.)

mod common;

use std::time::Duration;

use common::*;
use fedmesh_api::ServiceKey;
use fedmesh_api::pb::federation as pb;

fn web() -> ServiceKey {
    "shop/web".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_in_east_appears_in_west_and_central_and_removing_it_withdraws_it() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    let central = start_cluster(dir.path(), "central", &hub).await;

    east.export_web(80, &[("10.1.0.1", "east-a"), ("10.1.0.2", "east-b")]);

    for c in [&west, &central, &east] {
        let snap = c
            .wait_for("shop/web imported", |s| {
                s.clusterset.imports.contains_key(&web())
            })
            .await;
        let i = &snap.clusterset.imports[&web()];
        assert_eq!(i.ports.len(), 1);
        assert_eq!(
            (
                i.ports[0].name.as_str(),
                i.ports[0].port,
                i.ports[0].protocol.as_str()
            ),
            ("http", 80, "TCP")
        );
        assert_eq!(i.clusters.len(), 1);
        assert_eq!(i.clusters[0].cluster, "east");
        let zones: Vec<_> = i.clusters[0]
            .endpoints
            .iter()
            .map(|l| (l.region.as_str(), l.zone.as_str(), l.ready))
            .collect();
        assert_eq!(
            zones,
            vec![("east-region", "east-a", 1), ("east-region", "east-b", 1)]
        );
        assert!(
            snap.vips.contains_key(&web()),
            "a clusterset IP is allocated"
        );
    }

    // The ServiceImport as written for the cluster, and clusterset DNS.
    let west_snap = west.snapshot();
    let vip = west_snap.vips[&web()];
    // The status files are written after the snapshot changes: wait for the write.
    let vip_text = vip.to_string();
    let imports = wait_file(&west.data.join("status/serviceimports.yaml"), |s| {
        s.contains("name: web") && s.contains(&vip_text)
    })
    .await;
    assert!(
        imports.contains("kind: ServiceImport") && imports.contains("name: web"),
        "{imports}"
    );
    assert!(
        imports.contains(&vip.to_string()) && imports.contains("cluster: east"),
        "{imports}"
    );
    let answer = dns_a(west.cp.dns_addr.unwrap(), "web.shop.svc.clusterset.local.")
        .await
        .unwrap();
    assert_eq!(answer, vec![vip]);
    let missing = dns_a(west.cp.dns_addr.unwrap(), "nope.shop.svc.clusterset.local.").await;
    assert!(missing.is_err(), "unknown services do not resolve");

    // East's ServiceExport reports Valid, Ready and no Conflict, each with its own status.
    let condition = |yaml: &str, kind: &str| -> Option<String> {
        let doc: serde_json::Value = serde_saphyr::from_str(yaml).ok()?;
        find_condition(&doc, kind)
    };
    let status = wait_file(&east.data.join("status/serviceexports.yaml"), |s| {
        condition(s, "Ready").as_deref() == Some("True")
    })
    .await;
    assert_eq!(
        condition(&status, "Valid").as_deref(),
        Some("True"),
        "{status}"
    );
    assert_eq!(
        condition(&status, "Conflict").as_deref(),
        Some("False"),
        "{status}"
    );
    assert!(status.contains("NoConflicts"), "{status}");

    // Withdraw: delete the ServiceExport.
    east.remove("export.yaml");
    for c in [&west, &central, &east] {
        c.wait_for("shop/web withdrawn", |s| {
            !s.clusterset.imports.contains_key(&web())
        })
        .await;
    }
    hub.stop().await;
}

async fn wait_file(path: &std::path::Path, cond: impl Fn(&str) -> bool) -> String {
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(path)
            && cond(&s)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{} never reached the expected content:\n{}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_exports_get_a_conflict_naming_the_field_and_the_older_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;

    west.export_web(80, &[("10.1.0.1", "a")]);
    east.wait_for("west's export", |s| {
        s.clusterset.imports.contains_key(&web())
    })
    .await;
    // East exports later (it has seen west's), with the same port name on another port number.
    // The hub ages exports by when it first received them, to the millisecond; a tie would go
    // to the first name, east, so west winning shows the order of arrival decided.
    east.export_web(8080, &[("10.2.0.1", "a")]);

    let snap = west
        .wait_for("both exports merged", |s| {
            s.clusterset
                .imports
                .get(&web())
                .is_some_and(|i| i.clusters.len() == 2)
        })
        .await;
    let i = &snap.clusterset.imports[&web()];
    assert_eq!(i.ports.len(), 1);
    assert_eq!(i.ports[0].port, 80, "the oldest export wins");
    let conflict: &pb::Conflict = &i.conflicts[0];
    assert_eq!(
        (
            conflict.cluster.as_str(),
            conflict.field.as_str(),
            conflict.winner.as_str()
        ),
        ("east", "ports", "west")
    );

    let status = wait_file(&east.data.join("status/serviceexports.yaml"), |s| {
        s.contains("PortConflict")
    })
    .await;
    assert!(status.contains("type: Conflict"), "{status}");
    assert!(
        status.contains("west"),
        "the message names the winning cluster: {status}"
    );
    let west_status = wait_file(&west.data.join("status/serviceexports.yaml"), |s| {
        s.contains("NoConflicts")
    })
    .await;
    assert!(!west_status.contains("PortConflict"));
    hub.stop().await;
}

/// The `status` of the first condition of `kind` anywhere in `doc` (a status file).
fn find_condition(doc: &serde_json::Value, kind: &str) -> Option<String> {
    use serde_json::Value;
    match doc {
        Value::Object(m) => {
            if m.get("type").and_then(Value::as_str) == Some(kind) {
                return m.get("status").and_then(Value::as_str).map(str::to_string);
            }
            m.values().find_map(|v| find_condition(v, kind))
        }
        Value::Array(s) => s.iter().find_map(|v| find_condition(v, kind)),
        _ => None,
    }
}
