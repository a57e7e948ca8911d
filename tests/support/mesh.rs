//! The in-process clusterset ([`fedmesh_testbed`]) as the data-plane tests use it: workloads in
//! namespace `shop`, HTTP services on port 80, and waits until a caller can route to them.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use fedmesh_testbed::apps::RunningApp;
use fedmesh_testbed::yaml::EndpointSpec;
use fedmesh_testbed::{Cluster, ClusterSpec, Testbed, Workload, WorkloadSpec};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn")),
        )
        .with_test_writer()
        .try_init();
}

pub async fn testbed(dir: &std::path::Path, clusters: &[(&str, &str)]) -> Testbed {
    init_logs();
    let specs: Vec<ClusterSpec> = clusters
        .iter()
        .map(|(n, r)| ClusterSpec::new(n, r))
        .collect();
    Testbed::start(dir, &specs).await.expect("testbed starts")
}

pub async fn app_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// An HTTP echo app and its workload in `c`.
pub async fn http_workload(c: &Cluster, name: &str, zone: &str) -> (Workload, RunningApp) {
    http_workload_on(c, name, zone, 0).await
}

pub async fn http_workload_on(
    c: &Cluster,
    name: &str,
    zone: &str,
    port: u16,
) -> (Workload, RunningApp) {
    c.http_echo_workload("shop", name, zone, port)
        .await
        .expect("workload starts")
}

/// `GET url` through a sidecar's HTTP proxy with `headers`.
pub async fn get(
    c: &mut fedmesh_testbed::client::ProxyClient,
    url: &str,
    headers: &[(&str, &str)],
) -> fedmesh_testbed::client::Reply {
    c.request("GET", url, headers, Bytes::new()).await.unwrap()
}

/// `shop/api` served in `c` by one workload in zone e1, and a `frontend` workload there that
/// can route to it: the workload, its app (keep it alive) and the frontend.
pub async fn api_and_frontend(tb: &Testbed, c: &str) -> (Workload, RunningApp, Workload) {
    let cluster = tb.cluster(c);
    let (api, app) = http_workload(cluster, "api", "e1").await;
    serve_http(cluster, "api", &endpoints(&[&api]));
    let frontend = client_workload(cluster, "frontend", "e1").await;
    wait_routable(tb, &frontend, "api", &[c]).await;
    (api, app, frontend)
}

/// A workload that only calls out (its app address is never used).
pub async fn client_workload(c: &Cluster, name: &str, zone: &str) -> Workload {
    c.workload(
        &WorkloadSpec::new("shop", name, zone),
        "127.0.0.1:9".parse().unwrap(),
    )
    .await
    .expect("client workload starts")
}

pub fn endpoints(ws: &[&Workload]) -> Vec<EndpointSpec> {
    ws.iter().map(|w| w.endpoint()).collect()
}

/// Publishes service `shop/<name>` (HTTP port 80) with `eps` in `c` and exports it.
pub fn serve_http(c: &Cluster, name: &str, eps: &[EndpointSpec]) {
    c.serve_http("shop", name, eps).unwrap();
}

/// Waits until `w` can reach `shop/<svc>` in every cluster of `clusters` (locally or remotely).
pub async fn wait_routable(tb: &Testbed, w: &Workload, svc: &str, clusters: &[&str]) {
    let key = format!("shop/{svc}");
    let own = w.cluster.clone();
    // The other clusters' gateways first: they admit only what they know to be exported.
    for c in clusters.iter().filter(|c| **c != own) {
        let c = tb.cluster(c);
        c.wait_gateway_serves(&key).await.unwrap();
        w.wait_trusts(&c.trust_domain).await.unwrap();
    }
    w.wait_config(&format!("{key} in {clusters:?}"), |t| {
        t.service_named(&key).is_some_and(|e| {
            clusters.iter().all(|c| {
                if *c == own {
                    e.svc.endpoints.iter().any(|ep| ep.ready)
                } else {
                    e.svc
                        .remote
                        .iter()
                        .any(|r| r.cluster == *c && r.ready > 0 && !r.gateways.is_empty())
                }
            })
        })
    })
    .await
    .unwrap();
}

pub fn url(svc: &str, path: &str) -> String {
    format!("http://{svc}.shop.svc.clusterset.local{path}")
}

/// An app that answers nothing until `release` is cancelled (then 200 to everything): it counts
/// the requests that arrived, those marked as a route mirror's copy, and those it answered.
pub struct HeldApp {
    pub app: RunningApp,
    pub arrived: Arc<AtomicUsize>,
    pub mirrored: Arc<AtomicUsize>,
    pub answered: Arc<AtomicUsize>,
    pub release: CancellationToken,
}

impl HeldApp {
    pub async fn start() -> Self {
        let listener = app_listener().await;
        let addr = listener.local_addr().unwrap();
        let counters: [Arc<AtomicUsize>; 3] = Default::default();
        let release = CancellationToken::new();
        let stop = CancellationToken::new();
        let (c, r, token) = (counters.clone(), release.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let s = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                };
                let (c, r) = (c.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (c, r) = (c.clone(), r.clone());
                        async move {
                            c[0].fetch_add(1, Ordering::SeqCst);
                            if req
                                .headers()
                                .get("fedmesh-mirror")
                                .is_some_and(|v| v == "1")
                            {
                                c[1].fetch_add(1, Ordering::SeqCst);
                            }
                            r.cancelled().await;
                            c[2].fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let [arrived, mirrored, answered] = counters;
        Self {
            app: RunningApp::from_parts(addr, stop),
            arrived,
            mirrored,
            answered,
            release,
        }
    }
}
