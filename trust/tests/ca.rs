//! The trust domain CA: SVIDs that follow the X509-SVID spec, CSR refusals, rotation, upstream
//! intermediates, files on disk.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use common::*;
use fedmesh_trust::ca::{AuthorityState, CaError, CaOptions, TrustDomainCa, UpstreamAuthority};
use fedmesh_trust::svid::{csr_for, new_key_and_csr};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    ee.verify_for_usage(
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}

/// `not_after` is `ttl` after a signing that happened between `from` and `to` (whole seconds:
/// the certificate's time may be up to a second earlier).
fn expires_ttl_after(not_after: SystemTime, from: SystemTime, to: SystemTime, ttl: Duration) {
    assert!(
        not_after + Duration::from_secs(1) > from + ttl && not_after <= to + ttl,
        "not_after {not_after:?} is not {ttl:?} after signing ({from:?}..{to:?})"
    );
}

#[test]
fn svids_follow_the_x509_svid_spec() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "east.example");
    let signed_from = SystemTime::now();
    let s = svid(&ca, "spiffe://east.example/ns/default/sa/web");
    let signed_by = SystemTime::now();

    // The spiffe crate validates leaf constraints (CA=false, digitalSignature, no keyCertSign...).
    let chain_der: Vec<u8> = s.chain.iter().flat_map(|c| c.to_vec()).collect();
    let parsed = spiffe::X509Svid::parse_from_der(&chain_der, s.key.secret_pkcs8_der()).unwrap();
    assert_eq!(
        parsed.spiffe_id().to_string(),
        "spiffe://east.example/ns/default/sa/web"
    );

    let (_, cert) = parse_x509_certificate(&s.chain[0]).unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names.len(), 1, "exactly one SAN");
    assert!(matches!(sans.value.general_names[0], GeneralName::URI(_)));
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);

    // Default TTL is one hour from signing (certificates count whole seconds).
    expires_ttl_after(
        s.not_after,
        signed_from,
        signed_by,
        Duration::from_secs(3600),
    );
    verify_chain(&s.chain, ca.bundle().x509_authorities()).unwrap();

    // TTL is configurable per request and capped by the CA's maximum.
    let id = id("spiffe://east.example/a");
    let (_, csr) = new_key_and_csr(&id).unwrap();
    let from = SystemTime::now();
    let short = ca
        .sign_csr(&csr, None, Some(Duration::from_secs(120)))
        .unwrap();
    expires_ttl_after(
        short.not_after,
        from,
        SystemTime::now(),
        Duration::from_secs(120),
    );
    // Capped at the CA's maximum (24 h).
    let from = SystemTime::now();
    let long = ca
        .sign_csr(&csr, None, Some(Duration::from_secs(7 * 24 * 3600)))
        .unwrap();
    expires_ttl_after(
        long.not_after,
        from,
        SystemTime::now(),
        Duration::from_secs(24 * 3600),
    );
}

