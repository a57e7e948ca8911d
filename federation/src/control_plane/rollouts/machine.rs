//! One rollout's state machine: its plan, where it stands, the canary's requests in the step now,
//! and every decision. Pure: the controller feeds it the sidecars' reports, the time, and the
//! user's commands; it answers with the canary's share.

use std::time::{Duration, Instant};

use fedmesh_api::rollout::{Decision, Plan, phase};
use fedmesh_dataplane::signals::Counts;

/// Where a rollout stands, as the control plane keeps it across its restarts: a restarted
/// control plane goes on from there (a rolled-back canary stays rolled back, a promoted one
/// promoted) instead of starting the rollout again.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    /// The spec it ran ([`super::digest`]): another spec starts afresh.
    pub digest: String,
    pub phase: String,
    pub step: usize,
    pub canary_weight: u32,
    pub history: Vec<Decision>,
}

/// The most decisions a rollout keeps.
const HISTORY: usize = 50;

/// A user's command (`fedmesh rollout pause|resume|promote|abort`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl std::str::FromStr for Command {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "promote" => Self::Promote,
            "abort" => Self::Abort,
            _ => {
                return Err(format!(
                    "{s:?} is not a rollout command (pause, resume, promote or abort)"
                ));
            }
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Its wave has not begun (a rollout in waves, until the hub says go): the canary gets 0%.
    Waiting,
    Progressing,
    Paused,
    Promoted,
    RolledBack,
    Aborted,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => phase::WAITING,
            Self::Progressing => phase::PROGRESSING,
            Self::Paused => phase::PAUSED,
            Self::Promoted => phase::PROMOTED,
            Self::RolledBack => phase::ROLLED_BACK,
            Self::Aborted => phase::ABORTED,
        }
    }
}

/// What the hub says of a rollout in waves ([`fedmesh_api::pb::federation::RolloutGate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Go,
    Hold(String),
    RollBack(String),
}

/// The analysis of a step: a check failed (with its numbers), or not enough requests yet.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass,
    Wait(String),
    Fail(String),
}

pub struct Run {
    pub plan: Plan,
    pub phase: Phase,
    /// Index into the plan's steps (`steps.len()` once promoted).
    pub step: usize,
    pub canary_weight: u32,
    step_started: Instant,
    /// The canary's and the stable version's requests in this step.
    pub canary: Counts,
    pub stable: Counts,
    pub history: Vec<Decision>,
    /// The last analysis, in words, for the status.
    pub verdict: Verdict,
    /// The hub holds this rollout in waves where it is, and why.
    pub held: Option<String>,
    /// It rolled back on the hub's word, following another cluster.
    pub followed: bool,
}

impl Run {
    /// A rollout of this cluster alone starts at its first step; one in waves waits for the
    /// hub to say its wave begins (`waves`).
    pub fn start(plan: Plan, now: Instant, wall: &str) -> Self {
        let waves = !plan.waves.is_empty();
        let weight = if waves { 0 } else { plan.steps[0].weight };
        let mut r = Self {
            plan,
            phase: if waves {
                Phase::Waiting
            } else {
                Phase::Progressing
            },
            held: None,
            followed: false,
            step: 0,
            canary_weight: weight,
            step_started: now,
            canary: Counts::default(),
            stable: Counts::default(),
            history: Vec::new(),
            verdict: Verdict::Wait(String::new()),
        };
        r.verdict = r.analyse();
        if waves {
            r.decide(
                wall,
                "Waiting",
                "waiting for the hub to begin this cluster's wave: the canary gets nothing here yet"
                    .into(),
            );
        } else {
            let msg = r.step_words();
            r.decide(wall, "Started", msg);
        }
        r
    }

    /// What the step now does, in words.
    fn step_words(&self) -> String {
        match self.plan.steps.get(self.step) {
            Some(s) if s.mirror => format!(
                "step {}: green gets a copy of every request (its answers are dropped), blue answers",
                self.step
            ),
            Some(s) if self.plan.blue_green => format!(
                "step {}: every request switches to green; blue stays warm for {}",
                self.step,
                humantime::format_duration(s.pause)
            ),
            Some(s) => format!("step {}: the canary gets {}%", self.step, s.weight),
            None => "the canary takes every request".into(),
        }
    }

