//! Node-bound issuance, SPIRE's guarantee: an agent joins with a one-time token made for its
//! node, and obtains SVIDs only for the workloads its node may host — entries registered for
//! the node, or (Kubernetes source) running pods scheduled on it as the control plane sees
//! them. A compromised node gets its own workloads' identities and no others.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedmesh_api::{ClusterName, SpiffeId, TrustDomain};
use fedmesh_federation::control_plane::admin::AdminSocketClient;
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, SourceSpec};
use fedmesh_test_support::kube_apiserver::KubeApiServer;
use fedmesh_trust::workload::{ControlPlaneSigner, JoinCredential, SvidSigner};
use tokio_util::sync::CancellationToken;

const WEB: &str = "spiffe://east.example/ns/shop/sa/web";
const DB: &str = "spiffe://east.example/ns/shop/sa/db";

async fn sign(signer: &Arc<ControlPlaneSigner>, id: &str) -> Result<SpiffeId, String> {
    let id = SpiffeId::new(id).unwrap();
    let (_, csr) = fedmesh_trust::svid::new_key_and_csr(&id).unwrap();
    let chain = signer
        .sign_x509(csr, id, None)
        .await
        .map_err(|e| e.to_string())?;
    let info = fedmesh_trust::svid::inspect(&chain[0]).unwrap();
    Ok(info.spiffe_id)
}

async fn sign_jwt(signer: &Arc<ControlPlaneSigner>, id: &str) -> Result<String, String> {
    signer
        .sign_jwt(SpiffeId::new(id).unwrap(), vec!["db".into()], None)
        .await
        .map_err(|e| e.to_string())
}

