//! The east-west gateway's refusals, in process on loopback: every reason the README lists under
//! `fedmesh_gateway_refused_total{reason=...}` is produced by the connection that causes it and
//! counted under that name, while good traffic keeps flowing.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fedmesh_dataplane::config::{ConfigHandle, RoutingTable};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_gateway::{Gateway, GatewayOptions};
use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::yaml::EndpointSpec;
use support::mesh::{
    client_workload, endpoints, http_workload, serve_http, testbed, url, wait_routable,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A TLS client that sends `sni` (or none) and accepts any server certificate: the gateway
/// should refuse before any certificate is seen.
async fn tls_attempt(gateway: SocketAddr, sni: Option<&str>) -> Result<(), String> {
    let cfg = fedmesh_test_support::attack::accept_any_server(vec![]);
    // rustls sends no SNI for an IP address.
    let name =
        rustls_pki_types::ServerName::try_from(sni.unwrap_or("127.0.0.1").to_string()).unwrap();
    let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| "the gateway neither answered nor closed".to_string())?;
    r.map(|_| ()).map_err(|e| e.to_string())
}

/// Sends raw bytes; returns what the gateway answered before closing.
async fn raw_attempt(gateway: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the gateway closed the connection");
    out
}

fn refused(metrics: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("fedmesh_gateway_refused_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_what_it_must_and_keeps_serving_good_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api, _app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&api]));
    // A west service that is not exported.
    let (secret, _app2) = http_workload(west, "secret", "w1").await;
    west.serve(
        "shop",
        "secret",
        &[("http", 80, "")],
        &endpoints(&[&secret]),
    )
    .unwrap();
    let frontend = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;

    // Good traffic keeps flowing during the whole attack.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (stop, proxy) = (stop.clone(), frontend.proxy);
        tokio::spawn(async move {
            let mut c = ProxyClient::new(proxy);
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get(&url("api", "/")).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (ok, failed)
        })
    };

    let gw = west.gateway_addr;
    for (sni, reason) in [
        (Some("p80.secret.shop.west.fedmesh"), "not_exported"),
        (Some("p80.api.shop.east.fedmesh"), "wrong_cluster"),
        (Some("p81.api.shop.west.fedmesh"), "unknown_port"),
        (Some("api.shop.svc.cluster.local"), "bad_sni"),
        (Some("p0.api.shop.west.fedmesh"), "bad_sni"),
        (None, "no_sni"),
    ] {
        let before = refused(&west.gateway.metrics().encode(), reason);
        let err = tls_attempt(gw, sni).await.expect_err("refused");
        assert!(
            err.contains("UnrecognisedName"),
            "{sni:?}: the client learns why (an unrecognized_name alert): {err}"
        );
        let after = refused(&west.gateway.metrics().encode(), reason);
        assert_eq!(after, before + 1, "{sni:?} counted as {reason}");
    }
    let before = refused(&west.gateway.metrics().encode(), "not_tls");
    assert!(
        raw_attempt(gw, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_empty()
    );
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80)
        .collect();
    assert!(raw_attempt(gw, &garbage).await.is_empty());
    assert_eq!(
        refused(&west.gateway.metrics().encode(), "not_tls"),
        before + 2
    );
    // A well-formed ClientHello that claims 40 KiB, in full-size records, is cut off at the
    // gateway's 32 KiB limit (not refused as malformed) and closed without a word.
    let mut huge = Vec::new();
    for i in 0..3 {
        huge.extend([0x16, 0x03, 0x01, 0x40, 0x00]);
        let mut record = vec![0u8; 0x4000];
        if i == 0 {
            record[..4].copy_from_slice(&[0x01, 0x00, 0xa0, 0x00]);
        }
        huge.extend(record);
    }
    let before = refused(&west.gateway.metrics().encode(), "hello_too_large");
    assert!(raw_attempt(gw, &huge).await.is_empty());
    assert_eq!(
        refused(&west.gateway.metrics().encode(), "hello_too_large"),
        before + 1
    );

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = good.await.unwrap();
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "good traffic failed during the refusals: {failed:?}"
    );
    tb.shutdown().await;
}

