//! Rollouts across the clusterset, the hub's part. Every couple of seconds each control plane
//! reports where its Rollouts stand, with their latest decisions: the hub writes each new
//! decision to its audit log (`rollout.decision`, with its numbers) and shows every rollout
//! cluster by cluster (`GET /api/v1/rollouts`, `fedmesh rollout list`, the UI's timeline).
//!
//! For a Rollout in waves it also says which wave runs (each cluster steps its own canary on its
//! own sidecars' measurements) and answers with a gate for each:
//!
//! - **GO** for the clusters of the first wave not yet promoted everywhere, and of the waves
//!   before it;
//! - **HOLD** for the later waves (their canaries get nothing yet), and for every cluster while
//!   the clusters' Rollouts differ (the same spec must be in every cluster of its waves);
//! - **ROLL_BACK** for every cluster once any of them rolled back or was aborted.
//!
//! A cluster that stops reporting is forgotten after [`REPORT_TTL`]: its wave cannot complete
//! without it, so the waves after it hold. Reports are kept in memory only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fedmesh_api::pb::federation as pb;
use fedmesh_api::{ClusterName, ServiceKey};
use pb::rollout_gate::Gate;
use serde::{Deserialize, Serialize};

/// How long a cluster's report counts.
pub const REPORT_TTL: Duration = Duration::from_secs(10);
/// The most rollouts a report may carry, and decisions per rollout (more are ignored).
const MAX_ROLLOUTS: usize = 1000;
const MAX_DECISIONS: usize = 50;

/// Each cluster's latest report of one rollout, and when it came.
type ByCluster = BTreeMap<ClusterName, (pb::RolloutState, Instant)>;

pub struct Rollouts {
    reports: Mutex<HashMap<ServiceKey, ByCluster>>,
    /// The last decision audited per rollout and cluster, and its time (a few bytes per rollout
    /// and cluster that ever reported).
    audited: Mutex<HashMap<(ServiceKey, ClusterName), (String, String)>>,
    /// When the hub started (RFC 3339): after a restart, only later decisions are audited.
    started: String,
}

impl Default for Rollouts {
    fn default() -> Self {
        Self {
            reports: Mutex::default(),
            audited: Mutex::default(),
            started: fedmesh_trust::svid::rfc3339(std::time::SystemTime::now()),
        }
    }
}

/// One rollout across the clusterset as the hub sees it: each cluster's report, decisions, and
/// (in waves) the gate it gets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClustersetRollout {
    /// `namespace/name`.
    pub rollout: String,
    /// The service callers address, its stable and its canary version.
    pub service: String,
    pub stable: String,
    pub canary: String,
    /// It runs in waves across clusters (else each cluster on its own).
    pub waves: bool,
    pub clusters: Vec<RolloutCluster>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutCluster {
    pub cluster: String,
    /// Its wave (0-based; 0 for a rollout of one cluster).
    pub wave: u32,
    /// Waiting, Progressing, Paused, Promoted, RolledBack, Aborted.
    pub phase: String,
    pub step: u32,
    pub steps: u32,
    /// The canary's share there, in percent.
    pub canary_weight: u32,
    /// The canary's requests in the step now, and how they did: the share not failed, in
    /// percent, and the p99 (absent without requests).
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// The last decision there.
    pub message: String,
    /// GO, HOLD or ROLL_BACK, and why (empty outside waves).
    pub gate: String,
    pub reason: String,
    /// Its latest decisions, oldest first.
    pub decisions: Vec<DecisionView>,
}

/// One decision of a cluster's rollout controller and the numbers it was made on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DecisionView {
    /// RFC 3339.
    pub time: String,
    pub action: String,
    pub step: u32,
    pub canary_weight: u32,
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub message: String,
}

/// A decision new to the audit log: the rollout, and what was decided.
pub struct NewDecision {
    pub rollout: String,
    pub decision: pb::RolloutDecision,
}

fn decision_key(d: &pb::RolloutDecision) -> String {
    format!("{}|{}|{}|{}", d.time, d.action, d.step, d.canary_weight)
}