/// The value of `name{node="NODE",result="RESULT"}` in the control plane's metrics.
async fn counted(data: &std::path::Path, node: &str, result: &str) -> u64 {
    let text = AdminSocketClient::new(data).metrics().await.unwrap();
    let needle = format!(
        "fedmesh_control_plane_svid_requests_total{{node=\"{node}\",result=\"{result}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_only_the_identities_registered_for_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let token_a = east.enroll("node-a", &[WEB]).await;
    let _token_b = east.enroll("node-b", &[DB]).await;
    let a = east
        .agent(&dir.path().join("agent-a"), "node-a", &token_a)
        .await
        .unwrap();

    assert_eq!(sign(&a, WEB).await.unwrap().to_string(), WEB);
    sign_jwt(&a, WEB)
        .await
        .expect("a JWT-SVID for its own workload");
    let err = sign(&a, DB).await.unwrap_err();
    assert!(
        err.contains("node node-a may not hold spiffe://east.example/ns/shop/sa/db")
            && err.contains("no entry registers it"),
        "{err}"
    );
    let err = sign_jwt(&a, DB).await.unwrap_err();
    assert!(err.contains("node node-a may not hold"), "{err}");
    assert_eq!(counted(&east.data, "node-a", "no_entry").await, 2);
    assert_eq!(counted(&east.data, "node-a", "issued").await, 2);

    // A stolen copy of node A's identity is still node A: it cannot get node B's workloads.
    let stolen = dir.path().join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for f in std::fs::read_dir(dir.path().join("agent-a")).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), stolen.join(f.file_name())).unwrap();
        }
    }
    let thief = east
        .agent(&stolen, "node-b", "not-needed")
        .await
        .expect("a copied identity loads");
    let err = sign(&thief, DB).await.unwrap_err();
    assert!(err.contains("node node-a may not hold"), "{err}");

    // An entry registered later takes effect at once; a deleted one stops the next signing.
    let admin = AdminSocketClient::new(&east.data);
    admin.add_entry("node-a", DB).await.unwrap();
    sign(&a, DB).await.expect("registered for node-a now");
    admin.delete_entry("node-a", DB).await.unwrap();
    assert!(sign(&a, DB).await.is_err());
    let err = admin.delete_entry("node-a", DB).await.unwrap_err();
    assert!(err.contains("node node-a has no entry"), "{err}");

    // Entries of fedmesh's own or another trust domain's identities are refused.
    let err = admin
        .add_entry("node-a", "spiffe://east.example/fedmesh/agent/node-b")
        .await
        .unwrap_err();
    assert!(err.contains("reserved for fedmesh components"), "{err}");
    let err = admin
        .add_entry("node-a", "spiffe://west.example/ns/shop/sa/web")
        .await
        .unwrap_err();
    assert!(err.contains("not in trust domain east.example"), "{err}");
    east.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_token_works_once_and_for_its_own_node_only() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let token = east.enroll("node-a", &[WEB]).await;

    let err = east
        .agent(&dir.path().join("b"), "node-b", &token)
        .await
        .err()
        .unwrap();
    assert!(err.contains("issued for node-a, not node-b"), "{err}");
    east.agent(&dir.path().join("a1"), "node-a", &token)
        .await
        .expect("the token's node joins");
    let err = east
        .agent(&dir.path().join("a2"), "node-a", &token)
        .await
        .err()
        .unwrap();
    assert!(err.contains("already used"), "{err}");

    let admin = AdminSocketClient::new(&east.data);
    let err = admin
        .create_token("node-a", Duration::from_secs(30 * 24 * 3600))
        .await
        .unwrap_err();
    assert!(err.contains("between 1s and 7days"), "{err}");
    let err = admin
        .create_token("Bad_Node", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(err.contains("node name"), "{err}");
    east.stop().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_gets_no_more_svids_until_it_joins_again() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_redb_hub(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let east = start_cluster(dir.path(), "east", &hub).await;
    let token = east.enroll("node-a", &[WEB]).await;
    let a = east
        .agent(&dir.path().join("a"), "node-a", &token)
        .await
        .unwrap();
    sign(&a, WEB).await.unwrap();

    let admin = AdminSocketClient::new(&east.data);
    let nodes = admin.nodes().await.unwrap();
    let node = nodes.iter().find(|n| n.node == "node-a").unwrap();
    assert!(node.agent.is_some(), "{nodes:?}");
    assert_eq!(node.entries, vec![SpiffeId::new(WEB).unwrap()]);

    admin.remove_node("node-a").await.unwrap();
    let err = sign(&a, WEB).await.unwrap_err();
    assert!(err.contains("node node-a is not registered"), "{err}");
    let err = admin.remove_node("node-a").await.unwrap_err();
    assert!(
        err.contains("no agent is registered for node node-a"),
        "{err}"
    );

    // The entries stay: a new agent of the node joins with a new token and is served.
    let token = admin
        .create_token("node-a", Duration::from_secs(60))
        .await
        .unwrap()
        .token;
    let again = east
        .agent(&dir.path().join("a-again"), "node-a", &token)
        .await
        .unwrap();
    sign(&again, WEB).await.unwrap();
    east.stop().await;
    hub.stop().await;
}

/// A real API server (kube-apiserver + etcd) with fedmesh installed from the kind manifests,
/// nodes `node-a` and `node-b`, the namespace `shop`, and a client acting as the control plane's
/// own service account: each call the control plane makes needs a permission of our RBAC.
/// None when the peer is not built (the test then skips, except in CI).
async fn kubernetes() -> Option<(KubeApiServer, kube::Client)> {
    let api = tokio::task::spawn_blocking(|| {
        let api = KubeApiServer::start()?;
        api.install_fedmesh("east");
        api.apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n",
        );
        Some(api)
    })
    .await
    .unwrap()?;
    let client = api
        .client_as("fedmesh-system", "fedmesh-control-plane")
        .await;
    Some((api, client))
}

