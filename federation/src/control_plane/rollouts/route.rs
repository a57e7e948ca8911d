//! How a rollout's share reaches the sidecars: through the compiled routes of its service. A
//! route rule that names both versions as backends gets the rollout's weights; with no route
//! binding the service, the rollout makes its own (every request, the two versions). A route
//! that binds the service without both versions is the user's explicit choice: the rollout does
//! not touch it and reports the conflict.

use std::collections::BTreeMap;

use fedmesh_api::ServiceKey;
use fedmesh_api::pb::dataplane as pb;

use super::super::routes::{CompiledRoutes, World};

/// What a rollout asks of its service's routes now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub rollout: ServiceKey,
    pub service: ServiceKey,
    pub stable: ServiceKey,
    pub canary: ServiceKey,
    /// The canary's share, in percent.
    pub canary_weight: u32,
    /// The canary also gets a copy of every request (blue-green's first step).
    pub mirror: bool,
    /// The spec's digest, in the signal names.
    pub digest: String,
}

/// The names under which callers report a rollout's versions (`BackendRef.signals`):
/// `NAMESPACE/NAME@DIGEST/ARM`, the digest of the spec so that answers to a former spec's versions
/// never count for a new one.
pub fn signal_name(rollout: &ServiceKey, digest: &str, arm: &str) -> String {
    format!("{rollout}@{digest}/{arm}")
}

/// Whether `name` reports the canary of rollout `rollout` (any spec), for tools and tests.
pub fn is_canary_signal(name: &str, rollout: &str) -> bool {
    name.strip_prefix(rollout)
        .and_then(|rest| rest.strip_prefix('@'))
        .is_some_and(|rest| rest.ends_with("/canary"))
}

/// A copy of every request to the canary, counted under its signal name.
fn mirror(w: &Wanted, kind: pb::backend_ref::Kind) -> pb::Filter {
    pb::Filter {
        kind: Some(pb::filter::Kind::Mirror(pb::Mirror {
            backend: Some(pb::BackendRef {
                kind: kind as i32,
                service: w.canary.to_string(),
                weight: 1,
                signals: signal_name(&w.rollout, &w.digest, "canary"),
                ..Default::default()
            }),
            numerator: 1,
            denominator: 1,
        })),
    }
}

/// Applies each rollout's weights to `routes`; returns, per rollout, why its weights could not be
/// applied.
pub(in crate::control_plane) fn apply(
    routes: &mut CompiledRoutes,
    wanted: &[Wanted],
    world: &World<'_>,
) -> BTreeMap<ServiceKey, String> {
    let mut problems = BTreeMap::new();
    for w in wanted {
        let kind = |key: &ServiceKey| -> Option<pb::backend_ref::Kind> {
            if world.local.services.contains_key(key) {
                Some(pb::backend_ref::Kind::Service)
            } else if world.in_clusterset(key) {
                Some(pb::backend_ref::Kind::ServiceImport)
            } else {
                None
            }
        };
        let (Some(stable_kind), Some(canary_kind)) = (kind(&w.stable), kind(&w.canary)) else {
            let missing: Vec<String> = [&w.stable, &w.canary]
                .into_iter()
                .filter(|k| kind(k).is_none())
                .map(|k| k.name.to_string())
                .collect();
            problems.insert(
                w.rollout.clone(),
                format!(
                    "there is no Service {} in this cluster or the clusterset: traffic stays as it is until there is",
                    missing.join(" or ")
                ),
            );
            continue;
        };
        let names = |k: &ServiceKey| k.to_string();
        let (stable, canary) = (names(&w.stable), names(&w.canary));
        let arm = |b: &pb::BackendRef| -> Option<bool> {
            let by_name = b.kind == pb::backend_ref::Kind::Service as i32
                || b.kind == pb::backend_ref::Kind::ServiceImport as i32;
            if !by_name {
                return None;
            }
            if b.service == stable {
                Some(false)
            } else if b.service == canary {
                Some(true)
            } else {
                None
            }
        };
        match routes.by_parent.get_mut(&w.service) {
            Some(bound) if !bound.is_empty() => {
                let (mut driven, mut twice) = (0, false);
                for r in bound.iter_mut() {
                    let arms: Vec<Option<bool>> = r.backend_refs.iter().map(arm).collect();
                    let count = |a: bool| arms.iter().filter(|x| **x == Some(a)).count();
                    if count(false) == 0 || count(true) == 0 {
                        continue;
                    }
                    // Each version once: a version named twice would get its share twice.
                    if count(false) > 1 || count(true) > 1 {
                        twice = true;
                        continue;
                    }
                    driven += 1;
                    if w.mirror {
                        r.filters.push(mirror(w, canary_kind));
                    }
                    for (b, a) in r.backend_refs.iter_mut().zip(arms) {
                        match a {
                            Some(true) => {
                                b.weight = w.canary_weight;
                                b.signals = signal_name(&w.rollout, &w.digest, "canary");
                            }
                            Some(false) => {
                                b.weight = 100 - w.canary_weight.min(100);
                                b.signals = signal_name(&w.rollout, &w.digest, "stable");
                            }
                            // The user's other backends keep their weights.
                            None => {}
                        }
                    }
                }
                if driven == 0 && twice {
                    problems.insert(
                        w.rollout.clone(),
                        format!(
                            "a rule binding {} names {} or {} more than once: name each version once (the rollout drives their weights)",
                            w.service, w.stable.name, w.canary.name
                        ),
                    );
                } else if driven == 0 {
                    let sources: std::collections::BTreeSet<&str> =
                        bound.iter().map(|r| r.source.as_str()).collect();
                    problems.insert(
                        w.rollout.clone(),
                        format!(
                            "{} binds {} but no rule names both {} and {} as backends: add both to a rule (the rollout drives its weights) or remove the route",
                            sources.into_iter().collect::<Vec<_>>().join(", "),
                            w.service,
                            w.stable.name,
                            w.canary.name
                        ),
                    );
                }
            }
            _ => {
                let backend =
                    |key: &ServiceKey, kind: pb::backend_ref::Kind, weight, arm| pb::BackendRef {
                        kind: kind as i32,
                        service: key.to_string(),
                        weight,
                        signals: signal_name(&w.rollout, &w.digest, arm),
                        ..Default::default()
                    };
                let all = super::super::routes::every_request();
                routes.by_parent.insert(
                    w.service.clone(),
                    vec![pb::Route {
                        name: "canary".into(),
                        source: format!("Rollout {}", w.rollout),
                        matches: vec![all],
                        filters: if w.mirror {
                            vec![mirror(w, canary_kind)]
                        } else {
                            Vec::new()
                        },
                        backend_refs: vec![
                            backend(
                                &w.stable,
                                stable_kind,
                                100 - w.canary_weight.min(100),
                                "stable",
                            ),
                            backend(&w.canary, canary_kind, w.canary_weight, "canary"),
                        ],
                        ..Default::default()
                    }],
                );
            }
        }
    }
    problems
}
