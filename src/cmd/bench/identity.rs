//! Identity benchmark: how fast the CA signs SVIDs, and what SPIFFE verification costs per mTLS
//! handshake compared with plain rustls WebPKI verification of equivalent P-256 certificates.
//! Handshakes run in memory (no sockets) so the numbers are CPU cost, not loopback noise.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fedmesh_trust::bundle::BundleSet;
use fedmesh_trust::ca::{CaOptions, TrustDomainCa};
use fedmesh_trust::svid::{X509Svid, new_key_and_csr};
use fedmesh_trust::tls::{Authorizer, MeshIdentity, crypto_provider};
use fedmesh_trust::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::{median, rate};

pub fn run(duration: Duration, rounds: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let td = TrustDomain::new("bench.example")?;
    let ca = TrustDomainCa::init(&dir.path().join("ca"), CaOptions::new(td.clone()))?;
    let id = SpiffeId::new("spiffe://bench.example/ns/default/sa/bench")?;
    let (_, csr) = new_key_and_csr(&id)?;

    // Baseline for signing: rcgen signing the same CSR with no SPIFFE checks.
    let raw_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut raw_params = CertificateParams::default();
    raw_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let raw_issuer = Issuer::new(raw_params, raw_key);

    let (ours_cfg, plain_cfg) = (fedmesh_configs(&ca, &td)?, plain_configs()?);

    let mut sign = Vec::new();
    let mut sign_base = Vec::new();
    let mut hs = Vec::new();
    let mut hs_base = Vec::new();
    for _ in 0..rounds {
        sign.push(rate(duration, || {
            ca.sign_csr(&csr, Some(&id), None)?;
            Ok(())
        })?);
        sign_base.push(rate(duration, || {
            let req = CertificateSigningRequestParams::from_der(&csr.as_slice().into())?;
            req.signed_by(&raw_issuer)?;
            Ok(())
        })?);
        hs.push(rate(duration, || handshake(&ours_cfg))?);
        hs_base.push(rate(duration, || handshake(&plain_cfg))?);
    }
    let (s, sb, h, hb) = (median(sign), median(sign_base), median(hs), median(hs_base));
    println!("fedmesh bench identity — {rounds} round(s) of {duration:?} each, median, one core");
    println!(
        "{:<44} {:>12} {:>12} {:>7}",
        "", "fedmesh/s", "baseline/s", "ratio"
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}",
        "X509-SVID signing (CSR checks + sign)",
        s,
        sb,
        s / sb
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "  baseline: rcgen signing the CSR, no checks", "", ""
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>7.2}",
        "mTLS handshake, TLS 1.3, P-256, both sides",
        h,
        hb,
        h / hb
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "  baseline: plain rustls WebPKI verifiers", "", ""
    );
    Ok(())
}

struct Pair {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn fedmesh_configs(ca: &TrustDomainCa, td: &TrustDomain) -> anyhow::Result<Pair> {
    let mut bundles = BundleSet::new();
    bundles.update((*ca.bundle()).clone());
    let make = |name: &str| -> anyhow::Result<MeshIdentity> {
        let id = td.workload_id("default", name)?;
        let (key, csr) = new_key_and_csr(&id)?;
        let issued = ca.sign_csr(&csr, Some(&id), None)?;
        let ident = MeshIdentity::new();
        ident.set_svid(&X509Svid {
            id,
            chain: issued.chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before: issued.not_before,
            not_after: issued.not_after,
        })?;
        ident.set_bundles(bundles.clone());
        Ok(ident)
    };
    let (c, s) = (make("client")?, make("server")?);
    Ok(Pair {
        client: c.client_config(Authorizer::trust_domain(td.clone()), vec![]),
        server: s.server_config(Authorizer::trust_domain(td.clone()), vec![]),
    })
}

fn plain_configs() -> anyhow::Result<Pair> {
    let provider = crypto_provider();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| -> anyhow::Result<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    )> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(vec![name.to_string()])?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    };
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let roots = Arc::new(roots);
    let (s_chain, s_key) = leaf("server.bench")?;
    let (c_chain, c_key) = leaf("client.bench")?;
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(s_chain, s_key)?;
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(c_chain, c_key)?;
    client.resumption = rustls::client::Resumption::disabled();
    Ok(Pair {
        client: Arc::new(client),
        server: Arc::new(server),
    })
}

/// One complete handshake between two in-memory connections.
fn handshake(p: &Pair) -> anyhow::Result<()> {
    let mut client =
        ClientConnection::new(p.client.clone(), ServerName::try_from("server.bench")?)?;
    let mut server = ServerConnection::new(p.server.clone())?;
    let mut buf = Vec::with_capacity(8192);
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf)?;
        }
        server.read_tls(&mut buf.as_slice())?;
        server.process_new_packets().context("server side")?;
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf)?;
        }
        client.read_tls(&mut buf.as_slice())?;
        client.process_new_packets().context("client side")?;
    }
    anyhow::bail!("handshake did not complete")
}
