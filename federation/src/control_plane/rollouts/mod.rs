//! Rollouts, the control plane's part: the controller of this cluster's `Rollout`s. It follows
//! the declared rollouts, adds up the golden signals its sidecars report for each version
//! (`Demand.signals`), moves each rollout a step when its checks pass on enough requests and its
//! pause is over, sends every request back to the stable version when a check fails, and applies
//! each rollout's share to its service's routes ([`route`]). The status says where each stands,
//! every decision with its numbers, and any conflict with a user's route.
//!
//! The sidecars keep the last weights they were sent: while the control plane is away, the
//! canary keeps the share of its step and never gets more.

pub mod machine;
mod route;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use fedmesh_api::ServiceKey;
use fedmesh_api::pb::dataplane as dp;
use fedmesh_api::rollout::{Rollout, RolloutSpec, RolloutStatus, phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use fedmesh_api::pb::federation as pb;
use machine::{Command, Gate, Phase, Run, Verdict};
pub(super) use route::apply;
pub use route::{Wanted, is_canary_signal, signal_name};

/// How often rollouts are judged.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(250);

struct Entry {
    spec: RolloutSpec,
    /// A digest of the spec: the hub compares the runs of one spec across clusters.
    digest: String,
    generation: Option<i64>,
    run: Result<Run, String>,
    /// Why its share cannot be applied to its service's routes.
    conflict: Option<String>,
    /// The conditions last written, for their transition times.
    conditions: Vec<Condition>,
}

/// One rollout as `fedmesh rollout status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub stable: String,
    pub canary: String,
    /// How many steps the rollout has (0 when it is invalid).
    pub steps: u32,
    pub status: RolloutStatus,
}

#[derive(Default)]
pub struct Rollouts {
    runs: Mutex<BTreeMap<ServiceKey, Entry>>,
    /// Ticks when what a status shows changes.
    changed: watch::Sender<u64>,
    /// A share moved on the hub's word: the next tick compiles the routes.
    gated: std::sync::atomic::AtomicBool,
    /// Where each rollout stood when the control plane last stopped, until it is declared.
    restored: Mutex<BTreeMap<ServiceKey, machine::Saved>>,
}

/// How many of a rollout's latest decisions each report carries.
const REPORTED_DECISIONS: usize = 20;

/// The store's key prefix of saved rollouts.
pub const SAVED_PREFIX: &str = "rollout/";

fn wall() -> String {
    fedmesh_trust::svid::rfc3339(SystemTime::now())
}

