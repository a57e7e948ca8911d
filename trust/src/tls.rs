//! rustls configurations for SPIFFE mTLS.
//!
//! [`MeshIdentity`] holds the current SVID and the trust bundles, each swapped atomically when the
//! Workload API (ours or a SPIRE agent's) delivers a rotation; configs built from it read the newest
//! at every handshake, so rotation never drops an open connection and never needs a new config.
//!
//! A peer is verified against the bundle of the trust domain named in its own SPIFFE ID, and only
//! that one; then an [`Authorizer`] decides whether that ID may talk to us.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use fedmesh_api::{SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use tokio::sync::watch;

use crate::bundle::{BundleSet, SpiffeBundle};
use crate::svid::{SvidError, X509Svid, inspect, rfc3339};

/// The crypto provider fedmesh uses everywhere (ring: builds anywhere, no cmake).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a peer's certificate was refused. Each says what was wrong and what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerVerificationError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer certificate is not an X509-SVID: {0}")]
    NotAnSvid(#[from] SvidError),
    #[error("peer certificate for {id} is a CA certificate; SVIDs must be leaf certificates")]
    CaAsLeaf { id: SpiffeId },
    #[error(
        "no trust bundle for trust domain {trust_domain} (peer {id}); this side does not federate with {trust_domain} — check that both clusters are joined to the hub and their bundles exchanged"
    )]
    UnknownTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error(
        "peer SVID {id} expired at {not_after}; its agent has stopped renewing it (is the Workload API reachable?)"
    )]
    Expired { id: SpiffeId, not_after: String },
    #[error("peer SVID {id} is not valid until {not_before}; check the clocks")]
    NotYetValid { id: SpiffeId, not_before: String },
    #[error(
        "certificate chain of {id} does not verify against the bundle of {trust_domain}: {reason}. A chain signed by another trust domain's CA is refused by design"
    )]
    UntrustedChain {
        id: SpiffeId,
        trust_domain: TrustDomain,
        reason: String,
    },
    #[error("peer {id} is not authorized here: {policy}")]
    NotAuthorized { id: SpiffeId, policy: String },
}

impl PeerVerificationError {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }

    /// Finds our error inside a rustls handshake error (for logs, metrics and tests).
    pub fn from_rustls(err: &rustls::Error) -> Option<&PeerVerificationError> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
                e.downcast_ref::<PeerVerificationError>()
            }
            _ => None,
        }
    }
}

/// A readable message for a failed TLS handshake: our verification error when there is one
/// (rustls would print it as Debug), the I/O error otherwise.
pub fn handshake_error_message(e: &std::io::Error) -> String {
    let rustls_err = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_err {
        Some(r) => match PeerVerificationError::from_rustls(r) {
            Some(v) => v.to_string(),
            None => r.to_string(),
        },
        None => e.to_string(),
    }
}

/// Binds a verified chain to the leaf's own trust domain: the authority that signed the leaf
/// must be one of that trust domain's (an anchor of its bundle, or an intermediate whose SPIFFE
/// ID names it), and no intermediate on the path may name another trust domain.
///
/// Chain verification alone is not enough when trust domains share a root (upstream-CA mode:
/// every bundle holds the corporate root): east's intermediate, signed by that root, would
/// otherwise mint IDs of the hub or of west that verify against *their* bundles. URI name
/// constraints on the intermediates would say the same to other verifiers, but webpki (rustls)
/// refuses every chain under a URI-constrained CA, so the rule is enforced here.
/// `intermediates`: the path's intermediates, the leaf's issuer first.
fn check_issuing_authority<'a>(
    id: &SpiffeId,
    intermediates: impl Iterator<Item = CertificateDer<'a>>,
) -> Result<(), PeerVerificationError> {
    let td = id.trust_domain();
    for (i, ca) in intermediates.enumerate() {
        let named = inspect(&ca).ok().map(|c| c.spiffe_id);
        let reason = match &named {
            Some(ca_id) if ca_id.trust_domain() != td => format!(
                "it was issued under {ca_id}, an authority of another trust domain"
            ),
            None if i == 0 => {
                "the CA that signed it names no trust domain (no spiffe:// URI SAN), so it cannot be told apart from another trust domain's CA under the same root".to_string()
            }
            _ => continue,
        };
        return Err(PeerVerificationError::UntrustedChain {
            id: id.clone(),
            trust_domain: td.clone(),
            reason,
        });
    }
    Ok(())
}

