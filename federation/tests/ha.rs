//! Two hub replicas on one real etcd serve the same clusterset: a control plane connected to
//! either sees every export, and one that loses its replica resumes on the other without a
//! snapshot (the view version is etcd's revision, shared by both).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedmesh_api::ServiceKey;
use fedmesh_federation::store::{EtcdStore, KvStore};
use fedmesh_test_support::EtcdServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_one_etcd_serve_one_clusterset_and_control_planes_fail_over() {
    // The hubs' etcd as it should run: TLS with client certificates, and authentication.
    let etcd = tokio::task::spawn_blocking(EtcdServer::start_secure)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let security = etcd_security(&etcd);
    let store = || async {
        let s: Arc<dyn KvStore> = Arc::new(
            EtcdStore::connect_with(std::slice::from_ref(&etcd.url), "/fedmesh", &security)
                .await
                .unwrap(),
        );
        s
    };
    let mut config_a = hub_config();
    config_a.replica = "hub-a".into();
    let mut config_b = hub_config();
    config_b.replica = "hub-b".into();
    // Both replicas share the hub CA (in Kubernetes: one Secret mounted by both).
    let a = start_hub(
        dir.path(),
        store().await,
        "127.0.0.1:0".parse().unwrap(),
        config_a,
    )
    .await;
    let b = start_hub(
        dir.path(),
        store().await,
        "127.0.0.1:0".parse().unwrap(),
        config_b,
    )
    .await;

    // East talks to A first, west to B first.
    let mut east_cfg = cluster_config(dir.path(), "east", None);
    east_cfg.hub = Some(format!("{},{}", a.addr, b.addr));
    east_cfg.join_token = Some(
        a.hub
            .create_token(&east_cfg.cluster, &east_cfg.trust_domain, None)
            .await
            .unwrap()
            .0,
    );
    let east = start_with(east_cfg).await;
    let mut west_cfg = cluster_config(dir.path(), "west", None);
    west_cfg.hub = Some(format!("{},{}", b.addr, a.addr));
    // A token created on one replica is good on the other.
    west_cfg.join_token = Some(
        a.hub
            .create_token(&west_cfg.cluster, &west_cfg.trust_domain, None)
            .await
            .unwrap()
            .0,
    );
    let west = start_with(west_cfg).await;

    let web: ServiceKey = "shop/web".parse().unwrap();
    east.export_web(80, &[("10.1.0.1", "a")]);
    west.wait_for("east's export via the other replica", |s| {
        s.clusterset.imports.contains_key(&web)
    })
    .await;
    assert!(b.hub.view().import(&web).is_some() && a.hub.view().import(&web).is_some());

    // Replica A goes away; east fails over to B and resumes there.
    let snapshots_before = b.hub.metrics.encode();
    a.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    east.write(
        "db.yaml",
        &web_service("shop", "db", "sql", 5432, &[("10.1.0.9", "a")]),
    );
    east.write("db-export.yaml", &service_export("shop", "db"));
    let db: ServiceKey = "shop/db".parse().unwrap();
    west.wait_for("east's new export after failover", |s| {
        s.clusterset.imports.contains_key(&db)
    })
    .await;
    east.wait_for("east's own view after failover", |s| {
        s.clusterset.imports.contains_key(&db)
    })
    .await;
    let snapshot_count = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("fedmesh_hub_snapshots_sent_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        snapshot_count(&b.hub.metrics.encode()),
        snapshot_count(&snapshots_before),
        "east resumed on B without a snapshot"
    );
    b.stop().await;
}
