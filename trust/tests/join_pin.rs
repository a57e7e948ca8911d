//! Joining pins the server by its CA (from the join token) *and* its SPIFFE ID: every SVID of a
//! trust domain is signed by the same CA, so a workload holding its own SVID must not be able to
//! answer as the control plane and collect the agent's join token.

mod common;

use common::*;
use fedmesh_trust::svid::X509Svid;
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use fedmesh_trust::workload::remote::{
    CONTROL_PLANE_PATH, ControlPlaneSigner, JoinCredential, RemoteError,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A TLS server presenting `svid` (its CA appended, as the real control plane does). Resolves to
/// the number of application bytes a client sent it.
async fn server_presenting(
    svid: X509Svid,
    ca: &fedmesh_trust::ca::TrustDomainCa,
) -> (String, tokio::task::JoinHandle<usize>) {
    let mut svid = svid;
    svid.chain.push(ca.active_certificate().unwrap());
    let ident = MeshIdentity::new();
    ident.set_svid(&svid).unwrap();
    ident.set_bundles(bundles(&[&ca.bundle()]));
    let tls =
        ident.server_config_optional_client_auth(Authorizer::AnyTrusted, vec![b"h2".to_vec()]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let Ok(mut s) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
            return 0;
        };
        let mut got = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got)).await;
        got.len()
    });
    (addr, task)
}

fn token_for(ca: &fedmesh_trust::ca::TrustDomainCa) -> String {
    let pin = fedmesh_trust::grpc::ca_pin(&ca.active_certificate().unwrap());
    format!("fmj1.0123456789abcdef.{}.{pin}", "s".repeat(32))
}

#[tokio::test]
async fn a_workload_svid_cannot_pose_as_the_control_plane_to_a_joining_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "east.example");
    let token = token_for(&ca);

    // The impostor: a workload of the same trust domain, with its own valid SVID.
    let (addr, impostor) =
        server_presenting(svid(&ca, "spiffe://east.example/ns/default/sa/evil"), &ca).await;
    let err = ControlPlaneSigner::start(
        &addr,
        &dir.path().join("agent"),
        "node-1",
        Some(&JoinCredential::Token(token.clone())),
        CancellationToken::new(),
    )
    .await
    .err()
    .expect("the join fails");
    assert!(matches!(err, RemoteError::Join { .. }), "{err}");
    assert!(
        err.to_string().contains(
            "the server is spiffe://east.example/ns/default/sa/evil, not spiffe://east.example/fedmesh/control-plane"
        ),
        "{err}"
    );
    assert_eq!(
        impostor.await.unwrap(),
        0,
        "the token never reached the impostor"
    );
    assert!(
        !dir.path().join("agent").join("agent.pem").exists(),
        "nothing from the impostor is kept"
    );

    // The real control plane's ID passes the same check.
    let (addr, real) = server_presenting(
        svid(&ca, &format!("spiffe://east.example{CONTROL_PLANE_PATH}")),
        &ca,
    )
    .await;
    let cfg = fedmesh_trust::grpc::pinned_ca_client_config(
        token.rsplit('.').next().unwrap(),
        CONTROL_PLANE_PATH,
        vec![b"h2".to_vec()],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls_pki_types::ServerName::try_from("control-plane.fedmesh").unwrap(),
            tcp,
        )
        .await
        .expect("the control plane's own SVID is accepted");
    tokio::io::AsyncWriteExt::write_all(&mut tls, b"hello")
        .await
        .unwrap();
    drop(tls);
    assert_eq!(real.await.unwrap(), 5);
}
