//! `fedmesh bench rollout`: how fast a rollout decides, measured in the in-process clusterset
//! (real control plane, sidecars and apps, loopback).
//!
//! - **Decision latency**: a Rollout of `--steps` rising steps (no pauses) on a healthy canary;
//!   for each step, from the moment its `--min-requests`th canary request was answered (the
//!   client's clock) to the moment the caller's sidecar holds the next step's weights. Goal: p99
//!   ≤ 1 s.
//! - **Rollback latency**: `--rollbacks` times, a canary at 50% breaks (every request 503); from
//!   its first failed answer to the sidecar holding stable-only weights, and how many requests
//!   the canary still answered in that time. Goal: ≤ 1 s.
//!
//! The baseline is what the path is made of: the sidecars report signals every 250 ms and the
//! controller judges every 250 ms; the configuration push is the rest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fedmesh_testbed::apps::{VersionBehaviour, version_app};
use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::{Cluster, ClusterSpec, Testbed, Workload, WorkloadSpec};
use tokio::net::TcpListener;

pub struct Params {
    pub steps: usize,
    pub rollbacks: usize,
    pub min_requests: u64,
}

/// When the caller's sidecar started holding each canary weight (in order of change).
type Weights = Arc<Mutex<Vec<(Instant, u32)>>>;

fn canary_weight(w: &Workload) -> Option<u32> {
    let t = w.config.table();
    let e = t.service_named("shop/ratings")?;
    e.policy.routes.first().and_then(|r| {
        r.route_backends
            .iter()
            .find(|b| {
                b.signals.as_deref().is_some_and(|s| {
                    fedmesh_federation::control_plane::rollouts::is_canary_signal(s, "shop/ratings")
                })
            })
            .map(|b| b.weight)
    })
}

