//! A trust domain's certificate authority: one per cluster, kept in a directory.
//!
//! The CA is either a self-signed root (the default) or an intermediate under an operator's existing
//! root. It signs X.509-SVIDs from CSRs and JWT-SVIDs, and it rotates without breaking anyone:
//!
//! 1. **prepare** — a next authority is created and published in the bundle, but signs nothing yet;
//! 2. **activate** — once peers have had time to fetch the new bundle, it becomes the signer and the
//!    old one is retired;
//! 3. **prune** — a retired authority leaves the bundle only after the last SVID it signed expired.
//!
//! Directory layout (keys 0600, directory 0700):
//! ```text
//! DIR/ca.json                    state: trust domain, TTLs, bundle sequence, authorities
//! DIR/authorities/<id>.crt       the authority's certificate (+ upstream chain), PEM
//! DIR/authorities/<id>.key       its private key, PKCS#8 PEM
//! DIR/authorities/<id>.jwt.key   its JWT-SVID signing key, PKCS#8 PEM
//! DIR/upstream-bundle.pem        upstream mode only: the roots that form the bundle
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use fedmesh_api::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bundle::{SpiffeBundle, der_to_pem, parse_pem_certificates};
use crate::files::{self, FileError};
use crate::jwt::{JwtError, JwtSigner};
use crate::svid::{from_unix_secs, rfc3339, unix_secs};

pub const STATE_FILE: &str = "ca.json";
const STATE_VERSION: u32 = 1;
/// Issued certificates start up to this much in the past, to absorb clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(30);

/// Backdating is capped at a quarter of the lifetime, so that "renew at half-life" (measured from
/// notBefore) still falls in the future for very short TTLs.
fn backdate(ttl: Duration) -> Duration {
    BACKDATE.min(ttl / 4)
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{dir} already holds a CA (found {STATE_FILE}); refusing to overwrite it")]
    AlreadyInitialized { dir: PathBuf },
    #[error(
        "{dir} holds no CA ({STATE_FILE} is missing); create one with `fedmesh ca init --trust-domain TD --dir {dir}`"
    )]
    NotInitialized { dir: PathBuf },
    #[error("{path} is not a valid CA state file: {reason}")]
    BadState { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadKeyMaterial { path: PathBuf, reason: String },
    #[error("upstream authority: {0}")]
    Upstream(String),
    #[error("CSR refused: {0}")]
    Csr(String),
    #[error("CSR asks for {requested}, but this CA signs only for trust domain {trust_domain}")]
    ForeignTrustDomain {
        requested: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("CSR asks for {requested}, but the caller is registered as {expected}")]
    WrongId {
        requested: SpiffeId,
        expected: SpiffeId,
    },
    #[error(
        "the CA of {trust_domain} has no active authority that is still valid (it expired at {expired}); rotate it with `fedmesh ca rotate`"
    )]
    Expired {
        trust_domain: TrustDomain,
        expired: String,
    },
    #[error(
        "this CA is an intermediate under an upstream root; rotating needs the upstream key (--upstream-cert and --upstream-key)"
    )]
    UpstreamKeyNeeded,
    #[error("there is no prepared authority to activate; prepare one first")]
    NothingPrepared,
    #[error(
        "the system's random number generator failed; refusing to make keys, serials or IDs from anything else"
    )]
    Random,
    #[error("invalid TTL: {0}")]
    Ttl(String),
    #[error(transparent)]
    Jwt(#[from] JwtError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// An operator's existing CA under which ours becomes an intermediate.
#[derive(Clone)]
pub struct UpstreamAuthority {
    /// The certificate of the upstream signing key, PEM.
    pub cert_pem: String,
    /// Its private key, PEM. Used to sign our intermediate and never stored.
    pub key_pem: String,
    /// The roots to publish as the bundle, PEM. Defaults to `cert_pem` (a root signs directly).
    pub bundle_pem: Option<String>,
}

impl std::fmt::Debug for UpstreamAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuthority").finish_non_exhaustive()
    }
}

/// How a new CA is set up.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: TrustDomain,
    /// Lifetime of each authority certificate.
    pub ca_ttl: Duration,
    /// TTL of an SVID when the request does not ask for one.
    pub default_svid_ttl: Duration,
    /// Longest TTL an SVID may ask for.
    pub max_svid_ttl: Duration,
    /// TTL of a JWT-SVID when the request does not ask for one. JWTs cannot be revoked and are
    /// replayable by whoever sees them, so they live minutes (SPIRE's default is 5).
    pub default_jwt_ttl: Duration,
    /// Longest TTL a JWT-SVID may ask for.
    pub max_jwt_ttl: Duration,
    /// `spiffe_refresh_hint` published in the bundle.
    pub refresh_hint: Duration,
    pub upstream: Option<UpstreamAuthority>,
}

