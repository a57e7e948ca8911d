//! The data-plane configuration stream a control plane serves to its sidecars and gateways:
//! local endpoints by locality, remote clusters reached through their gateways, routing policy,
//! deltas, and resume.

mod common;

use std::time::Duration;

use common::*;
use fedmesh_api::DATAPLANE_PROTOCOL_VERSION;
use fedmesh_api::pb::dataplane as pb;
use fedmesh_api::pb::dataplane::data_plane_client::DataPlaneClient;
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use tokio::sync::mpsc;

/// A data-plane client with an SVID of the cluster's trust domain (a sidecar of namespace shop).
async fn client(c: &ClusterHandle) -> DataPlaneClient<tonic::transport::Channel> {
    client_as(c, "/ns/shop/sa/sidecar").await
}

/// A data-plane client with the SVID `spiffe://<trust domain><path>`, got as a proxy gets it:
/// from a node agent the control plane enrolled, which has the control plane sign it.
async fn client_as(c: &ClusterHandle, path: &str) -> DataPlaneClient<tonic::transport::Channel> {
    use fedmesh_trust::workload::SvidSigner;
    static NODES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = fedmesh_api::SpiffeId::new(&format!("spiffe://{}{path}", c.cp.config.trust_domain))
        .unwrap();
    let node = format!(
        "node-{}",
        NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let token = c.enroll(&node, &[&id.to_string()]).await;
    let agent = c
        .agent(&c.data.join("agents").join(&node), &node, &token)
        .await
        .unwrap();
    let (key, csr) = fedmesh_trust::svid::new_key_and_csr(&id).unwrap();
    let chain = agent.sign_x509(csr, id.clone(), None).await.unwrap();
    let ident = MeshIdentity::new();
    ident
        .set_svid_parts(
            chain,
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut set = fedmesh_trust::bundle::BundleSet::new();
    set.update((*c.cp.ca.bundle()).clone());
    ident.set_bundles(set);
    let cfg = ident.client_config(
        Authorizer::trust_domain(c.cp.config.trust_domain.clone()),
        vec![b"h2".to_vec()],
    );
    DataPlaneClient::new(
        fedmesh_trust::grpc::channel(&c.cp.listen_addr.unwrap().to_string(), cfg, "cp").unwrap(),
    )
}

async fn open(
    c: &mut DataPlaneClient<tonic::transport::Channel>,
    epoch: u64,
    version: u64,
) -> (
    mpsc::Sender<pb::DataPlaneMessage>,
    tonic::Streaming<pb::ConfigUpdate>,
) {
    open_as(c, "sidecar", epoch, version, vec![]).await.unwrap()
}

async fn open_as(
    c: &mut DataPlaneClient<tonic::transport::Channel>,
    role: &str,
    epoch: u64,
    version: u64,
    subscriptions: Vec<String>,
) -> Result<
    (
        mpsc::Sender<pb::DataPlaneMessage>,
        tonic::Streaming<pb::ConfigUpdate>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::DataPlaneMessage {
        msg: Some(pb::data_plane_message::Msg::Request(pb::ConfigRequest {
            protocol_version: DATAPLANE_PROTOCOL_VERSION,
            role: role.into(),
            node: "test".into(),
            resume_epoch: epoch,
            resume_version: version,
            subscriptions,
        })),
    })
    .await
    .unwrap();
    let s = c
        .stream_config(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, s))
}

async fn next(s: &mut tonic::Streaming<pb::ConfigUpdate>) -> pb::ConfigUpdate {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("an update")
        .unwrap()
        .unwrap()
}

