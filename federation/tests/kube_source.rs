//! The Kubernetes source and writer against a real API server (kube-apiserver + etcd, built by
//! `scripts/peers`), with fedmesh installed from the kind manifests and the control plane acting
//! as its own service account: list + watch of Services, EndpointSlices, ServiceExports and our
//! policies; server-side apply of ServiceImports, derived EndpointSlices and the status of
//! ServiceExports and policies; deletion of withdrawn imports only. Each object is read back from
//! the API server, so a field the schema prunes or a verb our RBAC lacks fails the test.

mod common;

use std::time::Duration;

use common::*;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, SourceSpec};
use fedmesh_test_support::kube_apiserver::KubeApiServer;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Beside `shop/web`, exported: policies and a FederatedTrustDomain (whose status the control
/// plane writes) and a ServiceImport a user made (which it must never touch).
const SHOP_EXTRAS: &str = r#"
apiVersion: fedmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-readers, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules:
    - from: [{source: {namespaces: [shop]}}]
---
apiVersion: fedmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: shop}
spec:
  timeouts: {connect: 1s}
---
# A trust domain outside the clusterset whose endpoint does not answer: Accepted, not Ready.
apiVersion: fedmesh.io/v1alpha1
kind: FederatedTrustDomain
metadata: {name: partner}
spec:
  trustDomain: partner.example
  bundleEndpointURL: https://127.0.0.1:1
  bundleEndpointProfile: {type: https_web}
---
# Made by a user, not by fedmesh: the control plane must never touch it.
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata: {name: by-hand, namespace: shop}
spec:
  type: ClusterSetIP
  ports: [{port: 80, protocol: TCP}]
"#;

