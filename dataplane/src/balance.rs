//! Where a request or connection goes: locality-aware, split-aware, outlier-aware.
//!
//! Candidates are this cluster's endpoints of the service and the other clusters exporting it
//! (reached through their gateways). Without a split they are tried in locality tiers:
//!
//! 0. endpoints here in the caller's zone,
//! 1. endpoints here in other zones,
//! 2. other clusters in the caller's region,
//! 3. all other clusters,
//!
//! taking the first tier with a healthy candidate, least-loaded of two random choices within it.
//! With a split (a TrafficPolicy's weighted `backendRefs`), a cluster is drawn by weight first —
//! among clusters that can take traffic — then locality applies inside it.
//!
//! Outlier detection: consecutive failures (connect errors, 5xx) eject a target for a time that
//! doubles with each ejection; at most `max_ejection_percent` of a pool is ejected at once; when
//! nothing at all is healthy, every target is tried anyway (panic routing). A failed attempt is
//! retried on a different target, so one dead endpoint costs no request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fedmesh_api::{ClusterName, ServiceKey};

use crate::policy::{ClusterShare, Outlier};
use crate::target::{Place, Target};

#[derive(Clone, Debug)]
pub struct OutlierConfig {
    /// Consecutive failures that eject a target.
    pub consecutive_failures: u32,
    /// First ejection time; doubled for every further ejection of the same target.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share of a pool (local endpoints, or remote clusters) is ejected at once.
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(10),
            max_ejection_percent: 90,
        }
    }
}

#[derive(Default)]
struct Health {
    failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    /// What the last ejection took out: for the control plane's view ([`Balancer::ejected`]).
    what: Option<Ejected>,
}

/// A target outlier detection holds ejected now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ejected {
    pub cluster: ClusterName,
    /// Another cluster, through its gateway (ejected for every service there).
    pub remote: bool,
    /// The endpoint's address, or the gateway's.
    pub address: String,
    /// The service whose failed requests ejected it.
    pub service: ServiceKey,
    pub remaining: Duration,
    /// Ejections in a row.
    pub ejections: u32,
}

/// Shared by all requests of a proxy; survives config updates (health is keyed by target).
pub struct Balancer {
    config: OutlierConfig,
    health: Mutex<HashMap<Box<str>, Health>>,
    active: Mutex<HashMap<Box<str>, std::sync::Arc<AtomicU32>>>,
    /// Round-robin positions, per service.
    turns: Mutex<HashMap<Box<str>, usize>>,
    rng: Mutex<u64>,
}

/// How a target is chosen within the tier that locality and the split leave.
#[derive(Clone, Copy, Debug, Default)]
pub enum Choose<'a> {
    /// The less loaded of two random targets (least request).
    #[default]
    LeastOfTwo,
    /// In turn, per service (the key).
    RoundRobin(&'a str),
    /// Rendezvous hashing of this key: a key stays on one target while the targets stay, and
    /// when one leaves only its keys move.
    Hash(u64),
}

/// A 64-bit FNV-1a hash: the same in every proxy and every release, so callers agree on where
/// a key goes.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Mixes two hashes (the finalizer of splitmix64), so every target's score for a key is
/// independent of the others'.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where this proxy is: borrowed from its routing table and options, since it is worked out for
/// every request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Locality<'a> {
    pub cluster: &'a str,
    pub region: &'a str,
    pub zone: &'a str,
}

/// A held slot on a target: counts as an active request until dropped.
pub struct Lease {
    counter: std::sync::Arc<AtomicU32>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(OutlierConfig::default())
    }
}

impl Balancer {
    pub fn new(config: OutlierConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        Self {
            config,
            health: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            rng: Mutex::new(seed),
        }
    }

    fn random(&self) -> u64 {
        // xorshift64*: fast, good enough for picking among a handful of targets.
        let mut s = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn is_ejected(&self, key: &str, now: Instant) -> bool {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.get(key)
            .and_then(|h| h.ejected_until)
            .is_some_and(|t| t > now)
    }

    /// Reports a successful attempt: the target's failure streak ends.
    pub fn success(&self, t: &Target) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = h.get_mut(t.key()) {
            e.failures = 0;
            if e.ejected_until.is_some_and(|u| u <= Instant::now()) {
                e.ejected_until = None;
            }
        }
    }

    /// Reports a failed attempt (connect error or 5xx); may eject the target. `pool` is the set it
    /// belongs to, for the ejection cap (one target can always be ejected). Returns whether
    /// this failure ejected it.
    pub fn failure(&self, t: &Target, pool: &[Target]) -> bool {
        self.failure_at(t, pool, Instant::now(), &Outlier::default())
    }