impl Rollouts {
    /// Records `cluster`'s report; answers with its gates (for rollouts in waves) and the
    /// decisions the audit log does not have yet.
    pub fn report(
        &self,
        cluster: &ClusterName,
        r: pb::RolloutReport,
    ) -> (pb::RolloutGates, Vec<NewDecision>) {
        let now = Instant::now();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let mut audited = self.audited.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = pb::RolloutGates::default();
        let mut fresh = Vec::new();
        // What no cluster reports any more goes (the views do the same).
        reports.retain(|_, by| {
            by.retain(|_, (_, at)| now.duration_since(*at) < REPORT_TTL);
            !by.is_empty()
        });
        for mut s in r.rollouts.into_iter().take(MAX_ROLLOUTS) {
            s.decisions.truncate(MAX_DECISIONS);
            let Ok(key) = s.rollout.parse::<ServiceKey>() else {
                continue;
            };
            // After the last one audited; when it is no longer among those reported, those after
            // its time (or, never seen, since the hub started).
            let last = audited.get(&(key.clone(), cluster.clone()));
            let at = last.and_then(|(k, _)| s.decisions.iter().position(|d| decision_key(d) == *k));
            let new: Vec<&pb::RolloutDecision> = match at {
                Some(i) => s.decisions.iter().skip(i + 1).collect(),
                None => s
                    .decisions
                    .iter()
                    .filter(|d| match last {
                        Some((_, time)) => d.time > *time,
                        None => d.time >= self.started,
                    })
                    .collect(),
            };
            if let Some(d) = s.decisions.last() {
                audited.insert(
                    (key.clone(), cluster.clone()),
                    (decision_key(d), d.time.clone()),
                );
            }
            fresh.extend(new.into_iter().map(|d| NewDecision {
                rollout: s.rollout.clone(),
                decision: d.clone(),
            }));
            let by = reports.entry(key).or_default();
            by.retain(|_, (_, at)| now.duration_since(*at) < REPORT_TTL);
            by.insert(cluster.clone(), (s.clone(), now));
            if s.waves.is_empty() {
                continue;
            }
            let (gate, wave, reason) = gate(cluster, &s, by);
            out.rollouts.push(pb::RolloutGate {
                rollout: s.rollout,
                gate: gate as i32,
                wave,
                reason,
            });
        }
        (out, fresh)
    }

