//! A fake Kubernetes API server on loopback (no API server can run here): list and watch (with
//! label and field selectors), get, server-side apply, status, delete and TokenReview (for the
//! tokens a test registers), recording every request so tests can assert what a controller
//! asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A request the fake API received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// (plural, watch event) broadcast to open watches.
type Events = broadcast::Sender<(String, Value)>;

/// A minimal Kubernetes API: enough of list (label and field selectors), watch, apply, status
/// and delete for the resources it is told to serve; any other resource is 404, like a cluster
/// where that CRD is not installed.
#[derive(Clone, Default)]
pub struct FakeApi {
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
    served: BTreeSet<String>,
    rv: u64,
    /// plural -> (namespace, name) -> object
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    namespaces: BTreeSet<String>,
    requests: Vec<Recorded>,
    /// token -> (its audiences, the user it authenticates as)
    tokens: BTreeMap<String, (Vec<String>, Value)>,
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
        [plural, name] if *plural != "namespaces" => (s(plural), None, Some(s(name)), None),
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
    /// Serves the resources named by their plurals (`services`, `pods`, ...), in namespaces
    /// `namespaces` (applies to others are refused as the API server does).
    pub fn new(plurals: &[&str], namespaces: &[&str]) -> Self {
        let api = Self::default();
        {
            let mut i = api.inner.lock().unwrap();
            i.served = plurals.iter().map(|p| p.to_string()).collect();
            i.namespaces = namespaces.iter().map(|n| n.to_string()).collect();
        }
        api
    }

    /// Serves on a loopback port until the runtime ends; returns the base URL.
    pub async fn start(&self) -> String {
        let app = Router::new().fallback(handle).with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn sender(&self) -> Events {
        self.events
            .lock()
            .unwrap()
            .get_or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }

    /// Stores an object as a client would create it, and notifies watchers.
    pub fn put(&self, plural: &str, mut obj: Value) {
        let (event, obj) = {
            let mut i = self.inner.lock().unwrap();
            i.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(i.rv.to_string());
            if !obj["metadata"]["uid"].is_string() {
                obj["metadata"]["uid"] = json!(format!("uid-{}", i.rv));
            }
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

    pub fn delete(&self, plural: &str, ns: &str, name: &str) -> bool {
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

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .objects
            .get(plural)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    /// Makes `token` known to TokenReview: for the `audiences` it was issued for, it
    /// authenticates as `user` (`{"username": ..., "uid": ..., "extra": {...}}`), as the API
    /// server answers for a projected service-account token.
    pub fn add_token(&self, token: &str, audiences: &[&str], user: Value) {
        self.inner.lock().unwrap().tokens.insert(
            token.to_string(),
            (audiences.iter().map(|a| a.to_string()).collect(), user),
        );
    }

    /// The API server's answer to a TokenReview: authenticated only for a known token and an
    /// audience it was issued for (none requested means the API server's own, "api").
    fn review(&self, spec: &Value) -> Value {
        let token = spec["token"].as_str().unwrap_or_default();
        let wanted: Vec<String> = spec["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_else(|| vec!["api".into()]);
        let known = self.inner.lock().unwrap().tokens.get(token).cloned();
        let status = match known {
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
            Some((audiences, user)) => {
                let both: Vec<&String> = wanted.iter().filter(|a| audiences.contains(a)).collect();
                if both.is_empty() {
                    json!({"authenticated": false,
                           "error": format!("token audiences {audiences:?} is invalid for the target audiences {wanted:?}")})
                } else {
                    json!({"authenticated": true, "user": user, "audiences": both})
                }
            }
        };
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {}, "spec": spec, "status": status})
    }

    pub fn requests(&self) -> Vec<Recorded> {
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

/// `fieldSelector` equality terms on dotted paths (`spec.nodeName=n1`).
fn matches_fields(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').all(|term| match term.split_once('=') {
        Some((path, v)) => {
            let field = path.split('.').fold(obj, |o, k| &o[k]);
            field.as_str() == Some(v.trim_start_matches('='))
        }
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
    if !api.inner.lock().unwrap().served.contains(&plural) {
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
            let fields = q.get("fieldSelector").cloned();
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
                                if rv <= from || !matches_fields(&ev["object"], fields.as_ref()) {
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
                        .filter(|o| matches_fields(o, q.get("fieldSelector")))
                        .collect()
                })
                .unwrap_or_default();
            axum::Json(json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": i.rv.to_string()}, "items": items})).into_response()
        }
        (Method::POST, None) if plural == "tokenreviews" => {
            (StatusCode::CREATED, axum::Json(api.review(&body["spec"]))).into_response()
        }
        (Method::GET, Some(name)) if sub.is_none() => {
            // Objects put without a namespace (cluster-scoped ones) are kept under "default".
            match api.get(&plural, ns.as_deref().unwrap_or("default"), &name) {
                Some(o) => axum::Json(o).into_response(),
                None => status_body(404, "NotFound", &format!("{plural} \"{name}\" not found")),
            }
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
