//! fedmesh's progressive delivery CRD, `Rollout` (group `fedmesh.io`, version `v1alpha1`): moves
//! the traffic of a service from its stable version to a canary step by step, checks the canary's
//! golden signals as the callers' own sidecars measure them at every step, and rolls back by
//! itself when a check fails.
//!
//! Each version is a Service of its own (selecting its pods by their `version` label, as
//! Gateway API backends are written); `service` is the name callers use:
//!
//! ```yaml
//! apiVersion: fedmesh.io/v1alpha1
//! kind: Rollout
//! metadata: {name: reviews, namespace: shop}
//! spec:
//!   service: reviews                  # what callers address
//!   stable: {service: reviews-v1}
//!   canary: {service: reviews-v2}
//!   strategy:
//!     canary:
//!       steps:                        # the canary's share, and how long each share holds
//!       - {weight: 5, pause: 30s}
//!       - {weight: 25, pause: 30s}
//!       - {weight: 50, pause: 1m}
//!     # or blueGreen: {mirror: 30s, rollbackWindow: 5m}: copies to green, then the switch
//!   analysis:                         # every step, from the callers' sidecars (no Prometheus)
//!     successRate: 99                 # % of the canary's answers that are not 5xx, at least
//!     latencyP99: 500ms               # the canary's p99, at most
//!     minRequests: 50                 # no decision (and no promotion) on fewer
//! ```
//!
//! After the last step the canary takes every request (`Promoted`) until the spec changes (make
//! the canary the new stable). A failed check sends every request back to the stable version
//! (`RolledBack`). A rollout drives the weights of an HTTPRoute rule that names both versions as
//! its backends, or makes its own route when none binds the service; a route binding the service
//! without both versions is a conflict (the rollout waits and says so), never overridden.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ServiceName;

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "fedmesh.io",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    shortname = "ro",
    status = "RolloutStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Canary","type":"integer","jsonPath":".status.canaryWeight"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.step"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// The Service callers address (in the rollout's namespace).
    pub service: String,
    /// The version that serves today.
    pub stable: Version,
    /// The version being rolled out.
    pub canary: Version,
    pub strategy: Strategy,
    #[serde(default)]
    pub analysis: Analysis,
    /// Across the clusterset: the clusters in order, wave by wave (e.g. `[{clusters: [east]},
    /// {clusters: [west, central]}]`). A wave begins when every cluster of the waves before it
    /// has promoted its canary; a rollback in any cluster rolls back every cluster. The same
    /// Rollout must be in each of these clusters (each cluster's control plane runs its own
    /// steps; the hub says which wave runs). Unset: this cluster alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Wave {
    pub clusters: Vec<String>,
}

/// A version of the service: a Service of its own (in the rollout's namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Version {
    pub service: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Strategy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue_green: Option<BlueGreenStrategy>,
}

/// Blue-green: green (the canary) first gets a copy of every request (its answers are dropped,
/// the callers get blue's) and is judged on them; then every request switches to green at once,
/// with blue kept warm: a failed check within `rollbackWindow` switches every request back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlueGreenStrategy {
    /// How long green gets the copies before the switch (default 30s; it also needs
    /// `minRequests` copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// How long after the switch a failed check switches back to blue (default 5m); then green
    /// is promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_window: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CanaryStrategy {
    /// The canary's shares in order, each rising; after the last the canary takes everything.
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// The canary's share of requests, in percent (1-100).
    pub weight: u32,
    /// How long the share holds at least, from the step's start (e.g. `30s`; default 0). The step
    /// also needs `minRequests` canary requests with every check passing before it moves on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<String>,
}

/// The checks of every step, on the canary's requests as its callers' sidecars see them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    /// The least share of answers that are not 5xx (or failures of the proxy), in percent.
    /// Default 99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// The most the canary's 99th percentile latency may be (e.g. `500ms`). Unset: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99: Option<String>,
    /// Requests to the canary a step needs before it is judged (default 20): a step with fewer
    /// waits, it is never promoted on silence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Waiting` (for its wave), `Progressing`, `Paused`, `Promoted`, `RolledBack`, `Aborted` or
    /// `Invalid`.
    #[serde(default)]
    pub phase: String,
    /// The step now (0-based).
    #[serde(default)]
    pub step: u32,
    /// The canary's share now, in percent.
    #[serde(default)]
    pub canary_weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Every decision, oldest first (the last 50).
    #[serde(default)]
    pub history: Vec<Decision>,
}

/// One decision of the controller and the numbers it was made on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// RFC 3339.
    pub time: String,
    /// `Started`, `Advanced`, `Promoted`, `RolledBack`, `Paused`, `Resumed`, `Aborted`.
    pub action: String,
    pub step: u32,
    /// The canary's share after the decision.
    pub canary_weight: u32,
    /// The canary's requests in the step's analysis, and how they did.
    pub requests: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    /// Why, in words (the failed check and its numbers for a rollback).
    pub message: String,
}

