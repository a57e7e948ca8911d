//! Federation with trust domains outside the clusterset (`FederatedTrustDomain`): SPIRE
//! deployments, or another mesh's CA. For each one the control plane keeps fetching the foreign
//! bundle from its SPIFFE bundle endpoint and hands it to its agents with the clusterset's
//! bundles, so the cluster's workloads verify that trust domain's SVIDs (and only against its own
//! bundle: bundles are never merged).
//!
//! Each bundle fetched is written under `<data-dir>/federated/`, so a restarted control plane
//! goes on trusting it, and an `https_spiffe` relationship goes on authenticating the endpoint with
//! the newest bundle, not the bootstrap one. A relationship removed from the source is forgotten
//! with its file. A spec that cannot work (a trust domain of the clusterset or our own, a bad URL
//! or bootstrap bundle) is refused and says why in its status.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fedmesh_api::SpiffeId;
use fedmesh_api::TrustDomain;
use fedmesh_api::federation::FederatedTrustDomainSpec;
use fedmesh_trust::bundle::SpiffeBundle;
use fedmesh_trust::endpoint::{BundleEndpointClient, ClientProfile};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::routes::Cond;
use super::source::LocalObjects;

/// One relationship's state, for its status.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub name: String,
    pub generation: Option<i64>,
    /// The spec is usable.
    pub accepted: Cond,
    /// A bundle is held (fetched now or before).
    pub ready: Cond,
}

struct Relation {
    spec: FederatedTrustDomainSpec,
    trust_domain: TrustDomain,
    bundle: watch::Receiver<Option<Arc<SpiffeBundle>>>,
    attempts: watch::Receiver<Result<u64, String>>,
    stop: CancellationToken,
}

impl Drop for Relation {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub struct Federated {
    dir: PathBuf,
    relations: Mutex<BTreeMap<String, Relation>>,
    /// Refused specs, by name: (generation, why).
    refused: Mutex<BTreeMap<String, (Option<i64>, String)>>,
    /// Bumped whenever a relationship's bundle or status may have changed.
    changed: watch::Sender<u64>,
}

impl Federated {
    pub fn new(data_dir: &std::path::Path) -> Arc<Self> {
        Arc::new(Self {
            dir: data_dir.join("federated"),
            relations: Mutex::default(),
            refused: Mutex::default(),
            changed: watch::Sender::new(0),
        })
    }

    /// Changes whenever a federated bundle (or a relationship's status) may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The foreign bundles held now.
    pub fn bundles(&self) -> Vec<Arc<SpiffeBundle>> {
        let relations = self.relations.lock().unwrap_or_else(|p| p.into_inner());
        relations
            .values()
            .filter_map(|r| r.bundle.borrow().clone())
            .collect()
    }

