//! Probes every other cluster's east-west gateways from this cluster, every [`PROBE_EVERY`]: a TCP
//! connection to each published address, an mTLS handshake (our control plane's SVID; the
//! gateway's verified against its cluster's trust domain) and the gateway's one-line answer
//! ([`fedmesh_dataplane::probe`]). The latest results go to the hub (`fedmesh gateways`, `fedmesh
//! check`, `fedmesh explain`) and to this control plane's `/metrics`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, TrustDomain};
use fedmesh_dataplane::probe;
use fedmesh_trust::bundle::{BundleSet, SpiffeBundle};
use fedmesh_trust::tls::{Authorizer, MeshIdentity};
use tokio_util::sync::CancellationToken;

use super::state::ClusterSetStore;

/// How often each gateway is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// A probe with no answer within this is a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The latest probe of each (cluster, gateway address).
#[derive(Default)]
pub struct GatewayProbes {
    latest: Mutex<BTreeMap<(String, String), pb::GatewayProbe>>,
}

impl GatewayProbes {
    /// The latest probe of each gateway, by cluster and address.
    pub fn current(&self) -> Vec<pb::GatewayProbe> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// What goes to the hub (nothing when there is nothing to probe).
    pub fn report(&self) -> Option<pb::GatewayProbes> {
        let probes = self.current();
        (!probes.is_empty()).then_some(pb::GatewayProbes { probes })
    }

    /// Keeps exactly the probes of `results` (a gateway no longer published is forgotten).
    fn replace(&self, results: Vec<pb::GatewayProbe>) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        *latest = results
            .into_iter()
            .map(|p| ((p.cluster.clone(), p.address.clone()), p))
            .collect();
    }
}

/// Probes until `shutdown`, presenting `own`'s SVID.
pub async fn run(
    own_cluster: ClusterName,
    own: MeshIdentity,
    clusterset: Arc<ClusterSetStore>,
    probes: Arc<GatewayProbes>,
    shutdown: CancellationToken,
) {
    let prober = own.sharing_svid();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cs = clusterset.current();
        let mut bundles = BundleSet::new();
        for (td, b) in &cs.bundles {
            match SpiffeBundle::from_json(td.clone(), &b.jwks) {
                Ok(b) => {
                    bundles.update(b);
                }
                Err(e) => tracing::debug!(trust_domain = %td, error = %e, "unusable bundle"),
            }
        }
        prober.set_bundles(bundles);
        let targets: Vec<(ClusterName, TrustDomain, String)> = cs
            .clusters
            .iter()
            .filter(|(name, _)| **name != own_cluster)
            .filter_map(|(name, c)| {
                let td = TrustDomain::new(&c.trust_domain).ok()?;
                Some((name.clone(), td, c.gateways.clone()))
            })
            .flat_map(|(name, td, gws)| {
                gws.into_iter()
                    .map(move |gw| (name.clone(), td.clone(), gw))
            })
            .collect();
        let results = futures::future::join_all(
            targets
                .into_iter()
                .map(|(cluster, td, addr)| probe_one(&prober, cluster, td, addr)),
        )
        .await;
        probes.replace(results);
    }
}

async fn probe_one(
    prober: &MeshIdentity,
    cluster: ClusterName,
    td: TrustDomain,
    address: String,
) -> pb::GatewayProbe {
    let tls = prober.client_config(Authorizer::trust_domain(td), vec![probe::ALPN.to_vec()]);
    let result = probe::probe(&address, &cluster, tls, PROBE_TIMEOUT).await;
    let mut out = pb::GatewayProbe {
        cluster: cluster.to_string(),
        address,
        probed_unix: crate::hub::records::now_unix(),
        ..Default::default()
    };
    match result {
        Ok(r) => {
            out.reachable = true;
            out.latency_us = r.latency.as_micros() as u64;
            out.gateway_id = r.gateway_id;
            out.ready = r.answer.ready;
            out.config_version = r.answer.config_version;
            out.exported_services = r.answer.exported_services;
        }
        Err(e) => {
            tracing::debug!(cluster = %out.cluster, gateway = %out.address, error = %e, "gateway probe failed");
            out.error = e;
        }
    }
    out
}
