//! The control plane hosts its trust domain's CA for the cluster's node agents.
//!
//! An agent joins once with a one-time token made for its node (`fedmesh control-plane token
//! create --node NAME`; it pins this CA) and receives `spiffe://<td>/fedmesh/agent/<node>`, a
//! short-lived identity it renews while its node stays registered. With that identity it asks
//! for workload SVIDs by CSR — the keys stay on the node — for the workloads its node may host
//! ([`super::nodes`]), and follows the trust domain's own bundle plus every federated bundle the
//! hub delivered.

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
use super::attest::AttestError;
use crate::metrics::ControlPlaneMetrics;
use crate::tokens::{self, JoinToken};

/// Agent identities live under this path; agents may not request anything under `/fedmesh/`.
const AGENT_PREFIX: &str = "/fedmesh/agent/";
pub(super) const RESERVED_PREFIX: &str = "/fedmesh/";
/// A node identity's lifetime: a node removed from the cluster loses its identity within it.
pub const NODE_IDENTITY_TTL: Duration = Duration::from_secs(3600);
/// Largest request message: a token, a node name, a CSR. tonic buffers a message whole before
/// the handler runs, and its 4 MiB default would let each stream of a flood hold 4 MiB.
pub const REQUEST_LIMIT: usize = 64 * 1024;

