//! The control plane hosts its trust domain's CA for the cluster's node agents.
//!
//! An agent joins once with the cluster's bootstrap token (written to `<data-dir>/agent-token`,
//! mode 0600; it pins this CA) and receives `spiffe://<td>/fedmesh/agent/<node>`. With that
//! identity it asks for workload SVIDs by CSR — the keys stay on the node — and follows the
//! trust domain's own bundle plus every federated bundle the hub delivered.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::SpiffeId;
use fedmesh_api::pb::identity as pb;
use fedmesh_api::pb::identity::identity_server::{Identity, IdentityServer};
use fedmesh_trust::svid::new_key_and_csr;
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use futures::Stream;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::ControlPlane;
use crate::store::KvStore;
use crate::tokens::{self, JoinToken};

/// Agent identities live under this path; agents may not request anything under `/fedmesh/`.
const AGENT_PREFIX: &str = "/fedmesh/agent/";
const RESERVED_PREFIX: &str = "/fedmesh/";
const BOOTSTRAP_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest request message: a token, a node name, a CSR. tonic buffers a message whole before
/// the handler runs, and its 4 MiB default would let each stream of a flood hold 4 MiB.
pub const REQUEST_LIMIT: usize = 64 * 1024;

pub fn agent_id(cp: &ControlPlane, node: &str) -> Result<SpiffeId, String> {
    for label in node.split('.') {
        fedmesh_api::names::check_dns_label("node name", label).map_err(|e| e.to_string())?;
    }
    SpiffeId::new(&format!(
        "spiffe://{}{AGENT_PREFIX}{node}",
        cp.config.trust_domain
    ))
    .map_err(|e| e.to_string())
}

pub fn control_plane_id(cp: &ControlPlane) -> SpiffeId {
    SpiffeId::new(&format!(
        "spiffe://{}{}",
        cp.config.trust_domain,
        fedmesh_trust::workload::remote::CONTROL_PLANE_PATH
    ))
    .unwrap_or_else(|_| cp.config.trust_domain.to_spiffe_id())
}

struct IdentityService {
    cp: Arc<ControlPlane>,
}

impl IdentityService {
    /// The calling agent and its identity's serial, once checked to be an agent of this cluster.
    fn caller<T>(&self, req: &Request<T>) -> Result<(SpiffeId, Option<String>), Status> {
        let peer = fedmesh_trust::grpc::peer_info(req);
        let id = peer
            .as_ref()
            .and_then(|p| p.spiffe_id.clone())
            .ok_or_else(|| {
                Status::unauthenticated("no client certificate: join first with the agent token")
            })?;
        if id.trust_domain() != &self.cp.config.trust_domain || !id.path().starts_with(AGENT_PREFIX)
        {
            return Err(Status::permission_denied(format!(
                "{id} is not an agent of this cluster"
            )));
        }
        Ok((id, peer.and_then(|p| p.serial)))
    }

    /// The calling agent, if its identity belongs to its node's current registration.
    async fn agent<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        let (id, serial) = self.caller(req)?;
        super::agents::check(&*self.cp.db, &id, serial.as_deref(), None).await?;
        Ok(id)
    }

    fn workload_id(&self, s: &str) -> Result<SpiffeId, Status> {
        let id =
            SpiffeId::new(s).map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
        if id.trust_domain() != &self.cp.config.trust_domain {
            return Err(Status::permission_denied(format!(
                "{id} is not in trust domain {}; agents get IDs of their own cluster only",
                self.cp.config.trust_domain
            )));
        }
        if id.path().starts_with(RESERVED_PREFIX) {
            return Err(Status::permission_denied(format!(
                "{id} is reserved for fedmesh components"
            )));
        }
        Ok(id)
    }

    fn ttl(s: u64) -> Option<Duration> {
        (s > 0).then(|| Duration::from_secs(s))
    }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::Bundles, Status>> + Send>>;

#[tonic::async_trait]
impl Identity for IdentityService {
    type WatchBundlesStream = BundleStream;

