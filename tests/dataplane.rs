//! The data plane end to end, in process, on loopback: a hub, clusters with their control planes
//! and east-west gateways, and workloads behind sidecars with identities from their own Workload
//! API agents. Real sockets, real mTLS, real SNI routing.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fedmesh_testbed::apps::{self, AppInfo};
use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::pb::EchoRequest;
use fedmesh_testbed::pb::echo_client::EchoClient;
use fedmesh_testbed::yaml;
use fedmesh_testbed::{Workload, WorkloadSpec};
use support::mesh::{
    app_listener, client_workload, endpoints, http_workload, http_workload_on, serve_http, testbed,
    url, wait_routable,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `CONNECT` tunnel through a sidecar's HTTP proxy, ready for the caller's bytes.
async fn open_tunnel(proxy: SocketAddr, authority: &str) -> tokio::net::TcpStream {
    let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    c.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c
}

/// Reads an HTTP/1 message head (through the empty line), byte by byte.
async fn read_head(c: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_grpc_and_tcp_cross_clusters_through_the_gateway_with_the_callers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));

    // West serves three services: HTTP, gRPC and opaque TCP.
    let (api, _api_app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&api]));
    let info = |w: &str| AppInfo {
        cluster: "west".into(),
        zone: "w1".into(),
        workload: w.into(),
    };
    let grpc_app = apps::grpc_echo(app_listener().await, info("greeter")).await;
    let greeter = west
        .workload(&WorkloadSpec::new("shop", "greeter", "w1"), grpc_app.addr)
        .await
        .unwrap();
    west.serve(
        "shop",
        "greeter",
        &[("grpc", 9090, "")],
        &endpoints(&[&greeter]),
    )
    .unwrap();
    west.export("shop", "greeter").unwrap();
    let tcp_app = apps::tcp_echo(app_listener().await, info("store")).await;
    let store = west
        .workload(&WorkloadSpec::new("shop", "store", "w1"), tcp_app.addr)
        .await
        .unwrap();
    west.serve(
        "shop",
        "store",
        &[("tcp-store", 7000, "")],
        &endpoints(&[&store]),
    )
    .unwrap();
    west.export("shop", "store").unwrap();

    let frontend = client_workload(east, "frontend", "e1").await;
    for svc in ["api", "greeter", "store"] {
        wait_routable(&tb, &frontend, svc, &["west"]).await;
    }

    // HTTP/1.1 through the frontend's HTTP proxy.
    let mut http = ProxyClient::new(frontend.proxy);
    let reply = http
        .request(
            "GET",
            &url("api", "/hello"),
            &[
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                (
                    "x-forwarded-client-cert",
                    "URI=spiffe://evil.example/forged",
                ),
            ],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let echo = reply.echo().unwrap();
    assert_eq!(
        (echo.cluster.as_str(), echo.workload.as_str()),
        ("west", "api")
    );
    assert_eq!(
        echo.caller,
        frontend.id.to_string(),
        "the app sees the east caller, never a forged header"
    );
    assert_eq!(
        echo.version, "HTTP/1.1",
        "the app is spoken to in the protocol the caller used"
    );
    assert!(
        echo.traceparent
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            && !echo.traceparent.contains("00f067aa0ba902b7"),
        "the trace continues with a new parent span per hop: {}",
        echo.traceparent
    );
    // A request body crosses too, and the connection is reused.
    let posted = http
        .request(
            "POST",
            &url("api", "/upload"),
            &[],
            bytes::Bytes::from(vec![7u8; 100_000]),
        )
        .await
        .unwrap();
    assert_eq!(posted.echo().unwrap().body_bytes, 100_000);

    // HTTP/2 (prior knowledge) to a service listener.
    let h2_port = frontend.listen("shop/api:80").await.unwrap();
    let tcp = tokio::net::TcpStream::connect(h2_port).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            http::Request::get("http://api.shop.svc.clusterset.local/h2")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let echo: apps::EchoResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (echo.cluster.as_str(), echo.version.as_str()),
        ("west", "HTTP/2.0")
    );
    assert_eq!(echo.caller, frontend.id.to_string());

    // gRPC: unary, server streaming, bidirectional streaming.
    let grpc_port = frontend.listen("shop/greeter:9090").await.unwrap();
    let mut grpc = EchoClient::connect(format!("http://{grpc_port}"))
        .await
        .unwrap();
    let r = grpc
        .unary(EchoRequest {
            message: "hi".into(),
            count: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.cluster.as_str(), r.message.as_str()), ("west", "hi"));
    assert_eq!(r.caller, frontend.id.to_string());
    let mut stream = grpc
        .server_stream(EchoRequest {
            message: "s".into(),
            count: 50,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut bidi = grpc
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..20 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
            count: 0,
        })
        .await
        .unwrap();
        let m = bidi.message().await.unwrap().unwrap();
        assert_eq!((m.message, m.seq), (format!("m{i}"), i));
    }
    drop(tx);
    assert!(bidi.message().await.unwrap().is_none());

    // Opaque TCP: through a service listener and through the proxy's CONNECT.
    let tcp_port = frontend.listen("shop/store:7000").await.unwrap();
    let mut s = tokio::net::TcpStream::connect(tcp_port).await.unwrap();
    let mut hello = vec![0u8; "store@west\n".len()];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(
        hello, b"store@west\n",
        "a server-first protocol works (no client bytes needed)"
    );
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(
        back, expected,
        "bytes come back intact and the half-close propagates"
    );

    let mut c = open_tunnel(frontend.proxy, "store.shop.svc.clusterset.local:7000").await;
    let mut hello = vec![0u8; "store@west\n".len()];
    c.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello, b"store@west\n");

    // Metrics: requests by source and destination cluster, on both sides; the gateway by SNI.
    let out = frontend.metrics.encode();
    assert!(
        out.contains(r#"reporter="source",source_principal="spiffe://east.fedmesh.test/ns/shop/sa/frontend",source_cluster="east",destination_cluster="west",destination_service="shop/api",response_code="200""#),
        "{out}"
    );
    let inbound = api.metrics.encode();
    assert!(
        inbound.contains(r#"reporter="destination",source_principal="spiffe://east.fedmesh.test/ns/shop/sa/frontend",source_cluster="east",destination_cluster="west",destination_service="shop/api",response_code="200""#),
        "{inbound}"
    );
    let gw = west.gateway.metrics().encode();
    assert!(gw.contains(r#"sni="p80.api.shop.west.fedmesh""#), "{gw}");
    assert!(
        gw.contains(r#"sni="p7000.store.shop.west.fedmesh""#),
        "{gw}"
    );
    assert!(
        frontend.sidecar.pooled_connections() >= 1,
        "HTTP rides pooled connections"
    );
    tb.shutdown().await;
}

/// Sends requests one after another until `stop`, recording who answered and what failed.
struct Stream {
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Stream {
    fn start(proxy: SocketAddr, svc: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, seen2) = (stop.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut c = ProxyClient::new(proxy);
            let mut failed = Vec::new();
            // Bounded: at most this many requests, however long the test waits.
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                match c.get(&url(svc, "/")).await {
                    Ok(r) if r.status == 200 => {
                        let e = r.echo().unwrap();
                        seen2
                            .lock()
                            .unwrap()
                            .push(format!("{}/{}", e.cluster, e.zone));
                    }
                    Ok(r) => failed.push(format!(
                        "{}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failed
        });
        Self { stop, seen, task }
    }

    /// Waits until the last `n` answers all came from `place` ("cluster/zone").
    async fn until_all_from(&self, place: &str, n: usize) {
        let r = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                {
                    let seen = self.seen.lock().unwrap();
                    if seen.len() >= n && seen[seen.len() - n..].iter().all(|s| s == place) {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let tail: Vec<String> = {
            let seen = self.seen.lock().unwrap();
            seen[seen.len().saturating_sub(10)..].to_vec()
        };
        assert!(
            r.is_ok(),
            "traffic never settled on {place}; last answers: {tail:?}"
        );
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_failover_zone_then_cluster_and_back_with_zero_failed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (a, a_app) = http_workload(east, "api", "east-a").await;
    let (b, b_app) = http_workload(east, "api-b", "east-b").await;
    let (w, _w_app) = http_workload(west, "api", "west-a").await;
    serve_http(east, "api", &endpoints(&[&a, &b]));
    serve_http(west, "api", &endpoints(&[&w]));
    let client = client_workload(east, "frontend", "east-a").await;
    wait_routable(&tb, &client, "api", &["east", "west"]).await;
    client
        .wait_config("two local endpoints", |t| {
            t.service_named("shop/api")
                .is_some_and(|e| e.svc.endpoints.len() == 2)
        })
        .await
        .unwrap();

    let stream = Stream::start(client.proxy, "api");
    stream.until_all_from("east/east-a", 100).await;
    {
        let seen = stream.seen.lock().unwrap();
        assert!(
            seen.iter().all(|s| s == "east/east-a"),
            "zone a stays in zone a: {seen:?}"
        );
    }
    // Zone a dies (sidecar and app): traffic moves to zone b.
    let a_port = a.inbound;
    // Graceful: the sidecar drains what it accepted, then the app goes.
    a.stop_and_drain().await;
    a_app.stop();
    drop(a);
    stream.until_all_from("east/east-b", 100).await;
    // Zone b dies too: traffic leaves the cluster for west.
    b.stop_and_drain().await;
    b_app.stop();
    drop(b);
    stream.until_all_from("west/west-a", 100).await;
    // Zone a comes back on the same address: traffic returns.
    let (_a2, _a2_app) = http_workload_on(east, "api", "east-a", a_port.port()).await;
    stream.until_all_from("east/east-a", 100).await;
    let failed = stream.finish().await;
    assert!(
        failed.is_empty(),
        "requests failed during failover: {failed:?}"
    );
    tb.shutdown().await;
}

async fn count_by_cluster(proxy: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut c = ProxyClient::new(proxy);
    let mut by = BTreeMap::new();
    for _ in 0..n {
        let r = c.get(&url("api", "/")).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        *by.entry(r.echo().unwrap().cluster).or_insert(0) += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_80_20_split_across_clusters_holds_and_changes_live() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (e, _e_app) = http_workload(east, "api", "e1").await;
    let (w, _w_app) = http_workload(west, "api", "w1").await;
    serve_http(east, "api", &endpoints(&[&e]));
    serve_http(west, "api", &endpoints(&[&w]));
    east.write(
        "api-split.yaml",
        &yaml::cluster_split("shop", "api", &[("east", 80), ("west", 20)]),
    )
    .unwrap();
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["east", "west"]).await;
    client
        .wait_config("the 80/20 split", |t| {
            t.service_named("shop/api")
                .and_then(|e| e.svc.policy.as_ref())
                .is_some_and(|p| p.routes.iter().any(|r| r.backend_refs.len() == 2))
        })
        .await
        .unwrap();
    let by = count_by_cluster(client.proxy, 5000).await;
    let east_share = by.get("east").copied().unwrap_or(0) as f64 / 5000.0;
    assert!(
        (east_share - 0.80).abs() <= 0.03,
        "east got {:.1}% of 5000 requests (want 80 ± 3): {by:?}",
        east_share * 100.0
    );

    // New weights take effect without restarting anything.
    east.write(
        "api-split.yaml",
        &yaml::cluster_split("shop", "api", &[("east", 0), ("west", 100)]),
    )
    .unwrap();
    client
        .wait_config("the new weights", |t| {
            t.service_named("shop/api")
                .and_then(|e| e.svc.policy.as_ref())
                .is_some_and(|p| {
                    p.routes.iter().any(|r| {
                        r.backend_refs
                            .iter()
                            .any(|b| b.cluster == "east" && b.weight == 0)
                    })
                })
        })
        .await
        .unwrap();
    let by = count_by_cluster(client.proxy, 300).await;
    assert_eq!(by.get("west"), Some(&300), "{by:?}");
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_and_gateways_keep_routing_while_the_control_planes_are_down() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (w, _w_app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&w]));
    // A second west workload, running but not yet published.
    let (orders, _orders_app) = http_workload(west, "orders", "w1").await;
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["west"]).await;
    let mut c = ProxyClient::new(client.proxy);
    assert_eq!(c.get(&url("api", "/")).await.unwrap().status, 200);

    east.stop_control_plane().await;
    west.stop_control_plane().await;
    for _ in 0..200 {
        let r = c.get(&url("api", "/")).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.echo().unwrap().cluster, "west");
    }
    // A new client connection works too.
    assert_eq!(client_workload_reuse(&client).await, 200);

    // A change made while they are down arrives when they return (nothing can carry it before:
    // the sidecar has not heard of it).
    serve_http(west, "orders", &endpoints(&[&orders]));
    assert!(client.config.table().service_named("shop/orders").is_none());
    west.start_control_plane().await.unwrap();
    east.start_control_plane().await.unwrap();
    wait_routable(&tb, &client, "orders", &["west"]).await;
    orders
        .wait_config("its own service", |t| {
            t.service_named("shop/orders").is_some()
        })
        .await
        .unwrap();
    let r = c.get(&url("orders", "/")).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.echo().unwrap().workload, "orders");
    assert_eq!(c.get(&url("api", "/")).await.unwrap().status, 200);
    tb.shutdown().await;
}

/// Opens a new client connection through the existing sidecar (its pooled peer connection may be
/// gone) and returns the status of one request.
async fn client_workload_reuse(client: &Workload) -> u16 {
    let mut c = ProxyClient::new(client.proxy);
    c.get(&url("api", "/fresh")).await.unwrap().status.as_u16()
}

/// Answers by cluster for `n` GETs of `host`.
async fn clusters_answering(proxy: SocketAddr, host: &str, n: usize) -> BTreeMap<String, usize> {
    let mut c = ProxyClient::new(proxy);
    let mut by = BTreeMap::new();
    for _ in 0..n {
        let r = c.get(&format!("http://{host}/")).await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{host}: {}",
            String::from_utf8_lossy(&r.body)
        );
        *by.entry(r.echo().unwrap().cluster).or_insert(0) += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_local_names_stay_local_and_clusterset_names_reach_only_exporters() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    // East has its own shop/api, not exported; west exports one.
    let (a, _a_app) = http_workload(east, "api", "e1").await;
    east.serve("shop", "api", &[("http", 80, "")], &endpoints(&[&a]))
        .unwrap();
    let (w, _w_app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&w]));
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["east", "west"]).await;

    // The clusterset name is the ServiceImport: west only, as east does not export.
    let by = clusters_answering(client.proxy, "api.shop.svc.clusterset.local", 20).await;
    assert_eq!(by, BTreeMap::from([("west".to_string(), 20)]));
    // The cluster.local name is east's own Service.
    let by = clusters_answering(client.proxy, "api.shop.svc.cluster.local", 20).await;
    assert_eq!(by, BTreeMap::from([("east".to_string(), 20)]));
    // A short name means the clusterset, since the service is in it.
    let by = clusters_answering(client.proxy, "api.shop", 10).await;
    assert_eq!(by, BTreeMap::from([("west".to_string(), 10)]));

    // A service only east has: reachable by its local names, not by a clusterset name.
    let (db, _db_app) = http_workload(east, "db", "e1").await;
    east.serve("shop", "db", &[("http", 80, "")], &endpoints(&[&db]))
        .unwrap();
    client
        .wait_config("shop/db", |t| {
            t.service_named("shop/db")
                .is_some_and(|e| !e.local_targets.values().all(|t| t.is_empty()))
        })
        .await
        .unwrap();
    let by = clusters_answering(client.proxy, "db.shop", 5).await;
    assert_eq!(by, BTreeMap::from([("east".to_string(), 5)]));
    let mut c = ProxyClient::new(client.proxy);
    let r = c.get("http://db.shop.svc.clusterset.local/").await.unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    tb.shutdown().await;
}

/// What a workload could write to pose as another: the header the callee's app trusts.
const FORGED_XFCC: &str =
    "By=spiffe://west.example/ns/shop/sa/api;URI=spiffe://west.example/ns/kube-system/sa/admin";

/// Sends one HTTP/1.1 request with a forged caller through a fresh tunnel to `shop/api` and
/// returns who the app believes called.
async fn caller_seen_through_tunnel(proxy: SocketAddr, opening: &str, pause: Duration) -> String {
    let mut t = open_tunnel(proxy, "api.shop.svc.clusterset.local:80").await;
    tokio::time::sleep(pause).await;
    t.write_all(
        format!(
            "{opening} /forged HTTP/1.1\r\nHost: api\r\nx-forwarded-client-cert: {FORGED_XFCC}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    t.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp).to_string();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let echo: apps::EchoResponse =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
    echo.caller
}

/// A WebSocket-like app: answers an upgrade with 101, says which caller header it saw, then
/// echoes bytes.
async fn upgrade_app() -> SocketAddr {
    let l = app_listener().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let seen = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("x-forwarded-client-cert:")
                            .then(|| l.split_once(':').unwrap().1.trim().to_string())
                    })
                    .unwrap_or_default();
                let reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\nx-seen-xfcc: {seen}\r\n\r\n"
                );
                if s.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Opaque TCP carries bytes unparsed, so a workload could tunnel HTTP through its own sidecar
/// (`CONNECT`, a `tcp-*` port) with an `x-forwarded-client-cert` naming anyone. The callee's
/// sidecar sniffs what arrives in a tunnel: HTTP is served as HTTP with the verified caller,
/// whatever the method, preamble, timing or version; what it cannot check is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cannot_forge_its_identity_through_an_opaque_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api, _api_app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&api]));
    let ws_app = upgrade_app().await;
    let ws = west
        .workload(&WorkloadSpec::new("shop", "ws", "w1"), ws_app)
        .await
        .unwrap();
    west.serve("shop", "ws", &[("tcp-ws", 8000, "")], &endpoints(&[&ws]))
        .unwrap();
    west.export("shop", "ws").unwrap();
    let frontend = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    wait_routable(&tb, &frontend, "ws", &["west"]).await;
    let me = frontend.id.to_string();

    for opening in ["GET", "\r\n\r\nGET", "PROPFIND", "X-ANYTHING"] {
        assert_eq!(
            caller_seen_through_tunnel(frontend.proxy, opening, Duration::ZERO).await,
            me,
            "HTTP opening {opening:?} inside a tunnel"
        );
    }
    // Silent past the detection timeout (as a server-first protocol would be), then HTTP.
    assert_eq!(
        caller_seen_through_tunnel(frontend.proxy, "GET", Duration::from_millis(700)).await,
        me,
        "HTTP after a pause"
    );

    // HTTP/2 with prior knowledge inside the tunnel.
    let t = open_tunnel(frontend.proxy, "api.shop.svc.clusterset.local:80").await;
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(t),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            http::Request::get("http://api.shop.svc.clusterset.local/h2")
                .header("x-forwarded-client-cert", FORGED_XFCC)
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let echo: apps::EchoResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (echo.caller.as_str(), echo.version.as_str()),
        (me.as_str(), "HTTP/2.0")
    );

    // An upgrade (WebSocket) through a tunnel to a tcp-* port: the app sees the real caller, and
    // the upgraded stream flows both ways.
    let mut t = open_tunnel(frontend.proxy, "ws.shop.svc.clusterset.local:8000").await;
    t.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: ws\r\nUpgrade: echo\r\nConnection: upgrade\r\nx-forwarded-client-cert: {FORGED_XFCC}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut t).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains(&format!("URI={me}")) && !head.contains("kube-system"),
        "the app saw the verified caller only: {head}"
    );
    t.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    t.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");

    // A request line too long to check is refused; the app never sees a byte of it.
    let mut t = open_tunnel(frontend.proxy, "api.shop.svc.clusterset.local:80").await;
    let mut long = b"GET /".to_vec();
    long.resize(70 * 1024, b'a');
    let _ = t.write_all(&long).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let refused = api.metrics.encode();
    assert!(
        refused.contains(r#"reason="undecidable_opening""#),
        "{refused}"
    );
    tb.shutdown().await;
}