pub fn agent_id(cp: &ControlPlane, node: &str) -> Result<SpiffeId, String> {
    super::nodes::check_node(node)?;
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

    /// The workload identity `s`, if the calling agent's node may host it; refusals are
    /// counted and logged with the node and the reason.
    async fn workload_id(&self, agent: &SpiffeId, s: &str) -> Result<SpiffeId, Status> {
        let node = super::agents::node_of(agent);
        let id = super::nodes::check_workload_id(&self.cp, s).map_err(|e| {
            self.refused(node, "invalid_id", &e);
            Status::permission_denied(e)
        })?;
        if let Err(r) = super::nodes::may_host(&self.cp, node, &id).await {
            self.refused(node, r.reason(), &r.to_string());
            return Err(match r {
                super::nodes::Refusal::Store { .. } => Status::unavailable(r.to_string()),
                _ => Status::permission_denied(r.to_string()),
            });
        }
        ControlPlaneMetrics::count(&self.cp.metrics.svids, node, "issued");
        Ok(id)
    }

    fn refused(&self, node: &str, reason: &str, message: &str) {
        ControlPlaneMetrics::count(&self.cp.metrics.svids, node, reason);
        tracing::warn!(node, reason, "refused an SVID: {message}");
    }

    /// Checks and consumes a node's one-time join token; the refusal carries its metrics label.
    async fn check_join_token(
        &self,
        raw: &str,
        node: &str,
    ) -> Result<String, (&'static str, Status)> {
        let token = JoinToken::parse(raw)
            .map_err(|e| ("bad_token", Status::unauthenticated(e.to_string())))?;
        // Node tokens only: a token without a node (the shared bootstrap token of earlier
        // versions) would let one secret claim every node.
        let (record, _) = tokens::check(&*self.cp.db, &token, node)
            .await
            .map_err(|e| ("bad_token", Status::permission_denied(e.to_string())))?;
        if record.subject.is_none() || record.reusable {
            return Err((
                "shared_token",
                Status::permission_denied(format!(
                    "join token {} is not bound to a node; create one for this node: fedmesh control-plane token create --node {node}",
                    token.id
                )),
            ));
        }
        tokens::consume_as(&*self.cp.db, &token, node)
            .await
            .map_err(|e| ("bad_token", Status::permission_denied(e.to_string())))?;
        Ok(format!("join token {}", token.id))
    }

    /// On Kubernetes, a node deleted from the cluster may not renew its agent's identity.
    async fn check_node_exists(&self, agent: &SpiffeId) -> Result<(), Status> {
        let Some(attestor) = &self.cp.k8s_attestor else {
            return Ok(());
        };
        let node = super::agents::node_of(agent);
        match attestor.node_exists(node).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                ControlPlaneMetrics::count(&self.cp.metrics.svids, node, "node_deleted");
                tracing::warn!(
                    node,
                    "refused to renew an agent identity: the node no longer exists"
                );
                Err(Status::permission_denied(format!(
                    "node {node} no longer exists in the cluster; its agent identity is not renewed"
                )))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
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
        let refuse = |result: &str, status: Status| {
            ControlPlaneMetrics::count(&self.cp.metrics.joins, &req.node, result);
            tracing::warn!(node = %req.node, "refused an agent's join: {}", status.message());
            status
        };
        let via = if req.service_account_token.is_empty() {
            self.check_join_token(&req.token, &req.node)
                .await
                .map_err(|(result, status)| refuse(result, status))?
        } else {
            if !req.token.is_empty() {
                return Err(refuse(
                    "bad_request",
                    Status::invalid_argument(
                        "send a join token or a service-account token, not both",
                    ),
                ));
            }
            let Some(attestor) = &self.cp.k8s_attestor else {
                return Err(refuse(
                    "not_kubernetes",
                    Status::failed_precondition(format!(
                        "this control plane does not run on Kubernetes, so it cannot check a service-account token; join with a node token: fedmesh control-plane token create --node {}",
                        req.node
                    )),
                ));
            };
            let pod = attestor
                .attest(&req.service_account_token, &req.node)
                .await
                .map_err(|e| {
                    let status = match e {
                        AttestError::Api(_) => Status::unavailable(e.to_string()),
                        _ => Status::permission_denied(e.to_string()),
                    };
                    refuse(e.reason(), status)
                })?;
            format!("the service-account token of pod {pod}")
        };
        let issued = self
            .cp
            .ca
            .sign_csr_for(&req.csr, &id, Some(NODE_IDENTITY_TTL))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let serial = issued
            .chain
            .first()
            .and_then(|c| fedmesh_trust::svid::inspect(c).ok())
            .map(|i| i.serial_hex)
            .ok_or_else(|| Status::internal("the CA issued no certificate"))?;
        // A new registration: identities issued to an earlier agent of this node stop working.
        super::agents::register(&*self.cp.db, &id, &serial).await?;
        ControlPlaneMetrics::count(&self.cp.metrics.joins, &req.node, "joined");
        tracing::info!(node = %req.node, %id, %via, "agent joined");
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
        let (id, ttl) = if renewal {
            self.check_node_exists(&agent).await?;
            (agent.clone(), Some(NODE_IDENTITY_TTL))
        } else {
            (
                self.workload_id(&agent, &req.spiffe_id).await?,
                Self::ttl(req.ttl_seconds),
            )
        };
        let issued = self
            .cp
            .ca
            .sign_csr(&req.csr, Some(&id), ttl)
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
        let agent = self.agent(&request).await?;
        let req = request.into_inner();
        let id = self.workload_id(&agent, &req.spiffe_id).await?;
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
        let mut federated = cp.federated.subscribe();
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
                    r = federated.changed() => if r.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Our own bundle, every clusterset one the hub delivered (never our own from the hub), and
/// those of the trust domains outside the clusterset we federate with.
fn bundles_now(cp: &ControlPlane) -> pb::Bundles {
    let mut bundles: HashMap<String, Vec<u8>> = HashMap::new();
    // First, so the clusterset's and our own always win (a FederatedTrustDomain naming one of
    // them is refused anyway).
    for b in cp.federated.bundles() {
        bundles.insert(b.trust_domain().to_string(), b.to_json().into_bytes());
    }
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

/// The active (signing) authority: the one our server chain carries. A prepared next authority
/// is in the bundle already but signs nothing until activated.
pub(super) fn current_pin(cp: &ControlPlane) -> String {
    cp.ca
        .active_certificate()
        .map(|c| fedmesh_trust::grpc::ca_pin(&c))
        .unwrap_or_default()
}

/// The control plane's own SVID (`spiffe://<td>/fedmesh/control-plane`), kept fresh and following
/// CA rotation until `shutdown`: once another authority signs, the served chain must name it
/// (node tokens made from then on pin it).
pub(super) fn own_identity(
    cp: &Arc<ControlPlane>,
    shutdown: &CancellationToken,
) -> Result<MeshIdentity, String> {
    // Subscribed before the certificate is made, so no rotation slips past.
    let mut rotations = cp.ca.subscribe_bundle();
    let ident = server_identity(cp)?;
    let (cp, renewed, shutdown) = (cp.clone(), ident.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut failed = false;
        loop {
            // At half the certificate's remaining life (it lives --svid-ttl), as agents renew
            // theirs; soon again after a failure.
            let wait = if failed {
                Duration::from_secs(5)
            } else {
                renew_in(renewed.svid().map(|s| s.not_after))
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                r = rotations.changed() => if r.is_err() { return },
            }
            failed = match refresh_server_identity(&cp, &renewed) {
                Ok(()) => false,
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the control plane's server identity; retrying in 5s");
                    true
                }
            };
        }
    });
    Ok(ident)
}

/// How long until a certificate expiring at `not_after` is due for renewal: half its remaining
/// life, at least a second.
fn renew_in(not_after: Option<std::time::SystemTime>) -> Duration {
    not_after
        .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
        .map_or(Duration::from_secs(1), |left| left / 2)
        .max(Duration::from_secs(1))
}

/// Serves the trust domain's bundle at a SPIFFE bundle endpoint (`https_spiffe` with the control
/// plane's SVID, or `https_web` with `web`'s certificate chain and key), for trust domains
/// outside the clusterset (a SPIRE server) to federate with.
pub fn serve_bundle_endpoint(
    cp: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    web: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        PrivateKeyDer<'static>,
    )>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    use fedmesh_trust::endpoint::ServerProfile;
    let profile = match web {
        Some((chain, key)) => ServerProfile::HttpsWeb { chain, key },
        None => ServerProfile::HttpsSpiffe {
            identity: own_identity(&cp, &shutdown)?,
        },
    };
    let bundle = cp.ca.subscribe_bundle();
    tokio::spawn(async move {
        if let Err(e) =
            fedmesh_trust::endpoint::serve(listener, profile, bundle, shutdown.cancelled_owned())
                .await
        {
            tracing::error!(error = %e, "the bundle endpoint stopped");
        }
    });
    Ok(())
}

/// Serves the Identity service (and, on the same port, the data-plane config) until `shutdown`.
pub fn serve(
    cp: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let ident = match own_identity(&cp, &shutdown) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "cannot issue the control plane's server identity");
                return;
            }
        };
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
