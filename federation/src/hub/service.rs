//! The hub's gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::pb::federation as pb;
use fedmesh_api::pb::federation::federation_server::{Federation, FederationServer};
use fedmesh_api::{ClusterName, FEDERATION_PROTOCOL_VERSION, TrustDomain};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{Hub, cluster_of};
use crate::tokens::{self, JoinToken};

#[derive(Clone)]
pub struct HubService {
    hub: Arc<Hub>,
}

impl HubService {
    pub fn new(hub: Arc<Hub>) -> FederationServer<Self> {
        FederationServer::new(Self { hub })
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<ClusterName, Status> {
        let id = fedmesh_trust::grpc::peer_id(req).ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: join first (`fedmesh control-plane --join-token ...`) and connect with the cluster identity",
            )
        })?;
        cluster_of(&self.hub.trust_domain(), &id).ok_or_else(|| {
            self.hub.metrics.refuse("not_a_cluster");
            Status::permission_denied(format!("{id} is not a cluster identity of this hub"))
        })
    }
}

fn check_protocol(v: u32) -> Result<(), Status> {
    if v > FEDERATION_PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "the control plane speaks federation protocol v{v}, this hub at most v{FEDERATION_PROTOCOL_VERSION}: upgrade the hub first"
        )));
    }
    if v == 0 {
        return Err(Status::invalid_argument(
            "protocol_version is missing (0); the control plane is too old or not fedmesh",
        ));
    }
    Ok(())
}