#[test]
fn bad_csrs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "east.example");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();

    let foreign = csr_for(&key, &["spiffe://west.example/ns/a/sa/b".into()]).unwrap();
    let err = ca.sign_csr(&foreign, None, None).unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    assert!(err.to_string().contains("west.example") && err.to_string().contains("east.example"));

    let two = csr_for(
        &key,
        &[
            "spiffe://east.example/a".into(),
            "spiffe://east.example/b".into(),
        ],
    )
    .unwrap();
    let err = ca.sign_csr(&two, None, None).unwrap_err();
    assert!(err.to_string().contains("2 URI SANs"), "{err}");

    let none = csr_for(&key, &[]).unwrap();
    assert!(
        ca.sign_csr(&none, None, None)
            .unwrap_err()
            .to_string()
            .contains("no URI SAN")
    );

    let bad_id = csr_for(&key, &["spiffe://east.example/a/../b".into()]).unwrap();
    assert!(
        ca.sign_csr(&bad_id, None, None)
            .unwrap_err()
            .to_string()
            .contains("not a SPIFFE ID")
    );

    let mut dns = CertificateParams::new(vec!["web.example.com".to_string()]).unwrap();
    dns.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://east.example/a".try_into().unwrap(),
    ));
    let dns = dns.serialize_request(&key).unwrap().der().to_vec();
    assert!(
        ca.sign_csr(&dns, None, None)
            .unwrap_err()
            .to_string()
            .contains("non-URI SAN")
    );

    let mut ca_req = CertificateParams::default();
    ca_req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_req.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://east.example/a".try_into().unwrap(),
    )];
    let ca_req = ca_req.serialize_request(&key).unwrap().der().to_vec();
    assert!(
        ca.sign_csr(&ca_req, None, None)
            .unwrap_err()
            .to_string()
            .contains("CA certificate")
    );

    assert!(
        ca.sign_csr(b"garbage", None, None)
            .unwrap_err()
            .to_string()
            .contains("PKCS#10")
    );

    let mut tampered = csr_for(&key, &["spiffe://east.example/a".into()]).unwrap();
    let n = tampered.len();
    tampered[n - 5] ^= 0x55;
    let err = ca.sign_csr(&tampered, None, None).unwrap_err().to_string();
    assert!(err.contains("CSR refused"), "{err}");

    let ok = csr_for(&key, &["spiffe://east.example/a".into()]).unwrap();
    let err = ca
        .sign_csr(&ok, Some(&id("spiffe://east.example/b")), None)
        .unwrap_err();
    assert!(matches!(err, CaError::WrongId { .. }), "{err}");
    assert!(ca.sign_csr(&ok, None, Some(Duration::ZERO)).is_err());
}

#[test]
fn keys_are_0600_and_the_ca_reopens_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "east.example");
    let ca_dir = ca.dir().to_path_buf();
    assert_eq!(
        std::fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut keys = 0;
    for f in std::fs::read_dir(ca_dir.join("authorities")).unwrap() {
        let f = f.unwrap();
        if f.file_name().to_string_lossy().ends_with(".key") {
            keys += 1;
            assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
    assert_eq!(keys, 2, "the X.509 key and the JWT key");
    let bundle = ca.bundle();
    drop(ca);
    let reopened = TrustDomainCa::open(&ca_dir).unwrap();
    assert_eq!(*reopened.bundle(), *bundle);
    let s = svid(&reopened, "spiffe://east.example/x");
    verify_chain(&s.chain, bundle.x509_authorities()).unwrap();

    // A key file made readable by others is refused with the fix.
    let key = std::fs::read_dir(ca_dir.join("authorities"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".jwt.key"))
        .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = TrustDomainCa::open(&ca_dir).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");

    let err = TrustDomainCa::open(&dir.path().join("nothing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fedmesh ca init"), "{err}");
    let err = TrustDomainCa::init(&ca_dir, CaOptions::new(td("east.example"))).unwrap_err();
    assert!(matches!(err, CaError::AlreadyInitialized { .. }));
}

#[test]
fn rotation_publishes_first_signs_later_and_keeps_the_old_authority_until_its_svids_expire() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "east.example");
    let old_root = ca.bundle().x509_authorities()[0].clone();
    let seq0 = ca.bundle().sequence();
    let before = svid(&ca, "spiffe://east.example/w");

    ca.prepare_next(None).unwrap();
    let b = ca.bundle();
    assert_eq!(b.x509_authorities().len(), 2, "next authority is published");
    assert_eq!(b.jwt_authorities().len(), 2);
    assert!(b.sequence() > seq0);
    let new_root = b
        .x509_authorities()
        .iter()
        .find(|c| **c != old_root)
        .unwrap()
        .clone();
    // Prepared, not signing: SVIDs still chain to the old root only.
    let during = svid(&ca, "spiffe://east.example/w");
    verify_chain(&during.chain, std::slice::from_ref(&old_root)).unwrap();
    assert!(verify_chain(&during.chain, std::slice::from_ref(&new_root)).is_err());
    ca.prepare_next(None).unwrap();
    assert_eq!(
        ca.bundle().x509_authorities().len(),
        2,
        "prepare is idempotent"
    );

    ca.activate_next().unwrap();
    let after = svid(&ca, "spiffe://east.example/w");
    verify_chain(&after.chain, std::slice::from_ref(&new_root)).unwrap();
    assert_eq!(
        ca.bundle().x509_authorities().len(),
        2,
        "old authority still trusted"
    );
    verify_chain(&before.chain, ca.bundle().x509_authorities()).unwrap();
    let states: Vec<_> = ca.authorities().iter().map(|a| a.state).collect();
    assert_eq!(
        states,
        vec![AuthorityState::Retired, AuthorityState::Active]
    );
    assert!(matches!(ca.activate_next(), Err(CaError::NothingPrepared)));

    // Not pruned while SVIDs it signed may still be valid...
    assert!(!ca.prune(SystemTime::now()).unwrap());
    assert!(!ca.prune(before.not_after).unwrap());
    // ...pruned once the longest of them is past (max TTL 24h + skew).
    let later = SystemTime::now() + ca.max_svid_ttl() + Duration::from_secs(120);
    let seq = ca.bundle().sequence();
    assert!(ca.prune(later).unwrap());
    assert_eq!(
        ca.bundle().x509_authorities(),
        std::slice::from_ref(&new_root)
    );
    assert!(ca.bundle().sequence() > seq);

    // Reopening keeps the rotated state.
    let reopened = TrustDomainCa::open(ca.dir()).unwrap();
    assert_eq!(
        reopened.bundle().x509_authorities(),
        std::slice::from_ref(&new_root)
    );
    let again = svid(&reopened, "spiffe://east.example/w");
    verify_chain(&again.chain, std::slice::from_ref(&new_root)).unwrap();
}

