//! mTLS between workloads of two trust domains, over real loopback sockets: it works only when each
//! side holds the other's bundle, and each kind of refusal carries its own clear error.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use fedmesh_trust::ca::TrustDomainCa;
use fedmesh_trust::svid::{X509Svid, new_key_and_csr};
use fedmesh_trust::tls::{Authorizer, MeshIdentity, PeerVerificationError, peer_spiffe_id};
use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

struct Outcome {
    client: Result<(), std::io::Error>,
    server: Result<Option<fedmesh_trust::SpiffeId>, std::io::Error>,
}

/// One connection: the client sends "ping", the server answers "pong" and reports who called.
async fn connect(
    client: &MeshIdentity,
    client_auth: Authorizer,
    server: &MeshIdentity,
    server_auth: Authorizer,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server_config(server_auth, vec![]));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = peer_spiffe_id(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(peer)
    });
    let connector = TlsConnector::from(client.client_config(client_auth, vec![]));
    let client_result = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector
            .connect(ServerName::try_from("west.svc").unwrap(), tcp)
            .await?;
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("server finished")
        .unwrap();
    Outcome {
        client: client_result,
        server,
    }
}

fn verification_error(e: &std::io::Error) -> PeerVerificationError {
    let rustls_err = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"));
    PeerVerificationError::from_rustls(rustls_err)
        .unwrap_or_else(|| panic!("not a SPIFFE verification error: {rustls_err:?}"))
        .clone()
}

struct Domains {
    _dir: tempfile::TempDir,
    east: Arc<TrustDomainCa>,
    west: Arc<TrustDomainCa>,
}

fn domains() -> Domains {
    let dir = tempfile::tempdir().unwrap();
    let east = new_ca(dir.path(), "east.example");
    let west = new_ca(dir.path(), "west.example");
    Domains {
        _dir: dir,
        east,
        west,
    }
}

const CLIENT: &str = "spiffe://east.example/ns/default/sa/frontend";
const SERVER: &str = "spiffe://west.example/ns/default/sa/backend";

#[tokio::test]
async fn works_when_each_side_holds_the_others_bundle_and_the_server_sees_the_callers_id() {
    let d = domains();
    let (eb, wb) = (d.east.bundle(), d.west.bundle());
    let client = identity(&svid(&d.east, CLIENT), &[&eb, &wb]);
    let server = identity(&svid(&d.west, SERVER), &[&wb, &eb]);
    let out = connect(
        &client,
        Authorizer::id(id(SERVER)),
        &server,
        Authorizer::trust_domain(td("east.example")),
    )
    .await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), Some(id(CLIENT)));
}