impl CaOptions {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            ca_ttl: Duration::from_secs(30 * 24 * 3600),
            default_svid_ttl: Duration::from_secs(3600),
            max_svid_ttl: Duration::from_secs(24 * 3600),
            default_jwt_ttl: DEFAULT_JWT_TTL,
            max_jwt_ttl: MAX_JWT_TTL,
            refresh_hint: Duration::from_secs(300),
            upstream: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityState {
    /// In the bundle, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// In the bundle until `retire_at`, signing nothing.
    Retired,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityRecord {
    pub id: String,
    pub state: AuthorityState,
    pub not_before: u64,
    pub not_after: u64,
    pub jwt_kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<u64>,
    /// Retired authorities leave the bundle at this time (the last SVID they signed has expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    trust_domain: TrustDomain,
    ca_ttl_secs: u64,
    default_svid_ttl_secs: u64,
    max_svid_ttl_secs: u64,
    #[serde(default = "default_jwt_ttl_secs")]
    default_jwt_ttl_secs: u64,
    #[serde(default = "max_jwt_ttl_secs")]
    max_jwt_ttl_secs: u64,
    refresh_hint_secs: u64,
    upstream: bool,
    sequence: u64,
    authorities: Vec<AuthorityRecord>,
}

struct Authority {
    record: AuthorityRecord,
    cert: CertificateDer<'static>,
    /// Certificates after the leaf in every SVID chain this authority signs.
    chain_tail: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    jwt: JwtSigner,
}

struct Inner {
    state: StateFile,
    authorities: Vec<Authority>,
    upstream_roots: Vec<CertificateDer<'static>>,
}

/// An X.509-SVID chain the CA just signed (the key stays with whoever made the CSR).
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Status of one authority, for `fedmesh ca status` and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityStatus {
    pub id: String,
    pub state: AuthorityState,
    pub not_after: String,
    pub jwt_kid: String,
    /// A retired authority leaves the bundle then (RFC 3339): the last SVID it signed expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<String>,
}

/// A CA as `fedmesh ca status` and `fedmesh control-plane ca status` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaView {
    pub trust_domain: String,
    pub bundle_sequence: u64,
    /// The longest lifetime an SVID may have: how long a retired authority stays in the bundle.
    pub max_svid_ttl_secs: u64,
    pub authorities: Vec<AuthorityStatus>,
}

pub struct TrustDomainCa {
    dir: PathBuf,
    inner: RwLock<Inner>,
    bundle_tx: watch::Sender<Arc<SpiffeBundle>>,
}

impl std::fmt::Debug for TrustDomainCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustDomainCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl TrustDomainCa {
    /// Creates a new CA in `dir` (created 0700 if missing).
    pub fn init(dir: &Path, opts: CaOptions) -> Result<Self, CaError> {
        if dir.join(STATE_FILE).exists() {
            return Err(CaError::AlreadyInitialized {
                dir: dir.to_path_buf(),
            });
        }
        if opts.default_svid_ttl.is_zero() || opts.default_svid_ttl > opts.max_svid_ttl {
            return Err(CaError::Ttl(format!(
                "default SVID TTL {:?} must be non-zero and at most the maximum {:?}",
                opts.default_svid_ttl, opts.max_svid_ttl
            )));
        }
        if opts.ca_ttl <= opts.max_svid_ttl * 2 {
            return Err(CaError::Ttl(format!(
                "CA TTL {:?} must be more than twice the maximum SVID TTL {:?}, so rotation can overlap",
                opts.ca_ttl, opts.max_svid_ttl
            )));
        }
        files::create_private_dir(&dir.join("authorities"))?;
        files::create_private_dir(dir)?;

        let upstream_roots = match &opts.upstream {
            Some(up) => {
                let roots_pem = up.bundle_pem.as_deref().unwrap_or(&up.cert_pem);
                let roots = parse_pem_certificates(roots_pem.as_bytes())
                    .map_err(|e| CaError::Upstream(format!("upstream bundle: {e}")))?;
                files::write_public(&dir.join("upstream-bundle.pem"), roots_pem.as_bytes())?;
                roots
            }
            None => Vec::new(),
        };
        let state = StateFile {
            version: STATE_VERSION,
            trust_domain: opts.trust_domain.clone(),
            ca_ttl_secs: opts.ca_ttl.as_secs(),
            default_svid_ttl_secs: opts.default_svid_ttl.as_secs(),
            max_svid_ttl_secs: opts.max_svid_ttl.as_secs(),
            default_jwt_ttl_secs: opts.default_jwt_ttl.as_secs(),
            max_jwt_ttl_secs: opts.max_jwt_ttl.as_secs(),
            refresh_hint_secs: opts.refresh_hint.as_secs(),
            upstream: opts.upstream.is_some(),
            sequence: 1,
            authorities: Vec::new(),
        };
        let mut inner = Inner {
            state,
            authorities: Vec::new(),
            upstream_roots,
        };
        let mut first = new_authority(dir, &inner, opts.upstream.as_ref(), SystemTime::now())?;
        first.record.state = AuthorityState::Active;
        first.record.activated_at = Some(unix_secs(SystemTime::now()));
        inner.authorities.push(first);
        inner.state.authorities = inner.authorities.iter().map(|a| a.record.clone()).collect();
        write_state(dir, &inner.state)?;
        let bundle = Arc::new(compute_bundle(&inner));
        Ok(Self {
            dir: dir.to_path_buf(),
            inner: RwLock::new(inner),
            bundle_tx: watch::Sender::new(bundle),
        })
    }