    async fn join(
        &self,
        request: Request<pb::AgentJoinRequest>,
    ) -> Result<Response<pb::AgentJoinResponse>, Status> {
        let req = request.into_inner();
        let id = agent_id(&self.cp, &req.node).map_err(Status::invalid_argument)?;
        let token =
            JoinToken::parse(&req.token).map_err(|e| Status::unauthenticated(e.to_string()))?;
        tokens::consume_as(&*self.cp.db, &token, &req.node)
            .await
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let issued = self
            .cp
            .ca
            .sign_csr_for(&req.csr, &id, Some(Duration::from_secs(24 * 3600)))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let serial = issued
            .chain
            .first()
            .and_then(|c| fedmesh_trust::svid::inspect(c).ok())
            .map(|i| i.serial_hex)
            .ok_or_else(|| Status::internal("the CA issued no certificate"))?;
        // A new registration: identities issued to an earlier agent of this node stop working.
        super::agents::register(&*self.cp.db, &id, &serial).await?;
        tracing::info!(node = %req.node, %id, "agent joined");
        Ok(Response::new(pb::AgentJoinResponse {
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: self.cp.ca.bundle().to_json().into_bytes(),
        }))
    }

    async fn sign_x509_svid(
        &self,
        request: Request<pb::SignX509SvidRequest>,
    ) -> Result<Response<pb::SignX509SvidResponse>, Status> {
        let (agent, serial) = self.caller(&request)?;
        let req = request.into_inner();
        // An agent may renew its own identity; otherwise only workload IDs.
        let renewal = req.spiffe_id == agent.to_string();
        if !renewal {
            super::agents::check(&*self.cp.db, &agent, serial.as_deref(), None).await?;
        }
        let id = if renewal {
            agent.clone()
        } else {
            self.workload_id(&req.spiffe_id)?
        };
        let issued = self
            .cp
            .ca
            .sign_csr(&req.csr, Some(&id), Self::ttl(req.ttl_seconds))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if renewal {
            let next = issued
                .chain
                .first()
                .and_then(|c| fedmesh_trust::svid::inspect(c).ok())
                .map(|i| i.serial_hex);
            super::agents::check(&*self.cp.db, &agent, serial.as_deref(), next.as_deref()).await?;
        }
        Ok(Response::new(pb::SignX509SvidResponse {
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
        }))
    }

