//! Helpers shared by the trust crate's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_trust::bundle::{BundleSet, SpiffeBundle};
use fedmesh_trust::ca::{CaOptions, TrustDomainCa};
use fedmesh_trust::svid::{X509Svid, new_key_and_csr};
use fedmesh_trust::tls::MeshIdentity;
use fedmesh_trust::workload::entries::parse_entries;
use fedmesh_trust::workload::{LocalCaSigner, SvidCache};
use fedmesh_trust::{SpiffeId, TrustDomain};
use hyper_util::rt::TokioIo;
use rustls_pki_types::PrivatePkcs8KeyDer;
use tokio_util::sync::CancellationToken;

pub fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

pub fn new_ca(dir: &Path, trust_domain: &str) -> Arc<TrustDomainCa> {
    Arc::new(
        TrustDomainCa::init(&dir.join(trust_domain), CaOptions::new(td(trust_domain))).unwrap(),
    )
}

/// A CA whose SVIDs live `svid_ttl` (for rotation tests).
pub fn short_lived_ca(dir: &Path, trust_domain: &str, svid_ttl: Duration) -> Arc<TrustDomainCa> {
    let mut opts = CaOptions::new(td(trust_domain));
    opts.default_svid_ttl = svid_ttl;
    opts.max_svid_ttl = svid_ttl;
    opts.ca_ttl = Duration::from_secs(3600);
    // Bundle endpoint clients fetch again after this (the shortest they accept).
    opts.refresh_hint = Duration::from_secs(1);
    Arc::new(TrustDomainCa::init(&dir.join(trust_domain), opts).unwrap())
}

/// An SVID for `spiffe_id` straight from `ca` (no agent).
pub fn svid(ca: &TrustDomainCa, spiffe_id: &str) -> X509Svid {
    let id = id(spiffe_id);
    let (key, csr) = new_key_and_csr(&id).unwrap();
    let issued = ca.sign_csr(&csr, Some(&id), None).unwrap();
    X509Svid {
        id,
        chain: issued.chain,
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        not_before: issued.not_before,
        not_after: issued.not_after,
    }
}

pub fn bundles(list: &[&SpiffeBundle]) -> BundleSet {
    let mut set = BundleSet::new();
    for b in list {
        set.update((*b).clone());
    }
    set
}

/// An identity holding `svid` and trusting `trusted`.
pub fn identity(svid: &X509Svid, trusted: &[&SpiffeBundle]) -> MeshIdentity {
    let ident = MeshIdentity::new();
    ident.set_svid(svid).unwrap();
    ident.set_bundles(bundles(trusted));
    ident
}

pub fn my_uid() -> u32 {
    unsafe { libc::getuid() }
}

/// An in-process agent serving the Workload API on a socket in `dir`.
pub struct TestAgent {
    pub socket: PathBuf,
    pub cache: Arc<SvidCache>,
    pub signer: Arc<LocalCaSigner>,
    pub shutdown: CancellationToken,
}

impl TestAgent {
    pub async fn start(dir: &Path, ca: Arc<TrustDomainCa>, entries_yaml: &str) -> Self {
        let socket = dir.join(format!("{}.sock", ca.trust_domain()));
        let entries =
            parse_entries(entries_yaml, Path::new("test.yaml"), &ca.trust_domain()).unwrap();
        let signer = LocalCaSigner::new(ca, Vec::new());
        let cache = SvidCache::new(signer.clone(), entries);
        let shutdown = CancellationToken::new();
        tokio::spawn(cache.clone().run(shutdown.clone().cancelled_owned()));
        let listener = fedmesh_trust::workload::bind_socket(&socket).unwrap();
        tokio::spawn(fedmesh_trust::workload::serve(
            listener,
            socket.clone(),
            cache.clone(),
            shutdown.clone().cancelled_owned(),
        ));
        Self {
            socket,
            cache,
            signer,
            shutdown,
        }
    }

    /// Entries giving this test process `spiffe_id`.
    pub fn entry_for_me(spiffe_id: &str) -> String {
        format!(
            "entries:\n  - spiffe_id: {spiffe_id}\n    selectors: [\"unix:uid:{}\"]\n",
            my_uid()
        )
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// A raw gRPC client for the Workload API on this agent's socket.
    pub async fn raw_client(
        &self,
    ) -> fedmesh_trust::workload_pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::transport::Channel,
    > {
        let path = self.socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        fedmesh_trust::workload_pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            channel,
        )
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Adds the Workload API security header to a request.
pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// A Web PKI for `https_web`: a root and a server certificate for `localhost`.
pub fn web_pki() -> (
    rustls::RootCertStore,
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls_pki_types::PrivateKeyDer;
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(root, root_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root_cert.der().clone()).unwrap();
    (
        roots,
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}