    /// Opens an existing CA directory.
    pub fn open(dir: &Path) -> Result<Self, CaError> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Err(CaError::NotInitialized {
                dir: dir.to_path_buf(),
            });
        }
        let state: StateFile =
            serde_json::from_slice(&files::read(&path)?).map_err(|e| CaError::BadState {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if state.version != STATE_VERSION {
            return Err(CaError::BadState {
                path,
                reason: format!(
                    "state version {} is not supported (expected {STATE_VERSION})",
                    state.version
                ),
            });
        }
        let upstream_roots = if state.upstream {
            let p = dir.join("upstream-bundle.pem");
            parse_pem_certificates(&files::read(&p)?)
                .map_err(|reason| CaError::BadKeyMaterial { path: p, reason })?
        } else {
            Vec::new()
        };
        let authorities = state
            .authorities
            .iter()
            .map(|rec| load_authority(dir, rec))
            .collect::<Result<Vec<_>, _>>()?;
        let inner = Inner {
            state,
            authorities,
            upstream_roots,
        };
        let bundle = Arc::new(compute_bundle(&inner));
        Ok(Self {
            dir: dir.to_path_buf(),
            inner: RwLock::new(inner),
            bundle_tx: watch::Sender::new(bundle),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn trust_domain(&self) -> TrustDomain {
        self.read().state.trust_domain.clone()
    }

    pub fn default_svid_ttl(&self) -> Duration {
        Duration::from_secs(self.read().state.default_svid_ttl_secs)
    }

    pub fn max_svid_ttl(&self) -> Duration {
        Duration::from_secs(self.read().state.max_svid_ttl_secs)
    }

    /// The trust domain's current bundle.
    pub fn bundle(&self) -> Arc<SpiffeBundle> {
        self.bundle_tx.borrow().clone()
    }

    /// Follows bundle changes (rotation).
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<SpiffeBundle>> {
        self.bundle_tx.subscribe()
    }

    /// The certificate of the authority that signs now. Differs from the bundle's newest
    /// authority while a prepared one waits for activation; pins and served chains need this one.
    pub fn active_certificate(&self) -> Option<CertificateDer<'static>> {
        self.read()
            .authorities
            .iter()
            .find(|a| a.record.state == AuthorityState::Active)
            .map(|a| a.cert.clone())
    }

    pub fn authorities(&self) -> Vec<AuthorityStatus> {
        self.read()
            .authorities
            .iter()
            .map(|a| AuthorityStatus {
                id: a.record.id.clone(),
                state: a.record.state,
                not_after: rfc3339(from_unix_secs(a.record.not_after)),
                jwt_kid: a.record.jwt_kid.clone(),
                retire_at: a.record.retire_at.map(|t| rfc3339(from_unix_secs(t))),
            })
            .collect()
    }

    /// The CA's state for status commands.
    pub fn view(&self) -> CaView {
        CaView {
            trust_domain: self.trust_domain().to_string(),
            bundle_sequence: self.bundle().sequence(),
            max_svid_ttl_secs: self.read().state.max_svid_ttl_secs,
            authorities: self.authorities(),
        }
    }

    /// Why [`Self::prune`] removes nothing at `now`: each retired authority that SVIDs it signed
    /// may still rely on, and when it may go. Empty when there is no retired authority.
    pub fn prune_blockers(&self, now: SystemTime) -> Vec<String> {
        self.read()
            .authorities
            .iter()
            .filter(|a| a.record.state == AuthorityState::Retired)
            .filter_map(|a| {
                let at = from_unix_secs(a.record.retire_at?);
                let left = at.duration_since(now).ok()?;
                Some(format!(
                    "retired authority {} may still vouch for SVIDs it signed until {} (in {}s): it can be pruned then, and the control plane prunes it by itself within a minute after",
                    a.record.id,
                    rfc3339(at),
                    left.as_secs() + 1
                ))
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Signs an X.509-SVID for the public key in `csr_der`.
    ///
    /// The CSR must ask for exactly one SPIFFE ID, in this trust domain, and nothing else; when
    /// `expected` is given (the ID the caller is registered as), it must be that one.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        expected: Option<&SpiffeId>,
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, CaError> {
        let (id, public_key) = check_csr(csr_der, false)?;
        let id = id.ok_or_else(|| CaError::Csr("it has no URI SAN".into()))?;
        let inner = self.read();
        if !id.is_member_of(&inner.state.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                requested: id,
                trust_domain: inner.state.trust_domain.clone(),
            });
        }
        if let Some(expected) = expected
            && expected != &id
        {
            return Err(CaError::WrongId {
                requested: id,
                expected: expected.clone(),
            });
        }
        let now = SystemTime::now();
        let (not_before, not_after) = self.validity(&inner, ttl, now)?;
        let chain = issue_leaf(
            active(&inner, now)?,
            &id,
            &[],
            public_key,
            not_before,
            not_after,
        )?;
        Ok(IssuedSvid {
            id,
            chain,
            not_before,
            not_after,
        })
    }

    /// Signs an X.509-SVID for the key in `csr_der` as `id`, which the signer decides (e.g. from a
    /// registration). The CSR may name no SAN at all, or exactly `id`; anything else is refused.
    pub fn sign_csr_for(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, CaError> {
        self.sign_serving_cert(csr_der, id, &[], ttl)
    }

    /// Signs an X.509-SVID for the key in `csr_der` as `id` that also names `hosts` (DNS names or
    /// IP addresses), for a client that checks host names rather than SPIFFE IDs — the
    /// Kubernetes API server calling the control plane's admission webhook. (An X.509-SVID has
    /// exactly one URI SAN and may have other SANs.) As for [`Self::sign_csr_for`], the CSR may
    /// name no SAN, or exactly `id`.
    pub fn sign_serving_cert(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        hosts: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, CaError> {
        let (requested, public_key) = check_csr(csr_der, true)?;
        if let Some(r) = requested
            && &r != id
        {
            return Err(CaError::WrongId {
                requested: r,
                expected: id.clone(),
            });
        }
        let inner = self.read();
        if !id.is_member_of(&inner.state.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                requested: id.clone(),
                trust_domain: inner.state.trust_domain.clone(),
            });
        }
        let now = SystemTime::now();
        let (not_before, not_after) = self.validity(&inner, ttl, now)?;
        let chain = issue_leaf(
            active(&inner, now)?,
            id,
            hosts,
            public_key,
            not_before,
            not_after,
        )?;
        Ok(IssuedSvid {
            id: id.clone(),
            chain,
            not_before,
            not_after,
        })
    }

    /// Signs a JWT-SVID for `id` and `audience`.
    pub fn sign_jwt(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<String, CaError> {
        let inner = self.read();
        if !id.is_member_of(&inner.state.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                requested: id.clone(),
                trust_domain: inner.state.trust_domain.clone(),
            });
        }
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(CaError::Csr(
                "a JWT-SVID needs at least one non-empty audience".into(),
            ));
        }
        let now = SystemTime::now();
        let ttl = ttl
            .unwrap_or(Duration::from_secs(inner.state.default_jwt_ttl_secs))
            .min(Duration::from_secs(inner.state.max_jwt_ttl_secs));
        let (_, not_after) = self.validity(&inner, Some(ttl), now)?;
        let authority = active(&inner, now)?;
        Ok(authority.jwt.sign(id, audience, now, not_after)?)
    }

    fn validity(
        &self,
        inner: &Inner,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<(SystemTime, SystemTime), CaError> {
        let max = Duration::from_secs(inner.state.max_svid_ttl_secs);
        let ttl = ttl.unwrap_or(Duration::from_secs(inner.state.default_svid_ttl_secs));
        if ttl.is_zero() {
            return Err(CaError::Ttl("an SVID TTL must be more than zero".into()));
        }
        let authority = active(inner, now)?;
        let ca_not_after = from_unix_secs(authority.record.not_after);
        let ca_not_before = from_unix_secs(authority.record.not_before);
        let ttl = ttl.min(max);
        let not_before = (now - backdate(ttl)).max(ca_not_before);
        // An SVID never outlives the authority that signed it.
        let not_after = (now + ttl).min(ca_not_after);
        Ok((not_before, not_after))
    }

    /// Signs an SVID with an arbitrary validity window. For tools and tests that need e.g. an
    /// already-expired SVID; the normal path is [`Self::sign_csr`].
    pub fn sign_with_validity(
        &self,
        csr_der: &[u8],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        let (id, public_key) = check_csr(csr_der, false)?;
        let id = id.ok_or_else(|| CaError::Csr("it has no URI SAN".into()))?;
        let inner = self.read();
        if !id.is_member_of(&inner.state.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                requested: id,
                trust_domain: inner.state.trust_domain.clone(),
            });
        }
        let chain = issue_leaf(
            active(&inner, SystemTime::now())?,
            &id,
            &[],
            public_key,
            not_before,
            not_after,
        )?;
        Ok(IssuedSvid {
            id,
            chain,
            not_before,
            not_after,
        })
    }

    /// Step 1 of rotation: creates the next authority and publishes it in the bundle. Idempotent:
    /// if one is already prepared, nothing changes.
    pub fn prepare_next(&self, upstream: Option<&UpstreamAuthority>) -> Result<(), CaError> {
        let mut inner = self.write();
        if inner
            .authorities
            .iter()
            .any(|a| a.record.state == AuthorityState::Prepared)
        {
            return Ok(());
        }
        if inner.state.upstream && upstream.is_none() {
            return Err(CaError::UpstreamKeyNeeded);
        }
        let next = new_authority(&self.dir, &inner, upstream, SystemTime::now())?;
        tracing::info!(trust_domain = %inner.state.trust_domain, authority = %next.record.id, "prepared next CA authority; it is in the bundle and will sign after activation");
        inner.authorities.push(next);
        self.commit(&mut inner, true)
    }

    /// Step 2 of rotation: the prepared authority starts signing; the active one is retired and
    /// stays in the bundle until every SVID it signed has expired.
    pub fn activate_next(&self) -> Result<(), CaError> {
        let mut inner = self.write();
        let now = SystemTime::now();
        let Some(next) = inner
            .authorities
            .iter()
            .position(|a| a.record.state == AuthorityState::Prepared)
        else {
            return Err(CaError::NothingPrepared);
        };
        let max_ttl = Duration::from_secs(inner.state.max_svid_ttl_secs);
        for a in inner.authorities.iter_mut() {
            if a.record.state == AuthorityState::Active {
                a.record.state = AuthorityState::Retired;
                // Nothing it signed outlives now + the max TTL, nor its own expiry.
                let retire_at = (now + max_ttl).min(from_unix_secs(a.record.not_after));
                a.record.retire_at = Some(unix_secs(retire_at) + BACKDATE.as_secs());
            }
        }
        let a = &mut inner.authorities[next];
        a.record.state = AuthorityState::Active;
        a.record.activated_at = Some(unix_secs(now));
        tracing::info!(trust_domain = %inner.state.trust_domain, authority = %inner.authorities[next].record.id, "activated CA authority");
        // The bundle's content is unchanged: no new sequence.
        self.commit(&mut inner, false)
    }

    /// Step 3 of rotation: drops retired authorities whose SVIDs have all expired. Returns whether
    /// the bundle changed.
    pub fn prune(&self, now: SystemTime) -> Result<bool, CaError> {
        let mut inner = self.write();
        let before = inner.authorities.len();
        let mut removed = Vec::new();
        inner.authorities.retain(|a| {
            let drop = a.record.state == AuthorityState::Retired
                && a.record.retire_at.is_some_and(|t| unix_secs(now) >= t);
            if drop {
                removed.push(a.record.id.clone());
            }
            !drop
        });
        if inner.authorities.len() == before {
            return Ok(false);
        }
        self.commit(&mut inner, true)?;
        for id in removed {
            tracing::info!(authority = %id, "pruned retired CA authority");
            for suffix in ["crt", "key", "jwt.key"] {
                let _ = std::fs::remove_file(
                    self.dir.join("authorities").join(format!("{id}.{suffix}")),
                );
            }
        }
        Ok(true)
    }

    /// One step of the automatic schedule: prepare at half the active authority's life, activate at
    /// three quarters, prune whatever has expired. A CA found already expired (the process was down)
    /// rotates at once.
    pub fn rotation_tick(&self, now: SystemTime) -> Result<(), CaError> {
        let (active_rec, prepared, upstream) = {
            let inner = self.read();
            let active_rec = inner
                .authorities
                .iter()
                .find(|a| a.record.state == AuthorityState::Active)
                .map(|a| a.record.clone());
            let prepared = inner
                .authorities
                .iter()
                .any(|a| a.record.state == AuthorityState::Prepared);
            (active_rec, prepared, inner.state.upstream)
        };
        self.prune(now)?;
        let Some(active_rec) = active_rec else {
            return Ok(());
        };
        let nb = from_unix_secs(active_rec.not_before);
        let life = from_unix_secs(active_rec.not_after)
            .duration_since(nb)
            .unwrap_or_default();
        let expired = now >= from_unix_secs(active_rec.not_after);
        if !prepared && (now >= nb + life / 2 || expired) {
            if upstream {
                tracing::warn!(authority = %active_rec.id, not_after = %rfc3339(from_unix_secs(active_rec.not_after)),
                    "CA intermediate is past half its life; rotate it with `fedmesh ca rotate --upstream-cert .. --upstream-key ..`");
                return Ok(());
            }
            self.prepare_next(None)?;
        }
        let prepared_now = prepared || !upstream;
        if prepared_now && (now >= nb + life * 3 / 4 || expired) {
            self.activate_next()?;
        }
        Ok(())
    }

    /// Runs [`Self::rotation_tick`] every `interval` until `shutdown` resolves.
    pub async fn run_rotation(
        self: Arc<Self>,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            if let Err(e) = self.rotation_tick(SystemTime::now()) {
                tracing::error!(error = %e, "CA rotation step failed; will retry");
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    fn commit(&self, inner: &mut Inner, bundle_changed: bool) -> Result<(), CaError> {
        if bundle_changed {
            inner.state.sequence += 1;
        }
        inner.state.authorities = inner.authorities.iter().map(|a| a.record.clone()).collect();
        write_state(&self.dir, &inner.state)?;
        let bundle = Arc::new(compute_bundle(inner));
        self.bundle_tx.send_replace(bundle);
        Ok(())
    }
}

fn active(inner: &Inner, now: SystemTime) -> Result<&Authority, CaError> {
    let a = inner
        .authorities
        .iter()
        .find(|a| a.record.state == AuthorityState::Active)
        .ok_or_else(|| CaError::Expired {
            trust_domain: inner.state.trust_domain.clone(),
            expired: "never activated".into(),
        })?;
    if now >= from_unix_secs(a.record.not_after) {
        return Err(CaError::Expired {
            trust_domain: inner.state.trust_domain.clone(),
            expired: rfc3339(from_unix_secs(a.record.not_after)),
        });
    }
    Ok(a)
}

/// Parses a CSR and checks it asks for exactly one SPIFFE ID (or, when `allow_none`, possibly
/// none) and nothing else.
fn check_csr(
    csr_der: &[u8],
    allow_none: bool,
) -> Result<(Option<SpiffeId>, rcgen::PublicKey), CaError> {
    let csr = CertificateSigningRequestParams::from_der(&csr_der.into()).map_err(|e| {
        CaError::Csr(match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "its signature does not verify (the CSR was altered or signed with another key)"
                    .into()
            }
            rcgen::Error::UnsupportedExtension => {
                "it requests an extension fedmesh does not issue; request only the SPIFFE ID URI SAN"
                    .into()
            }
            other => format!("it is not a valid PKCS#10 request ({other})"),
        })
    })?;
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(CaError::Csr(
            "it asks for a CA certificate; SVIDs are leaf certificates".into(),
        ));
    }
    let mut uris = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::URI(u) => uris.push(u.as_str().to_string()),
            other => {
                return Err(CaError::Csr(format!(
                    "it asks for a non-URI SAN ({other:?}); an X509-SVID carries only its SPIFFE ID"
                )));
            }
        }
    }
    let id = match uris.as_slice() {
        [one] => Some(
            SpiffeId::new(one)
                .map_err(|e| CaError::Csr(format!("its URI SAN is not a SPIFFE ID: {e}")))?,
        ),
        [] if allow_none => None,
        [] => {
            return Err(CaError::Csr(
                "it has no URI SAN; an X509-SVID needs exactly one SPIFFE ID".into(),
            ));
        }
        many => {
            return Err(CaError::Csr(format!(
                "it asks for {} URI SANs ({}); an X509-SVID carries exactly one SPIFFE ID",
                many.len(),
                many.join(", ")
            )));
        }
    };
    Ok((id, csr.public_key))
}

