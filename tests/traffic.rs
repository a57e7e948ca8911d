//! TrafficPolicy features end to end through real sidecars (the in-process clusterset): injected
//! faults at their share, a circuit breaker that trips and recovers, rate limits per caller that
//! answer 429, consistent hashing that keeps a key on one endpoint and moves few when one leaves.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::{Workload, WorkloadSpec};
use support::mesh::{
    HeldApp, api_and_frontend, client_workload, endpoints, get, http_workload, serve_http, testbed,
    url, wait_routable,
};

/// The value of a counter in a sidecar's Prometheus text (0 when absent).
fn counter(w: &Workload, name: &str, label: &str) -> u64 {
    let text = w.metrics.encode();
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Waits until `w`'s table holds a policy for `shop/<svc>` that `check` accepts.
async fn wait_policy(
    w: &Workload,
    svc: &str,
    what: &str,
    check: impl Fn(&fedmesh_dataplane::policy::Policy) -> bool,
) {
    let key = format!("shop/{svc}");
    w.wait_config(what, |t| {
        t.service_named(&key).is_some_and(|e| check(&e.policy))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_hit_their_share_of_a_routes_requests_and_only_the_testers() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let (_api, _api_app, client) = api_and_frontend(&tb, "east").await;
    east.write(
        "api-route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api, port: 80}]
  rules:
  - name: all
    backendRefs: [{name: api, port: 80}]
---
apiVersion: fedmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api-chaos, namespace: shop}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: api, sectionName: all}
  faultInjection:
    headers: [{name: x-chaos, value: me}]
    delay: {fixedDelay: 100ms, percentage: 30}
    abort: {httpStatus: 503, percentage: 20}
"#,
    )
    .unwrap();
    wait_policy(&client, "api", "the route's fault", |p| {
        p.routes.iter().any(|r| r.fault.is_some())
    })
    .await;

    // Without the header nothing happens.
    let mut c = ProxyClient::new(client.proxy);
    for _ in 0..100 {
        assert_eq!(get(&mut c, &url("api", "/"), &[]).await.status, 200);
    }
    assert_eq!(counter(&client, "fedmesh_sidecar_injected_faults", ""), 0);

    // With it, 400 requests on 8 connections.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let proxy = client.proxy;
            tokio::spawn(async move {
                let mut c = ProxyClient::new(proxy);
                let mut aborted = 0;
                for _ in 0..50 {
                    let r = get(&mut c, &url("api", "/"), &[("x-chaos", "me")]).await;
                    match r.status.as_u16() {
                        200 => {}
                        503 => {
                            assert_eq!(r.headers["fedmesh-proxy-error"], "fault-injected");
                            aborted += 1;
                        }
                        s => panic!("unexpected {s}"),
                    }
                }
                aborted
            })
        })
        .collect();
    let mut aborted = 0;
    for t in tasks {
        aborted += t.await.unwrap();
    }
    // 20% of 400 is 80 (σ 8) and 30% is 120 (σ 9.2): within four standard deviations.
    assert!((48..=112).contains(&aborted), "{aborted} of 400 aborted");
    let counted = counter(&client, "fedmesh_sidecar_injected_faults", "abort");
    assert_eq!(counted, aborted as u64);
    let delayed = counter(&client, "fedmesh_sidecar_injected_faults", "delay");
    assert!((83..=157).contains(&delayed), "{delayed} of 400 delayed");
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_breaker_trips_at_its_limit_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let held = HeldApp::start().await;
    let api = east
        .workload(&WorkloadSpec::new("shop", "api", "e1"), held.app.addr)
        .await
        .unwrap();
    serve_http(east, "api", &endpoints(&[&api]));
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["east"]).await;
    east.write(
        "api-policy.yaml",
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: shop}\nspec:\n  circuitBreaker: {maxRequests: 2}\n",
    )
    .unwrap();
    wait_policy(&client, "api", "the circuit breaker", |p| {
        p.circuit_breaker.max_requests == Some(2)
    })
    .await;

    // Two requests the app holds fill the breaker.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let proxy = client.proxy;
            tokio::spawn(async move {
                let mut c = ProxyClient::new(proxy);
                get(&mut c, &url("api", "/slow"), &[]).await.status.as_u16()
            })
        })
        .collect();
    for _ in 0..200 {
        if held.arrived.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(held.arrived.load(Ordering::SeqCst), 2);
    // The third is answered at once by the caller's sidecar; the app never sees it.
    let mut c = ProxyClient::new(client.proxy);
    // (Bounded: were the breaker not there, the held app would never answer.)
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        get(&mut c, &url("api", "/third"), &[]),
    )
    .await
    .expect("the breaker answers without waiting for the app");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["fedmesh-proxy-error"], "overloaded");
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("circuit breaker of shop/api"), "{body}");
    assert_eq!(held.arrived.load(Ordering::SeqCst), 2);
    // The held requests end: the breaker closes.
    held.release.cancel();
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    assert_eq!(get(&mut c, &url("api", "/after"), &[]).await.status, 200);
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_rate_limit_per_caller_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let (api, _api_app) = http_workload(east, "api", "e1").await;
    serve_http(east, "api", &endpoints(&[&api]));
    let frontend = client_workload(east, "frontend", "e1").await;
    let reports = client_workload(east, "reports", "e1").await;
    wait_routable(&tb, &frontend, "api", &["east"]).await;
    wait_routable(&tb, &reports, "api", &["east"]).await;
    east.write(
        "api-policy.yaml",
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: shop}\nspec:\n  rateLimit: {requests: 20, per: 1m, perCaller: true}\n",
    )
    .unwrap();
    // The limit is enforced by the api's own sidecar.
    wait_policy(&api, "api", "the rate limit", |p| p.rate_limit.is_some()).await;

    for caller in [&frontend, &reports] {
        let mut c = ProxyClient::new(caller.proxy);
        let mut by: BTreeMap<u16, usize> = BTreeMap::new();
        let mut retry_after = None;
        for _ in 0..30 {
            let r = get(&mut c, &url("api", "/"), &[]).await;
            if r.status == 429 {
                assert_eq!(r.headers["fedmesh-proxy-error"], "rate-limited");
                retry_after = r.headers.get("retry-after").cloned();
            }
            *by.entry(r.status.as_u16()).or_default() += 1;
        }
        // 20 a minute: the burst of 20, and at most one more refilled during the run.
        let ok = by.get(&200).copied().unwrap_or(0);
        assert!((20..=21).contains(&ok), "{by:?}");
        assert_eq!(ok + by.get(&429).copied().unwrap_or(0), 30, "{by:?}");
        let secs: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
        assert!(
            (1..=3).contains(&secs),
            "one token every 3 s: Retry-After {secs}"
        );
    }
    let limited = counter(&api, "fedmesh_sidecar_request_errors", "rate_limited");
    assert!((18..=20).contains(&limited), "{limited}");
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_hash_keeps_each_user_on_one_endpoint_and_moves_few_when_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let mut pods = Vec::new();
    for i in 1..=3 {
        pods.push(http_workload(east, &format!("api-{i}"), "e1").await);
    }
    let all: Vec<&Workload> = pods.iter().map(|(w, _)| w).collect();
    serve_http(east, "api", &endpoints(&all));
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["east"]).await;
    client
        .wait_config("three endpoints", |t| {
            t.service_named("shop/api")
                .is_some_and(|e| e.svc.endpoints.len() == 3)
        })
        .await
        .unwrap();
    east.write(
        "api-policy.yaml",
        "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: shop}\nspec:\n  loadBalancer: {type: ConsistentHash, consistentHash: {header: x-user}}\n",
    )
    .unwrap();
    wait_policy(&client, "api", "consistent hashing", |p| {
        !matches!(
            p.load_balancing,
            fedmesh_dataplane::policy::LoadBalancing::LeastRequest
        )
    })
    .await;

    let mut c = ProxyClient::new(client.proxy);
    let mut place = async |users: usize| {
        let mut at: BTreeMap<String, String> = BTreeMap::new();
        for u in 0..users {
            let user = format!("user-{u}");
            for _ in 0..5 {
                let r = get(&mut c, &url("api", "/"), &[("x-user", &user)]).await;
                let w = r.echo().unwrap().workload;
                let first = at.entry(user.clone()).or_insert_with(|| w.clone());
                assert_eq!(*first, w, "{user} moved while the endpoints stayed");
            }
        }
        at
    };
    let before = place(60).await;
    let used: std::collections::BTreeSet<&String> = before.values().collect();
    assert_eq!(used.len(), 3, "keys spread over every endpoint: {before:?}");

    // api-3 leaves: only its users move.
    serve_http(east, "api", &endpoints(&all[..2]));
    client
        .wait_config("two endpoints", |t| {
            t.service_named("shop/api")
                .is_some_and(|e| e.svc.endpoints.len() == 2)
        })
        .await
        .unwrap();
    let after = place(60).await;
    for (user, was) in &before {
        if was != "api-3" {
            assert_eq!(&after[user], was, "{user} moved though its endpoint stayed");
        }
    }
    tb.shutdown().await;
}

