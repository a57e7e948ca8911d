//! The hub's gRPC service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::pb::federation as pb;
use fedmesh_api::pb::federation::federation_server::{Federation, FederationServer, SERVICE_NAME};
use fedmesh_api::{ClusterName, FEDERATION_PROTOCOL_VERSION, TrustDomain};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::registration::RegistrationError;
use super::{Hub, PublishError, cluster_of};
use crate::tokens::{self, JoinToken};

/// Publish results waiting for the writer (see `run_stream`).
const PUBLISH_RESULTS_QUEUE: usize = 64;

/// Largest Federate message (a full publish or snapshot of a big clusterset).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Largest request body of the unary calls (Join, Renew): a token and a CSR. Their callers may
/// not have authenticated yet, and tonic buffers a unary request whole before the handler runs,
/// so the Federate limit would let anyone make the hub hold 64 MiB per call.
pub const UNARY_REQUEST_LIMIT: usize = 64 * 1024;

/// The OTLP export method the federation port also serves ([`crate::hub::traces::intake`]).
const OTLP_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Caps the request body of every call: Federate at its message limit (checked by tonic), an
/// OTLP export at [`fedmesh_api::MAX_OTLP_EXPORT_BYTES`] (a batch of a cluster's spans), every
/// other call at [`UNARY_REQUEST_LIMIT`] (a tower request map for the hub's gRPC server).
pub fn limit_unary_requests(
    req: http::Request<tonic::body::Body>,
) -> http::Request<tonic::body::Body> {
    let path = req.uri().path();
    let federate = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(SERVICE_NAME))
        == Some("/Federate");
    if federate {
        return req;
    }
    let (limit, what) = if path == OTLP_EXPORT {
        (
            fedmesh_api::MAX_OTLP_EXPORT_BYTES,
            "the most one OTLP export may carry",
        )
    } else {
        (
            UNARY_REQUEST_LIMIT,
            "Join and Renew carry only a token and a CSR",
        )
    };
    req.map(|body| {
        let limited = http_body_util::Limited::new(body, limit);
        tonic::body::Body::new(http_body_util::BodyExt::map_err(
            limited,
            move |e: Box<dyn std::error::Error + Send + Sync>| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Status::resource_exhausted(format!(
                        "request larger than {} KiB ({what})",
                        limit / 1024
                    ))
                } else {
                    Status::from_error(e)
                }
            },
        ))
    })
}

#[derive(Clone)]
pub struct HubService {
    hub: Arc<Hub>,
}