/// Signs an X509-SVID leaf per the spec (one URI SAN, CA=false, digitalSignature, server+client
/// auth) and returns it with the authority's chain tail.
fn issue_leaf(
    authority: &Authority,
    id: &SpiffeId,
    hosts: &[String],
    public_key: rcgen::PublicKey,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let mut params = CertificateParams::default();
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fedmesh");
    params.subject_alt_names = vec![SanType::URI(id.to_string().as_str().try_into()?)];
    for h in hosts {
        params
            .subject_alt_names
            .push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.as_str().try_into()?),
            });
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let signed =
        CertificateSigningRequestParams { params, public_key }.signed_by(&authority.issuer)?;
    let mut chain = Vec::with_capacity(1 + authority.chain_tail.len());
    chain.push(signed.der().clone());
    chain.extend(authority.chain_tail.iter().cloned());
    Ok(chain)
}

fn compute_bundle(inner: &Inner) -> SpiffeBundle {
    let x509 = if inner.state.upstream {
        inner.upstream_roots.clone()
    } else {
        inner.authorities.iter().map(|a| a.cert.clone()).collect()
    };
    SpiffeBundle::new(inner.state.trust_domain.clone())
        .with_x509_authorities(x509)
        .with_jwt_authorities(
            inner
                .authorities
                .iter()
                .map(|a| a.jwt.authority())
                .collect(),
        )
        .with_sequence(inner.state.sequence)
        .with_refresh_hint(Some(Duration::from_secs(inner.state.refresh_hint_secs)))
}