/// A sidecar's configuration holds its own namespace; a service of another namespace reaches it
/// when it first calls one, by name, in this cluster or across clusters, and a name that exists
/// nowhere is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_other_namespaces_are_learned_when_first_called() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (ledger, _ledger_app) = east
        .http_echo_workload("billing", "ledger", "e1", 0)
        .await
        .unwrap();
    east.serve(
        "billing",
        "ledger",
        &[("http", 80, "")],
        &endpoints(&[&ledger]),
    )
    .unwrap();
    let (audit, _audit_app) = west
        .http_echo_workload("billing", "audit", "w1", 0)
        .await
        .unwrap();
    west.serve(
        "billing",
        "audit",
        &[("http", 80, "")],
        &endpoints(&[&audit]),
    )
    .unwrap();
    west.export("billing", "audit").unwrap();
    west.wait_gateway_serves("billing/audit").await.unwrap();
    let (api, _api_app) = http_workload(east, "api", "e1").await;
    east.serve("shop", "api", &[("http", 80, "")], &endpoints(&[&api]))
        .unwrap();
    let frontend = client_workload(east, "frontend", "e1").await;
    frontend.wait_trusts(&west.trust_domain).await.unwrap();
    frontend
        .wait_config("shop/api", |t| t.service_named("shop/api").is_some())
        .await
        .unwrap();
    // The ledger's Service is in east's control plane, but not in the frontend's table.
    ledger
        .wait_config("billing/ledger", |t| {
            t.service_named("billing/ledger").is_some()
        })
        .await
        .unwrap();
    assert!(
        frontend
            .config
            .table()
            .service_named("billing/ledger")
            .is_none()
    );
    assert!(
        frontend
            .config
            .table()
            .service_named("billing/audit")
            .is_none()
    );

    let mut c = ProxyClient::new(frontend.proxy);
    let r = c
        .get("http://ledger.billing.svc.cluster.local/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.echo().unwrap().caller, frontend.id.to_string());
    let r = c
        .get("http://audit.billing.svc.clusterset.local/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.echo().unwrap().cluster, "west");
    let t = frontend.config.table();
    assert!(
        t.service_named("billing/ledger").is_some() && t.service_named("billing/audit").is_some()
    );

    let r = c
        .get("http://nope.billing.svc.cluster.local/")
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert!(frontend.config.table().not_found.contains("billing/nope"));
    // The answer is counted, with its service, and the cluster it never reached reads
    // `unknown`: no series carries an empty label.
    let metrics = frontend.metrics.encode();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fedmesh_sidecar_requests_total")
                && l.contains("destination_cluster=\"unknown\",destination_service=\"billing/nope\",response_code=\"404\"")),
        "{metrics}"
    );
    assert!(!metrics.contains("=\"\""), "no empty label: {metrics}");
    tb.shutdown().await;
}

/// A change of another cluster's bundle alone (its CA prepares the next authority; nothing else
/// in the clusterset changes) reaches this cluster's workloads, through the hub, their control
/// plane, their agent and its Workload API stream: the way CA rotation reaches federated peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_clusters_next_authority_alone_reaches_local_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let client = client_workload(east, "frontend", "e1").await;
    client.wait_trusts(&west.trust_domain).await.unwrap();
    let td = fedmesh_api::TrustDomain::new(&west.trust_domain).unwrap();
    let anchors = |w: &Workload| w.identity.trust().anchors(&td).map_or(0, <[_]>::len);
    assert_eq!(anchors(&client), 1);
    west.control_plane()
        .expect("west's control plane runs")
        .ca
        .prepare_next(None)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut changes = client.identity.subscribe();
        while anchors(&client) < 2 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("east's workload holds west's next authority");
}