/// Polls the API server (as admin) until `kind/name` in `ns` exists and `cond` holds.
async fn wait_object(
    api: &KubeApiServer,
    kind: &str,
    ns: &str,
    name: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = None;
    for _ in 0..600 {
        last = api.get(kind, ns, name);
        if last.as_ref().is_some_and(&cond) {
            return last.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{kind} {ns}/{name} never became as expected; last seen: {last:#?}");
}

/// The condition `type_` of an object's status.
fn condition<'a>(obj: &'a Value, type_: &str) -> &'a Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// The managedFields entry of field manager `manager` (and `subresource`, "" for the object).
fn managed_by<'a>(obj: &'a Value, manager: &str, subresource: &str) -> Option<&'a Value> {
    obj["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|m| m["manager"] == manager && m["subresource"].as_str().unwrap_or("") == subresource)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_source_and_writer_against_a_real_api_server() {
    let Some(api) = tokio::task::spawn_blocking(|| {
        let api = KubeApiServer::start()?;
        api.install_fedmesh("east");
        api.apply(&KubeApiServer::exported_service(
            "shop", "web", "10.1.0.7", "east-1a",
        ));
        api.apply(SHOP_EXTRAS);
        Some(api)
    })
    .await
    .unwrap() else {
        return;
    };
    // What the control plane's pod mounts: a token of its service account, nothing more.
    let client = api
        .client_as("fedmesh-system", "fedmesh-control-plane")
        .await;

    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    // West's gateway at an address an EndpointSlice may hold: the API server refuses loopback
    // addresses in one (the mocked server this test replaced did not).
    let mut west = cluster_config(dir.path(), "west", Some(hub.addr));
    west.join_token = Some(
        hub.hub
            .create_token(&west.cluster, &west.trust_domain, None)
            .await
            .unwrap()
            .0,
    );
    west.gateways = vec!["192.0.2.20:15443".into()];
    let west = start_with(west).await;
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
    let east = ControlPlane::start_with_kube_client(config, client.clone(), shutdown.clone())
        .await
        .unwrap();

    // Read path: east's Service/EndpointSlice/ServiceExport reach west as an import.
    let web: ServiceKey = "shop/web".parse().unwrap();
    let snap = west
        .wait_for("east's export from Kubernetes", |s| {
            s.clusterset.imports.contains_key(&web)
        })
        .await;
    let i = &snap.clusterset.imports[&web];
    assert_eq!(i.clusters[0].cluster, "east");
    assert_eq!(i.clusters[0].endpoints[0].zone, "east-1a");

    // The ServiceExport's status, applied server-side on the status subresource.
    let export = wait_object(&api, "serviceexport", "shop", "web", |o| {
        condition(o, "Ready")["status"] == "True"
    })
    .await;
    assert_eq!(condition(&export, "Valid")["status"], "True", "{export:#}");
    assert_eq!(
        condition(&export, "Conflict")["status"],
        "False",
        "{export:#}"
    );
    let m = managed_by(&export, "fedmesh", "status").expect("fedmesh manages the status");
    assert_eq!(m["operation"], "Apply", "{export:#}");

    // The policy's status too (its own subresource, its own RBAC rule).
    let policy = wait_object(&api, "authorizationpolicy", "shop", "web-readers", |o| {
        condition(o, "Accepted")["status"] == "True"
    })
    .await;
    assert!(
        managed_by(&policy, "fedmesh", "status").is_some(),
        "{policy:#}"
    );
    let policy = wait_object(&api, "trafficpolicy", "shop", "web", |o| {
        condition(o, "Accepted")["status"] == "True"
    })
    .await;
    assert!(
        managed_by(&policy, "fedmesh", "status").is_some(),
        "{policy:#}"
    );
    let partner = wait_object(&api, "federatedtrustdomain", "", "partner", |o| {
        condition(o, "Ready")["status"] == "False"
    })
    .await;
    assert_eq!(
        condition(&partner, "Accepted")["status"],
        "True",
        "{partner:#}"
    );
    assert!(
        managed_by(&partner, "fedmesh", "status").is_some(),
        "{partner:#}"
    );

    // ServiceImport for our own export, as the schema keeps it, labelled as fedmesh's.
    let si = wait_object(&api, "serviceimport", "shop", "web", |_| true).await;
    assert_eq!(si["spec"]["type"], "ClusterSetIP");
    assert_eq!(si["spec"]["ports"][0]["port"], 80);
    assert!(
        si["spec"]["ips"][0]
            .as_str()
            .unwrap()
            .starts_with("240.240."),
        "{si:#}"
    );
    assert_eq!(
        si["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "fedmesh.io"
    );
    assert_eq!(
        managed_by(&si, "fedmesh", "").unwrap()["operation"],
        "Apply"
    );

    // West exports shop/db: east writes its ServiceImport (with the clusters in its status) and
    // a derived EndpointSlice pointing at west's gateway, with the MCS labels.
    west.write(
        "db.yaml",
        &web_service("shop", "db", "sql", 5432, &[("10.2.0.1", "a")]),
    );
    west.write("db-export.yaml", &service_export("shop", "db"));
    let si = wait_object(&api, "serviceimport", "shop", "db", |o| {
        o["status"]["clusters"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    })
    .await;
    assert_eq!(si["status"]["clusters"][0]["cluster"], "west", "{si:#}");
    assert_eq!(si["spec"]["ports"][0]["port"], 5432);
    let es = wait_object(&api, "endpointslice", "shop", "db-west", |_| true).await;
    let labels = &es["metadata"]["labels"];
    assert_eq!(labels["multicluster.kubernetes.io/service-name"], "db");
    assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "west");
    assert_eq!(
        labels["endpointslice.kubernetes.io/managed-by"],
        "fedmesh.io"
    );
    assert_eq!(
        es["endpoints"][0]["addresses"][0], "192.0.2.20",
        "west's gateway address"
    );

    // An import into a namespace this cluster does not have is skipped (namespace sameness),
    // and does not hold up what comes after it.
    west.write(
        "other.yaml",
        &web_service("payments", "api", "http", 80, &[("10.2.0.2", "a")]),
    );
    west.write("other-export.yaml", &service_export("payments", "api"));
    west.write(
        "cache.yaml",
        &web_service("shop", "cache", "redis", 6379, &[("10.2.0.3", "a")]),
    );
    west.write("cache-export.yaml", &service_export("shop", "cache"));
    wait_object(&api, "serviceimport", "shop", "cache", |_| true).await;
    assert!(
        api.get("namespace", "", "payments").is_none(),
        "never created"
    );

    // Withdraw: the ServiceExport is deleted; west loses the import and east deletes its own
    // now-stale ServiceImport, but never the one a user made.
    api.kubectl_ok(&["delete", "serviceexport", "web", "-n", "shop"], None);
    west.wait_for("withdrawal", |s| !s.clusterset.imports.contains_key(&web))
        .await;
    let mut gone = false;
    for _ in 0..300 {
        gone = api.get("serviceimport", "shop", "web").is_none();
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the withdrawn ServiceImport shop/web was not deleted");
    assert!(api.get("serviceimport", "shop", "by-hand").is_some());
    assert!(api.get("serviceimport", "shop", "db").is_some());

    // The token is the control plane's and no more: the spec of a user's object is not its to
    // write, nor are Secrets its to read.
    let exports: kube::Api<fedmesh_api::mcs::ServiceExport> =
        kube::Api::namespaced(client.clone(), "shop");
    let err = exports
        .patch(
            "by-hand",
            &kube::api::PatchParams::apply("fedmesh"),
            &kube::api::Patch::Apply(serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "by-hand", "namespace": "shop"}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, "fedmesh-system");
    let err = secrets.list(&Default::default()).await.unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
    shutdown.cancel();
    drop(east);
    hub.stop().await;
}