fn write_state(dir: &Path, state: &StateFile) -> Result<(), CaError> {
    let json = serde_json::to_vec_pretty(state).map_err(|e| CaError::BadState {
        path: dir.join(STATE_FILE),
        reason: e.to_string(),
    })?;
    files::write_public(&dir.join(STATE_FILE), &json)?;
    Ok(())
}

/// Default TTL of JWT-SVIDs.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(5 * 60);
/// Default longest TTL a JWT-SVID may ask for.
pub const MAX_JWT_TTL: Duration = Duration::from_secs(3600);

fn default_jwt_ttl_secs() -> u64 {
    DEFAULT_JWT_TTL.as_secs()
}

fn max_jwt_ttl_secs() -> u64 {
    MAX_JWT_TTL.as_secs()
}

/// Random bytes from the system RNG. Its failure is not recoverable here: predictable serials,
/// authority IDs or key IDs (time-derived, as before) would make certificates collide or be
/// guessed, so the operation fails instead.
fn random_bytes<const N: usize>() -> Result<[u8; N], CaError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CaError::Random)?;
    Ok(b)
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = random_bytes::<16>()?;
    b[0] = (b[0] & 0x7f) | 0x01; // positive and exactly 16 bytes
    Ok(SerialNumber::from_slice(&b))
}

