//! Where the agent gets its SVIDs signed. Today: a CA directory on the same node
//! ([`LocalCaSigner`]). The control plane's CA service plugs in behind the same trait, so the
//! agent keeps its keys and only ever sends CSRs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_api::{SpiffeId, TrustDomain};
use futures::future::BoxFuture;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use crate::bundle::{BundleSet, SpiffeBundle};
use crate::ca::{CaError, TrustDomainCa};

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("signer unavailable: {0}")]
    Unavailable(String),
}

pub trait SvidSigner: Send + Sync + 'static {
    fn trust_domain(&self) -> TrustDomain;
    /// Signs the CSR as `id`; returns the chain, leaf first.
    fn sign_x509(
        &self,
        csr_der: Vec<u8>,
        id: SpiffeId,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<Vec<CertificateDer<'static>>, SignError>>;
    fn sign_jwt(
        &self,
        id: SpiffeId,
        audience: Vec<String>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<String, SignError>>;
    /// Own and federated bundles, updated on every change.
    fn bundles(&self) -> watch::Receiver<Arc<BundleSet>>;
}

/// Signs with a CA held in this process; federated bundles are set by the operator (files) or,
/// later, by the control plane.
pub struct LocalCaSigner {
    ca: Arc<TrustDomainCa>,
    federated: Arc<Mutex<BundleSet>>,
    bundles: watch::Sender<Arc<BundleSet>>,
}

impl LocalCaSigner {
    /// Must be called inside a Tokio runtime: it follows the CA's bundle as it rotates.
    pub fn new(ca: Arc<TrustDomainCa>, federated: Vec<SpiffeBundle>) -> Arc<Self> {
        let mut set = BundleSet::new();
        for b in federated {
            set.update(b);
        }
        let federated = Arc::new(Mutex::new(set));
        let bundles = watch::Sender::new(Arc::new(combine(&ca.bundle(), &federated)));
        let me = Arc::new(Self {
            ca: ca.clone(),
            federated,
            bundles,
        });
        let weak = Arc::downgrade(&me);
        let mut rx = ca.subscribe_bundle();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(me) = weak.upgrade() else { return };
                me.publish();
            }
        });
        me
    }

    /// Replaces (or adds) a federated bundle.
    pub fn set_federated(&self, bundle: SpiffeBundle) {
        if bundle.trust_domain() == &self.ca.trust_domain() {
            tracing::warn!(trust_domain = %bundle.trust_domain(), "ignoring a federated bundle for our own trust domain");
            return;
        }
        self.federated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(bundle);
        self.publish();
    }

    pub fn ca(&self) -> &Arc<TrustDomainCa> {
        &self.ca
    }

    fn publish(&self) {
        let set = combine(&self.ca.bundle(), &self.federated);
        self.bundles.send_if_modified(|cur| {
            if **cur == set {
                false
            } else {
                *cur = Arc::new(set);
                true
            }
        });
    }
}

fn combine(own: &Arc<SpiffeBundle>, federated: &Mutex<BundleSet>) -> BundleSet {
    let mut set = federated.lock().unwrap_or_else(|p| p.into_inner()).clone();
    set.remove(own.trust_domain());
    set.update_arc(own.clone());
    set
}

impl SvidSigner for LocalCaSigner {
    fn trust_domain(&self) -> TrustDomain {
        self.ca.trust_domain()
    }

    fn sign_x509(
        &self,
        csr_der: Vec<u8>,
        id: SpiffeId,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<Vec<CertificateDer<'static>>, SignError>> {
        let result = self
            .ca
            .sign_csr(&csr_der, Some(&id), ttl)
            .map(|s| s.chain)
            .map_err(SignError::from);
        Box::pin(async move { result })
    }

    fn sign_jwt(
        &self,
        id: SpiffeId,
        audience: Vec<String>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<String, SignError>> {
        let result = self
            .ca
            .sign_jwt(&id, &audience, ttl)
            .map_err(SignError::from);
        Box::pin(async move { result })
    }

    fn bundles(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.bundles.subscribe()
    }
}