    /// Every rollout with each cluster's report, decisions and gate (`fedmesh rollout list`).
    pub fn views(&self) -> Vec<ClustersetRollout> {
        let now = Instant::now();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.retain(|_, by| {
            by.retain(|_, (_, at)| now.duration_since(*at) < REPORT_TTL);
            !by.is_empty()
        });
        let mut out: Vec<ClustersetRollout> = reports
            .iter()
            .map(|(key, by)| {
                let first = by.values().next().map(|(s, _)| s);
                let of =
                    |f: fn(&pb::RolloutState) -> &String| first.map(f).cloned().unwrap_or_default();
                ClustersetRollout {
                    rollout: key.to_string(),
                    service: of(|s| &s.service),
                    stable: of(|s| &s.stable),
                    canary: of(|s| &s.canary),
                    waves: first.is_some_and(|s| !s.waves.is_empty()),
                    clusters: by
                        .iter()
                        .map(|(c, (s, _))| {
                            let (g, reason) = if s.waves.is_empty() {
                                (String::new(), String::new())
                            } else {
                                let (g, _, reason) = gate(c, s, by);
                                (g.as_str_name().to_string(), reason)
                            };
                            RolloutCluster {
                                cluster: c.to_string(),
                                wave: wave_of(c, s).unwrap_or(0) as u32,
                                phase: s.phase.clone(),
                                step: s.step,
                                steps: s.steps,
                                canary_weight: s.canary_weight,
                                requests: s.requests,
                                success_rate: (s.requests > 0)
                                    .then(|| (s.success_rate * 10_000.0).round() / 100.0),
                                latency_p99_ms: (s.requests > 0).then_some(s.latency_p99_ms),
                                message: s.message.clone(),
                                gate: g,
                                reason,
                                decisions: s
                                    .decisions
                                    .iter()
                                    .map(|d| DecisionView {
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
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        for r in &mut out {
            r.clusters
                .sort_by(|a, b| (a.wave, &a.cluster).cmp(&(b.wave, &b.cluster)));
        }
        out.sort_by(|a, b| a.rollout.cmp(&b.rollout));
        out
    }
}

/// Every Rollout of the clusterset: each cluster's wave, phase, step, share, analysis and latest
/// decisions as its control plane last reported them, and (in waves) the gate the hub gives it.
#[utoipa::path(get, path = "/api/v1/rollouts",
    responses((status = 200, description = "Every Rollout, cluster by cluster in wave order", body = [ClustersetRollout])))]
pub async fn list_rollouts(
    axum::extract::State(s): axum::extract::State<super::admin::AdminState>,
) -> axum::Json<Vec<ClustersetRollout>> {
    axum::Json(s.hub.rollouts.views())
}

fn wave_of(cluster: &ClusterName, s: &pb::RolloutState) -> Option<usize> {
    s.waves
        .iter()
        .position(|w| w.clusters.iter().any(|c| c == cluster.as_str()))
}

/// The gate of `cluster` (which reported `s`), given every cluster's report of the rollout.
fn gate(cluster: &ClusterName, s: &pb::RolloutState, by: &ByCluster) -> (Gate, u32, String) {
    // Only the clusters of its waves count (another cluster may hold a rollout of the same name
    // of its own).
    let members: ByCluster = by
        .iter()
        .filter(|(c, _)| wave_of(c, s).is_some())
        .map(|(c, v)| (c.clone(), v.clone()))
        .collect();
    let by = &members;
    let differ: Vec<&str> = by
        .iter()
        .filter(|(_, (o, _))| o.spec_digest != s.spec_digest)
        .map(|(c, _)| c.as_str())
        .collect();
    if !differ.is_empty() {
        return (
            Gate::Hold,
            0,
            format!(
                "the Rollout in {} differs from this cluster's: apply the same spec to every cluster of its waves",
                differ.join(", ")
            ),
        );
    }
    // The cluster where it began (its own analysis or a user's command), before those that
    // followed it.
    let ended = |o: &pb::RolloutState| o.phase == "RolledBack" || o.phase == "Aborted";
    if let Some((c, (o, _))) = by
        .iter()
        .find(|(_, (o, _))| ended(o) && !o.followed)
        .or_else(|| by.iter().find(|(_, (o, _))| ended(o)))
    {
        let why = if o.phase == "Aborted" {
            format!("{c} was aborted: every cluster goes back to the stable version")
        } else if c == cluster {
            o.message.clone()
        } else {
            format!("{c} rolled back ({})", o.message)
        };
        return (Gate::RollBack, 0, why);
    }
    let promoted = |c: &str| {
        by.iter()
            .any(|(name, (o, _))| name.as_str() == c && o.phase == "Promoted")
    };
    let current = s
        .waves
        .iter()
        .position(|w| !w.clusters.iter().all(|c| promoted(c)));
    let Some(current) = current else {
        return (
            Gate::Go,
            s.waves.len().saturating_sub(1) as u32,
            "every wave is promoted".into(),
        );
    };
    let Some(mine) = wave_of(cluster, s) else {
        return (
            Gate::Hold,
            current as u32,
            format!("{cluster} is in none of the rollout's waves"),
        );
    };
    if mine <= current {
        return (Gate::Go, current as u32, format!("wave {current} runs"));
    }
    let pending: Vec<String> = s.waves[current]
        .clusters
        .iter()
        .filter(|c| !promoted(c))
        .map(|c| {
            match by
                .iter()
                .find(|(name, _)| name.as_str() == c.as_str())
                .map(|(_, (o, _))| o)
            {
                Some(o) => format!(
                    "{c} is {} at step {} of {} ({}%)",
                    o.phase,
                    o.step.saturating_add(1).min(o.steps),
                    o.steps,
                    o.canary_weight
                ),
                None => format!("{c} has not reported this rollout"),
            }
        })
        .collect();
    (
        Gate::Hold,
        current as u32,
        format!(
            "wave {current} first: {} (this cluster is in wave {mine})",
            pending.join("; ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(phase: &str, digest: &str) -> pb::RolloutState {
        pb::RolloutState {
            rollout: "shop/reviews".into(),
            waves: vec![
                pb::RolloutWave {
                    clusters: vec!["east".into()],
                },
                pb::RolloutWave {
                    clusters: vec!["west".into(), "central".into()],
                },
            ],
            spec_digest: digest.into(),
            phase: phase.into(),
            step: 0,
            steps: 2,
            ..Default::default()
        }
    }

    fn gate_of(h: &Rollouts, c: &str, phase: &str, digest: &str) -> (Gate, String) {
        let g = h
            .report(
                &ClusterName::new(c).unwrap(),
                pb::RolloutReport {
                    rollouts: vec![state(phase, digest)],
                },
            )
            .0
            .rollouts
            .remove(0);
        (Gate::try_from(g.gate).unwrap(), g.reason)
    }

    #[test]
    fn waves_go_in_order_and_one_rollback_rolls_back_all() {
        let h = Rollouts::default();
        assert_eq!(gate_of(&h, "east", "Waiting", "a").0, Gate::Go);
        let (g, why) = gate_of(&h, "west", "Waiting", "a");
        assert_eq!(g, Gate::Hold);
        assert!(why.contains("east is Waiting at step 1 of 2"), "{why}");
        assert_eq!(gate_of(&h, "east", "Promoted", "a").0, Gate::Go);
        assert_eq!(gate_of(&h, "west", "Waiting", "a").0, Gate::Go);
        // A cluster with another spec holds everyone.
        let (g, why) = gate_of(&h, "central", "Waiting", "b");
        assert_eq!(g, Gate::Hold);
        assert!(why.contains("east, west differs"), "{why}");
        let (g, why) = gate_of(&h, "central", "RolledBack", "a");
        assert_eq!((g, why.as_str()), (Gate::RollBack, ""));
        let (g, why) = gate_of(&h, "east", "Promoted", "a");
        assert_eq!(g, Gate::RollBack);
        assert!(why.starts_with("central rolled back"), "{why}");
        let views = h.views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].clusters[0].cluster, "east");
        assert_eq!(views[0].clusters[0].gate, "ROLL_BACK");
    }

    #[test]
    fn each_decision_is_new_to_the_audit_log_once() {
        let h = Rollouts::default();
        let east = ClusterName::new("east").unwrap();
        let d = |time: &str, action: &str| pb::RolloutDecision {
            time: time.into(),
            action: action.into(),
            ..Default::default()
        };
        let report = |ds: Vec<pb::RolloutDecision>| pb::RolloutReport {
            rollouts: vec![pb::RolloutState {
                rollout: "shop/reviews".into(),
                decisions: ds,
                ..Default::default()
            }],
        };
        // Before the hub started: not audited again.
        let (gates, new) = h.report(&east, report(vec![d("2000-01-01T00:00:00Z", "Started")]));
        assert!(gates.rollouts.is_empty(), "no waves, no gate");
        assert!(new.is_empty());
        let later = |s: &str| format!("9999-01-01T00:00:0{s}Z");
        let (_, new) = h.report(
            &east,
            report(vec![
                d("2000-01-01T00:00:00Z", "Started"),
                d(&later("1"), "Advanced"),
            ]),
        );
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].decision.action, "Advanced");
        let (_, new) = h.report(
            &east,
            report(vec![d(&later("1"), "Advanced"), d(&later("2"), "Promoted")]),
        );
        assert_eq!(
            new.iter()
                .map(|n| n.decision.action.as_str())
                .collect::<Vec<_>>(),
            ["Promoted"]
        );
        let (_, new) = h.report(&east, report(vec![d(&later("2"), "Promoted")]));
        assert!(new.is_empty());
    }
}