/// Which verified SPIFFE IDs may complete a handshake.
#[derive(Clone)]
pub enum Authorizer {
    /// Any ID whose chain verifies against its trust domain's bundle.
    AnyTrusted,
    /// IDs of these trust domains.
    TrustDomains(BTreeSet<TrustDomain>),
    /// Exactly these IDs.
    Ids(BTreeSet<SpiffeId>),
    /// A predicate with a description for errors.
    Custom {
        description: String,
        allow: Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>,
    },
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Authorizer {
    pub fn id(id: SpiffeId) -> Self {
        Self::Ids(BTreeSet::from([id]))
    }

    pub fn trust_domain(td: TrustDomain) -> Self {
        Self::TrustDomains(BTreeSet::from([td]))
    }

    pub fn authorize(&self, id: &SpiffeId) -> Result<(), PeerVerificationError> {
        let ok = match self {
            Self::AnyTrusted => true,
            Self::TrustDomains(tds) => tds.contains(id.trust_domain()),
            Self::Ids(ids) => ids.contains(id),
            Self::Custom { allow, .. } => allow(id),
        };
        if ok {
            Ok(())
        } else {
            Err(PeerVerificationError::NotAuthorized {
                id: id.clone(),
                policy: self.describe(),
            })
        }
    }

    fn describe(&self) -> String {
        let join = |it: Vec<String>| it.join(", ");
        match self {
            Self::AnyTrusted => "any trusted SPIFFE ID is allowed".into(),
            Self::TrustDomains(tds) => format!(
                "only trust domains [{}] are allowed",
                join(tds.iter().map(|t| t.to_string()).collect())
            ),
            Self::Ids(ids) => format!(
                "only [{}] are allowed",
                join(ids.iter().map(|t| t.to_string()).collect())
            ),
            Self::Custom { description, .. } => description.clone(),
        }
    }
}

/// Trust anchors per trust domain, parsed once per bundle change (not per handshake).
#[derive(Default)]
pub struct TrustStore {
    anchors: HashMap<TrustDomain, Vec<TrustAnchor<'static>>>,
    bundles: BundleSet,
}

impl TrustStore {
    pub fn from_bundles(bundles: BundleSet) -> Self {
        let anchors = bundles
            .iter()
            .map(|b| (b.trust_domain().clone(), anchors_of(b.x509_authorities())))
            .collect();
        Self { anchors, bundles }
    }

