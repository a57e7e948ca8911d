//! The Kubernetes source and writer against a mocked API server (no API server can run here):
//! list + watch of Services, EndpointSlices and ServiceExports; server-side apply of
//! ServiceImports, derived EndpointSlices and ServiceExport status; deletion of withdrawn
//! imports. Every request the control plane makes is recorded and asserted.
//!
//! An opt-in test runs the same source against a real cluster when FEDMESH_TEST_KUBECONFIG is set.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use fedmesh_api::{ClusterName, ServiceKey, TrustDomain};
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, SourceSpec};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
struct Recorded {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

/// (plural, watch event) broadcast to open watches.
type Events = broadcast::Sender<(String, Value)>;

/// A minimal Kubernetes API: enough of list, watch, apply, status and delete.
#[derive(Clone, Default)]
struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    events: Arc<Mutex<Option<Events>>>,
}

/// An API path: plural, namespace, name, subresource.
struct ApiPath {
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// plural -> (namespace, name) -> object
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    namespaces: BTreeSet<String>,
    requests: Vec<Recorded>,
}

/// Splits an API path into its parts.
fn parse_path(path: &str) -> Option<ApiPath> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match parts.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let s = |x: &&str| x.to_string();
    let (plural, ns, name, sub) = match rest {
        [plural] => (s(plural), None, None, None),
        ["namespaces", ns, plural] => (s(plural), Some(s(ns)), None, None),
        ["namespaces", ns, plural, name] => (s(plural), Some(s(ns)), Some(s(name)), None),
        ["namespaces", ns, plural, name, sub] => {
            (s(plural), Some(s(ns)), Some(s(name)), Some(s(sub)))
        }
        _ => return None,
    };
    Some(ApiPath {
        plural,
        ns,
        name,
        sub,
    })
}

impl FakeApi {
    fn sender(&self) -> Events {
        self.events
            .lock()
            .unwrap()
            .get_or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }

    /// Stores an object as a client would create it, and notifies watchers.
    fn put(&self, plural: &str, mut obj: Value) {
        let (event, obj) = {
            let mut i = self.inner.lock().unwrap();
            i.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(i.rv.to_string());
            obj["metadata"]["uid"] = json!(format!("uid-{}", i.rv));
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            let map = i.objects.entry(plural.to_string()).or_default();
            let event = if map.contains_key(&(ns.clone(), name.clone())) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            map.insert((ns, name), obj.clone());
            (event, obj)
        };
        let _ = self
            .sender()
            .send((plural.to_string(), json!({"type": event, "object": obj})));
    }

    fn delete(&self, plural: &str, ns: &str, name: &str) -> bool {
        let obj = {
            let mut i = self.inner.lock().unwrap();
            i.rv += 1;
            let rv = i.rv;
            let removed = i
                .objects
                .get_mut(plural)
                .and_then(|m| m.remove(&(ns.to_string(), name.to_string())));
            removed.map(|mut o| {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                o
            })
        };
        match obj {
            Some(o) => {
                let _ = self
                    .sender()
                    .send((plural.to_string(), json!({"type": "DELETED", "object": o})));
                true
            }
            None => false,
        }
    }

    fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .objects
            .get(plural)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code})),
    )
        .into_response()
}

fn matches_selector(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
        None => true,
    })
}

async fn handle(
    State(api): State<FakeApi>,
    Query(q): Query<BTreeMap<String, String>>,
    req: Request,
) -> Response {
    let (method, path, query) = (
        req.method().clone(),
        req.uri().path().to_string(),
        req.uri().query().unwrap_or("").to_string(),
    );
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    api.inner.lock().unwrap().requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
    });
    let Some(ApiPath {
        plural,
        ns,
        name,
        sub,
    }) = parse_path(&path)
    else {
        return status_body(404, "NotFound", "unknown path");
    };
    // Like a cluster where fedmesh's own TrafficPolicy CRD is not installed.
    if ![
        "services",
        "endpointslices",
        "serviceexports",
        "serviceimports",
    ]
    .contains(&plural.as_str())
    {
        return status_body(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    match (method, name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let from: u64 = q
                .get("resourceVersion")
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            let mut rx = api.sender().subscribe();
            let stream = async_stream(
                move |tx: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>| async move {
                    loop {
                        match rx.recv().await {
                            Ok((p, ev)) if p == plural => {
                                let rv: u64 = ev["object"]["metadata"]["resourceVersion"]
                                    .as_str()
                                    .and_then(|r| r.parse().ok())
                                    .unwrap_or(0);
                                if rv <= from {
                                    continue;
                                }
                                let mut line = serde_json::to_vec(&ev).unwrap();
                                line.push(b'\n');
                                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                },
            );
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        (Method::GET, None) => {
            let i = api.inner.lock().unwrap();
            let items: Vec<Value> = i
                .objects
                .get(&plural)
                .map(|m| {
                    m.iter()
                        .filter(|((n, _), _)| ns.as_ref().is_none_or(|want| want == n))
                        .map(|(_, o)| o.clone())
                        .filter(|o| matches_selector(o, q.get("labelSelector")))
                        .collect()
                })
                .unwrap_or_default();
            axum::Json(json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": i.rv.to_string()}, "items": items})).into_response()
        }
        (Method::PATCH, Some(name)) => {
            let ns = ns.unwrap_or_default();
            if !api.inner.lock().unwrap().namespaces.contains(&ns) {
                return status_body(404, "NotFound", &format!("namespaces \"{ns}\" not found"));
            }
            let mut obj = api
                .get(&plural, &ns, &name)
                .unwrap_or_else(|| json!({"metadata": {"name": name, "namespace": ns}}));
            if sub.as_deref() == Some("status") {
                if api.get(&plural, &ns, &name).is_none() {
                    return status_body(404, "NotFound", "object not found");
                }
                obj["status"] = body["status"].clone();
            } else {
                let status = obj.get("status").cloned();
                obj = body.clone();
                obj["metadata"]["namespace"] = json!(ns);
                if let Some(s) = status {
                    obj["status"] = s;
                }
            }
            api.put(&plural, obj);
            axum::Json(api.get(&plural, &ns, &name).unwrap()).into_response()
        }
        (Method::DELETE, Some(name)) => {
            let ns = ns.unwrap_or_default();
            if api.delete(&plural, &ns, &name) {
                axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
                    .into_response()
            } else {
                status_body(404, "NotFound", "object not found")
            }
        }
        _ => status_body(405, "MethodNotAllowed", "not supported by the fake API"),
    }
}

/// A body stream fed by a task.
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn start_fake_api() -> (FakeApi, kube::Client) {
    let api = FakeApi::default();
    api.inner.lock().unwrap().namespaces.insert("shop".into());
    let app = Router::new().fallback(handle).with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
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
    config.join_token = Some(hub.hub.create_token(&config.cluster, None).await.unwrap().0);
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
    assert_eq!(
        i.clusters[0].exported_unix, 1767225600,
        "age from creationTimestamp"
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
async fn kubernetes_source_against_a_real_cluster_when_configured() {
    let Ok(path) = std::env::var("FEDMESH_TEST_KUBECONFIG") else {
        eprintln!("skipped: set FEDMESH_TEST_KUBECONFIG to run against a real cluster");
        return;
    };
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