    /// The canary also gets a copy of every request now.
    pub fn mirroring(&self) -> bool {
        matches!(self.phase, Phase::Progressing | Phase::Paused)
            && self.plan.steps.get(self.step).is_some_and(|s| s.mirror)
    }

    /// The run as it is saved.
    pub fn saved(&self, digest: &str) -> Saved {
        Saved {
            digest: digest.to_string(),
            phase: self.phase.name().to_string(),
            step: self.step,
            canary_weight: self.canary_weight,
            history: self.history.clone(),
        }
    }

    /// Goes on from where a saved run stood (its step's analysis starts afresh); `None` when the
    /// record does not fit the plan.
    pub fn restore(plan: Plan, s: Saved, now: Instant) -> Option<Self> {
        let phase = [
            Phase::Waiting,
            Phase::Progressing,
            Phase::Paused,
            Phase::Promoted,
            Phase::RolledBack,
            Phase::Aborted,
        ]
        .into_iter()
        .find(|p| p.name() == s.phase)?;
        // A running phase needs a step of the plan; an ended one may stand past the last.
        let running = matches!(phase, Phase::Waiting | Phase::Progressing | Phase::Paused);
        if s.step > plan.steps.len()
            || (running && s.step == plan.steps.len())
            || s.canary_weight > 100
        {
            return None;
        }
        let mut r = Self {
            plan,
            phase,
            step: s.step,
            canary_weight: s.canary_weight,
            step_started: now,
            canary: Counts::default(),
            stable: Counts::default(),
            history: s.history,
            verdict: Verdict::Wait(String::new()),
            held: None,
            followed: false,
        };
        // In waves, nothing moves on before the hub has spoken again.
        if !r.plan.waves.is_empty() {
            r.held = Some("the control plane restarted: waiting for the hub's word".into());
        }
        r.verdict = r.analyse();
        Some(r)
    }

    /// What the hub says of this rollout in waves; true when the canary's share changed.
    pub fn gate(&mut self, gate: Gate, now: Instant, wall: &str) -> bool {
        match gate {
            Gate::Go => {
                self.held = None;
                if self.phase != Phase::Waiting {
                    return false;
                }
                self.phase = Phase::Progressing;
                self.step = 0;
                self.canary_weight = self.plan.steps[0].weight;
                self.new_window(now);
                let msg = format!("this cluster's wave begins: {}", self.step_words());
                self.decide(wall, "Started", msg);
                true
            }
            Gate::Hold(why) => {
                self.held = Some(why);
                false
            }
            Gate::RollBack(why) => {
                self.held = None;
                // A waiting run sends the canary nothing already: it waits on (so resuming every
                // cluster of a rolled-back rollout starts it again).
                if !matches!(
                    self.phase,
                    Phase::Progressing | Phase::Paused | Phase::Promoted
                ) {
                    return false;
                }
                let before = self.canary_weight;
                self.phase = Phase::RolledBack;
                self.canary_weight = 0;
                self.followed = true;
                self.decide(wall, "RolledBack", why);
                before != 0
            }
        }
    }

    /// Judges the canary's requests of this step against the plan.
    pub fn analyse(&self) -> Verdict {
        let c = &self.canary;
        let min = self.plan.min_requests;
        if c.requests < min {
            return Verdict::Wait(format!(
                "waiting for requests to the canary: {} of the {min} a step needs",
                c.requests
            ));
        }
        let rate = c.success_rate().unwrap_or(0.0);
        if rate < self.plan.success_rate {
            return Verdict::Fail(format!(
                "success rate {:.2}% is below the floor of {}% ({} of {} requests failed)",
                rate * 100.0,
                self.plan.success_rate * 100.0,
                c.failures,
                c.requests
            ));
        }
        if let (Some(max), Some(p99)) = (self.plan.latency_p99, c.quantile(0.99))
            && p99 > max
        {
            return Verdict::Fail(format!(
                "p99 latency {:.1} ms is above the ceiling of {} ms ({} requests)",
                p99.as_secs_f64() * 1000.0,
                max.as_millis(),
                c.requests
            ));
        }
        Verdict::Pass
    }