#[test]
fn rotation_schedule_prepares_at_half_life_and_activates_at_three_quarters() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = CaOptions::new(td("east.example"));
    opts.ca_ttl = Duration::from_secs(1000);
    opts.default_svid_ttl = Duration::from_secs(60);
    opts.max_svid_ttl = Duration::from_secs(60);
    let ca = TrustDomainCa::init(&dir.path().join("ca"), opts).unwrap();
    let now = SystemTime::now();
    ca.rotation_tick(now + Duration::from_secs(100)).unwrap();
    assert_eq!(ca.authorities().len(), 1);
    ca.rotation_tick(now + Duration::from_secs(520)).unwrap();
    let states: Vec<_> = ca.authorities().iter().map(|a| a.state).collect();
    assert_eq!(
        states,
        vec![AuthorityState::Active, AuthorityState::Prepared]
    );
    ca.rotation_tick(now + Duration::from_secs(760)).unwrap();
    let states: Vec<_> = ca.authorities().iter().map(|a| a.state).collect();
    assert_eq!(
        states,
        vec![AuthorityState::Retired, AuthorityState::Active]
    );
}

#[test]
fn intermediate_under_an_operator_root() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Operator Root");
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = root_params.self_signed(&root_key).unwrap();

    let mut opts = CaOptions::new(td("east.example"));
    opts.upstream = Some(UpstreamAuthority {
        cert_pem: root.pem(),
        key_pem: root_key.serialize_pem(),
        bundle_pem: None,
    });
    let ca = TrustDomainCa::init(&dir.path().join("ca"), opts.clone()).unwrap();
    assert_eq!(ca.bundle().x509_authorities(), &[root.der().clone()]);
    let s = svid(&ca, "spiffe://east.example/ns/a/sa/b");
    assert_eq!(s.chain.len(), 2, "leaf + our intermediate");
    verify_chain(&s.chain, &[root.der().clone()]).unwrap();
    let chain_der: Vec<u8> = s.chain.iter().flat_map(|c| c.to_vec()).collect();
    spiffe::X509Svid::parse_from_der(&chain_der, s.key.secret_pkcs8_der()).unwrap();

    // Reopened, it still signs with the intermediate in the chain.
    let reopened = TrustDomainCa::open(ca.dir()).unwrap();
    let s = svid(&reopened, "spiffe://east.example/ns/a/sa/b");
    assert_eq!(s.chain.len(), 2);
    verify_chain(&s.chain, &[root.der().clone()]).unwrap();

    // Rotation needs the upstream key, and works with it; the bundle (the root) does not change.
    assert!(matches!(
        reopened.prepare_next(None),
        Err(CaError::UpstreamKeyNeeded)
    ));
    reopened.prepare_next(opts.upstream.as_ref()).unwrap();
    reopened.activate_next().unwrap();
    let s = svid(&reopened, "spiffe://east.example/ns/a/sa/b");
    verify_chain(&s.chain, &[root.der().clone()]).unwrap();
    assert_eq!(reopened.bundle().x509_authorities(), &[root.der().clone()]);

    // A key that is not the root's is refused.
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut bad = CaOptions::new(td("east.example"));
    bad.upstream = Some(UpstreamAuthority {
        cert_pem: root.pem(),
        key_pem: other.serialize_pem(),
        bundle_pem: None,
    });
    let err = TrustDomainCa::init(&dir.path().join("bad"), bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not belong"), "{err}");
}