/// With the Kubernetes source, the control plane's own watch of the pods decides: an agent on
/// node A asking for a service account that runs only on node B is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_a_node_gets_the_identities_of_the_pods_scheduled_on_it() {
    let Some((api, client)) = kubernetes().await else {
        return;
    };
    api.create_pod("shop", "web-1", "web", "node-a", "Running");
    api.create_pod("shop", "db-1", "db", "node-b", "Running");
    api.create_pod("shop", "batch-1", "batch", "node-a", "Succeeded");

    let dir = tempfile::tempdir().unwrap();
    let mut config = ControlPlaneConfig::new(
        ClusterName::new("east").unwrap(),
        TrustDomain::new("east.example").unwrap(),
        dir.path().join("data"),
        SourceSpec::Kubernetes,
    );
    config.listen = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = CancellationToken::new();
    let cp = ControlPlane::start_with_kube_client(config, client, shutdown.clone())
        .await
        .unwrap();
    let admin = AdminSocketClient::new(&cp.config.data_dir);
    let token = admin
        .create_token("node-a", Duration::from_secs(60))
        .await
        .unwrap()
        .token;
    let a = ControlPlaneSigner::start(
        &cp.listen_addr.unwrap().to_string(),
        &dir.path().join("agent"),
        "node-a",
        Some(&JoinCredential::Token(token)),
        shutdown.clone(),
    )
    .await
    .unwrap();

    // The pod index fills once the control plane has listed the pods.
    let mut web = Err(String::new());
    for _ in 0..100 {
        web = sign(&a, WEB).await;
        if web.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(web.unwrap().to_string(), WEB);
    let err = sign(&a, DB).await.unwrap_err();
    assert!(
        err.contains(
            "no running pod of namespace shop with service account db is scheduled on the node"
        ),
        "{err}"
    );
    let err = sign(&a, "spiffe://east.example/ns/shop/sa/batch")
        .await
        .unwrap_err();
    assert!(err.contains("no running pod"), "a finished pod: {err}");

    // The db pod moves to node A: the next request is served; it leaves again: refused.
    api.create_pod("shop", "db-2", "db", "node-a", "Running");
    let mut db = Err(String::new());
    for _ in 0..100 {
        db = sign(&a, DB).await;
        if db.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.expect("a db pod runs on node A now");
    // No kubelet confirms a graceful deletion here: delete at once, as a force delete does.
    api.kubectl_ok(
        &[
            "delete",
            "pod",
            "db-2",
            "-n",
            "shop",
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    let mut refused = false;
    for _ in 0..100 {
        if sign(&a, DB).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "node A keeps getting db's identity after its pod left"
    );

    let nodes = admin.nodes().await.unwrap();
    let node_b = nodes.iter().find(|n| n.node == "node-b").unwrap();
    assert_eq!(node_b.pod_identities, vec![DB.to_string()]);
    assert!(node_b.agent.is_none());
    shutdown.cancel();
}

/// On Kubernetes an agent proves its node with its pod's projected service-account token: the
/// control plane asks TokenReview whose token it is and reads the pod's node itself. A token of
/// another audience, another service account, a pod on another node, a pod since replaced, or
/// one bound to no pod does not join; a node deleted from the cluster can no longer renew its
/// agent's identity. Every token is a real one from the API server's TokenRequest API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_an_agent_proves_its_node_with_its_pods_service_account_token() {
    let Some((api, client)) = kubernetes().await else {
        return;
    };
    let sa = "fedmesh-agent";
    api.create_pod("fedmesh-system", "agent-x1", sa, "node-a", "Running");
    api.create_pod("shop", "web-1", "web", "node-a", "Running");
    api.create_pod("shop", "db-1", "db", "node-b", "Running");
    let agent = Some("agent-x1");
    let sat_agent = api.token("fedmesh-system", sa, Some("fedmesh"), agent);
    let sat_for_the_api_server = api.token("fedmesh-system", sa, None, agent);
    let sat_of_a_workload = api.token("shop", "web", Some("fedmesh"), Some("web-1"));
    let unbound = api.token("fedmesh-system", sa, Some("fedmesh"), None);
    // A token of a pod that was deleted and replaced by another of the same name.
    let old_uid = api.create_pod("fedmesh-system", "agent-x2", sa, "node-a", "Running");
    let sat_of_a_replaced_pod = api.token("fedmesh-system", sa, Some("fedmesh"), Some("agent-x2"));
    api.kubectl_ok(
        &[
            "delete",
            "pod",
            "agent-x2",
            "-n",
            "fedmesh-system",
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    let new_uid = api.create_pod("fedmesh-system", "agent-x2", sa, "node-a", "Running");
    assert_ne!(old_uid, new_uid);

    let dir = tempfile::tempdir().unwrap();
    let mut config = ControlPlaneConfig::new(
        ClusterName::new("east").unwrap(),
        TrustDomain::new("east.example").unwrap(),
        dir.path().join("data"),
        SourceSpec::Kubernetes,
    );
    config.listen = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = CancellationToken::new();
    let cp = ControlPlane::start_with_kube_client(config, client, shutdown.clone())
        .await
        .unwrap();
    let addr = cp.listen_addr.unwrap().to_string();

    // The control plane publishes the bundle agents verify it with.
    let mut published = None;
    for _ in 0..100 {
        published = api.get("configmap", "fedmesh-system", "fedmesh-ca-bundle");
        if published.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let published = published.expect("the ConfigMap fedmesh-ca-bundle is published");
    assert_eq!(published["data"]["trust-domain"], "east.example");
    let bundle_file = dir.path().join("bundle.spiffe");
    std::fs::write(
        &bundle_file,
        published["data"]["bundle.spiffe"].as_str().unwrap(),
    )
    .unwrap();

    let join = |name: &str, node: &str, token: &str, bundle: &std::path::Path| {
        let token_file = dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        let credential = JoinCredential::ServiceAccount {
            token_file,
            bundle_file: bundle.to_path_buf(),
            trust_domain: TrustDomain::new("east.example").unwrap(),
        };
        let (addr, agent_dir, node, shutdown) = (
            addr.clone(),
            dir.path().join(name),
            node.to_string(),
            shutdown.clone(),
        );
        async move {
            ControlPlaneSigner::start(&addr, &agent_dir, &node, Some(&credential), shutdown)
                .await
                .map_err(|e| e.to_string())
        }
    };

    let refusals = [
        (
            "the agent's token, claiming another node",
            "node-b",
            sat_agent.as_str(),
            "pod fedmesh-system/agent-x1 runs on node node-a, not node-b",
        ),
        (
            "a token for the API server",
            "node-a",
            sat_for_the_api_server.as_str(),
            "is invalid for the target audiences",
        ),
        (
            "a workload's token",
            "node-a",
            sat_of_a_workload.as_str(),
            "belongs to system:serviceaccount:shop:web, not to the agent's service account system:serviceaccount:fedmesh-system:fedmesh-agent",
        ),
        (
            "a token bound to no pod",
            "node-a",
            unbound.as_str(),
            "is not bound to a pod",
        ),
        // The API server itself refuses it (the control plane checks the uid too, for API
        // servers that do not).
        (
            "the token of a replaced pod",
            "node-a",
            sat_of_a_replaced_pod.as_str(),
            "does not match service account pod ref claim",
        ),
        (
            "a forged token",
            "node-a",
            "a-forged-token",
            "invalid bearer token",
        ),
    ];
    for (i, (what, node, token, want)) in refusals.iter().enumerate() {
        let err = join(&format!("refused-{i}"), node, token, &bundle_file)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} claiming {node} joined"));
        assert!(err.contains(want), "{what} claiming {node}: {err}");
    }
    let metrics = AdminSocketClient::new(&cp.config.data_dir)
        .metrics()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "fedmesh_control_plane_agent_joins_total{node=\"node-b\",result=\"wrong_node\"} 1"
        ),
        "{metrics}"
    );

    // A bundle of another CA (what an attacker's control plane would match) does not verify us.
    let other = fedmesh_trust::ca::TrustDomainCa::init(
        &dir.path().join("other-ca"),
        fedmesh_trust::ca::CaOptions::new(TrustDomain::new("east.example").unwrap()),
    )
    .unwrap();
    let other_bundle = dir.path().join("other.spiffe");
    std::fs::write(&other_bundle, other.bundle().to_json()).unwrap();
    let err = join("wrong-bundle", "node-a", &sat_agent, &other_bundle)
        .await
        .err()
        .expect("a control plane outside the given bundle is not trusted");
    assert!(err.contains("joining the control plane"), "{err}");

    // The agent's own token, for its own node: joined, and served its node's workloads only.
    let a = join("agent", "node-a", &sat_agent, &bundle_file)
        .await
        .unwrap();
    let mut web = Err(String::new());
    for _ in 0..100 {
        web = sign(&a, WEB).await;
        if web.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(web.unwrap().to_string(), WEB);
    assert!(sign(&a, DB).await.unwrap_err().contains("no running pod"));
    a.renew_identity()
        .await
        .expect("a node of the cluster renews");

    // The node is deleted from the cluster: its agent can no longer renew.
    api.kubectl_ok(&["delete", "node", "node-a"], None);
    let err = a.renew_identity().await.unwrap_err();
    assert!(
        err.contains("node node-a no longer exists in the cluster"),
        "{err}"
    );
    shutdown.cancel();
}
