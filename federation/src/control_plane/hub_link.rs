//! The control plane's link to the hub: join once with a token, keep the hub identity on disk,
//! renew it, and run the Federate stream — reconnecting with backoff, resuming from the last
//! acknowledged view version, and publishing this cluster's exports, bundle and gateways.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fedmesh_api::pb::federation as pb;
use fedmesh_api::pb::federation::federation_client::FederationClient;
use fedmesh_api::{ClusterName, FEDERATION_PROTOCOL_VERSION, ServiceKey, TrustDomain};
use fedmesh_trust::bundle::{BundleSet, SpiffeBundle};
use fedmesh_trust::svid::{inspect, new_key_and_csr};
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::state::ClusterSetStore;
use crate::tokens::JoinToken;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("joining the hub at {addr}: {reason}")]
    Join { addr: String, reason: String },
    #[error("hub credentials in {dir}: {reason}")]
    Credentials { dir: PathBuf, reason: String },
    #[error(
        "this control plane has not joined a hub yet: pass --join-token (create one with `fedmesh hub token create --cluster NAME --trust-domain TD`)"
    )]
    NotJoined,
}

/// What this cluster publishes: kept up to date by the source and the CA.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub exports: BTreeMap<ServiceKey, pb::Export>,
    pub bundle: Option<pb::Bundle>,
    pub gateways: Vec<String>,
    /// Routes and policies not fully accepted, and exports that cannot be exported, for the
    /// clusterset's status.
    pub problems: Vec<pb::ObjectProblem>,
    /// The routes in force, rule by rule (for `fedmesh explain`).
    pub routes: Vec<pb::RouteSummary>,
}

/// The hub's verdict on each of our exports, for ServiceExport conditions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PublishStatus {
    /// Connected to the hub right now.
    pub connected: bool,
    /// Exports the hub has accepted (the version that contained them).
    pub accepted: BTreeMap<ServiceKey, pb::Export>,
    /// The last refusal, if the last publish was refused.
    pub refused: Option<String>,
}

/// The cluster's hub identity, as kept in `<data-dir>/hub/`.
pub struct HubCredentials {
    dir: PathBuf,
    /// Every hub replica's address (`host:port`, comma-separated on the command line).
    pub hub_addr: String,
    pub hub_trust_domain: TrustDomain,
    pub identity: MeshIdentity,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CredentialsMeta {
    hub_addr: String,
    hub_trust_domain: TrustDomain,
    cluster: ClusterName,
}

impl HubCredentials {
    /// Loads credentials saved by an earlier join, if any.
    pub fn load(dir: &Path) -> Result<Option<Self>, LinkError> {
        let bad = |reason: String| LinkError::Credentials {
            dir: dir.to_path_buf(),
            reason,
        };
        let meta_path = dir.join("hub.json");
        if !meta_path.exists() {
            return Ok(None);
        }
        let meta: CredentialsMeta = serde_json::from_slice(
            &fedmesh_trust::files::read(&meta_path).map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(format!("hub.json: {e}")))?;
        let (chain, key) = fedmesh_trust::files::read_chain_and_key(
            &dir.join("identity.pem"),
            &dir.join("identity.key"),
        )
        .map_err(bad)?;
        let bundle_json = fedmesh_trust::files::read(&dir.join("hub-bundle.json"))
            .map_err(|e| bad(e.to_string()))?;
        let bundle = SpiffeBundle::from_json(meta.hub_trust_domain.clone(), &bundle_json)
            .map_err(|e| bad(e.to_string()))?;
        let identity = MeshIdentity::new();
        let mut set = BundleSet::new();
        set.update(bundle);
        identity.set_bundles(set);
        identity
            .set_svid_parts(chain, key)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Some(Self {
            dir: dir.to_path_buf(),
            hub_addr: meta.hub_addr,
            hub_trust_domain: meta.hub_trust_domain,
            identity,
        }))
    }

