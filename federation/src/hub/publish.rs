//! What a cluster may publish, checked before anything of it is stored (and what the
//! `hub_cluster_message` fuzz target drives).

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, TrustDomain};
use fedmesh_trust::bundle::SpiffeBundle;

use super::records::{BundleRecord, ExportRecord, export_from_pb};

/// A Publish that passed [`check_publish`]: its exports, removals and bundle, parsed.
pub struct CheckedPublish {
    pub upserts: Vec<ExportRecord>,
    pub removals: Vec<fedmesh_api::ServiceKey>,
    pub bundle: Option<BundleRecord>,
}

/// Checks a Publish from `cluster` before anything of it is stored: a cluster publishes only its
/// own state, every export, removal, gateway address and bundle must parse. What the store
/// decides (registration, versions, the bundle's trust domain) is checked by
/// [`Hub::apply_publish`]. The error says what was refused and why.
pub fn check_publish(cluster: &ClusterName, p: &pb::Publish) -> Result<CheckedPublish, String> {
    if !p.cluster.is_empty() && p.cluster != cluster.as_str() {
        return Err(format!(
            "cluster {cluster} may publish only its own state, not that of {:?}",
            p.cluster
        ));
    }
    let upserts = p
        .upserts
        .iter()
        .map(export_from_pb)
        .collect::<Result<Vec<_>, _>>()?;
    let removals = p
        .removals
        .iter()
        .map(|s| {
            s.parse::<fedmesh_api::ServiceKey>()
                .map_err(|e| format!("removal {s:?}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if let Some(g) = &p.gateways {
        for a in &g.addresses {
            fedmesh_api::names::check_gateway_address(a)
                .map_err(|e| format!("gateway {a:?}: {e}"))?;
        }
    }
    let bundle = match &p.bundle {
        Some(b) => {
            let td = TrustDomain::new(&b.trust_domain).map_err(|e| format!("bundle: {e}"))?;
            let parsed = SpiffeBundle::from_json(td.clone(), &b.jwks).map_err(|e| e.to_string())?;
            if parsed.x509_authorities().is_empty() {
                return Err(format!("bundle of {td} has no X.509 authorities"));
            }
            Some(BundleRecord {
                trust_domain: td,
                cluster: cluster.clone(),
                jwks: String::from_utf8_lossy(&b.jwks).into_owned(),
                sequence: parsed.sequence(),
            })
        }
        None => None,
    };
    Ok(CheckedPublish {
        upserts,
        removals,
        bundle,
    })
}