/// Creates (and writes to disk) a new authority: self-signed, or signed by `upstream`.
fn new_authority(
    dir: &Path,
    inner: &Inner,
    upstream: Option<&UpstreamAuthority>,
    now: SystemTime,
) -> Result<Authority, CaError> {
    let td = &inner.state.trust_domain;
    let ttl = Duration::from_secs(inner.state.ca_ttl_secs);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let id = hex::encode(random_bytes::<8>()?);
    let mut params = CertificateParams::default();
    let not_before = now - backdate(ttl);
    let mut not_after = now + ttl;
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fedmesh");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("fedmesh {td} CA {id}"));
    params.subject_alt_names = vec![SanType::URI(td.id_string().as_str().try_into()?)];
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = upstream.is_some();

    let (cert, chain_tail, cert_pem_chain) = match upstream {
        None => {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_before = not_before.into();
            params.not_after = not_after.into();
            let cert = params.self_signed(&key)?;
            let pem = cert.pem();
            (cert.der().clone(), Vec::new(), pem)
        }
        Some(up) => {
            let upstream_key = KeyPair::from_pem(&up.key_pem).map_err(|e| {
                CaError::Upstream(format!("upstream key is not a usable PEM private key: {e}"))
            })?;
            let upstream_certs = parse_pem_certificates(up.cert_pem.as_bytes())
                .map_err(|e| CaError::Upstream(format!("upstream certificate: {e}")))?;
            let upstream_cert = &upstream_certs[0];
            let (_, parsed) = x509_parser::parse_x509_certificate(upstream_cert)
                .map_err(|e| CaError::Upstream(e.to_string()))?;
            if parsed.public_key().raw != upstream_key.subject_public_key_info().as_slice() {
                return Err(CaError::Upstream(
                    "the upstream key does not belong to the upstream certificate".into(),
                ));
            }
            if !parsed.is_ca() {
                return Err(CaError::Upstream(
                    "the upstream certificate is not a CA (basicConstraints CA:TRUE is missing)"
                        .into(),
                ));
            }
            let upstream_not_after = crate::svid::asn1_to_system(parsed.validity().not_after);
            not_after = not_after.min(upstream_not_after);
            if not_after <= now {
                return Err(CaError::Upstream(format!(
                    "the upstream certificate expired at {}",
                    rfc3339(upstream_not_after)
                )));
            }
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.not_before = not_before.into();
            params.not_after = not_after.into();
            let issuer = Issuer::from_ca_cert_der(upstream_cert, upstream_key).map_err(|e| {
                CaError::Upstream(format!("cannot use the upstream certificate: {e}"))
            })?;
            let cert = params.signed_by(&key, &issuer)?;
            // SVID chains carry our intermediate, then any upstream certificate that is not itself
            // in the published roots.
            let mut tail = vec![cert.der().clone()];
            tail.extend(
                upstream_certs
                    .iter()
                    .filter(|c| !inner.upstream_roots.contains(c))
                    .cloned(),
            );
            let pem: String = tail.iter().map(|c| der_to_pem("CERTIFICATE", c)).collect();
            (cert.der().clone(), tail, pem)
        }
    };

    let jwt_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let jwt_kid = hex::encode(random_bytes::<16>()?);
    let base = dir.join("authorities");
    files::create_private_dir(&base)?;
    files::write_private(
        &base.join(format!("{id}.key")),
        key.serialize_pem().as_bytes(),
    )?;
    files::write_private(
        &base.join(format!("{id}.jwt.key")),
        jwt_key.serialize_pem().as_bytes(),
    )?;
    files::write_public(&base.join(format!("{id}.crt")), cert_pem_chain.as_bytes())?;
    let jwt = JwtSigner::from_pkcs8(jwt_kid.clone(), &jwt_key.serialize_der())?;
    let issuer = Issuer::from_ca_cert_der(&cert, key)?;
    Ok(Authority {
        record: AuthorityRecord {
            id,
            state: AuthorityState::Prepared,
            not_before: unix_secs(not_before),
            not_after: unix_secs(not_after),
            jwt_kid,
            activated_at: None,
            retire_at: None,
        },
        cert,
        chain_tail,
        issuer,
        jwt,
    })
}