    /// Moves on if it may; true when the canary's share changed.
    pub fn tick(&mut self, now: Instant, wall: &str) -> bool {
        if self.phase != Phase::Progressing {
            return false;
        }
        self.verdict = self.analyse();
        match self.verdict.clone() {
            Verdict::Fail(why) => {
                self.phase = Phase::RolledBack;
                self.canary_weight = 0;
                self.decide(wall, "RolledBack", why);
                true
            }
            Verdict::Wait(_) => false,
            // Held by the hub: a failure still rolls back, a pass does not move on.
            Verdict::Pass if self.held.is_some() => false,
            Verdict::Pass => {
                let pause = self.plan.steps[self.step].pause;
                if now.duration_since(self.step_started) < pause {
                    return false;
                }
                self.step += 1;
                match self.plan.steps.get(self.step) {
                    Some(s) => {
                        self.canary_weight = s.weight;
                        let msg = format!(
                            "checks passed on {} requests: {}",
                            self.canary.requests,
                            self.step_words()
                        );
                        self.decide(wall, "Advanced", msg);
                    }
                    None if self.plan.blue_green => {
                        self.phase = Phase::Promoted;
                        self.canary_weight = 100;
                        let msg = format!(
                            "checks passed on {} requests through the rollback window: green is promoted, blue may go",
                            self.canary.requests
                        );
                        self.decide(wall, "Promoted", msg);
                    }
                    None => {
                        self.phase = Phase::Promoted;
                        self.canary_weight = 100;
                        let msg = format!(
                            "checks passed on {} requests at the last step: the canary takes every request",
                            self.canary.requests
                        );
                        self.decide(wall, "Promoted", msg);
                    }
                }
                self.new_window(now);
                true
            }
        }
    }

    /// A user's command; true when the canary's share changed. An error says why the command
    /// does not apply now.
    pub fn command(
        &mut self,
        c: Command,
        now: Instant,
        wall: &str,
        by: &str,
    ) -> Result<bool, String> {
        let before = self.canary_weight;
        match (c, self.phase) {
            (Command::Pause, Phase::Progressing) => {
                self.phase = Phase::Paused;
                self.decide(wall, "Paused", format!("paused by {by}"));
            }
            (Command::Resume, Phase::Paused) => {
                self.phase = Phase::Progressing;
                self.new_window(now);
                self.decide(
                    wall,
                    "Resumed",
                    format!(
                        "resumed by {by}: step {} starts its analysis again",
                        self.step
                    ),
                );
            }
            (Command::Resume, Phase::RolledBack | Phase::Aborted)
                if !self.plan.waves.is_empty() =>
            {
                self.phase = Phase::Waiting;
                self.step = 0;
                self.canary_weight = 0;
                self.new_window(now);
                self.decide(
                    wall,
                    "Resumed",
                    format!("restarted by {by}: waiting for the hub to begin this cluster's wave (resume every cluster of the rollout)"),
                );
            }
            (Command::Resume, Phase::RolledBack | Phase::Aborted) => {
                self.phase = Phase::Progressing;
                self.step = 0;
                self.canary_weight = self.plan.steps[0].weight;
                self.new_window(now);
                self.decide(
                    wall,
                    "Resumed",
                    format!(
                        "restarted by {by}: step 0 gives the canary {}%",
                        self.canary_weight
                    ),
                );
            }
            (Command::Promote, Phase::Progressing | Phase::Paused) => {
                self.phase = Phase::Promoted;
                self.step = self.plan.steps.len();
                self.canary_weight = 100;
                self.decide(
                    wall,
                    "Promoted",
                    format!("promoted by {by}: the canary takes every request"),
                );
            }
            (
                Command::Abort,
                Phase::Waiting | Phase::Progressing | Phase::Paused | Phase::Promoted,
            ) => {
                self.phase = Phase::Aborted;
                self.canary_weight = 0;
                self.decide(
                    wall,
                    "Aborted",
                    format!("aborted by {by}: every request goes to the stable version"),
                );
            }
            (c, p) => {
                return Err(format!(
                    "the rollout is {}: {} does not apply (pause a progressing rollout, resume a paused, rolled back or aborted one, promote or abort one that has not ended)",
                    p.name(),
                    match c {
                        Command::Pause => "pause",
                        Command::Resume => "resume",
                        Command::Promote => "promote",
                        Command::Abort => "abort",
                    }
                ));
            }
        }
        self.verdict = self.analyse();
        Ok(before != self.canary_weight)
    }