    /// Starts, restarts (spec changed) or stops each relationship to match the source.
    /// `reserved` are the trust domains that cannot be federated this way: ours and the
    /// clusterset's, whose bundles come from the CA and the hub.
    pub fn sync(
        self: &Arc<Self>,
        local: &LocalObjects,
        reserved: &BTreeSet<TrustDomain>,
        shutdown: &CancellationToken,
    ) {
        let mut refused = BTreeMap::new();
        let mut relations = self.relations.lock().unwrap_or_else(|p| p.into_inner());
        let mut tds_seen: BTreeMap<TrustDomain, String> = BTreeMap::new();
        let mut changed = false;
        for (name, ftd) in &local.federated_tds {
            let generation = ftd.metadata.generation;
            if let Some(r) = relations.get(name)
                && r.spec == ftd.spec
            {
                tds_seen.insert(r.trust_domain.clone(), name.clone());
                continue;
            }
            let started =
                self.check(&ftd.spec, reserved, &tds_seen)
                    .and_then(|(td, client, bootstrap)| {
                        Ok((
                            td.clone(),
                            self.start(name, &ftd.spec, td, client, bootstrap, shutdown)?,
                        ))
                    });
            match started {
                Ok((td, relation)) => {
                    tracing::info!(%name, trust_domain = %td, url = %ftd.spec.bundle_endpoint_url, "federating with a trust domain outside the clusterset");
                    tds_seen.insert(td, name.clone());
                    relations.insert(name.clone(), relation);
                    changed = true;
                }
                Err(why) => {
                    if !self.refused_now(name, &why) {
                        tracing::warn!(%name, error = %why, "FederatedTrustDomain refused");
                    }
                    changed |= relations.remove(name).is_some();
                    refused.insert(name.clone(), (generation, why));
                }
            }
        }
        let gone: Vec<String> = relations
            .keys()
            .filter(|n| !local.federated_tds.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            changed = true;
            if let Some(r) = relations.remove(&name) {
                tracing::info!(%name, trust_domain = %r.trust_domain, "no longer federating");
                let _ = std::fs::remove_file(self.file(&r.trust_domain));
            }
        }
        drop(relations);
        let mut held = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        changed |= *held != refused;
        *held = refused;
        drop(held);
        // Called on every snapshot: wake the agents' bundle streams and the status writer only
        // when a relationship started, stopped or was refused.
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Whether `name` is refused already, for `why`.
    fn refused_now(&self, name: &str, why: &str) -> bool {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.get(name).is_some_and(|(_, w)| w == why)
    }

    /// Each relationship's conditions.
    pub fn reports(&self, local: &LocalObjects) -> Vec<Report> {
        let relations = self.relations.lock().unwrap_or_else(|p| p.into_inner());
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (name, ftd) in &local.federated_tds {
            let generation = ftd.metadata.generation;
            if let Some((_, why)) = refused.get(name) {
                out.push(Report {
                    name: name.clone(),
                    generation,
                    accepted: Cond::no("Invalid", why.clone()),
                    ready: Cond::no("Invalid", "the spec is not accepted".into()),
                });
                continue;
            }
            let Some(r) = relations.get(name) else {
                continue;
            };
            let held = r.bundle.borrow().clone();
            let attempt = r.attempts.borrow().clone();
            let ready = match (&held, attempt) {
                (Some(b), Ok(_)) => Cond::yes(
                    "BundleFetched",
                    format!(
                        "holding the bundle of {} (sequence {}, {} X.509 authorities)",
                        r.trust_domain,
                        b.sequence(),
                        b.x509_authorities().len()
                    ),
                ),
                (Some(b), Err(e)) => Cond::yes(
                    "FetchFailing",
                    format!(
                        "keeping the last bundle fetched (sequence {}); the last fetch failed: {e}",
                        b.sequence()
                    ),
                ),
                (None, Err(e)) => Cond::no("FetchFailed", e),
                (None, Ok(_)) => Cond::no("Pending", "not fetched yet".into()),
            };
            out.push(Report {
                name: name.clone(),
                generation,
                accepted: Cond::yes("Accepted", String::new()),
                ready,
            });
        }
        out
    }

    fn file(&self, td: &TrustDomain) -> PathBuf {
        self.dir.join(format!("{td}.json"))
    }

    /// Why a spec cannot work, or what it needs to start.
    fn check(
        &self,
        spec: &FederatedTrustDomainSpec,
        reserved: &BTreeSet<TrustDomain>,
        taken: &BTreeMap<TrustDomain, String>,
    ) -> Result<(TrustDomain, BundleEndpointClient, Option<SpiffeBundle>), String> {
        let td = TrustDomain::new(&spec.trust_domain).map_err(|e| format!("trustDomain: {e}"))?;
        if reserved.contains(&td) {
            return Err(format!(
                "{td} is this cluster's own trust domain or one of the clusterset's; their bundles come from the CA and the hub"
            ));
        }
        if let Some(other) = taken.get(&td) {
            return Err(format!(
                "FederatedTrustDomain {other} already federates with {td}"
            ));
        }
        let bootstrap = match &spec.trust_domain_bundle {
            Some(b) => Some(
                SpiffeBundle::from_json_or_pem(td.clone(), b.as_bytes())
                    .map_err(|e| format!("trustDomainBundle: {e}"))?,
            ),
            None => None,
        };
        let profile = match spec.bundle_endpoint_profile.type_.as_str() {
            "https_spiffe" => {
                let id = spec
                    .bundle_endpoint_profile
                    .endpoint_spiffe_id
                    .as_deref()
                    .ok_or(
                        "bundleEndpointProfile.endpointSPIFFEID is required with type https_spiffe",
                    )?;
                let id = SpiffeId::new(id)
                    .map_err(|e| format!("bundleEndpointProfile.endpointSPIFFEID: {e}"))?;
                if id.trust_domain() != &td {
                    return Err(format!(
                        "bundleEndpointProfile.endpointSPIFFEID {id} is not in trust domain {td}; to trust an endpoint of another trust domain, federate with that one"
                    ));
                }
                if bootstrap.is_none() && !self.file(&td).exists() {
                    return Err(
                        "type https_spiffe needs trustDomainBundle, the bundle that authenticates the first fetch"
                            .into(),
                    );
                }
                ClientProfile::HttpsSpiffe { endpoint_id: id }
            }
            "https_web" => ClientProfile::HttpsWeb {
                roots: Arc::new(system_roots()?),
            },
            other => {
                return Err(format!(
                    "bundleEndpointProfile.type {other:?} is not https_spiffe or https_web"
                ));
            }
        };
        let client = BundleEndpointClient::new(&spec.bundle_endpoint_url, td.clone(), profile)
            .map_err(|e| format!("bundleEndpointURL: {e}"))?;
        Ok((td, client, bootstrap))
    }

    fn start(
        self: &Arc<Self>,
        name: &str,
        spec: &FederatedTrustDomainSpec,
        td: TrustDomain,
        client: BundleEndpointClient,
        bootstrap: Option<SpiffeBundle>,
        shutdown: &CancellationToken,
    ) -> Result<Relation, String> {
        // A bundle fetched before (it authenticates the next https_spiffe fetch) wins over the
        // bootstrap one, unless the bootstrap is newer.
        let stored = std::fs::read(self.file(&td))
            .ok()
            .and_then(|b| SpiffeBundle::from_json(td.clone(), &b).ok());
        let initial = match (stored, bootstrap) {
            (Some(s), Some(b)) if b.sequence() > s.sequence() => Some(b),
            (Some(s), _) => Some(s),
            (None, b) => b,
        };
        let stop = shutdown.child_token();
        let (bundle, attempts, _task) =
            client.spawn_refresher_reporting(initial, stop.clone().cancelled_owned());
        // Persist each new bundle and tell the control plane.
        {
            let (me, mut bundle, mut attempts, stop) = (
                Arc::clone(self),
                bundle.clone(),
                attempts.clone(),
                stop.clone(),
            );
            let (name, td) = (name.to_string(), td.clone());
            tokio::spawn(async move {
                let mut kept = None;
                loop {
                    // A refresh attempt changes only the status; a new bundle goes to disk too.
                    if let Some(b) = bundle.borrow_and_update().clone()
                        && !kept.as_ref().is_some_and(|k| Arc::ptr_eq(k, &b))
                    {
                        match me.persist(&td, &b) {
                            Ok(()) => kept = Some(b),
                            Err(e) => {
                                tracing::warn!(%name, error = %e, "cannot keep the federated bundle on disk")
                            }
                        }
                    }
                    me.changed.send_modify(|v| *v += 1);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = bundle.changed() => if r.is_err() { return },
                        r = attempts.changed() => if r.is_err() { return },
                    }
                }
            });
        }
        Ok(Relation {
            spec: spec.clone(),
            trust_domain: td,
            bundle,
            attempts,
            stop,
        })
    }

