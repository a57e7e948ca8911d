//! Attacks replayed against the release binary's processes: each test performs an attack found by
//! review (see SECURITY.md) and checks that it is refused or bounded — and that legitimate use
//! still works afterwards.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fedmesh_test_support::attack::{accept_any_server, proc_kib};
use http_body_util::BodyExt;
use support::federation::*;
use support::*;

/// One connection without a client certificate opening `streams` gRPC calls to `path` at once,
/// each sending a message that claims 4 MiB and delivering up to `body` bytes of it. Returns the
/// outcomes: a `grpc-status` code, or how the stream failed.
async fn grpc_flood(
    addr: &str,
    path: &str,
    streams: usize,
    body: usize,
) -> BTreeMap<String, usize> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(accept_any_server(vec![b"h2".to_vec()]))
        .connect(
            rustls_pki_types::ServerName::try_from("attacker").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_reset_streams(usize::MAX)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut sender = sender.clone();
        let uri = format!("https://{addr}{path}");
        calls.spawn(async move {
            // The gRPC prefix announces 4 MiB; the rest follows in 64 KiB chunks.
            let mut first = vec![0u8, 0x00, 0x40, 0x00, 0x00];
            first.resize(64 * 1024, 0);
            let chunks = std::iter::once(Bytes::from(first))
                .chain(std::iter::repeat_n(
                    Bytes::from(vec![0u8; 64 * 1024]),
                    body / (64 * 1024),
                ))
                .map(|b| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)));
            let req = http::Request::post(uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(http_body_util::StreamBody::new(futures::stream::iter(
                    chunks,
                )))
                .unwrap();
            let call = async {
                let resp = sender.send_request(req).await.map_err(|e| format!("{e}"))?;
                if let Some(s) = resp.headers().get("grpc-status") {
                    return Ok::<_, String>(s.to_str().unwrap_or("?").to_string());
                }
                let collected = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("{e}"))?;
                Ok(collected
                    .trailers()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|s| s.to_str().ok())
                    .unwrap_or("none")
                    .to_string())
            };
            match tokio::time::timeout(Duration::from_secs(30), call).await {
                Ok(Ok(code)) => format!("grpc-status {code}"),
                Ok(Err(e)) if e.contains("refused") => "refused stream".to_string(),
                Ok(Err(_)) => "stream error".to_string(),
                Err(_) => "still open after 30s".to_string(),
            }
        });
    }
    let mut outcomes = BTreeMap::new();
    while let Some(r) = calls.join_next().await {
        *outcomes.entry(r.unwrap()).or_insert(0) += 1;
    }
    outcomes
}

/// Joining needs no certificate, so the control plane's and the hub's gRPC ports take calls from
/// anyone. A flood of Join streams, each feeding a message toward tonic's 4 MiB default, once
/// made a control plane hold 1.15 GB. Now calls without a certificate are few at once, small
/// and short; the processes' memory stays flat and they keep serving.
#[test]
fn a_stream_flood_without_a_certificate_is_bounded_on_the_control_plane_and_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path());
    let cp_port = free_port();
    let cp = start_cp_on(dir.path(), &hub, "east", cp_port);
    let cp_addr = format!("127.0.0.1:{cp_port}");
    wait_until(
        "the control plane's gRPC port",
        Duration::from_secs(30),
        || std::net::TcpStream::connect(&cp_addr).is_ok(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, pid, addr, path, streams) in [
        (
            "control plane",
            cp.child.id(),
            cp_addr.as_str(),
            "/fedmesh.identity.v1.Identity/Join",
            300,
        ),
        (
            "hub",
            hub.proc.child.id(),
            hub.grpc.as_str(),
            "/fedmesh.federation.v1.Federation/Join",
            1000,
        ),
    ] {
        let before = proc_kib(pid, "VmRSS");
        let outcomes = rt.block_on(grpc_flood(addr, path, streams, 1024 * 1024));
        let peak = proc_kib(pid, "VmHWM");
        assert!(
            peak.saturating_sub(before) < 96 * 1024,
            "{name}: {before} KiB before, a peak of {peak} KiB during the flood ({outcomes:?})"
        );
        assert!(
            outcomes.get("grpc-status 8").copied().unwrap_or(0) > 0,
            "{name}: calls beyond the limit are answered RESOURCE_EXHAUSTED: {outcomes:?}"
        );
        assert_eq!(
            outcomes.get("still open after 30s"),
            None,
            "{name}: every call ends: {outcomes:?}"
        );
        // Other methods need a certificate, before any body is read.
        let other = rt.block_on(grpc_flood(
            addr,
            "/fedmesh.identity.v1.Identity/SignX509Svid",
            1,
            0,
        ));
        assert_eq!(
            other.get("grpc-status 16"),
            Some(&1),
            "{name}: UNAUTHENTICATED for a call that needs an SVID: {other:?}"
        );
    }
    // Both keep serving: the control plane is still connected to the hub.
    let mut args = vec!["status".to_string()];
    args.extend(admin_args(&hub));
    wait_until(
        "east connected after the flood",
        Duration::from_secs(30),
        || {
            let out = run(&args);
            String::from_utf8_lossy(&out.stdout).contains("east")
        },
    );
}
