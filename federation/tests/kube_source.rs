//! The Kubernetes source and writer against a mocked API server (no API server can run here):
//! list + watch of Services, EndpointSlices and ServiceExports; server-side apply of
//! ServiceImports, derived EndpointSlices and ServiceExport status; deletion of withdrawn
//! imports. Every request the control plane makes is recorded and asserted.
//!
//! An opt-in test runs the same source against a real cluster when FEDMESH_TEST_KUBECONFIG is set.

mod common;

use std::time::Duration;

use axum::http::Method;
use common::*;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, SourceSpec};
use fedmesh_test_support::fake_kube::{FakeApi, Recorded};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn start_fake_api() -> (FakeApi, kube::Client) {
    // Like a cluster where fedmesh's own TrafficPolicy CRD is not installed.
    let api = FakeApi::new(
        &[
            "services",
            "endpointslices",
            "serviceexports",
            "serviceimports",
        ],
        &["shop"],
    );
    let url = api.start().await;
    let config = kube::Config::new(url.parse().unwrap());
    (api, kube::Client::try_from(config).unwrap())
}

fn svc(ns: &str, name: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
}

fn slice(ns: &str, name: &str, ip: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{name}-abc"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": [{"addresses": [ip], "zone": "east-1a", "conditions": {"ready": true}}]})
}

fn export(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T00:00:00Z"}})
}

