//! Partitions and restarts never cause mass withdrawal: a hub restart loses nothing and control
//! planes resume from their version; with the hub down control planes keep serving their last
//! imports (even across their own restart); a cluster cut off is marked stale and stays routable.

mod common;

use std::time::Duration;

use common::*;
use fedmesh_api::ServiceKey;

fn web() -> ServiceKey {
    "shop/web".parse().unwrap()
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_loses_nothing_and_control_planes_resume_without_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    // A port below the ephemeral range, so no other test's connection takes it while the hub
    // is down.
    let port = fedmesh_test_support::free_port();
    let hub = start_redb_hub(dir.path(), ([127, 0, 0, 1], port).into()).await;
    let addr = hub.addr;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    east.export_web(80, &[("10.1.0.1", "a")]);
    let before = west
        .wait_for("import", |s| s.clusterset.imports.contains_key(&web()))
        .await;
    let version_before = before.clusterset.version;
    hub.stop().await;

    // While the hub is down, west keeps serving what it had: DNS still answers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let vip = west.snapshot().vips[&web()];
    assert_eq!(
        dns_a(west.cp.dns_addr.unwrap(), "web.shop.svc.clusterset.local.")
            .await
            .unwrap(),
        vec![vip]
    );
    // And a change made meanwhile in east waits for the hub.
    east.write(
        "db.yaml",
        &web_service("shop", "db", "sql", 5432, &[("10.1.0.9", "a")]),
    );
    east.write("db-export.yaml", &service_export("shop", "db"));

    // The restarted hub, same file, same port: everything is still there.
    let hub = start_redb_hub(dir.path(), addr).await;
    assert!(hub.hub.view().import(&web()).is_some(), "nothing lost");
    let db: ServiceKey = "shop/db".parse().unwrap();
    let after = west
        .wait_for("the change made while the hub was down", |s| {
            s.clusterset.imports.contains_key(&db)
        })
        .await;
    assert!(after.clusterset.version > version_before);
    assert!(after.clusterset.imports.contains_key(&web()));
    // Both control planes resumed from their version: the hub sent no snapshot.
    let m = hub.hub.metrics.encode();
    assert_eq!(counter(&m, "fedmesh_hub_snapshots_sent_total"), 0, "{m}");
    assert!(counter(&m, "fedmesh_hub_updates_sent_total") >= 2, "{m}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restarted_while_the_hub_is_down_serves_its_last_imports() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    east.export_web(80, &[("10.1.0.1", "a")]);
    let before = west
        .wait_for("import", |s| s.clusterset.imports.contains_key(&web()))
        .await;
    hub.stop().await;
    west.stop().await;

    // Same data dir, hub unreachable: the imports come from disk.
    let west = start_with(cluster_config(
        dir.path(),
        "west",
        Some("127.0.0.1:1".parse().unwrap()),
    ))
    .await;
    let snap = west
        .wait_for("persisted import", |s| {
            s.clusterset.imports.contains_key(&web())
        })
        .await;
    assert_eq!(snap.clusterset.version, before.clusterset.version);
    assert_eq!(
        snap.vips[&web()],
        before.vips[&web()],
        "the clusterset IP is stable"
    );
    assert_eq!(
        dns_a(west.cp.dns_addr.unwrap(), "web.shop.svc.clusterset.local.")
            .await
            .unwrap(),
        vec![before.vips[&web()]]
    );
    assert_eq!(
        snap.clusterset.bundles.len(),
        2,
        "federated bundles are kept too, so mTLS keeps working"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_cut_off_is_marked_stale_and_its_exports_stay_routable() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    let central = start_cluster(dir.path(), "central", &hub).await;
    central.export_web(80, &[("10.3.0.1", "a")]);
    west.wait_for("import", |s| s.clusterset.imports.contains_key(&web()))
        .await;

    // Central disappears without a word (its control plane stops).
    central.stop().await;
    let central_name = fedmesh_api::ClusterName::new("central").unwrap();
    let snap = west
        .wait_for("central marked stale", |s| {
            s.clusterset
                .clusters
                .get(&central_name)
                .is_some_and(|c| c.stale)
        })
        .await;
    // Still routable: the import with central's endpoints is still there, everywhere.
    let i = &snap.clusterset.imports[&web()];
    assert_eq!(i.clusters[0].cluster, "central");
    assert!(east.snapshot().clusterset.imports.contains_key(&web()));
    let explanation = fedmesh_federation::hub::admin::explain_route(
        &hub.hub,
        &web(),
        &fedmesh_api::ClusterName::new("west").unwrap(),
    );
    assert!(explanation.routable, "{explanation:?}");
    assert!(
        explanation
            .steps
            .iter()
            .any(|s| s.status == "warn" && s.message.contains("central is stale")),
        "{explanation:?}"
    );

    // It comes back: no longer stale.
    let central = start_cluster(dir.path(), "central", &hub).await;
    west.wait_for("central fresh again", |s| {
        s.clusterset
            .clusters
            .get(&central_name)
            .is_some_and(|c| !c.stale)
    })
    .await;
    drop(central);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_silent_past_the_expiry_has_its_exports_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = hub_config();
    config.expire_after = Duration::from_secs(3);
    let store: std::sync::Arc<dyn fedmesh_federation::store::KvStore> = std::sync::Arc::new(
        fedmesh_federation::store::RedbStore::open(&dir.path().join("hub.redb")).unwrap(),
    );
    let hub = start_hub(dir.path(), store, "127.0.0.1:0".parse().unwrap(), config).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    let central = start_cluster(dir.path(), "central", &hub).await;
    central.export_web(80, &[("10.3.0.1", "a")]);
    west.wait_for("import", |s| s.clusterset.imports.contains_key(&web()))
        .await;
    central.stop().await;
    west.wait_for("withdrawal after expiry", |s| {
        !s.clusterset.imports.contains_key(&web())
    })
    .await;
    hub.stop().await;
}