type HubStream = Pin<Box<dyn Stream<Item = Result<pb::HubMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for HubService {
    type FederateStream = HubStream;

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let remote = fedmesh_trust::grpc::peer_info(&request).and_then(|p| p.remote);
        let req = request.into_inner();
        let result = async {
            check_protocol(req.protocol_version)?;
            let cluster = ClusterName::new(&req.cluster)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let td = TrustDomain::new(&req.trust_domain)
                .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))?;
            if td == self.hub.trust_domain() {
                return Err(Status::invalid_argument(format!(
                    "{td} is the hub's own trust domain; a cluster needs its own"
                )));
            }
            let token =
                JoinToken::parse(&req.token).map_err(|e| Status::unauthenticated(e.to_string()))?;
            // Check what can be checked before burning the token.
            if let Some(other) = self
                .hub
                .view()
                .clusters()
                .find(|c| c.trust_domain == td && c.name != cluster)
            {
                return Err(Status::already_exists(format!(
                    "trust domain {td} already belongs to cluster {}; every cluster needs its own",
                    other.name
                )));
            }
            if let Some(existing) = self.hub.view().cluster(&cluster)
                && existing.trust_domain != td
            {
                return Err(Status::already_exists(format!(
                    "cluster {cluster} is registered with trust domain {}, not {td}",
                    existing.trust_domain
                )));
            }
            tokens::consume(&**self.hub.store(), &token, &cluster)
                .await
                .map_err(|e| match e {
                    tokens::TokenError::Store(s) => Status::unavailable(s.to_string()),
                    other => Status::permission_denied(other.to_string()),
                })?;
            self.hub
                .register(&cluster, &td)
                .await
                .map_err(Status::failed_precondition)?;
            let chain = self
                .hub
                .sign_cluster(&cluster, &req.csr)
                .map_err(Status::invalid_argument)?;
            tracing::info!(%cluster, trust_domain = %td, ?remote, "cluster joined");
            Ok(pb::JoinResponse {
                chain: chain.iter().map(|c| c.to_vec()).collect(),
                hub_bundle: self.hub.ca().bundle().to_json().into_bytes(),
                hub_trust_domain: self.hub.trust_domain().to_string(),
            })
        }
        .await;
        match &result {
            Ok(_) => self
                .hub
                .metrics
                .joins
                .get_or_create(&crate::metrics::ResultLabels {
                    result: "ok".into(),
                })
                .inc(),
            Err(s) => {
                tracing::warn!(cluster = %req.cluster, ?remote, error = %s.message(), "join refused");
                self.hub
                    .metrics
                    .joins
                    .get_or_create(&crate::metrics::ResultLabels {
                        result: "refused".into(),
                    })
                    .inc()
            }
        };
        result.map(Response::new)
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let cluster = self.caller(&request)?;
        let registered = self
            .hub
            .ensure_registered(&cluster)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !registered {
            return Err(Status::permission_denied(format!(
                "cluster {cluster} is no longer registered; join again with a new token"
            )));
        }
        let chain = self
            .hub
            .sign_cluster(&cluster, &request.get_ref().csr)
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(pb::RenewResponse {
            chain: chain.iter().map(|c| c.to_vec()).collect(),
            hub_bundle: self.hub.ca().bundle().to_json().into_bytes(),
        }))
    }

    async fn federate(
        &self,
        request: Request<Streaming<pb::ClusterMessage>>,
    ) -> Result<Response<Self::FederateStream>, Status> {
        let cluster = self.caller(&request)?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(pb::ClusterMessage {
                msg: Some(pb::cluster_message::Msg::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        check_protocol(hello.protocol_version)?;
        let registered = self
            .hub
            .ensure_registered(&cluster)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !registered {
            return Err(Status::permission_denied(format!(
                "cluster {cluster} is not registered (removed by an operator?); join again"
            )));
        }
        let (tx, rx) = mpsc::channel::<Result<pb::HubMessage, Status>>(32);
        tokio::spawn(run_stream(self.hub.clone(), cluster, hello, inbound, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn hub_msg(msg: pb::hub_message::Msg) -> Result<pb::HubMessage, Status> {
    Ok(pb::HubMessage { msg: Some(msg) })
}

async fn run_stream(
    hub: Arc<Hub>,
    cluster: ClusterName,
    hello: pb::Hello,
    mut inbound: Streaming<pb::ClusterMessage>,
    tx: mpsc::Sender<Result<pb::HubMessage, Status>>,
) {
    if let Err(e) = hub.mark_connected(&cluster, &hello).await {
        tracing::warn!(%cluster, error = %e, "cannot record connection");
    }
    hub.metrics.connected_clusters.inc();
    let mut revisions = hub.subscribe();
    // Resume when the cluster knows a version and we can compute what changed since.
    let (first, resumed) = match hello.resume_from {
        0 => (hub.view().snapshot(), false),
        since => match hub.delta_since(since).await {
            Some(u) => (u, true),
            None => (hub.view().snapshot(), false),
        },
    };
    let published = hub
        .view()
        .cluster(&cluster)
        .map(|c| c.published_version)
        .unwrap_or(0);
    tracing::info!(%cluster, resume_from = hello.resume_from, resumed, version = first.version, "cluster connected");
    if first.snapshot {
        hub.metrics.snapshots_sent.inc();
    } else {
        hub.metrics.updates_sent.inc();
    }
    let mut sent = first.version;
    let welcome = pb::Welcome {
        protocol_version: fedmesh_api::FEDERATION_PROTOCOL_VERSION,
        cluster: cluster.to_string(),
        resumed,
        published_version: published,
    };
    if tx
        .send(hub_msg(pb::hub_message::Msg::Welcome(welcome)))
        .await
        .is_err()
        || tx
            .send(hub_msg(pb::hub_message::Msg::Update(first)))
            .await
            .is_err()
    {
        return finish(&hub, &cluster, 0).await;
    }
    tracing::debug!(%cluster, "welcome and first update queued");
    let mut acked = 0u64;
    let mut heartbeat = tokio::time::interval(hub.config.heartbeat());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::ClusterMessage { msg: Some(m) })) => match m {
                    pb::cluster_message::Msg::Publish(p) => {
                        tracing::debug!(%cluster, version = p.version, upserts = p.upserts.len(), "publish received");
                        let result = match hub.apply_publish(&cluster, &p).await {
                            Ok(_) => {
                                hub.metrics.publishes.get_or_create(&crate::metrics::ResultLabels { result: "accepted".into() }).inc();
                                pb::PublishResult { version: p.version, accepted: true, error: String::new() }
                            }
                            Err(e) => {
                                tracing::warn!(%cluster, version = p.version, error = %e, "publish refused");
                                hub.metrics.publishes.get_or_create(&crate::metrics::ResultLabels { result: "refused".into() }).inc();
                                hub.metrics.refuse("publish");
                                pb::PublishResult { version: p.version, accepted: false, error: e }
                            }
                        };
                        if tx.send(hub_msg(pb::hub_message::Msg::PublishResult(result))).await.is_err() {
                            break;
                        }
                    }
                    pb::cluster_message::Msg::Ack(a) => {
                        if a.nack {
                            tracing::warn!(%cluster, version = a.version, error = %a.error, "cluster could not apply an update");
                        } else {
                            acked = acked.max(a.version);
                            hub.record_ack(&cluster, acked);
                        }
                    }
                    pb::cluster_message::Msg::Hello(_) => {
                        let _ = tx.send(Err(Status::invalid_argument("Hello may only be sent once"))).await;
                        break;
                    }
                },
                Ok(Some(pb::ClusterMessage { msg: None })) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(%cluster, error = %e, "stream from cluster ended");
                    break;
                }
            },
            changed = revisions.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = *revisions.borrow_and_update();
                if current <= sent {
                    continue;
                }
                let update = match hub.delta_since(sent).await {
                    Some(u) => u,
                    None => hub.view().snapshot(),
                };
                if update.snapshot {
                    hub.metrics.snapshots_sent.inc();
                } else if update.imports.is_empty() && update.removed_imports.is_empty()
                    && update.clusters.is_empty() && update.removed_clusters.is_empty()
                    && update.bundles.is_empty() && update.removed_bundles.is_empty()
                {
                    // Only presence or tokens changed: nothing for the cluster.
                    sent = update.version;
                    continue;
                } else {
                    hub.metrics.updates_sent.inc();
                }
                sent = update.version;
                if tx.send(hub_msg(pb::hub_message::Msg::Update(update))).await.is_err() {
                    break;
                }
            }
            _ = heartbeat.tick() => {
                if let Err(e) = hub.write_presence(&cluster, acked, true).await {
                    tracing::warn!(%cluster, error = %e, "cannot record presence");
                }
            }
            _ = tx.closed() => break,
            _ = hub.shutdown.cancelled() => break,
        }
    }
    finish(&hub, &cluster, acked).await;
}

async fn finish(hub: &Hub, cluster: &ClusterName, acked: u64) {
    hub.metrics.connected_clusters.dec();
    tracing::info!(%cluster, "cluster disconnected");
    let _ = hub.write_presence(cluster, acked, false).await;
}