#[tokio::test]
async fn server_without_the_clients_bundle_refuses_unknown_trust_domain() {
    let d = domains();
    let (eb, wb) = (d.east.bundle(), d.west.bundle());
    let client = identity(&svid(&d.east, CLIENT), &[&eb, &wb]);
    let server = identity(&svid(&d.west, SERVER), &[&wb]);
    let out = connect(
        &client,
        Authorizer::AnyTrusted,
        &server,
        Authorizer::AnyTrusted,
    )
    .await;
    assert!(out.client.is_err(), "the client sees the handshake fail");
    let err = verification_error(&out.server.unwrap_err());
    assert!(
        matches!(&err, PeerVerificationError::UnknownTrustDomain { trust_domain, .. } if trust_domain.as_str() == "east.example"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("no trust bundle for trust domain east.example")
    );
}

#[tokio::test]
async fn client_without_the_servers_bundle_refuses_unknown_trust_domain() {
    let d = domains();
    let (eb, wb) = (d.east.bundle(), d.west.bundle());
    let client = identity(&svid(&d.east, CLIENT), &[&eb]);
    let server = identity(&svid(&d.west, SERVER), &[&wb, &eb]);
    let out = connect(
        &client,
        Authorizer::AnyTrusted,
        &server,
        Authorizer::AnyTrusted,
    )
    .await;
    let err = verification_error(&out.client.unwrap_err());
    assert!(
        matches!(&err, PeerVerificationError::UnknownTrustDomain { trust_domain, .. } if trust_domain.as_str() == "west.example"),
        "{err}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn expired_svid_is_refused() {
    let d = domains();
    let (eb, wb) = (d.east.bundle(), d.west.bundle());
    let who = id(CLIENT);
    let (key, csr) = new_key_and_csr(&who).unwrap();
    let now = SystemTime::now();
    let issued = d
        .east
        .sign_with_validity(
            &csr,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let expired = X509Svid {
        id: who,
        chain: issued.chain,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        not_before: issued.not_before,
        not_after: issued.not_after,
    };
    let client = identity(&expired, &[&eb, &wb]);
    let server = identity(&svid(&d.west, SERVER), &[&wb, &eb]);
    let out = connect(
        &client,
        Authorizer::AnyTrusted,
        &server,
        Authorizer::AnyTrusted,
    )
    .await;
    let err = verification_error(&out.server.unwrap_err());
    assert!(
        matches!(err, PeerVerificationError::Expired { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("expired at"), "{err}");
    assert!(out.client.is_err());
}

#[tokio::test]
async fn spiffe_id_not_authorized_is_refused_with_the_policy() {
    let d = domains();
    let (eb, wb) = (d.east.bundle(), d.west.bundle());
    let client = identity(&svid(&d.east, CLIENT), &[&eb, &wb]);
    let server = identity(&svid(&d.west, SERVER), &[&wb, &eb]);
    let only = Authorizer::id(id("spiffe://east.example/ns/default/sa/admin"));
    let out = connect(&client, Authorizer::AnyTrusted, &server, only).await;
    let err = verification_error(&out.server.unwrap_err());
    assert!(
        matches!(err, PeerVerificationError::NotAuthorized { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(CLIENT) && msg.contains("sa/admin"), "{msg}");

    // And the client side: the server is not who the client expects.
    let out = connect(
        &client,
        Authorizer::id(id("spiffe://west.example/ns/default/sa/other")),
        &server,
        Authorizer::AnyTrusted,
    )
    .await;
    let err = verification_error(&out.client.unwrap_err());
    assert!(
        matches!(err, PeerVerificationError::NotAuthorized { .. }),
        "{err}"
    );
}

/// The signing key of a CA's (only) authority, as an attacker who took the CA's disk has it.
fn authority_key(ca: &TrustDomainCa) -> KeyPair {
    let key_path = std::fs::read_dir(ca.dir().join("authorities"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.ends_with(".key") && !n.ends_with(".jwt.key")
        })
        .unwrap();
    KeyPair::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap()
}

/// A leaf for `spiffe_id` signed by `issuer` (a CA key an attacker holds), with `above` appended
/// to its chain.
fn forge_leaf(
    issuer: &Issuer<'_, KeyPair>,
    spiffe_id: fedmesh_trust::SpiffeId,
    above: Vec<CertificateDer<'static>>,
) -> X509Svid {
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        spiffe_id.to_string().as_str().try_into().unwrap(),
    )];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
    params.not_after = (SystemTime::now() + Duration::from_secs(3600)).into();
    let mut chain = vec![params.signed_by(&leaf_key, issuer).unwrap().der().clone()];
    chain.extend(above);
    X509Svid {
        id: spiffe_id,
        chain,
        key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        not_before: SystemTime::now(),
        not_after: SystemTime::now() + Duration::from_secs(3600),
    }
}

#[tokio::test]
async fn chain_signed_by_another_trust_domains_ca_is_refused() {
    let d = domains();
    let (eb, wb) = (d.east.bundle(), d.west.bundle());
    // A compromised east CA mints an ID of west: signed with east's real authority key.
    let east_issuer =
        Issuer::from_ca_cert_der(&eb.x509_authorities()[0], authority_key(&d.east)).unwrap();
    let forged = forge_leaf(
        &east_issuer,
        id("spiffe://west.example/ns/default/sa/backend"),
        vec![],
    );
    // The victim trusts both domains; east's CA is trusted — but only for east IDs.
    let attacker = identity(&forged, &[&eb, &wb]);
    let victim = identity(&svid(&d.east, CLIENT), &[&eb, &wb]);
    let out = connect(
        &victim,
        Authorizer::AnyTrusted,
        &attacker,
        Authorizer::AnyTrusted,
    )
    .await;
    let err = verification_error(&out.client.unwrap_err());
    assert!(
        matches!(&err, PeerVerificationError::UntrustedChain { trust_domain, .. } if trust_domain.as_str() == "west.example"),
        "{err}"
    );
    assert!(
        err.to_string().contains("not signed by any authority"),
        "{err}"
    );
}

/// One connection over configs built beforehand: the leaf certificate each side was shown.
async fn leaves_seen(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> (Vec<u8>, Vec<u8>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.unwrap();
        leaf
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(client)
        .connect(ServerName::try_from("west.svc").unwrap(), tcp)
        .await
        .unwrap();
    let server_leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    (
        tokio::time::timeout(Duration::from_secs(10), server_task)
            .await
            .unwrap()
            .unwrap(),
        server_leaf,
    )
}

#[tokio::test]
async fn rotated_svid_is_used_by_new_connections_without_rebuilding_configs() {
    let d = domains();
    let (eb, wb) = (d.east.bundle(), d.west.bundle());
    let client = identity(&svid(&d.east, CLIENT), &[&eb, &wb]);
    let server = identity(&svid(&d.west, SERVER), &[&wb, &eb]);
    // The configs are built once, before either rotation.
    let client_cfg = client.client_config(Authorizer::AnyTrusted, vec![]);
    let server_cfg = server.server_config(Authorizer::AnyTrusted, vec![]);
    let (client_before, server_before) = leaves_seen(client_cfg.clone(), server_cfg.clone()).await;
    client.set_svid(&svid(&d.east, CLIENT)).unwrap();
    server.set_svid(&svid(&d.west, SERVER)).unwrap();
    let (client_after, server_after) = leaves_seen(client_cfg, server_cfg).await;
    // Each side now presents its new SVID through the same config.
    assert_ne!(
        client_after, client_before,
        "the client still presents its old SVID"
    );
    assert_ne!(
        server_after, server_before,
        "the server still presents its old SVID"
    );
    assert_eq!(
        client_after,
        client.svid().unwrap().certified_key.cert[0].to_vec()
    );
    assert_eq!(
        server_after,
        server.svid().unwrap().certified_key.cert[0].to_vec()
    );
}

/// Upstream-CA mode: two trust domains' CAs are intermediates under one corporate root, so both
/// bundles hold that root. East's intermediate key still cannot mint an ID of the hub's trust
/// domain: the verifier binds the issuing authority to the leaf's own trust domain.
#[tokio::test]
async fn a_shared_upstream_root_does_not_let_one_trust_domain_mint_anothers_ids() {
    use fedmesh_trust::ca::{CaOptions, UpstreamAuthority};
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Corporate Root");
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = root_params.self_signed(&root_key).unwrap();
    let under_root = |name: &str| {
        let mut opts = CaOptions::new(td(name));
        opts.upstream = Some(UpstreamAuthority {
            cert_pem: root.pem(),
            key_pem: root_key.serialize_pem(),
            bundle_pem: None,
        });
        Arc::new(TrustDomainCa::init(&dir.path().join(name), opts).unwrap())
    };
    let (east, hub) = (under_root("east.example"), under_root("hub.fedmesh"));
    let (eb, hb) = (east.bundle(), hub.bundle());
    assert_eq!(
        eb.x509_authorities(),
        hb.x509_authorities(),
        "one shared root"
    );

    // East's intermediate (its key is on east's disk) signs the hub's admin ID.
    let east_ca_cert = east.active_certificate().unwrap();
    let east_issuer = Issuer::from_ca_cert_der(&east_ca_cert, authority_key(&east)).unwrap();
    let forged = forge_leaf(
        &east_issuer,
        id("spiffe://hub.fedmesh/admin"),
        vec![east_ca_cert.clone()],
    );
    let attacker = identity(&forged, &[&eb, &hb]);
    let hub_admin_api = identity(&svid(&hub, "spiffe://hub.fedmesh/hub"), &[&eb, &hb]);
    let out = connect(
        &attacker,
        Authorizer::AnyTrusted,
        &hub_admin_api,
        Authorizer::AnyTrusted,
    )
    .await;
    let err = verification_error(&out.server.unwrap_err());
    assert!(
        matches!(&err, PeerVerificationError::UntrustedChain { trust_domain, .. } if trust_domain.as_str() == "hub.fedmesh"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("issued under spiffe://east.example, an authority of another trust domain"),
        "{err}"
    );

    // The same root still carries each trust domain's own IDs.
    let client = identity(&svid(&east, CLIENT), &[&eb, &hb]);
    let out = connect(
        &client,
        Authorizer::AnyTrusted,
        &hub_admin_api,
        Authorizer::AnyTrusted,
    )
    .await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), Some(id(CLIENT)));
}