/// The phases of [`RolloutStatus::phase`].
pub mod phase {
    pub const PROGRESSING: &str = "Progressing";
    pub const PAUSED: &str = "Paused";
    pub const PROMOTED: &str = "Promoted";
    pub const ROLLED_BACK: &str = "RolledBack";
    pub const ABORTED: &str = "Aborted";
    pub const INVALID: &str = "Invalid";
    /// Its wave has not begun: the canary gets nothing here yet.
    pub const WAITING: &str = "Waiting";
}

/// A rollout's spec, checked: what the controller runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub service: ServiceName,
    pub stable: ServiceName,
    pub canary: ServiceName,
    pub steps: Vec<PlanStep>,
    /// A share (0-1).
    pub success_rate: f64,
    pub latency_p99: Option<Duration>,
    pub min_requests: u64,
    /// Blue-green (a mirror step, then the switch) rather than canary steps.
    pub blue_green: bool,
    /// The clusters wave by wave (empty: this cluster alone).
    pub waves: Vec<Vec<crate::ClusterName>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanStep {
    pub weight: u32,
    pub pause: Duration,
    /// The canary also gets a copy of every request (blue-green's first step).
    pub mirror: bool,
}

pub const DEFAULT_SUCCESS_RATE: f64 = 99.0;
pub const DEFAULT_MIN_REQUESTS: u64 = 20;

impl RolloutSpec {
    fn canary_steps(&self, c: &CanaryStrategy) -> Result<Vec<PlanStep>, String> {
        if c.steps.is_empty() {
            return Err(
                "strategy.canary.steps is empty: give the canary's shares, e.g. [{weight: 10, pause: 1m}, {weight: 50, pause: 1m}]"
                    .into(),
            );
        }
        let mut steps = Vec::with_capacity(c.steps.len());
        let mut last = 0;
        for (i, s) in c.steps.iter().enumerate() {
            if s.weight == 0 || s.weight > 100 {
                return Err(format!(
                    "step {i}: weight {} is not a share between 1 and 100",
                    s.weight
                ));
            }
            if s.weight <= last {
                return Err(format!(
                    "step {i}: weight {} does not rise above the step before ({last})",
                    s.weight
                ));
            }
            last = s.weight;
            let pause = match &s.pause {
                None => Duration::ZERO,
                Some(p) => humantime::parse_duration(p)
                    .map_err(|e| format!("step {i}: pause {p:?}: {e} (write e.g. 30s or 2m)"))?,
            };
            steps.push(PlanStep {
                weight: s.weight,
                pause,
                mirror: false,
            });
        }
        Ok(steps)
    }

