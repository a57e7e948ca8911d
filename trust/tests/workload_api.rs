//! The SPIFFE Workload API, driven by the Rust `spiffe` crate (the same client real workloads use)
//! and by a raw gRPC client for the refusals the spec requires.

mod common;

use std::time::Duration;

use common::*;
use fedmesh_trust::workload_pb::*;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::Code;

const WEB: &str = "spiffe://east.example/ns/default/sa/web";

#[tokio::test]
async fn spiffe_crate_x509_source_gets_the_registered_svid_and_both_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let east = new_ca(dir.path(), "east.example");
    let west = new_ca(dir.path(), "west.example");
    let agent = TestAgent::start(dir.path(), east.clone(), &TestAgent::entry_for_me(WEB)).await;
    // What this test is about is what the Workload API hands out of what the agent holds; how
    // the agent gets a federated bundle is tested where it happens: from the hub through the
    // control plane (tests/federation_cli.rs), a bundle endpoint (rotation.rs) and
    // `--federated-bundle` (tests/identity.rs).
    agent.signer.set_federated((*west.bundle()).clone());

    let source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    let svid = source.svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        WEB,
        "the registration entry's ID"
    );

    // The chain validates against the bundle the Workload API handed out.
    let bundles = source.bundle_set().unwrap();
    let own = bundles
        .get(&spiffe::TrustDomain::new("east.example").unwrap())
        .expect("own bundle");
    let anchors: Vec<_> = own
        .authorities()
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(c.as_bytes()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let chain: Vec<CertificateDer> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    webpki::EndEntityCert::try_from(&chain[0])
        .unwrap()
        .verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .unwrap();
    assert_eq!(own.authorities().len(), 1);
    assert_eq!(
        own.authorities()[0].as_bytes(),
        east.bundle().x509_authorities()[0].as_ref()
    );

    // The federated bundle is delivered side by side, never merged into ours.
    let theirs = bundles
        .get(&spiffe::TrustDomain::new("west.example").unwrap())
        .expect("federated bundle");
    assert_eq!(
        theirs.authorities()[0].as_bytes(),
        west.bundle().x509_authorities()[0].as_ref()
    );
    source.shutdown().await;
}

#[tokio::test]
async fn fetch_x509_svid_streams_a_new_svid_on_every_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let east = short_lived_ca(dir.path(), "east.example", Duration::from_secs(2));
    let agent = TestAgent::start(dir.path(), east, &TestAgent::entry_for_me(WEB)).await;
    let mut client = agent.raw_client().await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut leaves = Vec::new();
    while leaves.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("an update within 20s")
            .unwrap()
            .expect("stream open");
        assert_eq!(msg.svids.len(), 1);
        assert_eq!(msg.svids[0].spiffe_id, WEB);
        assert!(!msg.svids[0].bundle.is_empty());
        leaves.push(msg.svids[0].x509_svid.clone());
    }
    assert_ne!(leaves[0], leaves[1]);
    assert_ne!(leaves[1], leaves[2]);
}

#[tokio::test]
async fn jwt_svids_fetch_validate_and_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let east = new_ca(dir.path(), "east.example");
    let agent = TestAgent::start(dir.path(), east, &TestAgent::entry_for_me(WEB)).await;
    let mut client = agent.raw_client().await;

    let resp = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["billing".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.svids.len(), 1);
    assert_eq!(resp.svids[0].spiffe_id, WEB);
    let token = resp.svids[0].svid.clone();

    let ok = client
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "billing".into(),
            svid: token.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, WEB);
    let claims = ok.claims.unwrap();
    assert!(claims.fields.contains_key("exp") && claims.fields.contains_key("aud"));

    let wrong = client
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "payroll".into(),
            svid: token,
        }))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    assert!(wrong.message().contains("audience"), "{}", wrong.message());

    let no_aud = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(no_aud.code(), Code::InvalidArgument);

    let other_id = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: "spiffe://east.example/ns/default/sa/admin".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(other_id.code(), Code::PermissionDenied);

    let mut jwt_bundles = client
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let b = jwt_bundles.message().await.unwrap().unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&b.bundles["spiffe://east.example"]).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
    assert!(jwks["keys"][0]["kid"].is_string());
}

#[tokio::test]
async fn calls_without_the_security_header_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let east = new_ca(dir.path(), "east.example");
    let agent = TestAgent::start(dir.path(), east, &TestAgent::entry_for_me(WEB)).await;
    let mut client = agent.raw_client().await;
    let err = client
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    let mut bad = tonic::Request::new(X509BundlesRequest {});
    bad.metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    assert_eq!(
        client.fetch_x509_bundles(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn an_unregistered_caller_gets_permission_denied_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let east = new_ca(dir.path(), "east.example");
    let someone_else = format!(
        "entries:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:{}\"]\n",
        my_uid() + 4242
    );
    let agent = TestAgent::start(dir.path(), east, &someone_else).await;
    let mut c = agent.raw_client().await;
    let codes = [
        c.fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .map(|_| ())
            .unwrap_err(),
        c.fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await
            .map(|_| ())
            .unwrap_err(),
        c.fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .map(|_| ())
        .unwrap_err(),
        c.fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .map(|_| ())
            .unwrap_err(),
        c.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x.y.z".into(),
        }))
        .await
        .map(|_| ())
        .unwrap_err(),
    ];
    for s in codes {
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert_eq!(s.message(), "no identity issued");
    }

    // The same caller becomes entitled when the entries change, without restarting the agent.
    agent.cache.set_entries(
        fedmesh_trust::workload::entries::parse_entries(
            &TestAgent::entry_for_me(WEB),
            std::path::Path::new("t.yaml"),
            &td("east.example"),
        )
        .unwrap(),
    );
    let mut stream = c
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.svids[0].spiffe_id, WEB);
}

#[tokio::test]
async fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let east = new_ca(dir.path(), "east.example");
    let agent = TestAgent::start(dir.path(), east, &TestAgent::entry_for_me(WEB)).await;
    let err = fedmesh_trust::workload::bind_socket(&agent.socket).unwrap_err();
    assert!(err.to_string().contains("already serving"), "{err}");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    fedmesh_trust::workload::bind_socket(&stale).unwrap();
}

/// A user who pre-creates the socket's directory (or can rename what is in it) could swap the
/// socket for a fake Workload API that hands out its own bundle. The agent refuses such a
/// directory, says why, and creates a missing one that only it can change.
#[tokio::test]
async fn the_socket_directory_must_be_one_no_other_user_can_change() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bind = |d: &std::path::Path| {
        fedmesh_trust::workload::bind_socket(&d.join("agent.sock"))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };

    let open = dir.path().join("world-writable");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = bind(&open).unwrap_err();
    assert!(err.contains("writable by other users (mode 777)"), "{err}");

    let good = dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let err = bind(&link).unwrap_err();
    assert!(err.contains("is a symbolic link"), "{err}");

    if my_uid() == 0 {
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = bind(&theirs).unwrap_err();
        assert!(err.contains("belongs to uid 65534"), "{err}");
    }

    // A missing directory is created, 0755, and the socket in it is 0666.
    let fresh = dir.path().join("run").join("fedmesh");
    bind(&fresh).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&fresh), 0o755);
    assert_eq!(mode(&fresh.join("agent.sock")), 0o666);
}
