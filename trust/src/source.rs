//! Feeds a [`MeshIdentity`] from a SPIFFE Workload API — ours or a SPIRE agent's — through the
//! `spiffe` crate's `X509Source`, following every SVID rotation and bundle change.

use std::time::Duration;

use fedmesh_api::TrustDomain;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;
use tokio::task::JoinHandle;

use crate::tls::{MeshIdentity, TrustStore};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot get an identity from the Workload API at {endpoint}: {reason}. Is the agent running, and is this process registered (see `fedmesh agent --entries`)?"
    )]
    Connect { endpoint: String, reason: String },
    #[error("the Workload API at {endpoint} did not deliver an SVID within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("the Workload API delivered an unusable SVID: {0}")]
    BadSvid(String),
}

/// Keeps a [`MeshIdentity`] in step with a Workload API until dropped.
pub struct WorkloadApiFollower {
    source: X509Source,
    task: JoinHandle<()>,
}

impl WorkloadApiFollower {
    /// Connects to `endpoint` (`unix:/path/to/socket`), waits up to `timeout` for the first SVID,
    /// installs it in `identity`, and follows updates.
    pub async fn start(
        endpoint: &str,
        identity: MeshIdentity,
        timeout: Duration,
    ) -> Result<Self, SourceError> {
        let build = X509Source::builder().endpoint(endpoint).build();
        let source = tokio::time::timeout(timeout, build)
            .await
            .map_err(|_| SourceError::Timeout {
                endpoint: endpoint.to_string(),
                timeout,
            })?
            .map_err(|e| SourceError::Connect {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        // Subscribe before the first apply: an update that lands in between (a federated bundle
        // arriving just after the first SVID) must not be taken as already seen, or it would wait
        // for the next change (an hour away, for an SVID) to reach the identity.
        let mut updates = source.updated();
        apply(&source, &identity)?;
        let follower_source = source.clone();
        let task = tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                if let Err(e) = apply(&follower_source, &identity) {
                    tracing::error!(error = %e, "ignoring a Workload API update; keeping the previous SVID");
                }
            }
        });
        Ok(Self { source, task })
    }

    pub async fn shutdown(self) {
        self.task.abort();
        self.source.shutdown().await;
    }
}

impl Drop for WorkloadApiFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn apply(source: &X509Source, identity: &MeshIdentity) -> Result<(), SourceError> {
    let svid = source
        .svid()
        .map_err(|e| SourceError::BadSvid(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let bundles = source
        .bundle_set()
        .map_err(|e| SourceError::BadSvid(e.to_string()))?;
    let mut domains = Vec::new();
    for (td, bundle) in bundles.iter() {
        match TrustDomain::new(td.as_str()) {
            Ok(td) => domains.push((
                td,
                bundle
                    .authorities()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                    .collect(),
            )),
            Err(e) => {
                tracing::warn!(trust_domain = %td, error = %e, "skipping bundle with an invalid trust domain")
            }
        }
    }
    // Bundles first: a new SVID from a freshly activated CA must never meet an old bundle.
    identity.set_trust(TrustStore::from_authorities(domains));
    identity
        .set_svid_parts(chain, key)
        .map_err(|e| SourceError::BadSvid(e.to_string()))
}