    /// [`Balancer::failure`] under a service's own failure-accrual settings.
    pub fn failure_with(&self, t: &Target, pool: &[Target], outlier: &Outlier) -> bool {
        self.failure_at(t, pool, Instant::now(), outlier)
    }

    fn failure_at(&self, t: &Target, pool: &[Target], now: Instant, outlier: &Outlier) -> bool {
        let consecutive = outlier
            .consecutive_failures
            .unwrap_or(self.config.consecutive_failures);
        let base = outlier.base_ejection.unwrap_or(self.config.base_ejection);
        let max_ejection = self.config.max_ejection.max(base);
        let max_percent = outlier
            .max_ejection_percent
            .unwrap_or(self.config.max_ejection_percent);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let ejected_in_pool = pool
            .iter()
            .filter(|p| same_pool(p, t))
            .filter(|p| {
                h.get(p.key())
                    .and_then(|e| e.ejected_until)
                    .is_some_and(|u| u > now)
            })
            .count();
        let pool_size = pool.iter().filter(|p| same_pool(p, t)).count().max(1);
        let e = h.entry(t.key().into()).or_default();
        e.failures += 1;
        let already = e.ejected_until.is_some_and(|u| u > now);
        if e.failures >= consecutive && !already {
            let allowed = ejected_in_pool == 0
                || (ejected_in_pool + 1) * 100 <= pool_size * max_percent as usize;
            if allowed {
                let factor = 1u32 << e.ejections.min(10);
                let d = (base * factor).min(max_ejection);
                e.ejected_until = Some(now + d);
                e.ejections += 1;
                e.failures = 0;
                e.what = Some(Ejected {
                    cluster: t.cluster().clone(),
                    remote: !t.is_local(),
                    address: match t.place() {
                        Place::Local { addr, .. } => addr.to_string(),
                        Place::Remote { gateway, .. } => gateway.to_string(),
                    },
                    service: t.sni().service.clone(),
                    remaining: d,
                    ejections: e.ejections,
                });
                tracing::info!(target = %t.key(), ejected_for = ?d, "outlier ejected");
                return true;
            }
        }
        false
    }

    /// The targets ejected now, by address: what this proxy tells its control plane.
    pub fn ejected(&self) -> Vec<Ejected> {
        let now = Instant::now();
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Ejected> = h
            .values()
            .filter_map(|e| {
                let until = e.ejected_until.filter(|u| *u > now)?;
                let mut what = e.what.clone()?;
                what.remaining = until - now;
                Some(what)
            })
            .collect();
        out.sort_by(|a, b| (&a.cluster, &a.address).cmp(&(&b.cluster, &b.address)));
        out
    }