#[test]
fn jwt_svids_are_signed_by_the_active_authority_and_validate_against_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "east.example");
    let who = id("spiffe://east.example/ns/a/sa/b");
    let token = ca.sign_jwt(&who, &["db".into()], None).unwrap();
    let set = bundles(&[&ca.bundle()]);
    let v = fedmesh_trust::jwt::validate(&token, "db", &set, SystemTime::now()).unwrap();
    assert_eq!(v.spiffe_id, who);
    assert!(
        ca.sign_jwt(&id("spiffe://west.example/a"), &["db".into()], None)
            .is_err()
    );
    assert!(ca.sign_jwt(&who, &[], None).is_err());
    // The token names its key, and the bundle publishes that key.
    let kid_of = |token: &str| -> String {
        use base64::Engine;
        let header = token.split('.').next().unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        v["kid"].as_str().unwrap().to_string()
    };
    let kids = |ca: &TrustDomainCa| -> Vec<String> {
        ca.bundle()
            .jwt_authorities()
            .iter()
            .map(|a| a.kid.clone())
            .collect()
    };
    let old_kid = kid_of(&token);
    assert_eq!(kids(&ca), vec![old_kid.clone()]);
    ca.prepare_next(None).unwrap();
    ca.activate_next().unwrap();
    // New tokens are signed by the new authority's key; the bundle holds both keys.
    let fresh = ca.sign_jwt(&who, &["db".into()], None).unwrap();
    let new_kid = kid_of(&fresh);
    assert_ne!(new_kid, old_kid);
    let mut both = kids(&ca);
    both.sort();
    let mut want = vec![old_kid.clone(), new_kid.clone()];
    want.sort();
    assert_eq!(both, want);
    // Tokens from the retired key still validate while it is in the bundle, and so do new ones.
    let set = bundles(&[&ca.bundle()]);
    fedmesh_trust::jwt::validate(&token, "db", &set, SystemTime::now()).unwrap();
    fedmesh_trust::jwt::validate(&fresh, "db", &set, SystemTime::now()).unwrap();
    // Once the retired authority is pruned, its tokens no longer validate.
    assert!(
        ca.prune(SystemTime::now() + Duration::from_secs(400 * 24 * 3600))
            .unwrap()
    );
    assert_eq!(kids(&ca), vec![new_kid]);
    let set = bundles(&[&ca.bundle()]);
    let err = fedmesh_trust::jwt::validate(&token, "db", &set, SystemTime::now()).unwrap_err();
    assert!(err.to_string().contains(&old_kid), "{err}");
    fedmesh_trust::jwt::validate(&fresh, "db", &set, SystemTime::now()).unwrap();
}

/// JWT-SVIDs cannot be revoked and anyone who sees one can replay it until it expires: they live
/// five minutes unless asked otherwise, and never more than an hour, whatever X509-SVIDs may.
#[test]
fn jwt_svids_live_minutes_by_default_and_an_hour_at_most() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca(dir.path(), "east.example");
    let who = id("spiffe://east.example/ns/a/sa/b");
    let lifetime = |ttl: Option<Duration>| {
        let token = ca.sign_jwt(&who, &["db".into()], ttl).unwrap();
        let set = bundles(&[&ca.bundle()]);
        let v = fedmesh_trust::jwt::validate(&token, "db", &set, SystemTime::now()).unwrap();
        let exp = v.claims["exp"].as_u64().unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        exp.saturating_sub(now)
    };
    let default = lifetime(None);
    assert!((295..=300).contains(&default), "{default}s");
    let asked = lifetime(Some(Duration::from_secs(24 * 3600)));
    assert!((3595..=3600).contains(&asked), "{asked}s");
    assert_eq!(
        ca.default_svid_ttl(),
        Duration::from_secs(3600),
        "X509-SVIDs unchanged"
    );
}