    async fn sign_jwt_svid(
        &self,
        request: Request<pb::SignJwtSvidRequest>,
    ) -> Result<Response<pb::SignJwtSvidResponse>, Status> {
        self.agent(&request).await?;
        let req = request.into_inner();
        let id = self.workload_id(&req.spiffe_id)?;
        let token = self
            .cp
            .ca
            .sign_jwt(&id, &req.audience, Self::ttl(req.ttl_seconds))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::SignJwtSvidResponse { token }))
    }

    async fn watch_bundles(
        &self,
        request: Request<pb::WatchBundlesRequest>,
    ) -> Result<Response<Self::WatchBundlesStream>, Status> {
        self.agent(&request).await?;
        let cp = self.cp.clone();
        let mut snap = cp.snapshot();
        let mut own = cp.ca.subscribe_bundle();
        let shutdown = cp.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<pb::Bundles> = None;
            loop {
                let current = bundles_now(&cp);
                if last.as_ref() != Some(&current) {
                    if tx.send(Ok(current.clone())).await.is_err() {
                        return;
                    }
                    last = Some(current);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = snap.changed() => if r.is_err() { return },
                    r = own.changed() => if r.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Our own bundle and every federated one the hub delivered (never our own from the hub).
fn bundles_now(cp: &ControlPlane) -> pb::Bundles {
    let mut bundles: HashMap<String, Vec<u8>> = HashMap::new();
    let cs = cp.clusterset.current();
    for (td, b) in &cs.bundles {
        if td != &cp.config.trust_domain {
            bundles.insert(td.to_string(), b.jwks.clone());
        }
    }
    bundles.insert(
        cp.config.trust_domain.to_string(),
        cp.ca.bundle().to_json().into_bytes(),
    );
    pb::Bundles { bundles }
}

/// The control plane's own server identity, with the signing CA appended so agents can pin it.
fn server_identity(cp: &ControlPlane) -> Result<MeshIdentity, String> {
    let ident = MeshIdentity::new();
    refresh_server_identity(cp, &ident)?;
    Ok(ident)
}

fn refresh_server_identity(cp: &ControlPlane, ident: &MeshIdentity) -> Result<(), String> {
    let id = control_plane_id(cp);
    let (key, csr) = new_key_and_csr(&id).map_err(|e| e.to_string())?;
    let issued = cp
        .ca
        .sign_csr(&csr, Some(&id), None)
        .map_err(|e| e.to_string())?;
    let bundle = cp.ca.bundle();
    let chain = crate::hub::with_active_ca(&cp.ca, issued.chain);
    let mut set = fedmesh_trust::bundle::BundleSet::new();
    set.update((*bundle).clone());
    ident.set_bundles(set);
    ident
        .set_svid_parts(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| e.to_string())
}

/// Makes sure a valid agent bootstrap token exists in `<data-dir>/agent-token` (0600), pinning
/// the CA's active authority (a new token once the CA rotated).
pub async fn ensure_agent_token(cp: &ControlPlane) -> Result<String, String> {
    let path = cp.config.data_dir.join("agent-token");
    if let Ok(raw) = fedmesh_trust::files::read_private(&path)
        && let Ok(t) = JoinToken::parse(String::from_utf8_lossy(&raw).trim())
        && let Ok(Some(kv)) = cp.db.get(&crate::hub::records::token_key(&t.id)).await
        && let Ok(r) = serde_json::from_slice::<crate::hub::records::TokenRecord>(&kv.value)
        && r.expires_unix > crate::hub::records::now_unix() + 24 * 3600
        && t.ca_pin == current_pin(cp)
    {
        return Ok(t.to_string());
    }
    let (t, _) = tokens::create_with(
        &*cp.db,
        None,
        None,
        true,
        BOOTSTRAP_TOKEN_TTL,
        &current_pin(cp),
    )
    .await
    .map_err(|e| e.to_string())?;
    fedmesh_trust::files::write_private(&path, format!("{t}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(t.to_string())
}

/// The active (signing) authority: the one our server chain carries. A prepared next authority
/// is in the bundle already but signs nothing until activated.
fn current_pin(cp: &ControlPlane) -> String {
    cp.ca
        .active_certificate()
        .map(|c| fedmesh_trust::grpc::ca_pin(&c))
        .unwrap_or_default()
}

/// Serves the Identity service (and, on the same port, the data-plane config) until `shutdown`.
pub fn serve(
    cp: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        // Subscribed before the token and the certificate are made, so no rotation slips past.
        let mut rotations = cp.ca.subscribe_bundle();
        if let Err(e) = ensure_agent_token(&cp).await {
            tracing::error!(error = %e, "cannot write the agent bootstrap token");
        }
        let ident = match server_identity(&cp) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "cannot issue the control plane's server identity");
                return;
            }
        };
        // Keep the server certificate fresh, and follow CA rotation: once another authority
        // signs, the served chain and the agent token's pin must name it.
        {
            let (cp, ident, shutdown) = (cp.clone(), ident.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    let rotated = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(600)) => false,
                        r = rotations.changed() => if r.is_err() { return } else { true },
                    };
                    if let Err(e) = refresh_server_identity(&cp, &ident) {
                        tracing::error!(error = %e, "cannot renew the control plane's server identity");
                    }
                    if rotated && let Err(e) = ensure_agent_token(&cp).await {
                        tracing::error!(error = %e, "cannot renew the agent bootstrap token");
                    }
                }
            });
        }
        let td = cp.config.trust_domain.clone();
        let authorizer = Authorizer::Custom {
            description: format!("only agents and data-plane components of {td}"),
            allow: Arc::new(move |id| id.trust_domain() == &td),
        };
        let tls = ident.server_config_optional_client_auth(authorizer, vec![b"h2".to_vec()]);
        let incoming = fedmesh_trust::grpc::incoming(listener, tls);
        let result = fedmesh_trust::grpc::server()
            .layer(fedmesh_trust::grpc::UnauthenticatedLimitLayer::new(&[
                "/fedmesh.identity.v1.Identity/Join",
            ]))
            .add_service(
                IdentityServer::new(IdentityService { cp: cp.clone() })
                    .max_decoding_message_size(REQUEST_LIMIT),
            )
            .add_service(
                super::config_stream::ConfigService {
                    cp: cp.clone(),
                    epoch: cp.config_epoch,
                    state: cp.dataplane_config(),
                }
                .into_server(),
            )
            .add_service(super::traces::start(
                cp.credentials.clone(),
                shutdown.clone(),
            ))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "control plane gRPC server failed");
        }
    });
}