    fn persist(&self, td: &TrustDomain, bundle: &SpiffeBundle) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.file(td);
        let json = bundle.to_json();
        if std::fs::read(&path).ok().as_deref() == Some(json.as_bytes()) {
            return Ok(());
        }
        fedmesh_trust::files::write_public(&path, json.as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// The machine's Web PKI roots, for `https_web`.
fn system_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    for c in found.certs {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(format!(
            "type https_web needs the system's root certificates and none were found ({})",
            found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no certificate store".into())
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_api::federation::BundleEndpointProfile;

    fn spec(
        td: &str,
        profile: &str,
        id: Option<&str>,
        bundle: Option<&str>,
    ) -> FederatedTrustDomainSpec {
        FederatedTrustDomainSpec {
            trust_domain: td.into(),
            bundle_endpoint_url: "https://127.0.0.1:8443".into(),
            bundle_endpoint_profile: BundleEndpointProfile {
                type_: profile.into(),
                endpoint_spiffe_id: id.map(String::from),
            },
            trust_domain_bundle: bundle.map(String::from),
        }
    }

    fn why(f: &Federated, s: &FederatedTrustDomainSpec) -> String {
        let reserved = BTreeSet::from([TrustDomain::new("east.example").unwrap()]);
        let taken = BTreeMap::from([(
            TrustDomain::new("taken.example").unwrap(),
            "first".to_string(),
        )]);
        match f.check(s, &reserved, &taken) {
            Ok(_) => "accepted".into(),
            Err(e) => e,
        }
    }

    #[test]
    fn a_spec_that_cannot_work_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let f = Federated::new(dir.path());
        let ca_dir = dir.path().join("ca");
        let ca = fedmesh_trust::ca::TrustDomainCa::init(
            &ca_dir,
            fedmesh_trust::ca::CaOptions::new(TrustDomain::new("spire.example").unwrap()),
        )
        .unwrap();
        let bundle = ca.bundle().to_json();
        let id = Some("spiffe://spire.example/spire/server");
        assert_eq!(
            why(
                &f,
                &spec("spire.example", "https_spiffe", id, Some(&bundle))
            ),
            "accepted"
        );
        for (s, expect) in [
            (
                spec("east.example", "https_spiffe", id, Some(&bundle)),
                "own trust domain or one of the clusterset's",
            ),
            (
                spec("taken.example", "https_web", None, None),
                "FederatedTrustDomain first already federates",
            ),
            (spec("Bad_TD", "https_web", None, None), "trustDomain"),
            (
                spec("spire.example", "https_spiffe", None, Some(&bundle)),
                "endpointSPIFFEID is required",
            ),
            (
                spec(
                    "spire.example",
                    "https_spiffe",
                    Some("spiffe://other.example/x"),
                    Some(&bundle),
                ),
                "is not in trust domain spire.example",
            ),
            (
                spec("spire.example", "https_spiffe", id, None),
                "needs trustDomainBundle",
            ),
            (
                spec("spire.example", "https_spiffe", id, Some("{\"keys\": 1}")),
                "trustDomainBundle",
            ),
            (
                spec("spire.example", "mtls", None, None),
                "is not https_spiffe or https_web",
            ),
        ] {
            let got = why(&f, &s);
            assert!(got.contains(expect), "{s:?}: {got}");
        }
        let mut plain = spec("spire.example", "https_spiffe", id, Some(&bundle));
        plain.bundle_endpoint_url = "http://127.0.0.1:8443".into();
        assert!(
            why(&f, &plain).contains("https only"),
            "{}",
            why(&f, &plain)
        );
    }
}