impl Rollouts {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<ServiceKey, Entry>) -> T) -> T {
        f(&mut self.runs.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Where the rollouts stood when the control plane last stopped (from its store).
    pub fn restore(&self, saved: BTreeMap<ServiceKey, machine::Saved>) {
        *self.restored.lock().unwrap_or_else(|p| p.into_inner()) = saved;
    }

    /// Every valid rollout as it is to be saved.
    pub fn to_save(&self) -> BTreeMap<ServiceKey, machine::Saved> {
        self.with(|runs| {
            runs.iter()
                .filter_map(|(k, e)| Some((k.clone(), e.run.as_ref().ok()?.saved(&e.digest))))
                .collect()
        })
    }

    /// Ticks when a status changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Follows the declared rollouts: starts new ones, starts a changed one again from its first
    /// step, forgets removed ones.
    pub fn sync(&self, declared: &BTreeMap<ServiceKey, Rollout>, own: &fedmesh_api::ClusterName) {
        let mut restored = self.restored.lock().unwrap_or_else(|p| p.into_inner());
        let changed = self.with(|runs| {
            let before = runs.len();
            runs.retain(|k, _| declared.contains_key(k));
            let mut changed = before != runs.len();
            for (key, r) in declared {
                if runs.get(key).is_some_and(|e| e.spec == r.spec) {
                    continue;
                }
                let run = r
                    .spec
                    .plan()
                    .and_then(|plan| {
                        if plan.waves.is_empty() || plan.waves.iter().flatten().any(|c| c == own) {
                            Ok(plan)
                        } else {
                            Err(format!(
                                "this cluster ({own}) is in none of its waves: add it to one, or leave the Rollout out of this cluster"
                            ))
                        }
                    })
                    .map(|plan| {
                        let now = Instant::now();
                        let digest = digest(&r.spec);
                        match restored.remove(key).filter(|s| s.digest == digest) {
                            Some(s) => {
                                tracing::info!(rollout = %key, phase = %s.phase, step = s.step, "rollout goes on where it stood");
                                Run::restore(plan.clone(), s, now)
                            }
                            None => None,
                        }
                        .unwrap_or_else(|| Run::start(plan, now, &wall()))
                    });
                if let Err(e) = &run {
                    tracing::warn!(rollout = %key, error = %e, "rollout is invalid");
                }
                runs.insert(
                    key.clone(),
                    Entry {
                        digest: digest(&r.spec),
                        spec: r.spec.clone(),
                        generation: r.metadata.generation,
                        run,
                        conflict: None,
                        conditions: Vec::new(),
                    },
                );
                changed = true;
            }
            changed
        });
        if changed {
            self.bump();
        }
    }

    /// What the routes must carry now: each valid rollout's share.
    pub fn wanted(&self) -> Vec<Wanted> {
        self.with(|runs| {
            runs.iter()
                .filter_map(|(key, e)| {
                    let run = e.run.as_ref().ok()?;
                    let in_ns = |name: &fedmesh_api::ServiceName| ServiceKey {
                        namespace: key.namespace.clone(),
                        name: name.clone(),
                    };
                    Some(Wanted {
                        rollout: key.clone(),
                        service: in_ns(&run.plan.service),
                        stable: in_ns(&run.plan.stable),
                        canary: in_ns(&run.plan.canary),
                        canary_weight: run.canary_weight,
                        mirror: run.mirroring(),
                        digest: e.digest.clone(),
                    })
                })
                .collect()
        })
    }

    /// Records why shares could not be applied (from [`apply`]).
    pub fn set_conflicts(&self, mut conflicts: BTreeMap<ServiceKey, String>) {
        let changed = self.with(|runs| {
            let mut changed = false;
            for (key, e) in runs.iter_mut() {
                let now = conflicts.remove(key);
                if now != e.conflict {
                    if let Some(c) = &now {
                        tracing::warn!(rollout = %key, conflict = %c, "rollout waits");
                    }
                    e.conflict = now;
                    changed = true;
                }
            }
            changed
        });
        if changed {
            self.bump();
        }
    }

    /// Adds a sidecar's report of the versions' requests; `sees(service)` says whether that
    /// sidecar is sent the rollout's service (a report about one it is not sent is ignored).
    pub fn record(&self, signals: &[dp::BackendSignals], sees: impl Fn(&str) -> bool) {
        if signals.is_empty() {
            return;
        }
        self.with(|runs| {
            for s in signals {
                let Some((named, arm)) = s.name.rsplit_once('/') else {
                    continue;
                };
                let Some((rollout, digest)) = named.rsplit_once('@') else {
                    continue;
                };
                let Ok(key) = rollout.parse::<ServiceKey>() else {
                    continue;
                };
                // Answers to a former spec's versions do not count for this one.
                let Some(Ok(run)) = runs
                    .get_mut(&key)
                    .filter(|e| e.digest == digest)
                    .map(|e| e.run.as_mut())
                else {
                    continue;
                };
                if !sees(&format!("{}/{}", key.namespace, run.plan.service)) {
                    continue;
                }
                match arm {
                    "canary" => run.canary.add(s),
                    "stable" => run.stable.add(s),
                    _ => {}
                }
            }
        });
    }

    /// Where this cluster's rollouts stand, for the hub (`None`: there are none).
    pub fn report(&self) -> Option<pb::RolloutReport> {
        let rollouts: Vec<pb::RolloutState> = self.with(|runs| {
            runs.iter()
                .filter_map(|(key, e)| {
                    let run = e.run.as_ref().ok()?;
                    let c = &run.canary;
                    Some(pb::RolloutState {
                        rollout: key.to_string(),
                        waves: run
                            .plan
                            .waves
                            .iter()
                            .map(|w| pb::RolloutWave {
                                clusters: w.iter().map(|c| c.to_string()).collect(),
                            })
                            .collect(),
                        spec_digest: e.digest.clone(),
                        followed: run.followed,
                        service: e.spec.service.clone(),
                        stable: e.spec.stable.service.clone(),
                        canary: e.spec.canary.service.clone(),
                        decisions: run
                            .history
                            .iter()
                            .rev()
                            .take(REPORTED_DECISIONS)
                            .rev()
                            .map(|d| pb::RolloutDecision {
                                time: d.time.clone(),
                                action: d.action.clone(),
                                step: d.step,
                                canary_weight: d.canary_weight,
                                requests: d.requests,
                                success_rate: d.success_rate,
                                latency_p99_ms: d.latency_p99_ms,
                                message: d.message.clone(),
                            })
                            .collect(),
                        phase: run.phase.name().into(),
                        step: run.step as u32,
                        steps: run.plan.steps.len() as u32,
                        canary_weight: run.canary_weight,
                        requests: c.requests,
                        success_rate: c.success_rate().unwrap_or(1.0),
                        latency_p99_ms: c.quantile(0.99).map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                        message: run
                            .history
                            .last()
                            .map(|d| d.message.clone())
                            .unwrap_or_default(),
                    })
                })
                .collect()
        });
        (!rollouts.is_empty()).then_some(pb::RolloutReport { rollouts })
    }

    /// Applies the hub's word on the rollouts in waves.
    pub fn apply_gates(&self, gates: &pb::RolloutGates) {
        let now = Instant::now();
        let (moved, seen) = self.with(|runs| {
            let (mut moved, mut seen) = (false, false);
            for g in &gates.rollouts {
                let Ok(key) = g.rollout.parse::<ServiceKey>() else {
                    continue;
                };
                let Some(Ok(run)) = runs.get_mut(&key).map(|e| e.run.as_mut()) else {
                    continue;
                };
                // The hub gates rollouts in waves only; one of this cluster alone is its own.
                if run.plan.waves.is_empty() {
                    continue;
                }
                let gate = match pb::rollout_gate::Gate::try_from(g.gate) {
                    Ok(pb::rollout_gate::Gate::Go) => Gate::Go,
                    Ok(pb::rollout_gate::Gate::RollBack) => Gate::RollBack(g.reason.clone()),
                    _ => Gate::Hold(g.reason.clone()),
                };
                let before = (run.held.clone(), run.history.len());
                if run.gate(gate, now, &wall()) {
                    moved = true;
                    if let Some(d) = run.history.last() {
                        tracing::info!(rollout = %key, action = %d.action, weight = d.canary_weight, "{}", d.message);
                    }
                }
                seen |= before != (run.held.clone(), run.history.len());
            }
            (moved, seen)
        });
        if moved {
            self.gated.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if moved || seen {
            self.bump();
        }
    }

    /// Judges every rollout; true when a share changed (the routes must be compiled again).
    pub fn tick(&self) -> bool {
        let now = Instant::now();
        let (moved, seen) = self.with(|runs| {
            let (mut moved, mut seen) = (false, false);
            for (key, e) in runs.iter_mut() {
                // A rollout whose share cannot be applied does not move.
                if e.conflict.is_some() {
                    continue;
                }
                let Ok(run) = e.run.as_mut() else { continue };
                let before = (run.verdict.clone(), run.history.len());
                if run.tick(now, &wall()) {
                    moved = true;
                    if let Some(d) = run.history.last() {
                        tracing::info!(rollout = %key, action = %d.action, weight = d.canary_weight, "{}", d.message);
                    }
                }
                seen |= before != (run.verdict.clone(), run.history.len());
            }
            (moved, seen)
        });
        if moved || seen {
            self.bump();
        }
        moved | self.gated.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// A user's command on rollout `key`; the rollout's view after it, and whether a share
    /// changed.
    pub fn command(
        &self,
        key: &ServiceKey,
        command: Command,
        by: &str,
    ) -> Result<(RolloutView, bool), CommandError> {
        let out = self.with(|runs| {
            let e = runs.get_mut(key).ok_or_else(|| {
                CommandError::NotFound(format!("there is no Rollout {key} in this cluster"))
            })?;
            let run = e.run.as_mut().map_err(|why| {
                CommandError::Conflict(format!("Rollout {key} is invalid: {why}"))
            })?;
            let moved = run
                .command(command, Instant::now(), &wall(), by)
                .map_err(CommandError::Conflict)?;
            if let Some(d) = run.history.last() {
                tracing::info!(rollout = %key, action = %d.action, weight = d.canary_weight, "{}", d.message);
            }
            Ok((view(key, e), moved))
        });
        if out.is_ok() {
            self.bump();
        }
        out
    }

    /// Every rollout with its status now (conditions keep their transition times).
    pub fn views(&self) -> Vec<RolloutView> {
        self.with(|runs| {
            runs.iter_mut()
                .map(|(key, e)| {
                    let v = view(key, e);
                    e.conditions = v.status.conditions.clone();
                    v
                })
                .collect()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// A short digest of a spec (the same in every cluster that holds the same Rollout).
fn digest(spec: &RolloutSpec) -> String {
    use sha2::Digest;
    let json = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(&json)[..8])
}

fn view(key: &ServiceKey, e: &Entry) -> RolloutView {
    RolloutView {
        namespace: key.namespace.to_string(),
        name: key.name.to_string(),
        service: e.spec.service.clone(),
        stable: e.spec.stable.service.clone(),
        canary: e.spec.canary.service.clone(),
        steps: e.run.as_ref().map_or(0, |r| r.plan.steps.len() as u32),
        status: status_of(e),
    }
}

fn status_of(e: &Entry) -> RolloutStatus {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let cond = |type_: &str, status: &str, reason: &str, message: String| {
        let last = e
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: last,
            observed_generation: e.generation,
        }
    };
    let run = match &e.run {
        Err(why) => {
            return RolloutStatus {
                phase: phase::INVALID.into(),
                observed_generation: e.generation,
                conditions: vec![cond("Accepted", "False", "InvalidSpec", why.clone())],
                ..Default::default()
            };
        }
        Ok(r) => r,
    };
    let steps = run.plan.steps.len();
    let held = run
        .held
        .as_ref()
        .map(|why| format!("; held by the hub: {why}"))
        .unwrap_or_default();
    let progressing = match run.phase {
        Phase::Waiting => cond(
            "Progressing",
            "True",
            "WaitingForWave",
            format!("this cluster's wave has not begun: the canary gets nothing here yet{held}"),
        ),
        Phase::Progressing => cond(
            "Progressing",
            "True",
            "StepInProgress",
            format!(
                "step {} of {steps}: the canary gets {}%{held}",
                run.step + 1,
                run.canary_weight
            ),
        ),
        Phase::Paused => cond(
            "Progressing",
            "True",
            "Paused",
            format!(
                "paused at step {} of {steps}: the canary keeps {}%",
                run.step + 1,
                run.canary_weight
            ),
        ),
        Phase::Promoted => cond(
            "Progressing",
            "False",
            "Promoted",
            "the canary takes every request: make it the stable version to roll out the next"
                .into(),
        ),
        Phase::RolledBack => cond(
            "Progressing",
            "False",
            "RolledBack",
            run.history
                .last()
                .map(|d| d.message.clone())
                .unwrap_or_default(),
        ),
        Phase::Aborted => cond(
            "Progressing",
            "False",
            "Aborted",
            "every request goes to the stable version".into(),
        ),
    };
    let last = run
        .history
        .last()
        .map(|d| d.message.clone())
        .unwrap_or_default();
    let analysis = match &run.verdict {
        _ if run.phase == Phase::Promoted => cond("Healthy", "True", "ChecksPass", last),
        Verdict::Pass => cond(
            "Healthy",
            "True",
            "ChecksPass",
            format!(
                "success rate {:.2}%{} on {} requests to the canary",
                run.canary.success_rate().unwrap_or(1.0) * 100.0,
                run.canary
                    .quantile(0.99)
                    .map(|d| format!(", p99 {:.1} ms", d.as_secs_f64() * 1000.0))
                    .unwrap_or_default(),
                run.canary.requests
            ),
        ),
        Verdict::Wait(why) => cond("Healthy", "Unknown", "WaitingForRequests", why.clone()),
        Verdict::Fail(why) => cond("Healthy", "False", "CheckFailed", why.clone()),
    };
    let mut conditions = vec![
        cond("Accepted", "True", "Accepted", String::new()),
        progressing,
        analysis,
    ];
    if let Some(c) = &e.conflict {
        conditions.push(cond("RouteConflict", "True", "RouteConflict", c.clone()));
    }
    RolloutStatus {
        phase: run.phase.name().into(),
        step: run.step.min(steps) as u32,
        canary_weight: run.canary_weight,
        observed_generation: e.generation,
        conditions,
        history: run.history.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_count_only_from_proxies_sent_the_service_and_for_this_spec() {
        let r = Rollouts::default();
        let key: ServiceKey = "shop/reviews".parse().unwrap();
        let rollout: Rollout = serde_saphyr::from_str(
            "apiVersion: fedmesh.io/v1alpha1\nkind: Rollout\nmetadata: {name: reviews, namespace: shop}\n\
             spec:\n  service: reviews\n  stable: {service: reviews-v1}\n  canary: {service: reviews-v2}\n  \
             strategy: {canary: {steps: [{weight: 10}]}}\n",
        )
        .unwrap();
        r.sync(
            &[(key.clone(), rollout)].into(),
            &fedmesh_api::ClusterName::new("east").unwrap(),
        );
        let digest = r.with(|runs| runs[&key].digest.clone());
        let report = |name: String| {
            vec![dp::BackendSignals {
                name,
                requests: 5,
                ..Default::default()
            }]
        };
        let canary = |r: &Rollouts| r.with(|runs| runs[&key].run.as_ref().unwrap().canary.requests);
        r.record(&report(signal_name(&key, &digest, "canary")), |_| false);
        assert_eq!(canary(&r), 0, "a proxy not sent shop/reviews");
        r.record(&report(signal_name(&key, "0000", "canary")), |_| true);
        assert_eq!(canary(&r), 0, "another spec's versions");
        r.record(&report(signal_name(&key, &digest, "canary")), |s| {
            s == "shop/reviews"
        });
        assert_eq!(canary(&r), 5);
    }
}
