//! The agent's production mode: SVIDs signed by the control plane's CA.
//!
//! The agent joins its control plane once with a one-time token made for its node (which pins the
//! CA), keeps its own short-lived identity (`spiffe://<td>/fedmesh/agent/<node>`) in its data directory (key 0600)
//! and renews it, sends CSRs for workloads — keys never leave the node — and follows the trust
//! domain's bundle plus every federated bundle. Bundles are also kept on disk, so a restarted
//! agent serves them even while the control plane is unreachable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::pb::identity as pb;
use fedmesh_api::pb::identity::identity_client::IdentityClient;
use fedmesh_api::{SpiffeId, TrustDomain};
use futures::future::BoxFuture;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::signer::{SignError, SvidSigner};
use crate::bundle::{BundleSet, SpiffeBundle, der_to_pem, parse_pem_certificates};
use crate::svid::{inspect, new_key_and_csr};
use crate::tls::{Authorizer, MeshIdentity};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("joining the control plane at {addr}: {reason}")]
    Join { addr: String, reason: String },
    #[error("agent credentials in {dir}: {reason}")]
    Credentials { dir: PathBuf, reason: String },
    #[error(
        "this agent has not joined its control plane: pass --join-token-file with a token made for this node (fedmesh control-plane token create --node NAME --out FILE), or on Kubernetes --service-account-token-file with --control-plane-bundle"
    )]
    NotJoined,
}

/// How an agent proves its node on its first start.
pub enum JoinCredential {
    /// A one-time token made for this node; its last field pins the control plane's CA.
    Token(String),
    /// Kubernetes: the agent pod's projected service-account token (audience `fedmesh`), read
    /// from the file the kubelet keeps fresh; the control plane checks it with TokenReview and
    /// the pod's node. The control plane is verified with the trust bundle it publishes (the
    /// ConfigMap `fedmesh-ca-bundle`, key `bundle.spiffe`), mounted as `bundle_file`.
    ServiceAccount {
        token_file: PathBuf,
        bundle_file: PathBuf,
        trust_domain: TrustDomain,
    },
}