    /// From raw authorities per trust domain, as the Workload API delivers them.
    pub fn from_authorities(
        by_domain: impl IntoIterator<Item = (TrustDomain, Vec<CertificateDer<'static>>)>,
    ) -> Self {
        let mut bundles = BundleSet::new();
        for (td, certs) in by_domain {
            bundles.update(SpiffeBundle::new(td).with_x509_authorities(certs));
        }
        Self::from_bundles(bundles)
    }

    pub fn bundles(&self) -> &BundleSet {
        &self.bundles
    }

    pub fn anchors(&self, td: &TrustDomain) -> Option<&[TrustAnchor<'static>]> {
        self.anchors.get(td).map(Vec::as_slice)
    }

    /// Whether peers of trust domain `td` can be verified (a bundle with authorities is held).
    pub fn trusts(&self, td: &str) -> bool {
        self.anchors
            .iter()
            .any(|(k, v)| k.as_str() == td && !v.is_empty())
    }
}

fn anchors_of(certs: &[CertificateDer<'static>]) -> Vec<TrustAnchor<'static>> {
    certs
        .iter()
        .filter_map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect()
}

/// The current SVID as rustls wants it.
pub struct SvidState {
    pub id: SpiffeId,
    pub certified_key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
}

/// A workload's identity as seen by TLS: its SVID and the bundles it trusts, both hot-swappable.
#[derive(Clone)]
pub struct MeshIdentity {
    svid: Arc<ArcSwapOption<SvidState>>,
    trust: Arc<ArcSwap<TrustStore>>,
    provider: Arc<CryptoProvider>,
    changes: Arc<watch::Sender<u64>>,
}

impl fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshIdentity")
            .field("id", &self.spiffe_id())
            .finish_non_exhaustive()
    }
}

impl Default for MeshIdentity {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("SVID chain is empty")]
    EmptyChain,
    #[error("SVID leaf: {0}")]
    Leaf(#[from] SvidError),
    #[error("SVID private key is unusable: {0}")]
    Key(String),
}

impl MeshIdentity {
    /// An identity with no SVID and no bundles yet (handshakes fail until both arrive).
    pub fn new() -> Self {
        Self {
            svid: Arc::new(ArcSwapOption::empty()),
            trust: Arc::new(ArcSwap::from_pointee(TrustStore::default())),
            provider: crypto_provider(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// Installs a (new) SVID; in-flight connections keep the one they handshook with.
    pub fn set_svid(&self, svid: &X509Svid) -> Result<(), IdentityError> {
        self.set_svid_parts(
            svid.chain.clone(),
            PrivateKeyDer::Pkcs8(svid.key.clone_key()),
        )
    }

    /// Installs an SVID given as a DER chain (leaf first) and a private key.
    pub fn set_svid_parts(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
        let info = inspect(leaf)?;
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        self.svid.store(Some(Arc::new(SvidState {
            id: info.spiffe_id,
            certified_key: Arc::new(CertifiedKey::new(chain, signing_key)),
            not_after: info.not_after,
        })));
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// An identity presenting this one's SVID (renewals included) that trusts its own bundles,
    /// set apart from this one's: e.g. to verify peers this identity's bundles do not cover.
    pub fn sharing_svid(&self) -> Self {
        Self {
            svid: self.svid.clone(),
            trust: Arc::new(ArcSwap::from_pointee(TrustStore::default())),
            provider: self.provider.clone(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }

    pub fn set_bundles(&self, bundles: BundleSet) {
        self.set_trust(TrustStore::from_bundles(bundles));
    }

    pub fn set_trust(&self, store: TrustStore) {
        self.trust.store(Arc::new(store));
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        self.svid.load().as_ref().map(|s| s.id.clone())
    }

    pub fn svid(&self) -> Option<Arc<SvidState>> {
        self.svid.load_full()
    }

    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.load_full()
    }

    /// Ticks on every SVID or bundle change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Resolves once both an SVID and at least one bundle are present.
    pub async fn ready(&self) {
        let mut rx = self.subscribe();
        loop {
            if self.svid.load().is_some() && !self.trust.load().bundles.is_empty() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Verifies a peer chain: ID → its own trust domain's bundle → chain and validity → authorizer.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        authorizer: &Authorizer,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, PeerVerificationError> {
        let info = inspect(end_entity)?;
        let id = info.spiffe_id;
        if info.is_ca {
            return Err(PeerVerificationError::CaAsLeaf { id });
        }
        let td = id.trust_domain().clone();
        let trust = self.trust.load();
        let anchors = trust
            .anchors(&td)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| PeerVerificationError::UnknownTrustDomain {
                id: id.clone(),
                trust_domain: td.clone(),
            })?;
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            PeerVerificationError::UntrustedChain {
                id: id.clone(),
                trust_domain: td.clone(),
                reason: format!("leaf is not parseable: {e}"),
            }
        })?;
        let path = cert
            .verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| match e {
                webpki::Error::CertExpired { .. } => PeerVerificationError::Expired {
                    id: id.clone(),
                    not_after: rfc3339(info.not_after),
                },
                webpki::Error::CertNotValidYet { .. } => PeerVerificationError::NotYetValid {
                    id: id.clone(),
                    not_before: rfc3339(info.not_before),
                },
                webpki::Error::UnknownIssuer => PeerVerificationError::UntrustedChain {
                    id: id.clone(),
                    trust_domain: td.clone(),
                    reason: "it is not signed by any authority in that bundle".into(),
                },
                other => PeerVerificationError::UntrustedChain {
                    id: id.clone(),
                    trust_domain: td.clone(),
                    reason: other.to_string(),
                },
            })?;
        check_issuing_authority(&id, path.intermediate_certificates().map(|c| c.der()))?;
        authorizer.authorize(&id)?;
        Ok(id)
    }

    /// A server config: presents our SVID, requires and verifies a client SVID.
    pub fn server_config(&self, authorizer: Authorizer, alpn: Vec<Vec<u8>>) -> Arc<ServerConfig> {
        self.server_config_with(authorizer, alpn, true)
    }

    /// A server config where a client SVID, when presented, is verified, but clients without one
    /// are let in too (for bootstrap calls such as joining); handlers must check the caller.
    pub fn server_config_optional_client_auth(
        &self,
        authorizer: Authorizer,
        alpn: Vec<Vec<u8>>,
    ) -> Arc<ServerConfig> {
        self.server_config_with(authorizer, alpn, false)
    }

    fn server_config_with(
        &self,
        authorizer: Authorizer,
        alpn: Vec<Vec<u8>>,
        client_auth_mandatory: bool,
    ) -> Arc<ServerConfig> {
        let verifier = Arc::new(SpiffeVerifier {
            identity: self.clone(),
            authorizer,
            algorithms: self.provider.signature_verification_algorithms,
            client_auth_mandatory,
        });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"))
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SvidResolver(self.clone())));
        cfg.alpn_protocols = alpn;
        // No resumption: every connection is verified against the current bundles and authorizer.
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Arc::new(cfg)
    }

