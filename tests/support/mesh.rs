//! The in-process clusterset ([`fedmesh_testbed`]) as the data-plane tests use it: workloads in
//! namespace `shop`, HTTP services on port 80, and waits until a caller can route to them.

use fedmesh_testbed::apps::RunningApp;
use fedmesh_testbed::yaml::EndpointSpec;
use fedmesh_testbed::{Cluster, ClusterSpec, Testbed, Workload, WorkloadSpec};
use tokio::net::TcpListener;

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