    /// Counts an active request on `t` (for least-request) until the lease drops.
    pub fn lease(&self, t: &Target) -> Lease {
        let counter = {
            let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            match active.get(t.key()) {
                Some(c) => c.clone(),
                None => active.entry(t.key().into()).or_default().clone(),
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Lease { counter }
    }

    fn load(&self, t: &Target) -> u32 {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(t.key())
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Chooses a target for `service` (and its `split`), skipping those in `exclude` (already
    /// tried for this request). `None` when nothing is left.
    pub fn pick(
        &self,
        here: &Locality<'_>,
        candidates: &[Target],
        split: &[ClusterShare],
        exclude: &[Target],
    ) -> Option<Target> {
        self.pick_at(
            here,
            candidates,
            split,
            exclude,
            Instant::now(),
            Choose::LeastOfTwo,
        )
    }

    /// [`Balancer::pick`], choosing within the tier as `how` says.
    pub fn pick_by(
        &self,
        here: &Locality<'_>,
        candidates: &[Target],
        split: &[ClusterShare],
        exclude: &[Target],
        how: Choose<'_>,
    ) -> Option<Target> {
        self.pick_at(here, candidates, split, exclude, Instant::now(), how)
    }

    fn pick_at(
        &self,
        here: &Locality<'_>,
        candidates: &[Target],
        split: &[ClusterShare],
        exclude: &[Target],
        now: Instant,
        how: Choose<'_>,
    ) -> Option<Target> {
        let usable: Vec<&Target> = candidates.iter().filter(|t| !exclude.contains(t)).collect();
        if usable.is_empty() {
            return None;
        }
        let healthy: Vec<&Target> = usable
            .iter()
            .copied()
            .filter(|t| !self.is_ejected(t.key(), now))
            .collect();
        // Panic routing: when nothing is healthy, try everything rather than fail.
        let pool = if healthy.is_empty() { usable } else { healthy };

        let pool: Vec<&Target> = if split.iter().any(|b| b.weight > 0) {
            match self.pick_cluster(&pool, split) {
                Some(Some(c)) => pool.into_iter().filter(|t| t.cluster() == c).collect(),
                // The share that goes wherever locality sends it, or no cluster of the split
                // can take traffic: locality over what is left.
                Some(None) | None => pool,
            }
        } else {
            pool
        };
        let tier = (0..4)
            .map(|t| {
                pool.iter()
                    .copied()
                    .filter(|c| Self::tier(here, c) == t)
                    .collect::<Vec<_>>()
            })
            .find(|v| !v.is_empty())?;
        Some(
            match how {
                Choose::LeastOfTwo => self.least_of_two(&tier),
                Choose::RoundRobin(service) => {
                    let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
                    let turn = match turns.get_mut(service) {
                        Some(t) => t,
                        None => turns.entry(service.into()).or_default(),
                    };
                    *turn = turn.wrapping_add(1);
                    tier[*turn % tier.len()]
                }
                Choose::Hash(key) => tier
                    .iter()
                    .copied()
                    .max_by_key(|t| mix(key, stable_hash(t.key().as_bytes())))
                    .expect("the tier is not empty"),
            }
            .clone(),
        )
    }

    /// The locality tier a target is in as seen from `here`, by name: `same-zone`,
    /// `same-cluster` (another zone), `same-region` (another cluster of this region) or
    /// `other-region`.
    pub fn tier_name(here: &Locality<'_>, t: &Target) -> &'static str {
        ["same-zone", "same-cluster", "same-region", "other-region"]
            [usize::from(Self::tier(here, t))]
    }

    fn tier(here: &Locality<'_>, t: &Target) -> u8 {
        match t.place() {
            Place::Local { zone, .. } if !here.zone.is_empty() && **zone == *here.zone => 0,
            Place::Local { .. } => 1,
            Place::Remote { region, .. } if !here.region.is_empty() && **region == *here.region => {
                2
            }
            Place::Remote { .. } => 3,
        }
    }

    /// Draws a backend by weight among the split's that can take traffic (a cluster with a
    /// target in `pool`, or "anywhere"): `Some(Some(cluster))`, `Some(None)` for anywhere,
    /// `None` when none can.
    fn pick_cluster<'a>(
        &self,
        pool: &[&Target],
        split: &'a [ClusterShare],
    ) -> Option<Option<&'a fedmesh_api::ClusterName>> {
        let available: Vec<&ClusterShare> = split
            .iter()
            .filter(|b| b.weight > 0)
            .filter(|b| match &b.cluster {
                Some(c) => pool.iter().any(|t| t.cluster() == c),
                None => !pool.is_empty(),
            })
            .collect();
        let total: u64 = available.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut r = self.random() % total;
        for b in available {
            if r < u64::from(b.weight) {
                return Some(b.cluster.as_ref());
            }
            r -= u64::from(b.weight);
        }
        None
    }

    fn least_of_two<'t>(&self, tier: &[&'t Target]) -> &'t Target {
        if tier.len() == 1 {
            return tier[0];
        }
        let a = tier[(self.random() % tier.len() as u64) as usize];
        let b = tier[(self.random() % tier.len() as u64) as usize];
        if self.load(b) < self.load(a) { b } else { a }
    }
}

fn same_pool(a: &Target, b: &Target) -> bool {
    a.is_local() == b.is_local()
}

#[cfg(test)]
mod tests {
    use super::*;

    use fedmesh_api::TrustDomain;

    use crate::sni::MeshSni;