    /// How long until the step may end (for the status): `None` when it does not wait on time.
    pub fn pause_left(&self, now: Instant) -> Option<Duration> {
        if self.phase != Phase::Progressing {
            return None;
        }
        let pause = self.plan.steps.get(self.step)?.pause;
        pause.checked_sub(now.duration_since(self.step_started))
    }

    fn new_window(&mut self, now: Instant) {
        self.followed = false;
        self.step_started = now;
        self.canary = Counts::default();
        self.stable = Counts::default();
        self.verdict = self.analyse();
    }

    fn decide(&mut self, wall: &str, action: &str, message: String) {
        let c = &self.canary;
        self.history.push(Decision {
            time: wall.to_string(),
            action: action.to_string(),
            step: self.step as u32,
            canary_weight: self.canary_weight,
            requests: c.requests,
            success_rate: c.success_rate().map(|r| (r * 10_000.0).round() / 100.0),
            latency_p99_ms: c
                .quantile(0.99)
                .map(|d| (d.as_secs_f64() * 10_000.0).round() / 10.0),
            message,
        });
        if self.history.len() > HISTORY {
            self.history.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_api::rollout::PlanStep;

    fn plan() -> Plan {
        Plan {
            service: fedmesh_api::ServiceName::new("reviews").unwrap(),
            stable: fedmesh_api::ServiceName::new("reviews-v1").unwrap(),
            canary: fedmesh_api::ServiceName::new("reviews-v2").unwrap(),
            steps: vec![
                PlanStep {
                    weight: 10,
                    pause: Duration::from_secs(5),
                    mirror: false,
                },
                PlanStep {
                    weight: 50,
                    pause: Duration::ZERO,
                    mirror: false,
                },
            ],
            success_rate: 0.99,
            latency_p99: Some(Duration::from_millis(100)),
            min_requests: 20,
            blue_green: false,
            waves: Vec::new(),
        }
    }

    fn requests(r: &mut Run, n: u64, failed_every: u64, ms: u64) {
        for i in 0..n {
            let failed = failed_every > 0 && i % failed_every == 0;
            r.canary.record(failed, Duration::from_millis(ms));
        }
    }

    #[test]
    fn a_healthy_canary_climbs_each_step_only_with_requests_and_after_its_pause() {
        let t0 = Instant::now();
        let mut r = Run::start(plan(), t0, "t0");
        assert_eq!(r.canary_weight, 10);
        // No requests: no promotion, however long it waits.
        assert!(!r.tick(t0 + Duration::from_secs(60), "t"));
        assert!(matches!(r.verdict, Verdict::Wait(_)));
        requests(&mut r, 20, 0, 3);
        // Enough requests, but the pause holds.
        let t1 = t0 + Duration::from_secs(1);
        r.step_started = t1;
        assert!(!r.tick(t1 + Duration::from_secs(4), "t"));
        assert!(r.tick(t1 + Duration::from_secs(5), "t"));
        assert_eq!((r.step, r.canary_weight), (1, 50));
        assert_eq!(r.canary.requests, 0, "each step judges its own requests");
        requests(&mut r, 20, 0, 3);
        assert!(r.tick(t1 + Duration::from_secs(6), "t"));
        assert_eq!((r.phase, r.canary_weight), (Phase::Promoted, 100));
        let actions: Vec<_> = r.history.iter().map(|d| d.action.as_str()).collect();
        assert_eq!(actions, ["Started", "Advanced", "Promoted"]);
        assert_eq!(r.history[2].requests, 20);
        assert_eq!(r.history[2].success_rate, Some(100.0));
    }

    #[test]
    fn errors_or_a_slow_tail_roll_back_with_the_numbers() {
        let t0 = Instant::now();
        let mut r = Run::start(plan(), t0, "t0");
        requests(&mut r, 40, 20, 3);
        assert!(r.tick(t0, "t"));
        assert_eq!((r.phase, r.canary_weight), (Phase::RolledBack, 0));
        let last = r.history.last().unwrap();
        assert!(
            last.message
                .contains("success rate 95.00% is below the floor of 99% (2 of 40"),
            "{}",
            last.message
        );
        assert_eq!(last.success_rate, Some(95.0));

        let mut slow = Run::start(plan(), t0, "t0");
        requests(&mut slow, 30, 0, 250);
        assert!(slow.tick(t0, "t"));
        let last = slow.history.last().unwrap();
        assert!(
            last.message.contains("above the ceiling of 100 ms"),
            "{}",
            last.message
        );
        assert!(last.latency_p99_ms.unwrap() > 200.0);
    }

    #[test]
    fn a_rollout_in_waves_waits_for_its_wave_holds_when_told_and_rolls_back_with_the_others() {
        let t0 = Instant::now();
        let mut p = plan();
        p.waves = vec![vec![fedmesh_api::ClusterName::new("east").unwrap()]];
        let mut r = Run::start(p, t0, "t0");
        assert_eq!((r.phase, r.canary_weight), (Phase::Waiting, 0));
        requests(&mut r, 40, 0, 1);
        assert!(!r.tick(t0 + Duration::from_secs(60), "t"), "waiting");
        assert!(!r.gate(Gate::Hold("wave 0 first".into()), t0, "t"));
        assert!(r.gate(Gate::Go, t0, "t"));
        assert_eq!((r.phase, r.canary_weight), (Phase::Progressing, 10));
        requests(&mut r, 40, 0, 1);
        assert!(!r.gate(Gate::Hold("the clusters disagree".into()), t0, "t"));
        assert!(!r.tick(t0 + Duration::from_secs(60), "t"), "held");
        assert!(r.gate(Gate::RollBack("west rolled back".into()), t0, "t"));
        assert_eq!((r.phase, r.canary_weight), (Phase::RolledBack, 0));
        assert_eq!(r.history.last().unwrap().message, "west rolled back");
        let actions: Vec<_> = r.history.iter().map(|d| d.action.as_str()).collect();
        assert_eq!(actions, ["Waiting", "Started", "RolledBack"]);
        // Resumed, it waits; another cluster still rolled back does not roll it back again.
        assert_eq!(r.command(Command::Resume, t0, "t", "ann"), Ok(false));
        assert!(!r.gate(Gate::RollBack("west rolled back".into()), t0, "t"));
        assert_eq!(r.phase, Phase::Waiting);
        assert!(r.gate(Gate::Go, t0, "t"));
    }

    #[test]
    fn a_saved_run_goes_on_where_it_stood() {
        let t0 = Instant::now();
        let mut r = Run::start(plan(), t0, "t0");
        requests(&mut r, 40, 20, 1);
        assert!(r.tick(t0, "t"));
        let saved = r.saved("d1");
        let back = Run::restore(plan(), saved.clone(), t0).unwrap();
        assert_eq!((back.phase, back.canary_weight), (Phase::RolledBack, 0));
        assert_eq!(back.history, r.history);
        let mut bad = saved.clone();
        bad.phase = "Sideways".into();
        assert!(Run::restore(plan(), bad, t0).is_none());
        // A running phase past the last step would index past the plan.
        let mut bad = saved;
        bad.phase = "Progressing".into();
        bad.step = 2;
        assert!(Run::restore(plan(), bad, t0).is_none());
    }

    #[test]
    fn commands_pause_resume_promote_and_abort() {
        let t0 = Instant::now();
        let mut r = Run::start(plan(), t0, "t0");
        assert_eq!(r.command(Command::Pause, t0, "t", "ann"), Ok(false));
        requests(&mut r, 40, 0, 1);
        assert!(!r.tick(t0 + Duration::from_secs(60), "t"), "paused");
        assert!(r.command(Command::Pause, t0, "t", "ann").is_err());
        assert_eq!(r.command(Command::Resume, t0, "t", "ann"), Ok(false));
        assert_eq!(r.canary.requests, 0, "a resumed step counts afresh");
        assert_eq!(r.command(Command::Abort, t0, "t", "ann"), Ok(true));
        assert_eq!(r.canary_weight, 0);
        assert_eq!(r.command(Command::Resume, t0, "t", "ann"), Ok(true));
        assert_eq!((r.phase, r.canary_weight), (Phase::Progressing, 10));
        assert_eq!(r.command(Command::Promote, t0, "t", "ann"), Ok(true));
        assert_eq!((r.phase, r.canary_weight), (Phase::Promoted, 100));
        assert!(
            r.history
                .last()
                .unwrap()
                .message
                .contains("promoted by ann")
        );
        assert!("skip".parse::<Command>().is_err());
    }
}