/// Records every change of the canary's weight in `w`'s sidecar (polled every millisecond).
fn watch_weights(w: Arc<Workload>, stop: tokio_util::sync::CancellationToken) -> Weights {
    let out: Weights = Arc::default();
    let o = out.clone();
    tokio::spawn(async move {
        let mut last = None;
        while !stop.is_cancelled() {
            let now = canary_weight(&w);
            if now != last {
                if let Some(weight) = now {
                    o.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), weight));
                }
                last = now;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    out
}

fn rollout(steps: &str, analysis: &str) -> String {
    format!(
        "apiVersion: fedmesh.io/v1alpha1\nkind: Rollout\nmetadata: {{name: ratings, namespace: shop}}\n\
         spec:\n  service: ratings\n  stable: {{service: ratings-v1}}\n  canary: {{service: ratings-v2}}\n\
         \x20 strategy: {{canary: {{steps: {steps}}}}}\n  analysis: {analysis}\n"
    )
}

/// One answer: when it came, and whether the canary gave it (and failed).
struct Answer {
    at: Instant,
    canary: bool,
    failed: bool,
}

/// Sends requests one after another until `done` or `limit`.
async fn drive(
    w: &Workload,
    limit: Duration,
    done: impl Fn() -> bool,
) -> anyhow::Result<Vec<Answer>> {
    let mut c = ProxyClient::new(w.proxy);
    let mut out = Vec::new();
    let end = Instant::now() + limit;
    while !done() {
        anyhow::ensure!(
            Instant::now() < end,
            "the rollout did not finish within {limit:?}"
        );
        let r = c
            .get("http://ratings.shop.svc.clusterset.local/")
            .await
            .context("a request through the sidecar")?;
        out.push(Answer {
            at: Instant::now(),
            canary: r.body.as_ref() == b"v2",
            failed: r.status.as_u16() >= 500,
        });
    }
    Ok(out)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn verdict(p99: Duration) -> &'static str {
    if p99 <= Duration::from_secs(1) {
        "met"
    } else {
        "NOT met"
    }
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    let steps = p.steps.clamp(1, 99);
    let dir = tempfile::tempdir()?;
    let tb = Testbed::start(dir.path(), &[ClusterSpec::new("east", "us-east")]).await?;
    let east: &Cluster = tb.cluster("east");
    let broken = Arc::new(AtomicBool::new(false));
    let mut apps = Vec::new();
    let mut ws = Vec::new();
    for (name, version, b) in [
        ("ratings-v1", "v1", VersionBehaviour::default()),
        (
            "ratings-v2",
            "v2",
            VersionBehaviour {
                broken: broken.clone(),
                ..Default::default()
            },
        ),
    ] {
        let app = version_app(TcpListener::bind("127.0.0.1:0").await?, version, b).await;
        let w = east
            .workload(&WorkloadSpec::new("shop", name, "e1"), app.addr)
            .await?;
        east.serve_http("shop", name, &[w.endpoint()])?;
        apps.push(app);
        ws.push(w);
    }
    east.serve_http("shop", "ratings", &[ws[0].endpoint(), ws[1].endpoint()])?;
    let caller = Arc::new(
        east.workload(
            &WorkloadSpec::new("shop", "frontend", "e1"),
            "127.0.0.1:9".parse()?,
        )
        .await?,
    );
    caller
        .wait_config("shop/ratings and its versions", |t| {
            ["shop/ratings", "shop/ratings-v1", "shop/ratings-v2"]
                .iter()
                .all(|s| {
                    t.service_named(s)
                        .is_some_and(|e| e.svc.endpoints.iter().any(|x| x.ready))
                })
        })
        .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let weights = watch_weights(caller.clone(), stop.clone());

    // Decision latency: steps of 1, 3, 5, ... % (then 100% on promotion), no pauses.
    let list: Vec<u32> = (0..steps).map(|k| 1 + 2 * k as u32).collect();
    let yaml = rollout(
        &format!(
            "[{}]",
            list.iter()
                .map(|w| format!("{{weight: {w}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        &format!("{{successRate: 99, minRequests: {}}}", p.min_requests),
    );
    east.write("ratings-rollout.yaml", &yaml)?;
    let w = weights.clone();
    let answers = drive(&caller, Duration::from_secs(600), || {
        w.lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .is_some_and(|(_, weight)| *weight == 100)
    })
    .await?;
    let changes = weights.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let at = |weight: u32| changes.iter().find(|(_, w)| *w == weight).map(|(t, _)| *t);
    let mut decisions = Vec::new();
    for (k, weight) in list.iter().enumerate() {
        let next = list.get(k + 1).copied().unwrap_or(100);
        let (Some(from), Some(to)) = (at(*weight), at(next)) else {
            anyhow::bail!(
                "step {k} ({weight}%) or the next never reached the sidecar: {changes:?}"
            );
        };
        let sample = answers
            .iter()
            .filter(|a| a.canary && a.at >= from)
            .nth(p.min_requests.saturating_sub(1) as usize)
            .map(|a| a.at)
            .with_context(|| format!("step {k}: fewer than {} canary answers", p.min_requests))?;
        decisions.push(to.saturating_duration_since(sample));
    }
    decisions.sort();
    println!(
        "rollout decision latency ({steps} steps, {} canary requests each, {} requests in all):",
        p.min_requests,
        answers.len()
    );
    println!(
        "  sample reached -> next weights in the caller's sidecar: p50 {}  p99 {}  max {}  (goal p99 <= 1 s: {})",
        ms(percentile(&decisions, 0.5)),
        ms(percentile(&decisions, 0.99)),
        ms(*decisions.last().unwrap_or(&Duration::ZERO)),
        verdict(percentile(&decisions, 0.99))
    );

    // Rollback latency: a canary at 50% breaks.
    let mut latencies = Vec::new();
    let mut after = Vec::new();
    for round in 0..p.rollbacks.max(1) {
        broken.store(false, Ordering::SeqCst);
        weights.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // A new spec each round: the rollout starts afresh.
        east.write(
            "ratings-rollout.yaml",
            &rollout(
                "[{weight: 50, pause: 1h}]",
                &format!(
                    "{{successRate: 99, minRequests: {}, latencyP99: {}s}}",
                    p.min_requests,
                    60 + round
                ),
            ),
        )?;
        let w = weights.clone();
        drive(&caller, Duration::from_secs(60), || {
            w.lock()
                .unwrap_or_else(|p| p.into_inner())
                .last()
                .is_some_and(|(_, weight)| *weight == 50)
        })
        .await?;
        // Enough healthy canary requests for the step to be judged, then the canary breaks.
        let mut c = ProxyClient::new(caller.proxy);
        let mut healthy = 0;
        while healthy < p.min_requests {
            let r = c.get("http://ratings.shop.svc.clusterset.local/").await?;
            if r.body.as_ref() == b"v2" {
                healthy += 1;
            }
        }
        broken.store(true, Ordering::SeqCst);
        let w = weights.clone();
        let answers = drive(&caller, Duration::from_secs(60), || {
            w.lock()
                .unwrap_or_else(|p| p.into_inner())
                .last()
                .is_some_and(|(_, weight)| *weight == 0)
        })
        .await?;
        let stable_at = weights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map(|(t, _)| *t)
            .context("no stable-only weights")?;
        let first_failure = answers
            .iter()
            .find(|a| a.canary && a.failed)
            .map(|a| a.at)
            .context("the broken canary never answered")?;
        latencies.push(stable_at.saturating_duration_since(first_failure));
        after.push(
            answers
                .iter()
                .filter(|a| a.canary && a.at > first_failure)
                .count(),
        );
    }
    latencies.sort();
    after.sort();
    println!(
        "rollback latency ({} rollbacks of a canary at 50% that breaks):",
        latencies.len()
    );
    println!(
        "  first failed answer -> stable-only weights in the caller's sidecar: p50 {}  p99 {}  max {}  (goal <= 1 s: {})",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        verdict(percentile(&latencies, 0.99))
    );
    println!(
        "  requests the canary still answered after its first failure: median {}  max {}",
        after[after.len() / 2],
        after.last().copied().unwrap_or(0)
    );
    println!(
        "  baseline of the path: signals reported every 250 ms, judged every 250 ms, then one configuration push"
    );
    stop.cancel();
    drop(caller);
    drop(ws);
    tb.shutdown().await;
    Ok(())
}