async fn wait_for_request(api: &FakeApi, what: &str, f: impl Fn(&Recorded) -> bool) -> Recorded {
    for _ in 0..400 {
        if let Some(r) = api.requests().into_iter().find(|r| f(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen: Vec<String> = api
        .requests()
        .iter()
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect();
    panic!("no request for {what}; saw:\n{}", seen.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_and_writer_against_a_mocked_api_server() {
    let (api, client) = start_fake_api().await;
    api.put("services", svc("shop", "web", 80));
    api.put("endpointslices", slice("shop", "web", "10.1.0.7"));
    api.put("serviceexports", export("shop", "web"));

    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    let mut config = ControlPlaneConfig::new(
        ClusterName::new("east").unwrap(),
        TrustDomain::new("east.example").unwrap(),
        dir.path().join("east-data"),
        SourceSpec::Kubernetes,
    );
    config.region = "east-1".into();
    config.hub = Some(hub.addr.to_string());
    config.join_token = Some(
        hub.hub
            .create_token(&config.cluster, &config.trust_domain, None)
            .await
            .unwrap()
            .0,
    );
    config.gateways = vec!["192.0.2.10:15443".into()];
    let shutdown = CancellationToken::new();
    let east = ControlPlane::start_with_kube_client(config, client, shutdown.clone())
        .await
        .unwrap();

    // Read path: east's Service/EndpointSlice/ServiceExport from the API reach west as an import.
    let web: ServiceKey = "shop/web".parse().unwrap();
    let snap = west
        .wait_for("east's export from Kubernetes", |s| {
            s.clusterset.imports.contains_key(&web)
        })
        .await;
    let i = &snap.clusterset.imports[&web];
    assert_eq!(i.clusters[0].cluster, "east");
    assert_eq!(i.clusters[0].endpoints[0].zone, "east-1a");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - 60..=now).contains(&i.clusters[0].exported_unix),
        "the hub stamps the export's age when it first arrives, whatever creationTimestamp (2026-01-01) says: {}",
        i.clusters[0].exported_unix
    );
    for kind in ["services", "endpointslices", "serviceexports"] {
        wait_for_request(&api, kind, |r| {
            r.method == Method::GET && r.path.ends_with(kind) && r.query.contains("watch=true")
        })
        .await;
    }

    // Write path: the ServiceExport's status, applied server-side by fedmesh.
    let status = wait_for_request(&api, "ServiceExport status", |r| {
        r.method == Method::PATCH
            && r.path
                == "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceexports/web/status"
            && r.body["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    })
    .await;
    assert!(
        status.query.contains("fieldManager=fedmesh"),
        "{}",
        status.query
    );
    let conditions = status.body["status"]["conditions"].as_array().unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Valid" && c["status"] == "True")
    );
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Conflict" && c["status"] == "False")
    );

    // ServiceImport for our own export, labelled as managed by fedmesh.
    let si = wait_for_request(&api, "ServiceImport web", |r| {
        r.method == Method::PATCH
            && r.path == "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports/web"
    })
    .await;
    assert_eq!(si.body["spec"]["type"], "ClusterSetIP");
    assert_eq!(si.body["spec"]["ports"][0]["port"], 80);
    assert!(
        si.body["spec"]["ips"][0]
            .as_str()
            .unwrap()
            .starts_with("240.240.")
    );
    assert_eq!(
        si.body["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "fedmesh.io"
    );

    // West exports shop/db: east writes its ServiceImport and a derived EndpointSlice pointing at
    // west's gateway, labelled with the MCS labels.
    west.write(
        "db.yaml",
        &web_service("shop", "db", "sql", 5432, &[("10.2.0.1", "a")]),
    );
    west.write("db-export.yaml", &service_export("shop", "db"));
    wait_for_request(&api, "ServiceImport db", |r| {
        r.method == Method::PATCH && r.path.ends_with("/namespaces/shop/serviceimports/db")
    })
    .await;
    let es = wait_for_request(&api, "derived EndpointSlice", |r| {
        r.method == Method::PATCH
            && r.path == "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/db-west"
    })
    .await;
    assert_eq!(
        es.body["metadata"]["labels"]["multicluster.kubernetes.io/service-name"],
        "db"
    );
    assert_eq!(
        es.body["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "west"
    );
    assert_eq!(
        es.body["endpoints"][0]["addresses"][0], "127.0.0.1",
        "west's gateway address"
    );

    // An import into a namespace this cluster does not have is skipped, not an error loop.
    west.write(
        "other.yaml",
        &web_service("payments", "api", "http", 80, &[("10.2.0.2", "a")]),
    );
    west.write("other-export.yaml", &service_export("payments", "api"));
    wait_for_request(&api, "ServiceImport in a missing namespace", |r| {
        r.method == Method::PATCH && r.path.ends_with("/namespaces/payments/serviceimports/api")
    })
    .await;

    // Withdraw: the ServiceExport is deleted in Kubernetes; west loses the import and east deletes
    // its now-stale ServiceImport.
    assert!(api.delete("serviceexports", "shop", "web"));
    west.wait_for("withdrawal", |s| !s.clusterset.imports.contains_key(&web))
        .await;
    wait_for_request(&api, "delete of the stale ServiceImport", |r| {
        r.method == Method::DELETE && r.path.ends_with("/namespaces/shop/serviceimports/web")
    })
    .await;
    // Only fedmesh-managed objects are listed for cleanup.
    let lists: Vec<Recorded> = api
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == Method::GET
                && r.path.ends_with("serviceimports")
                && !r.query.contains("watch")
        })
        .collect();
    assert!(
        !lists.is_empty()
            && lists.iter().all(|r| r
                .query
                .contains("labelSelector=endpointslice.kubernetes.io%2Fmanaged-by%3Dfedmesh.io")),
        "{lists:?}"
    );
    shutdown.cancel();
    drop(east);
    hub.stop().await;
}

/// Opt-in: the source against a real cluster. Set FEDMESH_TEST_KUBECONFIG to a kubeconfig whose
/// cluster has the MCS CRDs (`fedmesh crds | kubectl apply -f -`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: set FEDMESH_TEST_KUBECONFIG and run with --run-ignored only"]
async fn kubernetes_source_against_a_real_cluster_when_configured() {
    let path = std::env::var("FEDMESH_TEST_KUBECONFIG")
        .expect("FEDMESH_TEST_KUBECONFIG names the real cluster's kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let shutdown = CancellationToken::new();
    let source = fedmesh_federation::control_plane::source::kube::KubeSource::start(
        client,
        shutdown.clone(),
    );
    let mut ready = source.initialized();
    tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    let objs = source.subscribe().borrow().clone();
    assert!(
        !objs.services.is_empty(),
        "a real cluster has at least the kubernetes Service"
    );
    shutdown.cancel();
}
