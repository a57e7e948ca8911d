//! The SPIFFE bundle endpoint, both profiles, over real TLS on loopback: fetch, refresh by the
//! refresh hint, and keep the last good bundle when the endpoint fails.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedmesh_trust::ca::{CaOptions, TrustDomainCa};
use fedmesh_trust::endpoint::{self, BundleEndpointClient, ClientProfile, ServerProfile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A CA whose bundle asks to be refreshed every second.
fn quick_refresh_ca(dir: &std::path::Path, name: &str) -> Arc<TrustDomainCa> {
    let mut opts = CaOptions::new(td(name));
    opts.refresh_hint = Duration::from_secs(1);
    Arc::new(TrustDomainCa::init(&dir.join(name), opts).unwrap())
}

#[tokio::test]
async fn https_web_fetch_and_refresh_follow_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = quick_refresh_ca(dir.path(), "west.example");
    let (roots, chain, key) = web_pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    tokio::spawn(endpoint::serve(
        listener,
        ServerProfile::HttpsWeb { chain, key },
        ca.subscribe_bundle(),
        stop.clone().cancelled_owned(),
    ));
    let client = BundleEndpointClient::new(
        &format!("https://localhost:{port}/bundle"),
        td("west.example"),
        ClientProfile::HttpsWeb {
            roots: Arc::new(roots),
        },
    )
    .unwrap();
    let fetched = client.fetch(None).await.unwrap();
    assert_eq!(fetched, *ca.bundle());

    let (mut rx, _task) = client.spawn_refresher(None, stop.clone().cancelled_owned());
    rx.wait_for(|b| b.is_some()).await.unwrap();
    ca.prepare_next(None).unwrap();
    let updated = tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|b| b.as_ref().is_some_and(|b| b.x509_authorities().len() == 2)),
    )
    .await
    .expect("refreshed within a few refresh hints")
    .unwrap()
    .clone()
    .unwrap();
    assert_eq!(*updated, *ca.bundle());
    stop.cancel();
}

#[tokio::test]
async fn https_spiffe_authenticates_the_endpoint_by_its_svid_and_keeps_the_last_good_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = quick_refresh_ca(dir.path(), "west.example");
    let endpoint_id = "spiffe://west.example/fedmesh/bundle-endpoint";
    let server_ident = identity(&svid(&ca, endpoint_id), &[&ca.bundle()]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(endpoint::serve(
        listener,
        ServerProfile::HttpsSpiffe {
            identity: server_ident,
        },
        ca.subscribe_bundle(),
        stop_server.clone().cancelled_owned(),
    ));
    let url = format!("https://127.0.0.1:{port}/");
    let bootstrap = (*ca.bundle()).clone();

    // Without a bootstrap bundle the client cannot authenticate the endpoint: a clear error.
    let client = BundleEndpointClient::new(
        &url,
        td("west.example"),
        ClientProfile::HttpsSpiffe {
            endpoint_id: id(endpoint_id),
        },
    )
    .unwrap();
    let err = client.fetch(None).await.unwrap_err().to_string();
    assert!(err.contains("bootstrap bundle"), "{err}");
    assert_eq!(client.fetch(Some(&bootstrap)).await.unwrap(), bootstrap);

    // An endpoint presenting another ID is refused.
    let wrong = BundleEndpointClient::new(
        &url,
        td("west.example"),
        ClientProfile::HttpsSpiffe {
            endpoint_id: id("spiffe://west.example/other"),
        },
    )
    .unwrap();
    let err = wrong.fetch(Some(&bootstrap)).await.unwrap_err().to_string();
    assert!(err.contains("not authorized"), "{err}");

    // Refresh, then the endpoint dies: the last good bundle stays.
    let stop_client = CancellationToken::new();
    let (mut rx, mut attempts, _task) = client
        .clone()
        .with_timeout(Duration::from_secs(2))
        .spawn_refresher_reporting(
            Some(bootstrap.clone()),
            stop_client.clone().cancelled_owned(),
        );
    ca.prepare_next(None).unwrap();
    let newer = tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|b| {
            b.as_ref()
                .is_some_and(|b| b.sequence() > bootstrap.sequence())
        }),
    )
    .await
    .expect("refreshed")
    .unwrap()
    .clone()
    .unwrap();
    stop_server.cancel();
    server.await.unwrap().unwrap();
    // The next refresh fails (the endpoint is gone), and the bundle it had stays.
    let failed = tokio::time::timeout(Duration::from_secs(30), attempts.wait_for(|a| a.is_err()))
        .await
        .expect("a refresh was attempted after the endpoint died")
        .unwrap()
        .clone();
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(
        rx.borrow().as_deref(),
        Some(&*newer),
        "last good bundle kept"
    );
    stop_client.cancel();
}

#[tokio::test]
async fn a_body_that_is_not_a_bundle_or_a_wrong_server_name_is_an_error() {
    let (roots, chain, key) = web_pki();
    let roots = Arc::new(roots);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = rustls::ServerConfig::builder_with_provider(fedmesh_trust::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut buf = vec![0u8; 4096];
            let _ = tls.read(&mut buf).await;
            let body = "<html>not a bundle</html>";
            let _ = tls
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = tls.shutdown().await;
        }
    });
    let c = BundleEndpointClient::new(
        &format!("https://localhost:{port}/"),
        td("west.example"),
        ClientProfile::HttpsWeb {
            roots: roots.clone(),
        },
    )
    .unwrap();
    let err = c.fetch(None).await.unwrap_err().to_string();
    assert!(
        err.contains("not valid JSON") && err.contains("west.example"),
        "{err}"
    );

    // The certificate is for localhost, not 127.0.0.1: the Web PKI check refuses it.
    let c = BundleEndpointClient::new(
        &format!("https://127.0.0.1:{port}/"),
        td("west.example"),
        ClientProfile::HttpsWeb {
            roots: roots.clone(),
        },
    )
    .unwrap();
    let err = c.fetch(None).await.unwrap_err().to_string();
    assert!(err.contains("TLS"), "{err}");

    // Plain http is refused up front.
    let err = BundleEndpointClient::new(
        "http://localhost/",
        td("w"),
        ClientProfile::HttpsWeb { roots },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("https only"), "{err}");
}