    fn save(
        dir: &Path,
        meta: &CredentialsMeta,
        chain: &[CertificateDer<'static>],
        key_pkcs8: &[u8],
        bundle_json: &[u8],
    ) -> Result<(), LinkError> {
        let bad = |e: fedmesh_trust::files::FileError| LinkError::Credentials {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        };
        fedmesh_trust::files::create_private_dir(dir).map_err(bad)?;
        let pem: String = chain
            .iter()
            .map(|c| fedmesh_trust::bundle::der_to_pem("CERTIFICATE", c))
            .collect();
        fedmesh_trust::files::write_private(
            &dir.join("identity.key"),
            fedmesh_trust::bundle::der_to_pem("PRIVATE KEY", key_pkcs8).as_bytes(),
        )
        .map_err(bad)?;
        fedmesh_trust::files::write_public(&dir.join("identity.pem"), pem.as_bytes())
            .map_err(bad)?;
        fedmesh_trust::files::write_public(&dir.join("hub-bundle.json"), bundle_json)
            .map_err(bad)?;
        fedmesh_trust::files::write_public(
            &dir.join("hub.json"),
            &serde_json::to_vec_pretty(meta).unwrap_or_default(),
        )
        .map_err(bad)?;
        Ok(())
    }

    /// Joins the hub at `addr` with a one-time token, verifying the hub by the CA pinned in the
    /// token, and saves the issued identity in `dir`.
    pub async fn join(
        dir: &Path,
        addr: &str,
        token: &str,
        cluster: &ClusterName,
        trust_domain: &TrustDomain,
    ) -> Result<Self, LinkError> {
        let fail = |reason: String| LinkError::Join {
            addr: addr.to_string(),
            reason,
        };
        let token = JoinToken::parse(token).map_err(|e| fail(e.to_string()))?;
        let config = fedmesh_trust::grpc::pinned_ca_client_config(
            &token.ca_pin,
            crate::hub::HUB_SERVER_PATH,
            vec![b"h2".to_vec()],
        )
        .map_err(fail)?;
        let first = split_addrs(addr)
            .into_iter()
            .next()
            .ok_or_else(|| fail("no hub address".into()))?;
        let channel = fedmesh_trust::grpc::channel(&first, config, "hub.fedmesh").map_err(fail)?;
        // The hub decides our ID (spiffe://<hub trust domain>/cluster/<name>); the CSR only
        // carries our public key. The private key never leaves this process.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(e.to_string()))?;
        let csr = fedmesh_trust::svid::csr_for(&key, &[]).map_err(|e| fail(e.to_string()))?;
        let req = pb::JoinRequest {
            cluster: cluster.to_string(),
            token: token.to_string(),
            csr,
            trust_domain: trust_domain.to_string(),
            protocol_version: FEDERATION_PROTOCOL_VERSION,
        };
        let resp = FederationClient::new(channel)
            .join(req)
            .await
            .map_err(|s| fail(format!("{} ({:?})", s.message(), s.code())))?
            .into_inner();
        let hub_td = TrustDomain::new(&resp.hub_trust_domain).map_err(|e| fail(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> =
            resp.chain.into_iter().map(CertificateDer::from).collect();
        let leaf = chain
            .first()
            .ok_or_else(|| fail("the hub returned no certificate".into()))?;
        let issued = inspect(leaf).map_err(|e| fail(e.to_string()))?;
        if issued.spiffe_id != crate::hub::cluster_id(&hub_td, cluster) {
            return Err(fail(format!(
                "the hub issued {} instead of a cluster identity for {cluster}",
                issued.spiffe_id
            )));
        }
        let meta = CredentialsMeta {
            hub_addr: addr.to_string(),
            hub_trust_domain: hub_td,
            cluster: cluster.clone(),
        };
        Self::save(dir, &meta, &chain, &key.serialize_der(), &resp.hub_bundle)?;
        tracing::info!(%cluster, hub = addr, id = %issued.spiffe_id, "joined the hub");
        Self::load(dir)?.ok_or_else(|| fail("credentials vanished after saving".into()))
    }

    /// The hub replicas' addresses.
    pub fn addresses(&self) -> Vec<String> {
        split_addrs(&self.hub_addr)
    }

    /// A channel to the first hub replica, authenticated with our cluster identity.
    pub fn channel(&self) -> Result<tonic::transport::Channel, String> {
        self.channel_to(0)
    }

    /// A channel to hub replica `i` (modulo the number of replicas).
    pub fn channel_to(&self, i: usize) -> Result<tonic::transport::Channel, String> {
        let addrs = self.addresses();
        let addr = addrs
            .get(i % addrs.len().max(1))
            .ok_or("no hub address configured")?;
        fedmesh_trust::grpc::channel(addr, self.client_tls(vec![b"h2".to_vec()]), "hub.fedmesh")
    }

    /// A TLS client config that authenticates as this cluster and accepts only the hub's server
    /// identity, offering `alpn` (for the hub's other ports: its OTLP listener).
    pub fn client_tls(&self, alpn: Vec<Vec<u8>>) -> Arc<rustls::ClientConfig> {
        self.identity.client_config(
            Authorizer::id(crate::hub::hub_server_id(&self.hub_trust_domain)),
            alpn,
        )
    }

    /// Renews the cluster identity when past half its life; returns when it next should run.
    pub async fn renew_if_due(&self) -> Result<Duration, String> {
        let svid = self.identity.svid().ok_or("no identity loaded")?;
        let now = SystemTime::now();
        let left = svid.not_after.duration_since(now).unwrap_or_default();
        let info = inspect(&svid.certified_key.cert[0]).map_err(|e| e.to_string())?;
        let life = svid
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        if left > life / 2 {
            return Ok(left - life / 2);
        }
        let (key, csr) = new_key_and_csr(&svid.id).map_err(|e| e.to_string())?;
        let mut last_err = String::new();
        let mut resp = None;
        for i in 0..self.addresses().len() {
            match FederationClient::new(self.channel_to(i)?)
                .renew(pb::RenewRequest { csr: csr.clone() })
                .await
            {
                Ok(r) => {
                    resp = Some(r);
                    break;
                }
                Err(s) => last_err = s.message().to_string(),
            }
        }
        let resp = resp.ok_or(last_err)?.into_inner();
        let chain: Vec<CertificateDer<'static>> =
            resp.chain.into_iter().map(CertificateDer::from).collect();
        let meta = CredentialsMeta {
            hub_addr: self.hub_addr.clone(),
            hub_trust_domain: self.hub_trust_domain.clone(),
            cluster: ClusterName::new(svid.id.path().trim_start_matches("/cluster/"))
                .map_err(|e| e.to_string())?,
        };
        Self::save(
            &self.dir,
            &meta,
            &chain,
            &key.serialize_der(),
            &resp.hub_bundle,
        )
        .map_err(|e| e.to_string())?;
        let bundle = SpiffeBundle::from_json(self.hub_trust_domain.clone(), &resp.hub_bundle)
            .map_err(|e| e.to_string())?;
        let mut set = BundleSet::new();
        set.update(bundle);
        self.identity.set_bundles(set);
        self.identity
            .set_svid_parts(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| e.to_string())?;
        tracing::info!("renewed the cluster's hub identity");
        Ok(Duration::from_secs(60))
    }
}

fn split_addrs(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

/// What the hub last accepted from us: the publish version and the state it carried.
#[derive(Clone, Debug, Default)]
struct Accepted {
    version: u64,
    state: Option<Desired>,
}

/// Runs the Federate stream until `shutdown`, reconnecting forever with backoff.
/// What a control plane tells the hub every few seconds besides its exports.
pub struct Reports {
    /// Demand for clusterset-wide rate limits (and where the hub's shares go).
    pub limits: Arc<super::ratelimit::ClustersetLimits>,
    /// What reaches PERMISSIVE services.
    pub traffic: Arc<super::peer_traffic::PeerTraffic>,
    /// The proxies served, with the configuration version now.
    pub proxies: Arc<super::proxies::Proxies>,
    /// The latest probes of other clusters' gateways.
    pub probes: Arc<super::gateway_probe::GatewayProbes>,
    /// The rollouts in waves (and where the hub's gates go).
    pub rollouts: Arc<super::rollouts::Rollouts>,
    pub config: watch::Receiver<Arc<super::config_stream::ConfigState>>,
}

/// The proxy list goes whole at least this often even unchanged: the hub forgets a report older
/// than [`crate::hub::proxies::REPORT_TTL`].
const PROXIES_EVERY: u32 = 5;

#[allow(clippy::too_many_arguments)]
pub async fn run(
    creds: Arc<HubCredentials>,
    cluster: ClusterName,
    region: String,
    state: Arc<ClusterSetStore>,
    mut desired: watch::Receiver<Arc<Desired>>,
    status: watch::Sender<PublishStatus>,
    reports: Reports,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    let mut accepted = Accepted::default();
    let mut replica = 0usize;
    loop {
        let started = std::time::Instant::now();
        let result = session(
            &creds,
            replica,
            &cluster,
            &region,
            &state,
            &mut desired,
            &status,
            &mut accepted,
            &reports,
            &shutdown,
        )
        .await;
        status.send_modify(|s| s.connected = false);
        if shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => tracing::info!("hub stream closed; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "hub unreachable; serving the last imports meanwhile")
            }
        }
        // With several hub replicas, the next attempt goes to the next one.
        replica = replica.wrapping_add(1);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    creds: &HubCredentials,
    replica: usize,
    cluster: &ClusterName,
    region: &str,
    state: &ClusterSetStore,
    desired: &mut watch::Receiver<Arc<Desired>>,
    status: &watch::Sender<PublishStatus>,
    accepted: &mut Accepted,
    reports: &Reports,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let (limits, traffic) = (&reports.limits, &reports.traffic);
    let mut ticks = 0u32;
    let mut client = FederationClient::new(creds.channel_to(replica)?)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    // Hello, then publishes, in order; at most one publish is in flight, so this never fills.
    let (publish_tx, publish_rx) = mpsc::channel::<pb::ClusterMessage>(8);
    // The latest ack. Acks are cumulative, so a newer one replaces one not sent yet: reading the
    // hub never waits for the hub to read us (it may be waiting for us to read it).
    let (ack_tx, ack_rx) = watch::channel::<Option<pb::Ack>>(None);
    let acks = tokio_stream::wrappers::WatchStream::from_changes(ack_rx).filter_map(|a| {
        a.map(|a| pb::ClusterMessage {
            msg: Some(pb::cluster_message::Msg::Ack(a)),
        })
    });
    let outbound = tokio_stream::wrappers::ReceiverStream::new(publish_rx).merge(acks);
    let resume_from = state.current().version;
    let send = |msg: pb::cluster_message::Msg| {
        let publish_tx = publish_tx.clone();
        async move {
            publish_tx
                .send(pb::ClusterMessage { msg: Some(msg) })
                .await
                .map_err(|_| "hub stream closed".to_string())
        }
    };
    send(pb::cluster_message::Msg::Hello(pb::Hello {
        protocol_version: FEDERATION_PROTOCOL_VERSION,
        resume_from,
        region: region.to_string(),
        update_parts: true,
    }))
    .await?;
    let mut inbound = client
        .federate(outbound)
        .await
        .map_err(|s| format!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    // What the hub holds of ours: Some(None) = unknown (publish in full); None = not welcomed yet.
    let mut hub_has: Option<Option<Desired>> = None;
    // The last state the hub refused: not sent again as it is (it would be refused again).
    let mut refused: Option<Desired> = None;
    let mut next_version = accepted.version;
    let mut in_flight: Option<(u64, Desired)> = None;
    // The parts of an update received so far (we said Hello.update_parts).
    let mut parts: Option<pb::Update> = None;
    let mut report = tokio::time::interval(super::ratelimit::REPORT_EVERY);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let failed = loop {
        if in_flight.is_none()
            && let Some(held) = &hub_has
        {
            let want = (**desired.borrow_and_update()).clone();
            if held.as_ref() != Some(&want) && refused.as_ref() != Some(&want) {
                next_version += 1;
                let msg = match held {
                    Some(h) => diff_publish(cluster, next_version, h, &want),
                    None => full_publish(cluster, next_version, &want),
                };
                send(pb::cluster_message::Msg::Publish(msg)).await?;
                in_flight = Some((next_version, want));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            changed = desired.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = report.tick() => {
                // Never waits: a report not sent now is replaced by the next one.
                if hub_has.is_some()
                    && let Some(d) = limits.report()
                {
                    let _ = publish_tx.try_send(pb::ClusterMessage {
                        msg: Some(pb::cluster_message::Msg::Demand(d)),
                    });
                }
                if hub_has.is_some()
                    && let Some(t) = traffic.report()
                {
                    let _ = publish_tx.try_send(pb::ClusterMessage {
                        msg: Some(pb::cluster_message::Msg::Traffic(t)),
                    });
                }
                // The first after welcome, and every PROXIES_EVERY ticks, go whole.
                if hub_has.is_some()
                    && let Some(p) = reports.proxies.report(
                        reports.config.borrow().version,
                        ticks.is_multiple_of(PROXIES_EVERY),
                    )
                {
                    let _ = publish_tx.try_send(pb::ClusterMessage {
                        msg: Some(pb::cluster_message::Msg::Proxies(p)),
                    });
                }
                if hub_has.is_some()
                    && let Some(r) = reports.rollouts.report()
                {
                    let _ = publish_tx.try_send(pb::ClusterMessage {
                        msg: Some(pb::cluster_message::Msg::Rollouts(r)),
                    });
                }
                if hub_has.is_some()
                    && let Some(p) = reports.probes.report()
                {
                    let _ = publish_tx.try_send(pb::ClusterMessage {
                        msg: Some(pb::cluster_message::Msg::Probes(p)),
                    });
                }
                if hub_has.is_some() {
                    ticks = ticks.wrapping_add(1);
                }
            }
            msg = inbound.message() => {
                let Some(msg) = msg.map_err(|s| format!("{} ({:?})", s.message(), s.code()))? else {
                    return Ok(());
                };
                match msg.msg {
                    Some(pb::hub_message::Msg::Welcome(w)) => {
                        tracing::info!(resumed = w.resumed, resume_from, hub_published = w.published_version, "connected to the hub");
                        // Delta-publish only when the hub holds exactly what we last saw accepted.
                        hub_has = Some(if w.published_version != 0 && w.published_version == accepted.version {
                            accepted.state.clone()
                        } else {
                            None
                        });
                        next_version = next_version.max(w.published_version);
                        status.send_modify(|s| s.connected = true);
                    }
                    Some(pb::hub_message::Msg::Update(part)) => {
                        let Some(u) = crate::update_parts::gather(&mut parts, part) else {
                            continue;
                        };
                        let version = u.version;
                        match state.apply(&u).await {
                            Ok(()) => {
                                ack_tx.send_replace(Some(pb::Ack { version, nack: false, error: String::new() }));
                            }
                            Err(e) => {
                                tracing::error!(version, error = %e, "cannot apply the hub's update");
                                ack_tx.send_replace(Some(pb::Ack { version, nack: true, error: e.clone() }));
                                // Nothing of it was applied, and later deltas build on it: start
                                // over from the version we persisted.
                                break format!(
                                    "cannot apply the hub's update v{version} ({e}); resuming from v{}",
                                    state.current().version
                                );
                            }
                        }
                    }
                    Some(pb::hub_message::Msg::Shares(s)) => limits.apply_shares(&s),
                    Some(pb::hub_message::Msg::Gates(g)) => reports.rollouts.apply_gates(&g),
                    Some(pb::hub_message::Msg::PublishResult(r)) => {
                        let Some((version, sent)) = in_flight.take() else { continue };
                        if r.version != version {
                            continue;
                        }
                        if r.accepted {
                            *accepted = Accepted { version, state: Some(sent.clone()) };
                            status.send_modify(|s| {
                                s.accepted = sent.exports.clone();
                                s.refused = None;
                            });
                            hub_has = Some(Some(sent));
                            refused = None;
                        } else {
                            tracing::error!(version, error = %r.error, "the hub refused our publish");
                            status.send_modify(|s| s.refused = Some(r.error.clone()));
                            // The hub kept its previous state, not what we sent: publish in full on
                            // the next change (or the next connection).
                            accepted.version = version;
                            accepted.state = None;
                            hub_has = Some(None);
                            refused = Some(sent);
                        }
                    }
                    None => {}
                }
            }
        }
    };
    // Half-close after the NACK so the hub reads it, then wait for the hub to end the stream.
    drop(publish_tx);
    drop(ack_tx);
    let drain = async { while let Ok(Some(_)) = inbound.message().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    Err(failed)
}

fn full_publish(cluster: &ClusterName, version: u64, want: &Desired) -> pb::Publish {
    pb::Publish {
        version,
        cluster: cluster.to_string(),
        full: true,
        upserts: want.exports.values().cloned().collect(),
        removals: vec![],
        bundle: want.bundle.clone(),
        gateways: Some(pb::Gateways {
            addresses: want.gateways.clone(),
        }),
        problems: Some(pb::Problems {
            items: want.problems.clone(),
        }),
        routes: Some(pb::Routes {
            items: want.routes.clone(),
        }),
    }
}

/// The Publish that turns `held` into `want`.
fn diff_publish(
    cluster: &ClusterName,
    version: u64,
    held: &Desired,
    want: &Desired,
) -> pb::Publish {
    pb::Publish {
        version,
        cluster: cluster.to_string(),
        full: false,
        upserts: want
            .exports
            .iter()
            .filter(|(k, v)| held.exports.get(*k) != Some(*v))
            .map(|(_, v)| v.clone())
            .collect(),
        removals: held
            .exports
            .keys()
            .filter(|k| !want.exports.contains_key(*k))
            .map(|k| k.to_string())
            .collect(),
        bundle: if held.bundle != want.bundle {
            want.bundle.clone()
        } else {
            None
        },
        gateways: (held.gateways != want.gateways).then(|| pb::Gateways {
            addresses: want.gateways.clone(),
        }),
        problems: (held.problems != want.problems).then(|| pb::Problems {
            items: want.problems.clone(),
        }),
        routes: (held.routes != want.routes).then(|| pb::Routes {
            items: want.routes.clone(),
        }),
    }
}