impl HubService {
    pub fn new(hub: Arc<Hub>) -> FederationServer<Self> {
        FederationServer::new(Self { hub })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
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
            let chain = self
                .hub
                .join(&token, &cluster, &td, &req.csr)
                .await
                .map_err(registration_status)?;
            tracing::info!(%cluster, trust_domain = %td, ?remote, "cluster joined");
            let from = remote.map(|r| format!(" from {r}")).unwrap_or_default();
            self.hub
                .audit(
                    &format!("cluster {cluster}"),
                    "cluster.join",
                    cluster.as_str(),
                    format!("trust domain {td}, join token {}{from}", token.id),
                )
                .await;
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
        let serial = fedmesh_trust::grpc::peer_info(&request).and_then(|p| p.serial);
        let chain = self
            .hub
            .renew_registration(&cluster, serial.as_deref(), &request.get_ref().csr)
            .await
            .map_err(registration_status)?;
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
        let serial = fedmesh_trust::grpc::peer_info(&request).and_then(|p| p.serial);
        self.hub
            .check_registration(&cluster, serial.as_deref())
            .await
            .map_err(registration_status)?;
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

fn registration_status(e: RegistrationError) -> Status {
    match e {
        RegistrationError::Token(tokens::TokenError::Store(s)) | RegistrationError::Store(s) => {
            Status::unavailable(s.to_string())
        }
        e @ (RegistrationError::OtherTrustDomain { .. }
        | RegistrationError::TrustDomainTaken { .. }) => Status::already_exists(e.to_string()),
        e @ RegistrationError::BadCsr(_) => Status::invalid_argument(e.to_string()),
        e @ RegistrationError::Concurrent(_) => Status::aborted(e.to_string()),
        other => Status::permission_denied(other.to_string()),
    }
}

fn hub_msg(msg: pb::hub_message::Msg) -> Result<pb::HubMessage, Status> {
    Ok(pb::HubMessage { msg: Some(msg) })
}

/// One cluster's Federate stream. Reading and writing are separate tasks: the writer may wait
/// for a slow cluster to read, while the reader keeps taking acks and publishes (it waits for the
/// writer only when a client pipelines more publishes than the results queue holds). The
/// control plane reads just as independently, so neither side can stall the other. Updates
/// coalesce: the writer always sends what changed since what it last sent.
async fn run_stream(
    hub: Arc<Hub>,
    cluster: ClusterName,
    hello: pb::Hello,
    inbound: Streaming<pb::ClusterMessage>,
    tx: mpsc::Sender<Result<pb::HubMessage, Status>>,
) {
    if let Err(e) = hub.mark_connected(&cluster, &hello).await {
        tracing::warn!(%cluster, error = %e, "cannot record connection");
    }
    hub.metrics.connected_clusters.inc();
    let session = CancellationToken::new();
    // A control plane has one publish in flight; a client pipelining more than this many without
    // reading the answers is slowed down (its stream, not others).
    let (results_tx, results_rx) = mpsc::channel::<pb::PublishResult>(PUBLISH_RESULTS_QUEUE);
    let writer = tokio::spawn(send_to_cluster(
        hub.clone(),
        cluster.clone(),
        hello.resume_from,
        hello.update_parts,
        tx.clone(),
        results_rx,
        session.clone(),
    ));
    let acked = receive_from_cluster(&hub, &cluster, inbound, &tx, &results_tx, &session).await;
    session.cancel();
    let _ = writer.await;
    finish(&hub, &cluster, acked).await;
}

/// Sends `msg` unless the session ends first; false when the stream is done.
async fn deliver(
    tx: &mpsc::Sender<Result<pb::HubMessage, Status>>,
    session: &CancellationToken,
    msg: pb::hub_message::Msg,
) -> bool {
    tokio::select! {
        r = tx.send(hub_msg(msg)) => r.is_ok(),
        _ = session.cancelled() => false,
    }
}

/// Sends `u` whole, or in parts when the cluster takes them; false when the stream is done.
async fn deliver_update(
    tx: &mpsc::Sender<Result<pb::HubMessage, Status>>,
    session: &CancellationToken,
    u: pb::Update,
    parts: bool,
) -> bool {
    let parts = if parts {
        crate::update_parts::split(u, crate::update_parts::IMPORTS_PER_PART)
    } else {
        vec![u]
    };
    for p in parts {
        if !deliver(tx, session, pb::hub_message::Msg::Update(p)).await {
            return false;
        }
    }
    true
}

/// The writer: Welcome, the first update (a delta when the cluster can resume, else a snapshot),
/// then coalesced updates and publish results until the session ends.
async fn send_to_cluster(
    hub: Arc<Hub>,
    cluster: ClusterName,
    resume_from: u64,
    parts: bool,
    tx: mpsc::Sender<Result<pb::HubMessage, Status>>,
    mut results: mpsc::Receiver<pb::PublishResult>,
    session: CancellationToken,
) {
    // Whichever half ends first ends the other.
    let _end = session.clone().drop_guard();
    let mut revisions = hub.subscribe();
    let (first, resumed) = match resume_from {
        0 => (hub.view().snapshot(), false),
        since => match hub.delta_since(since).await {
            Some(u) => (u, true),
            None => (hub.view().snapshot(), false),
        },
    };
    let published = hub.published_version(&cluster).await;
    tracing::info!(%cluster, resume_from, resumed, version = first.version, "cluster connected");
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
    if !deliver(&tx, &session, pb::hub_message::Msg::Welcome(welcome)).await
        || !deliver_update(&tx, &session, first, parts).await
    {
        return;
    }
    tracing::debug!(%cluster, "welcome and first update sent");
    loop {
        tokio::select! {
            _ = session.cancelled() => return,
            _ = hub.shutdown.cancelled() => return,
            _ = tx.closed() => return,
            result = results.recv() => {
                let Some(r) = result else { return };
                if !deliver(&tx, &session, pb::hub_message::Msg::PublishResult(r)).await {
                    return;
                }
            }
            changed = revisions.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = *revisions.borrow_and_update();
                if current <= sent {
                    continue;
                }
                if hub.view().cluster(&cluster).is_none() {
                    // An operator removed the cluster: its certificate still verifies, but it is
                    // no member any more and must not go on reading the clusterset.
                    tracing::warn!(%cluster, "cluster removed from the clusterset; ending its stream");
                    let _ = tx.try_send(Err(Status::permission_denied(format!(
                        "cluster {cluster} was removed from the clusterset; join again with a new token to come back"
                    ))));
                    return;
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
                if !deliver_update(&tx, &session, update, parts).await {
                    return;
                }
            }
        }
    }
}

/// The reader: applies publishes, records acks, keeps the presence record fresh. Returns the
/// last acknowledged version.
async fn receive_from_cluster(
    hub: &Hub,
    cluster: &ClusterName,
    mut inbound: Streaming<pb::ClusterMessage>,
    tx: &mpsc::Sender<Result<pb::HubMessage, Status>>,
    results: &mpsc::Sender<pb::PublishResult>,
    session: &CancellationToken,
) -> u64 {
    let mut acked = 0u64;
    let mut heartbeat = tokio::time::interval(hub.config.heartbeat());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(pb::ClusterMessage { msg: Some(m) })) => match m {
                    pb::cluster_message::Msg::Publish(p) => {
                        tracing::debug!(%cluster, version = p.version, upserts = p.upserts.len(), "publish received");
                        let result = match hub.apply_publish(cluster, &p).await {
                            Ok(_) => {
                                hub.metrics.publishes.get_or_create(&crate::metrics::ResultLabels { result: "accepted".into() }).inc();
                                pb::PublishResult { version: p.version, accepted: true, error: String::new() }
                            }
                            Err(PublishError::Refused(e)) => {
                                tracing::warn!(%cluster, version = p.version, error = %e, "publish refused");
                                hub.metrics.publishes.get_or_create(&crate::metrics::ResultLabels { result: "refused".into() }).inc();
                                hub.metrics.refuse("publish");
                                pb::PublishResult { version: p.version, accepted: false, error: e }
                            }
                            Err(e @ PublishError::Unavailable(_)) => {
                                // Not the cluster's fault: end the stream; it reconnects and
                                // publishes again (in full, as the hub's version did not move).
                                tracing::warn!(%cluster, version = p.version, error = %e, "cannot apply a publish; ending the stream");
                                let _ = tx.try_send(Err(Status::unavailable(e.to_string())));
                                break;
                            }
                        };
                        let queued = tokio::select! {
                            r = results.send(result) => r.is_ok(),
                            _ = session.cancelled() => false,
                        };
                        if !queued {
                            break;
                        }
                    }
                    pb::cluster_message::Msg::Ack(a) => {
                        if a.nack {
                            hub.metrics.nacks.inc();
                            tracing::warn!(%cluster, version = a.version, error = %a.error, "cluster could not apply an update; it reconnects and resumes from its last version");
                        } else {
                            acked = acked.max(a.version);
                            hub.record_ack(cluster, acked);
                        }
                    }
                    pb::cluster_message::Msg::Demand(d) => {
                        // In memory only, and answered at once: a share moves every few seconds.
                        let shares = hub.quotas.report(cluster, &d);
                        if !deliver(tx, session, pb::hub_message::Msg::Shares(shares)).await {
                            break;
                        }
                    }
                    pb::cluster_message::Msg::Traffic(t) => hub.plaintext.record(cluster, t),
                    pb::cluster_message::Msg::Proxies(p) => hub.proxies.record(cluster, p),
                    pb::cluster_message::Msg::Probes(p) => hub.probes.record(cluster, p),
                    pb::cluster_message::Msg::Rollouts(r) => {
                        // In memory only, and answered at once, as demand is; each new decision
                        // goes to the audit log.
                        let (gates, decided) = hub.rollouts.report(cluster, r);
                        for n in decided {
                            let d = &n.decision;
                            let numbers = match (d.success_rate, d.latency_p99_ms) {
                                (Some(s), Some(l)) => format!(" [{} requests, {s:.2}% success, p99 {l:.1} ms]", d.requests),
                                _ => String::new(),
                            };
                            hub.audit(
                                &format!("cluster {cluster}"),
                                "rollout.decision",
                                &n.rollout,
                                format!("{}: {}% to the canary at step {}: {}{numbers}", d.action, d.canary_weight, d.step, d.message),
                            )
                            .await;
                        }
                        if !gates.rollouts.is_empty()
                            && !deliver(tx, session, pb::hub_message::Msg::Gates(gates)).await
                        {
                            break;
                        }
                    }
                    pb::cluster_message::Msg::Hello(_) => {
                        let _ = tx.try_send(Err(Status::invalid_argument("Hello may only be sent once")));
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
            _ = heartbeat.tick() => {
                if let Err(e) = hub.write_presence(cluster, acked, true).await {
                    tracing::warn!(%cluster, error = %e, "cannot record presence");
                }
            }
            _ = session.cancelled() => break,
            _ = hub.shutdown.cancelled() => break,
        }
    }
    acked
}

async fn finish(hub: &Hub, cluster: &ClusterName, acked: u64) {
    hub.metrics.connected_clusters.dec();
    tracing::info!(%cluster, "cluster disconnected");
    let _ = hub.write_presence(cluster, acked, false).await;
}
