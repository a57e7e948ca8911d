//! Every `fedmesh-proxy-error` value the README's troubleshooting section lists, produced by the
//! situation it names and answered with the status it says, in process on loopback. (`timeout`,
//! `app-error`, `upstream-reset` and `not-ready` are produced by real processes in
//! tests/routes.rs and tests/lifecycle.rs.)

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::yaml::EndpointSpec;
use fedmesh_trust::tls::Authorizer;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::mesh::{
    client_workload, endpoints, get, http_workload, serve_http, testbed, url, wait_routable,
};

/// The answer to `GET url` through `proxy`: (status, fedmesh-proxy-error, body).
async fn answer(proxy: SocketAddr, url: &str) -> (u16, String, String) {
    let mut c = ProxyClient::new(proxy);
    let r = get(&mut c, url, &[]).await;
    let kind = r
        .headers
        .get("fedmesh-proxy-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (
        r.status.as_u16(),
        kind,
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_error_the_readme_lists_comes_from_the_situation_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let frontend = client_workload(east, "frontend", "e1").await;
    let ready = |addr: SocketAddr| EndpointSpec {
        addr,
        zone: "e1".into(),
        ready: true,
    };

    // `connect_failed`: the only endpoint refuses the connection.
    let closed = fedmesh_test_support::free_port();
    serve_http(east, "closed", &[ready(local(closed))]);
    // `tls_failed`: the only endpoint is not a sidecar (plain text, no mTLS).
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = plain.accept().await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    serve_http(east, "plain", &[ready(plain_addr)]);
    // `unavailable`: exported by west, with no ready endpoint anywhere.
    let (api, _api_app) = http_workload(west, "api", "w1").await;
    serve_http(
        west,
        "drained",
        &[EndpointSpec {
            ready: false,
            ..api.endpoint()
        }],
    );
    // `app-unreachable`: a meshed endpoint whose app is not listening.
    let no_app = east
        .workload(
            &fedmesh_testbed::WorkloadSpec::new("shop", "no-app", "e1"),
            local(fedmesh_test_support::free_port()),
        )
        .await
        .unwrap();
    serve_http(east, "no-app", &endpoints(&[&no_app]));
    // `denied`: west's api admits only another caller.
    serve_http(west, "api", &endpoints(&[&api]));
    west.write(
        "api-authz.yaml",
        r#"apiVersion: fedmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-admins, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: api}]
  rules:
    - from: [{source: {principals: ["spiffe://east.fedmesh.test/ns/shop/sa/admin"]}}]
"#,
    )
    .unwrap();
    for svc in ["closed", "plain", "no-app"] {
        wait_routable(&tb, &frontend, svc, &["east"]).await;
    }
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    api.wait_config("api's authorization policy", |t| {
        t.service_named("shop/api")
            .and_then(|e| e.svc.policy.as_ref())
            .is_some_and(|p| !p.authorization.is_empty())
    })
    .await
    .unwrap();
    frontend
        .wait_config("west's drained export", |t| {
            t.service_named("shop/drained").is_some()
        })
        .await
        .unwrap();

    let cases = [
        ("nosuch", "/", 404, "no-route"),
        ("closed", "/", 503, "connect_failed"),
        ("plain", "/", 502, "tls_failed"),
        ("drained", "/", 503, "unavailable"),
        ("no-app", "/", 503, "app-unreachable"),
        ("api", "/", 403, "denied"),
    ];
    for (svc, path, status, kind) in cases {
        let (got_status, got_kind, body) = answer(frontend.proxy, &url(svc, path)).await;
        assert_eq!(
            (got_status, got_kind.as_str()),
            (status, kind),
            "{svc}: {body}"
        );
        assert!(!body.is_empty(), "{svc}: the body says why");
    }

    // `not-exported`: a caller of another cluster that reaches a sidecar directly (past the
    // gateway, which would have refused it) for a service this cluster does not export. Here,
    // east's frontend identity, over mTLS to the inbound port of west's `secret`.
    let (secret, _secret_app) = http_workload(west, "secret", "w1").await;
    west.serve(
        "shop",
        "secret",
        &[("http", 80, "")],
        &endpoints(&[&secret]),
    )
    .unwrap();
    secret
        .wait_config("its own service", |t| {
            t.service_named("shop/secret").is_some()
        })
        .await
        .unwrap();
    let tls = frontend
        .identity
        .client_config(Authorizer::AnyTrusted, vec![b"h2".to_vec()]);
    let tcp = tokio::net::TcpStream::connect(secret.inbound)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("p80.secret.shop.west.fedmesh").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
        .connect(name, tcp)
        .await
        .expect("mTLS with a trusted identity completes; the refusal is per request");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://secret.shop.svc.cluster.local/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp.headers()["fedmesh-proxy-error"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        (status, kind.as_str()),
        (403, "not-exported"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    tb.shutdown().await;
}