fn load_authority(dir: &Path, rec: &AuthorityRecord) -> Result<Authority, CaError> {
    let base = dir.join("authorities");
    let crt_path = base.join(format!("{}.crt", rec.id));
    let key_path = base.join(format!("{}.key", rec.id));
    let jwt_path = base.join(format!("{}.jwt.key", rec.id));
    let bad = |path: &Path, reason: String| CaError::BadKeyMaterial {
        path: path.to_path_buf(),
        reason,
    };
    let certs = parse_pem_certificates(&files::read(&crt_path)?).map_err(|r| bad(&crt_path, r))?;
    let key_pem = String::from_utf8(files::read_private(&key_path)?)
        .map_err(|_| bad(&key_path, "not UTF-8 PEM".into()))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
    let cert = certs[0].clone();
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&cert).map_err(|e| bad(&crt_path, e.to_string()))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad(
            &key_path,
            format!("key does not match certificate {}", crt_path.display()),
        ));
    }
    // Self-signed authorities are the bundle themselves; intermediates travel in the chain.
    let self_signed = parsed.subject() == parsed.issuer();
    let chain_tail = if self_signed { Vec::new() } else { certs };
    let jwt_pem = String::from_utf8(files::read_private(&jwt_path)?)
        .map_err(|_| bad(&jwt_path, "not UTF-8 PEM".into()))?;
    let jwt_key = KeyPair::from_pem(&jwt_pem).map_err(|e| bad(&jwt_path, e.to_string()))?;
    let jwt = JwtSigner::from_pkcs8(rec.jwt_kid.clone(), &jwt_key.serialize_der())?;
    let issuer = Issuer::from_ca_cert_der(&cert, key)?;
    Ok(Authority {
        record: rec.clone(),
        cert,
        chain_tail,
        issuer,
        jwt,
    })
}
