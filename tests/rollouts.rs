//! Rollouts end to end through the in-process clusterset: a `Rollout` written to a cluster's
//! source directory as a user would, its control plane moving the canary's share step by step on
//! what the callers' real sidecars measured, rolling back by itself, and the status (with every
//! decision and its numbers) read back from the status directory and through `fedmesh rollout`.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fedmesh_federation::control_plane::rollouts::is_canary_signal;
use fedmesh_testbed::apps::RunningApp;
use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::{Cluster, Workload, WorkloadSpec};
use support::mesh::{app_listener, client_workload, endpoints, serve_http, testbed, url};

/// An app that answers its version's name; every `fail_every`th request (the first included)
/// gets 503, and every answer waits `delay`.
async fn version_app(version: &'static str, fail_every: u64, delay: Duration) -> RunningApp {
    version_app_with(version, fail_every, delay, Arc::default(), Arc::default()).await
}

/// [`version_app`], failing every request while `broken` is set, counting requests in `count`.
async fn version_app_with(
    version: &'static str,
    fail_every: u64,
    delay: Duration,
    broken: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> RunningApp {
    fedmesh_testbed::apps::version_app(
        app_listener().await,
        version,
        fedmesh_testbed::apps::VersionBehaviour {
            fail_every,
            delay,
            broken,
            count,
        },
    )
    .await
}

/// `shop/reviews` in `c` served by a v1 and a v2 workload, each version also a Service of its
/// own (`reviews-v1`, `reviews-v2`), and a `frontend` that calls it.
struct Reviews {
    frontend: Workload,
    _workloads: Vec<(Workload, RunningApp)>,
}

async fn reviews(c: &Cluster, v2_fail_every: u64, v2_delay: Duration) -> Reviews {
    let v2 = version_app("v2", v2_fail_every, v2_delay).await;
    reviews_with(c, v2).await
}

/// [`reviews`] with v2 served by `v2`.
async fn reviews_with(c: &Cluster, v2: RunningApp) -> Reviews {
    let mut ws = Vec::new();
    let v1 = version_app("v1", 0, Duration::ZERO).await;
    for (name, app) in [("reviews-v1", v1), ("reviews-v2", v2)] {
        let w = c
            .workload(&WorkloadSpec::new("shop", name, "e1"), app.addr)
            .await
            .unwrap();
        serve_http(c, name, &endpoints(&[&w]));
        ws.push((w, app));
    }
    serve_http(c, "reviews", &endpoints(&[&ws[0].0, &ws[1].0]));
    let frontend = client_workload(c, "frontend", "e1").await;
    for svc in ["reviews", "reviews-v1", "reviews-v2"] {
        let key = format!("shop/{svc}");
        frontend
            .wait_config(&format!("{key} has an endpoint"), |t| {
                t.service_named(&key)
                    .is_some_and(|e| e.svc.endpoints.iter().any(|ep| ep.ready))
            })
            .await
            .unwrap();
    }
    Reviews {
        frontend,
        _workloads: ws,
    }
}

/// `n` requests to `reviews` through `w`'s sidecar: how many each version answered, by status.
async fn drive(w: &Workload, n: usize) -> BTreeMap<(String, u16), usize> {
    let mut c = ProxyClient::new(w.proxy);
    let mut by = BTreeMap::new();
    for _ in 0..n {
        let r = c.get(&url("reviews", "/")).await.unwrap();
        *by.entry((
            String::from_utf8_lossy(&r.body).into_owned(),
            r.status.as_u16(),
        ))
        .or_default() += 1;
    }
    by
}

fn rollout_yaml(steps: &str, analysis: &str) -> String {
    format!(
        r#"apiVersion: fedmesh.io/v1alpha1
kind: Rollout
metadata: {{name: reviews, namespace: shop}}
spec:
  service: reviews
  stable: {{service: reviews-v1}}
  canary: {{service: reviews-v2}}
  strategy:
    canary:
      steps: {steps}
  analysis: {analysis}
"#
    )
}

/// The Rollout's status as the control plane wrote it (`status/rollouts.yaml`).
fn status(c: &Cluster) -> Option<serde_json::Value> {
    let text =
        std::fs::read_to_string(c.data.join("status").join("rollouts.yaml")).unwrap_or_default();
    text.split("\n---\n")
        .skip(1)
        .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
        .find(|v| v["metadata"]["name"] == "reviews")
        .map(|v| v["status"].clone())
}

fn condition(s: &serde_json::Value, type_: &str) -> (String, String, String) {
    let c = s["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or_default();
    let f = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (f("status"), f("reason"), f("message"))
}

/// Drives `batch` requests at a time (none when 0) until the status satisfies `done`.
async fn until(
    c: &Cluster,
    w: &Workload,
    batch: usize,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    until_all(&[(c, w)], batch, what, |s| done(&s[0]))
        .await
        .remove(0)
}

/// Drives `batch` requests from each frontend at a time until `done` holds of every cluster's
/// status (in the order of `clusters`); at most 90 s.
async fn until_all(
    clusters: &[(&Cluster, &Workload)],
    batch: usize,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now: Vec<serde_json::Value> = clusters
            .iter()
            .map(|(c, _)| status(c).unwrap_or_default())
            .collect();
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout never got {what}: {now:#?}"
        );
        for (_, w) in clusters {
            drive(w, batch).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn actions(s: &serde_json::Value) -> Vec<String> {
    s["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["action"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits until `w`'s sidecar sends the canary `weight`% of `reviews`.
async fn wait_weight(w: &Workload, weight: u32) {
    w.wait_config(&format!("the canary at {weight}%"), |t| {
        t.service_named("shop/reviews").is_some_and(|e| {
            e.policy.routes.first().is_some_and(|r| {
                r.route_backends.iter().any(|b| {
                    b.signals
                        .as_deref()
                        .is_some_and(|s| is_canary_signal(s, "shop/reviews"))
                        && b.weight == weight
                })
            })
        })
    })
    .await
    .unwrap();
}

fn fedmesh(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .arg("--data-dir")
        .arg(&c.data)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_waits_for_traffic_then_is_promoted_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let r = reviews(east, 0, Duration::ZERO).await;
    east.write(
        "rollout.yaml",
        &rollout_yaml(
            "[{weight: 20}, {weight: 50}]",
            "{successRate: 99, latencyP99: 1s, minRequests: 20}",
        ),
    )
    .unwrap();
    wait_weight(&r.frontend, 20).await;
    // No requests, no promotion: the step waits however long nothing comes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(east).unwrap();
    assert_eq!(s["phase"], "Progressing", "{s:#?}");
    assert_eq!(
        (s["step"].as_u64(), s["canaryWeight"].as_u64()),
        (Some(0), Some(20))
    );
    let (st, reason, message) = condition(&s, "Healthy");
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("Unknown", "WaitingForRequests")
    );
    assert!(message.contains("0 of the 20"), "{message}");

    // With traffic, each step is judged on its own requests and the canary climbs.
    let s = until(east, &r.frontend, 40, "promoted", |s| {
        s["phase"] == "Promoted"
    })
    .await;
    assert_eq!(actions(&s), ["Started", "Advanced", "Promoted"], "{s:#?}");
    for d in &s["history"].as_array().unwrap()[1..] {
        assert!(d["requests"].as_u64().unwrap() >= 20, "{d:#?}");
        assert_eq!(d["successRate"], 100.0, "{d:#?}");
        assert!(d["latencyP99Ms"].as_f64().unwrap() < 1000.0, "{d:#?}");
    }
    wait_weight(&r.frontend, 100).await;
    let by = drive(&r.frontend, 50).await;
    assert_eq!(by, BTreeMap::from([(("v2".into(), 200), 50)]));

    let (ok, out, err) = fedmesh(east, &["rollout", "status", "shop/reviews"]);
    assert!(ok, "{err}");
    for want in [
        "reviews-v1 → reviews-v2",
        "Promoted",
        "100%",
        "Advanced",
        "checks passed on",
    ] {
        assert!(out.contains(want), "{want} not in:\n{out}");
    }
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_5_percent_of_requests_is_rolled_back_at_its_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let r = reviews(east, 20, Duration::ZERO).await;
    east.write(
        "rollout.yaml",
        &rollout_yaml(
            "[{weight: 50, pause: 1h}, {weight: 100}]",
            "{successRate: 99, minRequests: 40}",
        ),
    )
    .unwrap();
    wait_weight(&r.frontend, 50).await;
    let s = until(east, &r.frontend, 40, "rolled back", |s| {
        s["phase"] == "RolledBack"
    })
    .await;
    assert_eq!(actions(&s), ["Started", "RolledBack"]);
    let last = s["history"].as_array().unwrap().last().unwrap().clone();
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("is below the floor of 99%"),
        "the failed check and its numbers: {message}"
    );
    let rate = last["successRate"].as_f64().unwrap();
    assert!((90.0..99.0).contains(&rate), "{last:#?}");
    assert!(last["requests"].as_u64().unwrap() >= 40);
    let (st, reason, _) = condition(&s, "Progressing");
    assert_eq!((st.as_str(), reason.as_str()), ("False", "RolledBack"));
    let (ok, out, err) = fedmesh(east, &["rollout", "status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("RolledBack") && out.contains("below the floor of 99%"),
        "{out}"
    );
    // One configuration push later, every request goes to the stable version.
    wait_weight(&r.frontend, 0).await;
    let by = drive(&r.frontend, 50).await;
    assert_eq!(by, BTreeMap::from([(("v1".into(), 200), 50)]));

    // A restarted control plane goes on where the rollout stood: still rolled back.
    east.stop_control_plane().await;
    east.start_control_plane().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let (ok, out, err) = fedmesh(east, &["rollout", "status", "-o", "json"]);
        if ok
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
            && v[0].is_object()
        {
            break v;
        }
        assert!(Instant::now() < deadline, "{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v[0]["status"]["phase"], "RolledBack", "{v:#}");
    assert_eq!(actions(&v[0]["status"]), ["Started", "RolledBack"]);
    assert_eq!(
        drive(&r.frontend, 50).await,
        BTreeMap::from([(("v1".into(), 200), 50)])
    );
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_with_a_latency_regression_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let r = reviews(east, 0, Duration::from_millis(200)).await;
    east.write(
        "rollout.yaml",
        &rollout_yaml(
            "[{weight: 50, pause: 1h}]",
            "{latencyP99: 50ms, minRequests: 10}",
        ),
    )
    .unwrap();
    wait_weight(&r.frontend, 50).await;
    let s = until(east, &r.frontend, 10, "rolled back", |s| {
        s["phase"] == "RolledBack"
    })
    .await;
    let last = s["history"].as_array().unwrap().last().unwrap().clone();
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("is above the ceiling of 50 ms"),
        "{message}"
    );
    assert!(last["latencyP99Ms"].as_f64().unwrap() >= 150.0, "{last:#?}");
    wait_weight(&r.frontend, 0).await;
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_abort_and_promote_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let r = reviews(east, 0, Duration::ZERO).await;
    east.write(
        "rollout.yaml",
        &rollout_yaml("[{weight: 10}, {weight: 60}]", "{minRequests: 5}"),
    )
    .unwrap();
    wait_weight(&r.frontend, 10).await;

    let (ok, out, err) = fedmesh(east, &["rollout", "pause", "reviews", "-n", "shop"]);
    assert!(ok, "{err}");
    assert!(out.contains("Paused"), "{out}");
    // Paused: traffic flows, the share holds.
    drive(&r.frontend, 100).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(east).unwrap();
    assert_eq!(
        (s["phase"].as_str(), s["canaryWeight"].as_u64()),
        (Some("Paused"), Some(10))
    );
    // Pausing twice says why not.
    let (ok, _, err) = fedmesh(east, &["rollout", "pause", "shop/reviews"]);
    assert!(!ok && err.contains("the rollout is Paused"), "{err}");

    let (ok, _, err) = fedmesh(east, &["rollout", "resume", "shop/reviews"]);
    assert!(ok, "{err}");
    until(east, &r.frontend, 20, "to step 1", |s| {
        s["canaryWeight"] == 60
    })
    .await;

    let (ok, _, err) = fedmesh(east, &["rollout", "abort", "shop/reviews"]);
    assert!(ok, "{err}");
    wait_weight(&r.frontend, 0).await;
    assert_eq!(
        drive(&r.frontend, 30).await,
        BTreeMap::from([(("v1".into(), 200), 30)])
    );

    let (ok, _, err) = fedmesh(east, &["rollout", "promote", "shop/reviews"]);
    assert!(!ok && err.contains("the rollout is Aborted"), "{err}");
    let (ok, _, err) = fedmesh(east, &["rollout", "resume", "shop/reviews"]);
    assert!(ok, "{err}");
    wait_weight(&r.frontend, 10).await;
    let (ok, _, err) = fedmesh(east, &["rollout", "promote", "shop/reviews"]);
    assert!(ok, "{err}");
    wait_weight(&r.frontend, 100).await;

    let (ok, out, err) = fedmesh(east, &["rollout", "status", "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v[0]["status"];
    assert_eq!(s["phase"], "Promoted");
    assert_eq!(
        actions(s),
        [
            "Started", "Paused", "Resumed", "Advanced", "Aborted", "Resumed", "Promoted"
        ]
    );
    assert!(
        s["history"][1]["message"]
            .as_str()
            .unwrap()
            .starts_with("paused by")
    );
    let (ok, _, err) = fedmesh(east, &["rollout", "status", "shop/nope"]);
    assert!(
        !ok && err.contains("there is no Rollout shop/nope"),
        "{err}"
    );
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_never_overrides_a_users_route_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let r = reviews(east, 0, Duration::ZERO).await;
    east.write(
        "route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-pinned, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 80}]
"#,
    )
    .unwrap();
    east.write(
        "rollout.yaml",
        &rollout_yaml("[{weight: 50}]", "{minRequests: 5}"),
    )
    .unwrap();
    let s = until(east, &r.frontend, 0, "a conflict", |s| {
        condition(s, "RouteConflict").0 == "True"
    })
    .await;
    let (_, _, message) = condition(&s, "RouteConflict");
    assert!(
        message.contains("HTTPRoute shop/reviews-pinned binds shop/reviews but no rule names both reviews-v1 and reviews-v2"),
        "{message}"
    );
    // The user's route holds: everything to v1, and the rollout does not move.
    assert_eq!(
        drive(&r.frontend, 40).await,
        BTreeMap::from([(("v1".into(), 200), 40)])
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(actions(&status(east).unwrap()), ["Started"]);

    // A rule naming both versions is the rollout's to drive.
    east.write(
        "route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-pinned, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 80, weight: 1}, {name: reviews-v2, port: 80, weight: 0}]
"#,
    )
    .unwrap();
    until(east, &r.frontend, 20, "promoted", |s| {
        s["phase"] == "Promoted"
    })
    .await;
    let s = status(east).unwrap();
    assert_eq!(condition(&s, "RouteConflict").0, "", "{s:#?}");
    tb.shutdown().await;
}

/// East and west, each with `shop/reviews` v1 and v2 (west's v2 failing every
/// `west_fail_every`th request) and the same Rollout in two waves, east first.
async fn in_waves(
    dir: &std::path::Path,
    west_fail_every: u64,
) -> (fedmesh_testbed::Testbed, Reviews, Reviews) {
    let tb = testbed(dir, &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let e = reviews(east, 0, Duration::ZERO).await;
    let w = reviews(west, west_fail_every, Duration::ZERO).await;
    let yaml = rollout_yaml("[{weight: 30}, {weight: 60}]", "{minRequests: 10}")
        + "  waves: [{clusters: [east]}, {clusters: [west]}]\n";
    for c in [east, west] {
        c.write("rollout.yaml", &yaml).unwrap();
    }
    (tb, e, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_wave_by_wave_across_two_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (tb, e, w) = in_waves(dir.path(), 0).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    // West's wave waits while east's runs: its canary gets nothing.
    let s = until_all(
        &[(east, &e.frontend), (west, &w.frontend)],
        20,
        "east promoted",
        |s| s[0]["phase"] == "Promoted",
    )
    .await;
    let west_actions = actions(&s[1]);
    assert_eq!(
        west_actions.first().map(String::as_str),
        Some("Waiting"),
        "{s:#?}"
    );
    let s = until_all(
        &[(east, &e.frontend), (west, &w.frontend)],
        20,
        "west promoted",
        |s| s[1]["phase"] == "Promoted",
    )
    .await;
    assert_eq!(
        actions(&s[0]),
        ["Waiting", "Started", "Advanced", "Promoted"]
    );
    assert_eq!(
        actions(&s[1]),
        ["Waiting", "Started", "Advanced", "Promoted"]
    );
    // West began only after east had promoted.
    let t = |s: &serde_json::Value, action: &str| {
        s["history"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["action"] == action)
            .map(|d| d["time"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert!(t(&s[1], "Started") >= t(&s[0], "Promoted"), "{s:#?}");
    assert!(
        s[1]["history"][1]["message"]
            .as_str()
            .unwrap()
            .contains("this cluster's wave begins"),
        "{s:#?}"
    );
    for f in [&e.frontend, &w.frontend] {
        wait_weight(f, 100).await;
    }
    // The hub's view: both clusters, in wave order, each with its gate (the control planes
    // report every 2 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
            .args(["rollout", "list", "-o", "json", "--admin"])
            .arg(format!("http://{}", tb.hub_admin))
            .args(["--admin-token", &tb.hub_admin_token])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let clusters: Vec<(String, u64, String, String)> = v[0]["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (
                    s("cluster"),
                    c["wave"].as_u64().unwrap_or(9),
                    s("phase"),
                    s("gate"),
                )
            })
            .collect();
        let want = [("east", 0, "Promoted", "GO"), ("west", 1, "Promoted", "GO")]
            .map(|(c, w, p, g)| (c.to_string(), w, p.to_string(), g.to_string()));
        if clusters == want {
            assert_eq!(v[0]["rollout"], "shop/reviews");
            break;
        }
        assert!(Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_in_the_second_wave_rolls_back_the_first() {
    let dir = tempfile::tempdir().unwrap();
    // West's v2 fails one request in five.
    let (tb, e, w) = in_waves(dir.path(), 5).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let s = until_all(
        &[(east, &e.frontend), (west, &w.frontend)],
        20,
        "rolled back everywhere",
        |s| s[0]["phase"] == "RolledBack" && s[1]["phase"] == "RolledBack",
    )
    .await;
    assert_eq!(
        actions(&s[0]),
        ["Waiting", "Started", "Advanced", "Promoted", "RolledBack"]
    );
    let east_why = s[0]["history"].as_array().unwrap().last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        east_why.starts_with("west rolled back (success rate"),
        "{east_why}"
    );
    let west_why = s[1]["history"].as_array().unwrap().last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(west_why.contains("is below the floor of 99%"), "{west_why}");
    // Each decision is in the hub's audit log, with its numbers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = tb
            .hub
            .audit_log(&fedmesh_federation::hub::audit::AuditQuery {
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap();
        let rolled_back = log.iter().find(|r| {
            r.action == "rollout.decision"
                && r.actor == "cluster west"
                && r.target == "shop/reviews"
                && r.detail.starts_with("RolledBack: 0% to the canary")
        });
        if let Some(r) = rolled_back {
            assert!(r.detail.contains("% success, p99"), "{r:#?}");
            assert!(
                log.iter()
                    .any(|r| r.actor == "cluster east" && r.detail.starts_with("Promoted")),
                "{log:#?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{log:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every request in both clusters goes to the stable version again.
    for f in [&e.frontend, &w.frontend] {
        wait_weight(f, 0).await;
        assert_eq!(
            drive(f, 30).await,
            BTreeMap::from([(("v1".into(), 200), 30)])
        );
    }
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_mirrors_to_green_then_switches_and_switches_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let (broken, green_got) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let green = version_app_with("v2", 0, Duration::ZERO, broken.clone(), green_got.clone()).await;
    let r = reviews_with(east, green).await;
    east.write(
        "rollout.yaml",
        &rollout_yaml("[]", "{minRequests: 10}").replace(
            "canary:\n      steps: []",
            "blueGreen: {mirror: 2s, rollbackWindow: 1h}",
        ),
    )
    .unwrap();
    // Mirroring: blue answers every request, green gets a copy of each.
    r.frontend
        .wait_config("a mirror to green", |t| {
            t.service_named("shop/reviews").is_some_and(|e| {
                e.policy.routes.first().is_some_and(|r| {
                    r.filters.iter().any(|f| {
                        matches!(f, fedmesh_dataplane::policy::Filter::Mirror(m)
                            if m.signals.as_deref().is_some_and(|s| is_canary_signal(s, "shop/reviews")))
                    })
                })
            })
        })
        .await
        .unwrap();
    assert_eq!(
        drive(&r.frontend, 40).await,
        BTreeMap::from([(("v1".into(), 200), 40)])
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while green_got.load(Ordering::SeqCst) < 40 {
        assert!(
            Instant::now() < deadline,
            "green got {} copies",
            green_got.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Judged on the copies, then every request switches to green.
    let s = until(east, &r.frontend, 20, "switched", |s| {
        s["canaryWeight"] == 100
    })
    .await;
    assert_eq!(s["phase"], "Progressing", "blue stays warm: {s:#?}");
    let switched = &s["history"].as_array().unwrap()[1];
    assert!(
        switched["message"]
            .as_str()
            .unwrap()
            .contains("every request switches to green; blue stays warm for 1h"),
        "{switched:#?}"
    );
    assert!(
        switched["requests"].as_u64().unwrap() >= 10,
        "{switched:#?}"
    );
    wait_weight(&r.frontend, 100).await;
    assert_eq!(
        drive(&r.frontend, 30).await,
        BTreeMap::from([(("v2".into(), 200), 30)])
    );
    // Green breaks within the window: every request goes back to blue at once.
    broken.store(true, Ordering::SeqCst);
    let s = until(east, &r.frontend, 10, "rolled back", |s| {
        s["phase"] == "RolledBack"
    })
    .await;
    assert!(
        s["history"].as_array().unwrap().last().unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("below the floor"),
        "{s:#?}"
    );
    wait_weight(&r.frontend, 0).await;
    assert_eq!(
        drive(&r.frontend, 30).await,
        BTreeMap::from([(("v1".into(), 200), 30)])
    );
    tb.shutdown().await;
}