/// A gateway of its own (`options`) on a fresh loopback port, following `config`; its address
/// and metrics. It stops when `stop` is cancelled.
async fn own_gateway(
    options: GatewayOptions,
    config: ConfigHandle,
    stop: &CancellationToken,
) -> (SocketAddr, Arc<ProxyMetrics>) {
    let metrics = Arc::new(ProxyMetrics::new("fedmesh_gateway"));
    let gw = Arc::new(Gateway::new(options, config, metrics.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gw.serve(listener, stop.child_token()));
    (addr, metrics)
}

/// Waits until `f` holds (a bounded poll: the gateway's configuration arrives asynchronously).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The reasons the attack test above cannot reach with a production gateway's limits: a
/// ClientHello that never comes (`hello_timeout`), connections past `--max-connections`
/// (`overloaded`), an exported service with no ready endpoint (`no_endpoints`), endpoints that
/// all refuse the connection (`upstream_unavailable`), and a gateway with no configuration yet
/// (`not_ready`). Each is one connection and one count, and none costs a good request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_remaining_refusal_is_counted_under_the_reason_the_readme_names() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api, _app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&api]));
    // Exported, but its only endpoint is not ready.
    let not_ready_ep = EndpointSpec {
        ready: false,
        ..api.endpoint()
    };
    serve_http(west, "empty", &[not_ready_ep]);
    // Exported, ready, and nothing listens there.
    let closed = SocketAddr::from(([127, 0, 0, 1], fedmesh_test_support::free_port()));
    serve_http(
        west,
        "gone",
        &[EndpointSpec {
            addr: closed,
            zone: "w1".into(),
            ready: true,
        }],
    );
    let frontend = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    let config = west.gateway_config.clone();
    eventually("west's gateway to know empty and gone as exported", || {
        let t = config.table();
        ["shop/empty", "shop/gone"]
            .iter()
            .all(|s| t.service(&s.parse().unwrap()).is_some_and(|e| e.exported))
    })
    .await;

    let stop = CancellationToken::new();
    let options = GatewayOptions {
        hello_timeout: Duration::from_secs(1),
        max_connections: 2,
        ..GatewayOptions::default()
    };
    let (gw, metrics) = own_gateway(options, config.clone(), &stop).await;
    let count = |reason: &str| refused(&metrics.encode(), reason);

    // Two connections that never say hello fill the gateway: a third is turned away at once...
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(gw).await.unwrap());
    }
    // Accepted in order: the first two hold both slots when the third comes.
    assert!(raw_attempt(gw, b"").await.is_empty());
    assert_eq!(count("overloaded"), 1, "{}", metrics.encode());
    // ... and the two are closed when their hello does not come in time.
    for mut c in idle {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
        assert!(matches!(read, Ok(Ok(0))), "closed without a word: {read:?}");
    }
    assert_eq!(count("hello_timeout"), 2, "{}", metrics.encode());
    // The opening has one deadline: a client that stalls inside a hop (PROXY v2) header is a
    // hello timeout too, not a bad header.
    let mut stalled = tokio::net::TcpStream::connect(gw).await.unwrap();
    stalled.write_all(b"\r\n\r\n\0\r\nQ").await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut out)).await;
    assert!(matches!(read, Ok(Ok(0))), "closed without a word: {read:?}");
    assert_eq!(count("hello_timeout"), 3, "{}", metrics.encode());

    for (sni, reason) in [
        ("p80.empty.shop.west.fedmesh", "no_endpoints"),
        ("p80.gone.shop.west.fedmesh", "upstream_unavailable"),
    ] {
        let err = tls_attempt(gw, Some(sni)).await.expect_err("refused");
        assert_eq!(count(reason), 1, "{sni} counted as {reason} ({err})");
    }

    // A gateway that has no configuration yet refuses everything as not ready.
    let empty = ConfigHandle::fixed(Arc::new(RoutingTable::default()));
    let (fresh, fresh_metrics) = own_gateway(GatewayOptions::default(), empty, &stop).await;
    tls_attempt(fresh, Some("p80.api.shop.west.fedmesh"))
        .await
        .expect_err("refused");
    assert_eq!(refused(&fresh_metrics.encode(), "not_ready"), 1);

    // Nothing else was refused, and the same gateway still carries a good request.
    let total: u64 = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("fedmesh_gateway_refused_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 6, "{}", metrics.encode());
    let mut c = ProxyClient::new(frontend.proxy);
    let r = c.get(&url("api", "/")).await.unwrap();
    assert_eq!(r.status, 200);
    stop.cancel();
    tb.shutdown().await;
}