    fn cluster(c: &str) -> ClusterName {
        ClusterName::new(c).unwrap()
    }
    fn sni(c: &str) -> MeshSni {
        MeshSni::new(80, "shop/web".parse().unwrap(), cluster(c))
    }
    /// An endpoint of east; `addr` is its last octet's name ("a1" -> 10.0.0.1:8080 with 1).
    fn local(addr: &str, zone: &str) -> Target {
        let n: u8 = addr[1..].parse().unwrap();
        let octet = if addr.starts_with('a') { n } else { 100 + n };
        Target::local(
            std::net::SocketAddr::from(([10, 0, 0, octet], 8080)),
            zone,
            cluster("east"),
            TrustDomain::new("east.example").unwrap(),
            sni("east"),
        )
    }
    fn remote(c: &str) -> Target {
        Target::remote(
            cluster(c),
            TrustDomain::new(&format!("{c}.example")).unwrap(),
            if c == "west" { "us" } else { "eu" },
            &format!("{c}-gw:15443"),
            sni(c),
        )
    }
    fn here() -> Locality<'static> {
        Locality {
            cluster: "east",
            region: "us",
            zone: "a",
        }
    }
    fn fast() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_millis(50),
            max_ejection: Duration::from_millis(400),
            max_ejection_percent: 100,
        }
    }

    #[test]
    fn locality_tiers_fail_over_zone_then_region_then_other_clusters() {
        let b = Balancer::new(fast());
        let all = vec![
            local("a1", "a"),
            local("b1", "b"),
            remote("far"),
            remote("west"),
        ];
        let t = Instant::now();
        for _ in 0..20 {
            assert_eq!(
                b.pick_at(&here(), &all, &[], &[], t, Choose::LeastOfTwo),
                Some(local("a1", "a"))
            );
        }
        b.failure_at(&local("a1", "a"), &all, t, &Outlier::default());
        assert_eq!(
            b.pick_at(&here(), &all, &[], &[], t, Choose::LeastOfTwo),
            Some(local("b1", "b"))
        );
        b.failure_at(&local("b1", "b"), &all, t, &Outlier::default());
        assert_eq!(
            b.pick_at(&here(), &all, &[], &[], t, Choose::LeastOfTwo),
            Some(remote("west")),
            "same region before far"
        );
        // Excluded (already tried) targets are skipped too.
        assert_eq!(
            b.pick_at(&here(), &all, &[], &[remote("west")], t, Choose::LeastOfTwo),
            Some(remote("far"))
        );
        // Ejection ends: traffic comes back to zone a.
        let later = t + Duration::from_millis(60);
        assert_eq!(
            b.pick_at(&here(), &all, &[], &[], later, Choose::LeastOfTwo),
            Some(local("a1", "a"))
        );
    }

    #[test]
    fn splits_draw_clusters_by_weight_and_skip_unavailable_ones() {
        let b = Balancer::new(fast());
        let all = vec![local("a1", "a"), remote("west")];
        let split = vec![
            ClusterShare {
                cluster: Some(cluster("east")),
                weight: 80,
            },
            ClusterShare {
                cluster: Some(cluster("west")),
                weight: 20,
            },
        ];
        let n = 20_000;
        let west = (0..n)
            .filter(|_| {
                b.pick(&here(), &all, &split, &[])
                    .unwrap()
                    .cluster()
                    .as_str()
                    == "west"
            })
            .count();
        let share = west as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.02, "{share}");
        // West has nothing to offer: everything goes to east.
        let only_east = vec![local("a1", "a")];
        assert!(
            (0..100).all(|_| b.pick(&here(), &only_east, &split, &[]) == Some(local("a1", "a")))
        );
    }

    #[test]
    fn ejected_lists_what_is_out_now_with_its_service_and_time_left() {
        let b = Balancer::new(OutlierConfig {
            base_ejection: Duration::from_secs(3600),
            max_ejection: Duration::from_secs(7200),
            ..fast()
        });
        let all = vec![local("a1", "a"), local("a2", "a"), remote("west")];
        assert!(b.ejected().is_empty());
        b.failure(&local("a2", "a"), &all);
        b.failure(&remote("west"), &all);
        let out = b.ejected();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(
            (
                out[0].cluster.as_str(),
                out[0].remote,
                out[0].address.as_str()
            ),
            ("east", false, "10.0.0.2:8080")
        );
        assert_eq!(out[1].cluster.as_str(), "west");
        assert!(out[1].remote);
        assert_eq!(out[1].service.to_string(), "shop/web");
        assert_eq!(out[1].ejections, 1);
        assert!(out[1].remaining > Duration::from_secs(3500));
        // A success ends the streak but not the ejection; its end does.
        b.success(&local("a2", "a"));
        assert_eq!(b.ejected().len(), 2);
        let b = Balancer::new(fast());
        b.failure_at(
            &local("a1", "a"),
            &all,
            Instant::now() - Duration::from_secs(1),
            &Outlier::default(),
        );
        assert!(
            b.ejected().is_empty(),
            "a 50ms ejection a second ago is over"
        );
    }

    #[test]
    fn ejection_backs_off_is_capped_and_panic_routing_keeps_traffic_flowing() {
        let mut cfg = fast();
        cfg.max_ejection_percent = 50;
        // Long ejections: nothing here may depend on how fast the test runs.
        cfg.base_ejection = Duration::from_secs(3600);
        cfg.max_ejection = Duration::from_secs(7200);
        let b = Balancer::new(cfg);
        let all = vec![local("a1", "a"), local("a2", "a")];
        b.failure(&local("a1", "a"), &all);
        b.failure(&local("a2", "a"), &all); // would exceed 50%: not ejected
        let picks: std::collections::HashSet<_> = (0..50)
            .map(|_| b.pick(&here(), &all, &[], &[]).unwrap())
            .collect();
        assert_eq!(picks, [local("a2", "a")].into_iter().collect());
        // Nothing healthy: panic routing tries everything.
        let b = Balancer::new(OutlierConfig {
            base_ejection: Duration::from_secs(3600),
            max_ejection: Duration::from_secs(7200),
            ..fast()
        });
        let one = vec![local("a1", "a")];
        b.failure(&local("a1", "a"), &one);
        assert_eq!(b.pick(&here(), &one, &[], &[]), Some(local("a1", "a")));
        // Backoff doubles: a second ejection lasts longer than the first (50ms, then 100ms).
        let b = Balancer::new(fast());
        let two = vec![local("a1", "a"), local("b1", "b")];
        let t0 = Instant::now();
        b.failure_at(&local("a1", "a"), &two, t0, &Outlier::default());
        let t1 = t0 + Duration::from_millis(60);
        assert_eq!(
            b.pick_at(&here(), &two, &[], &[], t1, Choose::LeastOfTwo),
            Some(local("a1", "a")),
            "first ejection (50ms) over"
        );
        b.failure_at(&local("a1", "a"), &two, t1, &Outlier::default());
        assert_eq!(
            b.pick_at(
                &here(),
                &two,
                &[],
                &[],
                t1 + Duration::from_millis(60),
                Choose::LeastOfTwo
            ),
            Some(local("b1", "b")),
            "second ejection (100ms) still on"
        );
        assert_eq!(
            b.pick_at(
                &here(),
                &two,
                &[],
                &[],
                t1 + Duration::from_millis(110),
                Choose::LeastOfTwo
            ),
            Some(local("a1", "a")),
            "second ejection over"
        );
    }

    #[test]
    fn least_loaded_of_two_prefers_idle_targets() {
        let b = Balancer::new(fast());
        let all = vec![local("a1", "a"), local("a2", "a")];
        let _busy: Vec<Lease> = (0..10).map(|_| b.lease(&local("a1", "a"))).collect();
        let a2 = (0..1000)
            .filter(|_| b.pick(&here(), &all, &[], &[]) == Some(local("a2", "a")))
            .count();
        assert!(a2 > 700, "{a2}");
    }

    #[test]
    fn round_robin_takes_turns_and_a_hash_keeps_a_key_on_one_target_and_moves_few() {
        let b = Balancer::default();
        let all: Vec<Target> = (1..=4).map(|i| local(&format!("a{i}"), "a")).collect();
        let turns: Vec<String> = (0..8)
            .map(|_| {
                b.pick_by(&here(), &all, &[], &[], Choose::RoundRobin("shop/web"))
                    .unwrap()
                    .key()
                    .to_string()
            })
            .collect();
        assert_eq!(turns[..4], turns[4..], "{turns:?}");
        let mut distinct = turns[..4].to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "each target once per round: {turns:?}");

        let place = |targets: &[Target], key: u64| {
            b.pick_by(&here(), targets, &[], &[], Choose::Hash(key))
                .unwrap()
                .key()
                .to_string()
        };
        let keys: Vec<u64> = (0..1000u32)
            .map(|k| stable_hash(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<String> = keys.iter().map(|k| place(&all, *k)).collect();
        assert_eq!(
            before,
            keys.iter().map(|k| place(&all, *k)).collect::<Vec<_>>(),
            "stable while the targets are"
        );
        let mut per: HashMap<&str, usize> = HashMap::new();
        for t in &before {
            *per.entry(t.as_str()).or_default() += 1;
        }
        assert!(
            per.values().all(|n| (150..=350).contains(n)),
            "spread: {per:?}"
        );
        // One target leaves: only its keys move.
        let gone = all[0].key().to_string();
        let after: Vec<String> = keys.iter().map(|k| place(&all[1..], *k)).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let on_gone = before.iter().filter(|t| **t == gone).count();
        assert_eq!(moved, on_gone, "only the keys of the target that left move");
    }
}