/// Sends `rate` requests a second to `svc` through `proxy` until `stop`, recording each answer's
/// status and when it came.
async fn load(
    proxy: std::net::SocketAddr,
    svc: &'static str,
    rate: u32,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(std::time::Instant, u16)> {
    let mut c = ProxyClient::new(proxy);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut out = Vec::new();
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Ok(r) = c.request("GET", &url(svc, "/"), &[], Bytes::new()).await {
            out.push((std::time::Instant::now(), r.status.as_u16()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusterset_wide_limit_holds_across_two_clusters_and_shares_follow_demand() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api_e, _e_app) = http_workload(east, "api", "e1").await;
    let (api_w, _w_app) = http_workload(west, "api", "w1").await;
    serve_http(east, "api", &endpoints(&[&api_e]));
    serve_http(west, "api", &endpoints(&[&api_w]));
    // Each cluster serving the service declares the clusterset-wide limit.
    let policy = "apiVersion: fedmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: api, namespace: shop}\nspec:\n  clustersetRateLimit: {requests: 100, per: 1s}\n";
    east.write("api-policy.yaml", policy).unwrap();
    west.write("api-policy.yaml", policy).unwrap();
    let (caller_e, caller_w) = (
        client_workload(east, "frontend", "e1").await,
        client_workload(west, "frontend", "w1").await,
    );
    wait_routable(&tb, &caller_e, "api", &["east", "west"]).await;
    wait_routable(&tb, &caller_w, "api", &["east", "west"]).await;
    for api in [&api_e, &api_w] {
        wait_policy(api, "api", "the clusterset limit's share", |p| {
            p.clusterset_rate_limit.is_some()
        })
        .await;
    }

    // East's callers want three times what west's do; locality keeps each in its own cluster.
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = [
        (caller_e.proxy, 150),
        (caller_e.proxy, 150),
        (caller_w.proxy, 100),
    ]
    .map(|(proxy, rate)| tokio::spawn(load(proxy, "api", rate, stop.clone())));
    // The hub rebalances every couple of seconds: measure after it has had a few rounds.
    let warm = std::time::Instant::now() + std::time::Duration::from_secs(6);
    tokio::time::sleep(std::time::Duration::from_secs(16)).await;
    let end = std::time::Instant::now();
    stop.cancel();
    let mut by_caller = Vec::new();
    for t in tasks {
        by_caller.push(t.await.unwrap());
    }
    let in_window = |v: &Vec<(std::time::Instant, u16)>, status: u16| {
        v.iter()
            .filter(|(at, s)| *at >= warm && *at <= end && *s == status)
            .count()
    };
    let admitted_e = in_window(&by_caller[0], 200) + in_window(&by_caller[1], 200);
    let admitted_w = in_window(&by_caller[2], 200);
    let refused: usize = by_caller.iter().map(|v| in_window(v, 429)).sum();
    let seconds = (end - warm).as_secs_f64();
    let expected = 100.0 * seconds;
    let admitted = (admitted_e + admitted_w) as f64;
    eprintln!(
        "clusterset limit 100/s over {seconds:.1} s: admitted {admitted} (east {admitted_e}, west {admitted_w}), refused {refused}"
    );
    assert!(
        (admitted - expected).abs() <= expected * 0.10,
        "{admitted} admitted in {seconds:.1} s (east {admitted_e}, west {admitted_w}, refused {refused}); the limit allows {expected:.0} ± 10%"
    );
    assert!(refused > 0, "the callers asked for more than the limit");
    // Demand decides: east, asking three times as much, gets the larger share.
    assert!(
        admitted_e > admitted_w,
        "east {admitted_e}, west {admitted_w}"
    );
    tb.shutdown().await;
}

/// The sum of a counter's series whose labels contain every one of `labels`.
fn counter_sum(w: &Workload, name: &str, labels: &[&str]) -> u64 {
    w.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_budget_caps_retries_when_every_backend_fails_in_every_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api_e, _e_app) = http_workload(east, "api", "e1").await;
    let (api_w, _w_app) = http_workload(west, "api", "w1").await;
    serve_http(east, "api", &endpoints(&[&api_e]));
    serve_http(west, "api", &endpoints(&[&api_w]));
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["east", "west"]).await;
    // Every 503 is retried, three times: without a budget, four attempts per request.
    east.write(
        "api-route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: api}]
  rules:
  - backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: api}]
    retry: {codes: [503], attempts: 3}
"#,
    )
    .unwrap();
    wait_policy(&client, "api", "the route's retry", |p| {
        p.routes.iter().any(|r| r.retry.is_some())
    })
    .await;
    // Both clusters' endpoints answer every request with 503 (the app's /status/503).
    let mut c = ProxyClient::new(client.proxy);
    let requests = 300u64;
    for _ in 0..requests {
        let r = get(&mut c, &url("api", "/status/503"), &[]).await;
        assert_eq!(r.status, 503);
    }
    let attempts: u64 = [&api_e, &api_w]
        .iter()
        .map(|w| {
            counter_sum(
                w,
                "fedmesh_sidecar_requests_total",
                &[
                    "reporter=\"destination\"",
                    "destination_service=\"shop/api\"",
                    "response_code=\"503\"",
                ],
            )
        })
        .sum();
    let retries = counter(&client, "fedmesh_sidecar_retries_total", "");
    let exhausted = counter(&client, "fedmesh_sidecar_retry_budget_exhausted", "");
    eprintln!(
        "{requests} requests: {attempts} attempts ({retries} retries), budget refused {exhausted}"
    );
    // The budget: 20% of the requests of the last 10 s plus 10 a second (100 over the window),
    // where three retries each would have made 900 (a retry goes back to a target already tried
    // when every one has been).
    assert_eq!(attempts, requests + retries);
    assert!(
        retries <= 100 + requests / 5,
        "{retries} retries for {requests} requests"
    );
    assert!(exhausted > 0);
    tb.shutdown().await;
}