    /// Checks the spec; the error says what is wrong and how to write it.
    pub fn plan(&self) -> Result<Plan, String> {
        let name = |what: &str, s: &str| {
            ServiceName::new(s).map_err(|e| format!("{what} {s:?} is not a Service name: {e}"))
        };
        let service = name("service", &self.service)?;
        let stable = name("stable.service", &self.stable.service)?;
        let canary = name("canary.service", &self.canary.service)?;
        if service == stable || service == canary {
            return Err(format!(
                "service {service} is also a version: the versions must be Services of their own (e.g. {service}-v1, {service}-v2), each selecting one version's pods"
            ));
        }
        if stable == canary {
            return Err(format!(
                "stable and canary are both {stable}: name the new version's Service as the canary"
            ));
        }
        let duration = |what: &str, s: &Option<String>, default: Duration| match s {
            None => Ok(default),
            Some(p) => humantime::parse_duration(p)
                .map_err(|e| format!("{what} {p:?}: {e} (write e.g. 30s or 2m)")),
        };
        let (steps, blue_green) = match (&self.strategy.canary, &self.strategy.blue_green) {
            (Some(_), Some(_)) => {
                return Err("strategy has both canary and blueGreen: choose one".into());
            }
            (None, None) => {
                return Err(
                    "strategy needs `canary: {steps: [...]}` or `blueGreen: {mirror: 30s, rollbackWindow: 5m}`"
                        .into(),
                );
            }
            (None, Some(b)) => (
                vec![
                    PlanStep {
                        weight: 0,
                        pause: duration(
                            "strategy.blueGreen.mirror",
                            &b.mirror,
                            Duration::from_secs(30),
                        )?,
                        mirror: true,
                    },
                    PlanStep {
                        weight: 100,
                        pause: duration(
                            "strategy.blueGreen.rollbackWindow",
                            &b.rollback_window,
                            Duration::from_secs(300),
                        )?,
                        mirror: false,
                    },
                ],
                true,
            ),
            (Some(c), None) => (self.canary_steps(c)?, false),
        };
        let rate = self.analysis.success_rate.unwrap_or(DEFAULT_SUCCESS_RATE);
        if !(rate > 0.0 && rate <= 100.0) {
            return Err(format!(
                "analysis.successRate {rate} is not a percentage above 0 (write e.g. 99 or 99.9)"
            ));
        }
        let latency_p99 = match &self.analysis.latency_p99 {
            None => None,
            Some(l) => {
                let d = humantime::parse_duration(l).map_err(|e| {
                    format!("analysis.latencyP99 {l:?}: {e} (write e.g. 250ms or 1s)")
                })?;
                if d.is_zero() {
                    return Err("analysis.latencyP99 is 0: no request is that fast".into());
                }
                Some(d)
            }
        };
        let min_requests = self.analysis.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS);
        if min_requests == 0 {
            return Err(
                "analysis.minRequests is 0: a step must see requests before it is judged".into(),
            );
        }
        let mut waves = Vec::with_capacity(self.waves.len());
        let mut seen = std::collections::BTreeSet::new();
        for (i, w) in self.waves.iter().enumerate() {
            if w.clusters.is_empty() {
                return Err(format!("wave {i} names no cluster"));
            }
            let mut wave = Vec::with_capacity(w.clusters.len());
            for c in &w.clusters {
                let name = crate::ClusterName::new(c)
                    .map_err(|e| format!("wave {i}: cluster {c:?}: {e}"))?;
                if !seen.insert(name.clone()) {
                    return Err(format!(
                        "wave {i}: cluster {c} is already in an earlier wave (a cluster rolls out once)"
                    ));
                }
                wave.push(name);
            }
            waves.push(wave);
        }
        Ok(Plan {
            waves,
            service,
            stable,
            canary,
            steps,
            success_rate: rate / 100.0,
            latency_p99,
            min_requests,
            blue_green,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> RolloutSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_spec_becomes_a_plan_with_defaults() {
        let p = spec(
            "service: reviews\nstable: {service: reviews-v1}\ncanary: {service: reviews-v2}\n\
             strategy: {canary: {steps: [{weight: 5, pause: 30s}, {weight: 50}]}}\n",
        )
        .plan()
        .unwrap();
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.steps[0].pause, Duration::from_secs(30));
        assert_eq!(p.steps[1].pause, Duration::ZERO);
        assert_eq!(p.success_rate, 0.99);
        assert_eq!(p.min_requests, DEFAULT_MIN_REQUESTS);
        assert_eq!(p.latency_p99, None);
    }

    #[test]
    fn blue_green_is_a_mirror_step_then_the_switch() {
        let p = spec(
            "service: reviews\nstable: {service: blue}\ncanary: {service: green}\n\
             strategy: {blueGreen: {mirror: 1m}}\n",
        )
        .plan()
        .unwrap();
        assert!(p.blue_green);
        assert_eq!(
            p.steps,
            [
                PlanStep {
                    weight: 0,
                    pause: Duration::from_secs(60),
                    mirror: true
                },
                PlanStep {
                    weight: 100,
                    pause: Duration::from_secs(300),
                    mirror: false
                }
            ]
        );
        let both = spec(
            "service: reviews\nstable: {service: blue}\ncanary: {service: green}\n\
             strategy: {blueGreen: {}, canary: {steps: [{weight: 5}]}}\n",
        );
        assert!(both.plan().unwrap_err().contains("choose one"));
    }

    #[test]
    fn mistakes_are_named() {
        let base =
            "service: reviews\nstable: {service: reviews-v1}\ncanary: {service: reviews-v2}\n";
        for (tail, says) in [
            ("strategy: {canary: {steps: []}}", "steps is empty"),
            (
                "strategy: {canary: {steps: [{weight: 50}, {weight: 20}]}}",
                "does not rise",
            ),
            (
                "strategy: {canary: {steps: [{weight: 101}]}}",
                "between 1 and 100",
            ),
            (
                "strategy: {canary: {steps: [{weight: 5, pause: soon}]}}",
                "pause \"soon\"",
            ),
            (
                "strategy: {canary: {steps: [{weight: 5}]}}\nanalysis: {successRate: 0}",
                "successRate 0",
            ),
            (
                "strategy: {canary: {steps: [{weight: 5}]}}\nanalysis: {minRequests: 0}",
                "minRequests is 0",
            ),
            ("strategy: {}", "strategy needs"),
            (
                "strategy: {canary: {steps: [{weight: 5}]}}\nwaves: [{clusters: [east]}, {clusters: [east]}]",
                "already in an earlier wave",
            ),
            (
                "strategy: {canary: {steps: [{weight: 5}]}}\nwaves: [{clusters: []}]",
                "wave 0 names no cluster",
            ),
        ] {
            let e = spec(&format!("{base}{tail}\n")).plan().unwrap_err();
            assert!(e.contains(says), "{tail}: {e}");
        }
        let same = spec(
            "service: reviews\nstable: {service: v1}\ncanary: {service: v1}\nstrategy: {canary: {steps: [{weight: 5}]}}\n",
        );
        assert!(same.plan().unwrap_err().contains("both v1"));
    }
}