/// Reads updates until `f` holds for the accumulated service map.
async fn until(
    s: &mut tonic::Streaming<pb::ConfigUpdate>,
    map: &mut std::collections::BTreeMap<String, pb::Service>,
    f: impl Fn(&std::collections::BTreeMap<String, pb::Service>) -> bool,
) -> pb::ConfigUpdate {
    loop {
        let u = next(s).await;
        if u.snapshot {
            map.clear();
        }
        for svc in &u.services {
            map.insert(svc.key.clone(), svc.clone());
        }
        for r in &u.removed_services {
            map.remove(r);
        }
        if f(map) {
            return u;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_and_gateways_get_endpoints_by_locality_remote_gateways_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let west = start_cluster(dir.path(), "west", &hub).await;
    east.export_web(80, &[("10.1.0.1", "east-a"), ("10.1.0.2", "east-b")]);
    west.export_web(80, &[("10.2.0.1", "west-a")]);

    let mut c = client(&east).await;
    let (_tx, mut s) = open(&mut c, 0, 0).await;
    let mut map = Default::default();
    let u = until(&mut s, &mut map, |m| {
        m.get("shop/web")
            .is_some_and(|w| !w.remote.is_empty() && w.endpoints.len() == 2)
    })
    .await;
    assert_eq!(u.cluster.as_ref().unwrap().name, "east");
    let web = &map["shop/web"];
    assert!(web.exported);
    assert!(web.vip.starts_with("240.240."));
    assert_eq!(web.ports[0].port, 80);
    let zones: Vec<_> = web
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.as_str(),
                e.zone.as_str(),
                e.region.as_str(),
                e.ports[0].port,
            )
        })
        .collect();
    assert_eq!(
        zones,
        vec![
            ("10.1.0.1", "east-a", "east-region", 8080),
            ("10.1.0.2", "east-b", "east-region", 8080)
        ]
    );
    let w = &web.remote[0];
    assert_eq!(
        (
            w.cluster.as_str(),
            w.trust_domain.as_str(),
            w.region.as_str()
        ),
        ("west", "west.example", "west-region")
    );
    assert_eq!(w.gateways, vec!["127.0.0.1:15443".to_string()]);
    assert_eq!(w.ready, 1);
    assert_eq!(w.localities[0].zone, "west-a");

    // A TrafficPolicy in east's source arrives as a delta.
    east.write(
        "policy.yaml",
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  backendRefs: [{cluster: east, weight: 80}, {cluster: west, weight: 20}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /beta}}]\n    backendRefs: [{cluster: west, weight: 1}]\n  authorization: {allowedCallers: [\"spiffe://east.example/ns/shop/*\"]}\n  timeouts: {request: 2s}\n",
    );
    let u = until(&mut s, &mut map, |m| m["shop/web"].policy.is_some()).await;
    assert!(!u.snapshot, "a delta, not a snapshot");
    let p = map["shop/web"].policy.clone().unwrap();
    // The v1alpha1 routing fields arrive converted into routes: the rule, then a catch-all with
    // the service-wide split, each with the request timeout.
    assert_eq!(p.routes.len(), 2);
    assert_eq!(p.routes[0].matches[0].path_prefix, "/beta");
    let split: Vec<_> = p.routes[1]
        .backend_refs
        .iter()
        .map(|b| (b.cluster.as_str(), b.weight))
        .collect();
    assert_eq!(split, vec![("east", 80), ("west", 20)]);
    assert!(p.routes.iter().all(|r| r.timeout_ms == 2000));
    assert!(!p.exhaustive, "a converted policy answers no 404s");
    assert_eq!(
        p.allowed_callers,
        vec!["spiffe://east.example/ns/shop/*".to_string()]
    );
    let (epoch, version) = (u.epoch, u.version);

    // An invalid policy edit is refused and its status says why; the valid one stays.
    east.write(
        "policy.yaml",
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  backendRefs: [{cluster: east, weight: 0}]\n",
    );
    let status = east.data.join("status/trafficpolicies.yaml");
    for _ in 0..100 {
        if std::fs::read_to_string(&status).is_ok_and(|s| s.contains("every weight is 0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&status).unwrap_or_default();
    assert!(
        text.contains("every weight is 0") && text.contains("last valid version stays in force"),
        "{text}"
    );
    assert_eq!(
        east.cp.dataplane_config().borrow().version,
        version,
        "nothing changed"
    );

    // Resume from the version we hold: a delta with nothing in it.
    drop(s);
    let (_tx2, mut s2) = open(&mut c, epoch, version).await;
    let u = next(&mut s2).await;
    assert!(
        !u.snapshot && u.services.is_empty() && u.removed_services.is_empty(),
        "{u:?}"
    );
    // Unknown epoch: a snapshot.
    let (_tx3, mut s3) = open(&mut c, epoch + 1, version).await;
    let u = next(&mut s3).await;
    assert!(u.snapshot && u.services.iter().any(|s| s.key == "shop/web"));

    // Removing the export from both clusters takes the service out of the clusterset; east's
    // own Service stays, for cluster.local routing only.
    east.remove("export.yaml");
    west.remove("export.yaml");
    let mut m2 = std::collections::BTreeMap::new();
    until(&mut s3, &mut m2, |m| {
        m.get("shop/web")
            .is_some_and(|w| !w.in_clusterset && !w.exported && w.remote.is_empty())
    })
    .await;
    let web = &m2["shop/web"];
    assert_eq!(web.endpoints.len(), 2, "local endpoints stay");
    assert!(web.vip.is_empty(), "no clusterset IP once not imported");
    // Without the Service it is gone.
    east.remove("web.yaml");
    until(&mut s3, &mut m2, |m| !m.contains_key("shop/web")).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_services_are_routable_in_cluster_and_an_export_counts_before_the_hub_answers() {
    let dir = tempfile::tempdir().unwrap();
    // No hub at all: what the cluster itself knows must be enough for its own data plane.
    let east = start_with(cluster_config(dir.path(), "east", None)).await;
    east.write(
        "db.yaml",
        &web_service("shop", "db", "tcp-db", 5432, &[("10.1.0.9", "east-a")]).replace(
            "spec:\n  ports:",
            "spec:\n  clusterIP: 10.96.0.15\n  ports:",
        ),
    );
    let mut c = client(&east).await;
    let (_tx, mut s) = open(&mut c, 0, 0).await;
    let mut map = Default::default();
    until(&mut s, &mut map, |m| m.contains_key("shop/db")).await;
    let db = &map["shop/db"];
    assert!(!db.exported && !db.in_clusterset, "{db:?}");
    assert_eq!(db.cluster_ip, "10.96.0.15");
    assert!(db.vip.is_empty());
    assert_eq!(db.ports[0].port, 5432);
    assert_eq!(db.endpoints[0].address, "10.1.0.9");
    assert_eq!(db.endpoints[0].ports[0].port, 8080);

    // Exporting it is enough for this cluster's gateway to admit it, hub or not.
    east.write("export.yaml", &service_export("shop", "db"));
    until(&mut s, &mut map, |m| m["shop/db"].exported).await;
    assert!(map["shop/db"].in_clusterset);
    // An invalid export (ExternalName) is not exported.
    east.write(
        "ext.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: shop}\nspec: {type: ExternalName, externalName: example.com}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: ext, namespace: shop}\n",
    );
    until(&mut s, &mut map, |m| m.contains_key("shop/ext")).await;
    assert!(!map["shop/ext"].exported && !map["shop/ext"].in_clusterset);
    east.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_requires_an_svid_of_the_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    // Pinning the CA (as a join would) but presenting no certificate.
    let pin = fedmesh_trust::grpc::ca_pin(east.cp.ca.bundle().x509_authorities().last().unwrap());
    let cfg = fedmesh_trust::grpc::pinned_ca_client_config(
        &pin,
        fedmesh_trust::workload::remote::CONTROL_PLANE_PATH,
        vec![b"h2".to_vec()],
    )
    .unwrap();
    let mut c = DataPlaneClient::new(
        fedmesh_trust::grpc::channel(&east.cp.listen_addr.unwrap().to_string(), cfg, "cp").unwrap(),
    );
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::DataPlaneMessage {
        msg: Some(pb::data_plane_message::Msg::Request(pb::ConfigRequest {
            protocol_version: DATAPLANE_PROTOCOL_VERSION,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let err = c
        .stream_config(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    hub.stop().await;
}

/// Any SVID of the trust domain may open the stream, so what it carries is scoped: a sidecar gets
/// its own namespace and what it subscribes to, a gateway what its cluster exports; another
/// namespace's services, endpoints and policies never arrive unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_receives_its_namespace_and_what_it_asks_for_not_the_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let east = start_with(cluster_config(dir.path(), "east", None)).await;
    east.write(
        "web.yaml",
        &web_service("shop", "web", "http", 80, &[("10.1.0.1", "a")]),
    );
    east.write("export.yaml", &service_export("shop", "web"));
    east.write(
        "ledger.yaml",
        &web_service("billing", "ledger", "http", 80, &[("10.1.0.7", "a")]).replace(
            "spec:\n  ports:",
            "spec:\n  clusterIP: 10.96.0.77\n  ports:",
        ),
    );
    east.write(
        "ledger-policy.yaml",
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: ledger, namespace: billing}\nspec:\n  authorization: {allowedCallers: [\"spiffe://east.example/ns/billing/*\"]}\n",
    );
    east.write(
        "audit.yaml",
        &web_service("billing", "audit", "http", 80, &[("10.1.0.8", "a")]),
    );
    east.write("audit-export.yaml", &service_export("billing", "audit"));
    let known =
        |m: &std::collections::BTreeMap<String, pb::Service>| m.keys().cloned().collect::<Vec<_>>();
    // Wait until the control plane has all three.
    let mut all = std::collections::BTreeMap::new();
    let mut system = client_as(&east, "/ns/fedmesh-system/sa/gateway").await;
    let (_g, mut gs) = open_as(&mut system, "gateway", 0, 0, vec![]).await.unwrap();
    until(&mut gs, &mut all, |m| {
        m.contains_key("billing/audit") && m.contains_key("shop/web")
    })
    .await;
    assert_eq!(
        known(&all),
        ["billing/audit", "shop/web"],
        "a gateway sees what its cluster exports"
    );
    // The control plane holds billing/ledger (not exported); it never reaches the gateway, as an
    // export made after it shows: the gateway gets that one and still not the ledger.
    let mut config = east.cp.dataplane_config();
    tokio::time::timeout(
        Duration::from_secs(10),
        config.wait_for(|c| c.services.contains_key("billing/ledger")),
    )
    .await
    .expect("the control plane reads billing/ledger")
    .unwrap();
    east.write(
        "marker.yaml",
        &web_service("ops", "marker", "http", 80, &[("10.1.0.9", "a")]),
    );
    east.write("marker-export.yaml", &service_export("ops", "marker"));
    until(&mut gs, &mut all, |m| m.contains_key("ops/marker")).await;
    assert_eq!(known(&all), ["billing/audit", "ops/marker", "shop/web"]);

    let mut c = client(&east).await;
    let (tx, mut s) = open_as(&mut c, "sidecar", 0, 0, vec![]).await.unwrap();
    let first = next(&mut s).await;
    let mut map: std::collections::BTreeMap<String, pb::Service> = first
        .services
        .iter()
        .map(|s| (s.key.clone(), s.clone()))
        .collect();
    assert_eq!(known(&map), ["shop/web"], "only its own namespace");

    // The sidecar meets billing's ledger by name and by its cluster IP, and a name that is not there.
    tx.send(pb::DataPlaneMessage {
        msg: Some(pb::data_plane_message::Msg::Subscribe(pb::Subscribe {
            services: vec!["billing/ledger".into(), "billing/nope".into()],
            addresses: vec!["10.96.0.77".into(), "10.96.9.9".into()],
        })),
    })
    .await
    .unwrap();
    let u = next(&mut s).await;
    for svc in &u.services {
        map.insert(svc.key.clone(), svc.clone());
    }
    assert_eq!(known(&map), ["billing/ledger", "shop/web"]);
    assert_eq!(u.not_found, ["billing/nope", "10.96.9.9"]);
    assert_eq!(map["billing/ledger"].endpoints[0].address, "10.1.0.7");

    // Reconnecting with its subscriptions, it keeps them (and still not billing/audit).
    drop(s);
    let (_tx, mut s) = open_as(&mut c, "sidecar", 0, 0, vec!["billing/ledger".into()])
        .await
        .unwrap();
    let u = next(&mut s).await;
    let keys: Vec<_> = u.services.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.contains(&"billing/ledger") && keys.contains(&"shop/web"),
        "{keys:?}"
    );

    // A workload cannot ask for a gateway's view.
    let err = open_as(&mut c, "gateway", 0, 0, vec![])
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("namespace fedmesh-system"),
        "{}",
        err.message()
    );
    // An ID not shaped like a Kubernetes workload's gets only what it asks for.
    let mut host = client_as(&east, "/web").await;
    let (_h, mut hs) = open_as(&mut host, "sidecar", 0, 0, vec![]).await.unwrap();
    assert!(next(&mut hs).await.services.is_empty());
}