    /// A client config: presents our SVID, verifies the server's SVID (server names are ignored;
    /// the authorizer decides who the server may be).
    pub fn client_config(&self, authorizer: Authorizer, alpn: Vec<Vec<u8>>) -> Arc<ClientConfig> {
        let verifier = Arc::new(SpiffeVerifier {
            identity: self.clone(),
            authorizer,
            algorithms: self.provider.signature_verification_algorithms,
            client_auth_mandatory: true,
        });
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"))
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SvidResolver(self.clone())));
        cfg.alpn_protocols = alpn;
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }

    /// A client config that verifies a server's SVID but presents none (e.g. bundle endpoint
    /// clients, which have no identity of their own).
    pub fn anonymous_client_config(&self, authorizer: Authorizer) -> Arc<ClientConfig> {
        let verifier = Arc::new(SpiffeVerifier {
            identity: self.clone(),
            authorizer,
            algorithms: self.provider.signature_verification_algorithms,
            client_auth_mandatory: true,
        });
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"))
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }

    /// A server config that presents our SVID and asks for no client certificate.
    pub fn server_config_without_client_auth(&self) -> Arc<ServerConfig> {
        let cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"))
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SvidResolver(self.clone())));
        Arc::new(cfg)
    }
}

/// The SPIFFE ID in a peer's leaf certificate, after a completed handshake.
pub fn peer_spiffe_id(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = peer_certs?.first()?;
    inspect(leaf).ok().map(|i| i.spiffe_id)
}

#[derive(Debug)]
struct SvidResolver(MeshIdentity);

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.svid.load().as_ref().map(|s| s.certified_key.clone())
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.svid.load().as_ref().map(|s| s.certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

struct SpiffeVerifier {
    identity: MeshIdentity,
    authorizer: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
    client_auth_mandatory: bool,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("authorizer", &self.authorizer)
            .finish()
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.identity
            .verify_peer(
                end_entity,
                intermediates,
                now,
                &self.authorizer,
                webpki::KeyUsage::server_auth(),
            )
            .map(|_| ServerCertVerified::assertion())
            .map_err(PeerVerificationError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.identity
            .verify_peer(
                end_entity,
                intermediates,
                now,
                &self.authorizer,
                webpki::KeyUsage::client_auth(),
            )
            .map(|_| ClientCertVerified::assertion())
            .map_err(|e| {
                tracing::debug!(error = %e, "refused client certificate");
                e.into_rustls()
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