pub struct ControlPlaneSigner {
    trust_domain: TrustDomain,
    client: IdentityClient<tonic::transport::Channel>,
    bundles: watch::Sender<Arc<BundleSet>>,
    /// Where the agent's identity is kept, and the identity itself.
    dir: PathBuf,
    meta: AgentMeta,
    ident: MeshIdentity,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AgentMeta {
    control_plane: String,
    trust_domain: TrustDomain,
    node: String,
}

/// The control plane's SPIFFE ID path in its trust domain.
pub const CONTROL_PLANE_PATH: &str = "/fedmesh/control-plane";

fn control_plane_id(td: &TrustDomain) -> Option<SpiffeId> {
    SpiffeId::new(&format!("spiffe://{td}{CONTROL_PLANE_PATH}")).ok()
}

impl ControlPlaneSigner {
    /// Loads the agent's credentials from `dir`, or joins with `token` first, then starts
    /// following bundles. Must run inside a Tokio runtime; background work stops on `shutdown`.
    pub async fn start(
        addr: &str,
        dir: &Path,
        node: &str,
        credential: Option<&JoinCredential>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RemoteError> {
        let identity = match load(dir)? {
            Some(i) => i,
            None => {
                let credential = credential.ok_or(RemoteError::NotJoined)?;
                join(addr, dir, node, credential).await?;
                load(dir)?.ok_or(RemoteError::NotJoined)?
            }
        };
        let (meta, ident) = identity;
        let td = meta.trust_domain.clone();
        let config = ident.client_config(
            Authorizer::Ids(control_plane_id(&td).into_iter().collect()),
            vec![b"h2".to_vec()],
        );
        let channel = crate::grpc::channel(&meta.control_plane, config, "control-plane.fedmesh")
            .map_err(|reason| RemoteError::Credentials {
                dir: dir.to_path_buf(),
                reason,
            })?;
        let client = IdentityClient::new(channel);
        let saved = load_bundles(dir, &td);
        let me = Arc::new(Self {
            trust_domain: td,
            client,
            bundles: watch::Sender::new(Arc::new(saved)),
            dir: dir.to_path_buf(),
            meta,
            ident,
        });
        tokio::spawn(
            me.clone()
                .follow_bundles(dir.to_path_buf(), shutdown.clone()),
        );
        tokio::spawn(me.clone().keep_identity(shutdown));
        Ok(me)
    }

    async fn follow_bundles(self: Arc<Self>, dir: PathBuf, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut client = self.client.clone();
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = client.watch_bundles(pb::WatchBundlesRequest {}) => s,
            };
            match stream {
                Ok(s) => {
                    let mut s = s.into_inner();
                    loop {
                        let msg = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = s.message() => m,
                        };
                        match msg {
                            Ok(Some(b)) => {
                                backoff = Duration::from_millis(200);
                                self.apply_bundles(&dir, &b);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e.message(), "bundle stream from the control plane ended");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e.message(), retry_in = ?backoff, "cannot reach the control plane; serving the last bundles")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn apply_bundles(&self, dir: &Path, b: &pb::Bundles) {
        let mut set = BundleSet::new();
        for (td, jwks) in &b.bundles {
            let parsed = TrustDomain::new(td)
                .map_err(|e| e.to_string())
                .and_then(|td| SpiffeBundle::from_json(td, jwks).map_err(|e| e.to_string()));
            match parsed {
                Ok(bundle) => {
                    set.update(bundle);
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "ignoring an unusable bundle")
                }
            }
        }
        if set.get(&self.trust_domain).is_none() {
            tracing::warn!(
                "the control plane sent no bundle of our own trust domain; keeping the previous bundles"
            );
            return;
        }
        let doc: HashMap<String, String> = set
            .iter()
            .map(|b| (b.trust_domain().to_string(), b.to_json()))
            .collect();
        if let Err(e) = crate::files::write_public(
            &dir.join("bundles.json"),
            &serde_json::to_vec(&doc).unwrap_or_default(),
        ) {
            tracing::warn!(error = %e, "cannot save bundles");
        }
        self.bundles.send_if_modified(|cur| {
            if **cur == set {
                false
            } else {
                *cur = Arc::new(set);
                true
            }
        });
    }

    /// Renews the agent's own identity at half its life.
    async fn keep_identity(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let wait = self
                .ident
                .svid()
                .and_then(|s| {
                    s.not_after
                        .duration_since(std::time::SystemTime::now())
                        .ok()
                })
                .map(|left| left / 2)
                .unwrap_or(Duration::from_secs(10))
                .max(Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.renew_identity().await {
                Ok(id) => tracing::info!(%id, "renewed the agent identity"),
                Err(e) => tracing::warn!(error = %e, "cannot renew the agent identity; retrying"),
            }
        }
    }

    /// Renews the agent's own identity now (new key, same ID) and saves it; the control plane
    /// refuses a node it no longer knows.
    pub async fn renew_identity(&self) -> Result<SpiffeId, String> {
        let id = self
            .ident
            .spiffe_id()
            .ok_or("the agent holds no identity")?;
        let (key, csr) = new_key_and_csr(&id).map_err(|e| e.to_string())?;
        let resp = self
            .client
            .clone()
            .sign_x509_svid(pb::SignX509SvidRequest {
                spiffe_id: id.to_string(),
                csr,
                // The control plane decides a node identity's lifetime.
                ttl_seconds: 0,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let chain: Vec<CertificateDer<'static>> =
            resp.chain.into_iter().map(CertificateDer::from).collect();
        save(&self.dir, &self.meta, &chain, &key.serialize_der(), None)
            .map_err(|e| e.to_string())?;
        self.ident
            .set_svid_parts(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| e.to_string())?;
        Ok(id)
    }
}

impl SvidSigner for ControlPlaneSigner {
    fn trust_domain(&self) -> TrustDomain {
        self.trust_domain.clone()
    }

    fn sign_x509(
        &self,
        csr_der: Vec<u8>,
        id: SpiffeId,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<Vec<CertificateDer<'static>>, SignError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let resp = tokio::time::timeout(
                Duration::from_secs(10),
                client.sign_x509_svid(pb::SignX509SvidRequest {
                    spiffe_id: id.to_string(),
                    csr: csr_der,
                    ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
                }),
            )
            .await
            .map_err(|_| {
                SignError::Unavailable("the control plane did not answer within 10s".into())
            })?
            .map_err(|s| SignError::Unavailable(format!("control plane: {}", s.message())))?;
            Ok(resp
                .into_inner()
                .chain
                .into_iter()
                .map(CertificateDer::from)
                .collect())
        })
    }

    fn sign_jwt(
        &self,
        id: SpiffeId,
        audience: Vec<String>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<String, SignError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let resp = client
                .sign_jwt_svid(pb::SignJwtSvidRequest {
                    spiffe_id: id.to_string(),
                    audience,
                    ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
                })
                .await
                .map_err(|s| SignError::Unavailable(format!("control plane: {}", s.message())))?;
            Ok(resp.into_inner().token)
        })
    }

    fn bundles(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.bundles.subscribe()
    }
}

async fn join(
    addr: &str,
    dir: &Path,
    node: &str,
    credential: &JoinCredential,
) -> Result<(), RemoteError> {
    let fail = |reason: String| RemoteError::Join {
        addr: addr.to_string(),
        reason,
    };
    let alpn = vec![b"h2".to_vec()];
    let (config, token, service_account_token) = match credential {
        JoinCredential::Token(token) => {
            // The token's last field pins the control plane's CA (see fedmesh-federation's tokens).
            let pin = token
                .trim()
                .rsplit('.')
                .next()
                .filter(|p| p.len() == 64)
                .ok_or_else(|| fail("the join token is malformed".into()))?;
            let config = crate::grpc::pinned_ca_client_config(pin, CONTROL_PLANE_PATH, alpn)
                .map_err(fail)?;
            (config, token.trim().to_string(), String::new())
        }
        JoinCredential::ServiceAccount {
            token_file,
            bundle_file,
            trust_domain,
        } => {
            let read = |f: &Path| {
                std::fs::read(f).map_err(|e| fail(format!("reading {}: {e}", f.display())))
            };
            let sat = String::from_utf8(read(token_file)?)
                .map_err(|_| fail(format!("{} is not text", token_file.display())))?;
            let bundle = SpiffeBundle::from_json(trust_domain.clone(), &read(bundle_file)?)
                .map_err(|e| fail(format!("{}: {e}", bundle_file.display())))?;
            let ident = MeshIdentity::new();
            let mut set = BundleSet::new();
            set.update(bundle);
            ident.set_bundles(set);
            let mut config = (*ident.anonymous_client_config(Authorizer::Ids(
                control_plane_id(trust_domain).into_iter().collect(),
            )))
            .clone();
            config.alpn_protocols = alpn;
            (Arc::new(config), String::new(), sat.trim().to_string())
        }
    };
    let channel = crate::grpc::channel(addr, config, "control-plane.fedmesh").map_err(fail)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| fail(e.to_string()))?;
    let csr = crate::svid::csr_for(&key, &[]).map_err(|e| fail(e.to_string()))?;
    let resp = IdentityClient::new(channel)
        .join(pb::AgentJoinRequest {
            node: node.to_string(),
            token,
            csr,
            service_account_token,
        })
        .await
        .map_err(|s| fail(format!("{} ({:?})", s.message(), s.code())))?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> =
        resp.chain.into_iter().map(CertificateDer::from).collect();
    let leaf = chain
        .first()
        .ok_or_else(|| fail("no certificate returned".into()))?;
    let id = inspect(leaf).map_err(|e| fail(e.to_string()))?.spiffe_id;
    if !id.path().starts_with("/fedmesh/agent/") {
        return Err(fail(format!(
            "the control plane issued {id}, which is not an agent identity"
        )));
    }
    let meta = AgentMeta {
        control_plane: addr.to_string(),
        trust_domain: id.trust_domain().clone(),
        node: node.to_string(),
    };
    save(dir, &meta, &chain, &key.serialize_der(), Some(&resp.bundle))
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(%id, control_plane = addr, "agent joined its control plane");
    Ok(())
}

fn save(
    dir: &Path,
    meta: &AgentMeta,
    chain: &[CertificateDer<'static>],
    key: &[u8],
    own_bundle: Option<&[u8]>,
) -> Result<(), crate::files::FileError> {
    crate::files::create_private_dir(dir)?;
    crate::files::write_private(
        &dir.join("agent.key"),
        der_to_pem("PRIVATE KEY", key).as_bytes(),
    )?;
    let pem: String = chain.iter().map(|c| der_to_pem("CERTIFICATE", c)).collect();
    crate::files::write_public(&dir.join("agent.pem"), pem.as_bytes())?;
    if let Some(b) = own_bundle {
        crate::files::write_public(&dir.join("trust-bundle.json"), b)?;
    }
    crate::files::write_public(
        &dir.join("agent.json"),
        &serde_json::to_vec_pretty(meta).unwrap_or_default(),
    )
}

type Loaded = (AgentMeta, MeshIdentity);

fn load(dir: &Path) -> Result<Option<Loaded>, RemoteError> {
    let bad = |reason: String| RemoteError::Credentials {
        dir: dir.to_path_buf(),
        reason,
    };
    if !dir.join("agent.json").exists() {
        return Ok(None);
    }
    let meta: AgentMeta = serde_json::from_slice(
        &crate::files::read(&dir.join("agent.json")).map_err(|e| bad(e.to_string()))?,
    )
    .map_err(|e| bad(format!("agent.json: {e}")))?;
    let chain = parse_pem_certificates(
        &crate::files::read(&dir.join("agent.pem")).map_err(|e| bad(e.to_string()))?,
    )
    .map_err(bad)?;
    let key = PrivateKeyDer::from_pem_slice(
        &crate::files::read_private(&dir.join("agent.key")).map_err(|e| bad(e.to_string()))?,
    )
    .map_err(|e| bad(format!("agent.key: {e}")))?;
    let own = SpiffeBundle::from_json(
        meta.trust_domain.clone(),
        &crate::files::read(&dir.join("trust-bundle.json")).map_err(|e| bad(e.to_string()))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    let ident = MeshIdentity::new();
    let mut set = BundleSet::new();
    set.update(own);
    ident.set_bundles(set);
    ident
        .set_svid_parts(chain, key)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Some((meta, ident)))
}

fn load_bundles(dir: &Path, td: &TrustDomain) -> BundleSet {
    let mut set = BundleSet::new();
    if let Ok(raw) = crate::files::read(&dir.join("bundles.json"))
        && let Ok(doc) = serde_json::from_slice::<HashMap<String, String>>(&raw)
    {
        for (t, json) in doc {
            if let Ok(b) = TrustDomain::new(&t)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    SpiffeBundle::from_json(t, json.as_bytes()).map_err(|e| e.to_string())
                })
            {
                set.update(b);
            }
        }
    }
    if set.get(td).is_none()
        && let Ok(raw) = crate::files::read(&dir.join("trust-bundle.json"))
        && let Ok(b) = SpiffeBundle::from_json(td.clone(), &raw)
    {
        set.update(b);
    }
    set
}
