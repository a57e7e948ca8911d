//! Gateway API routes in the mesh (the GAMMA profile), end to end through the in-process
//! clusterset: HTTPRoutes written to a cluster's source directory as a user would, compiled by its
//! control plane, applied by real sidecars, their status read back from the status directory.
//! The cases follow `conformance/tests/mesh/` of kubernetes-sigs/gateway-api, adapted to this
//! harness, plus what a multi-cluster mesh adds (versions and clusters as backends).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use fedmesh_testbed::client::{ProxyClient, Reply};
use fedmesh_testbed::{Cluster, Workload, WorkloadSpec};
use support::mesh::{
    HeldApp, api_and_frontend, client_workload, endpoints, get, http_workload, serve_http, testbed,
    url, wait_routable,
};

/// The object named `name` in a status file the control plane wrote (`status/<file>`).
fn status_doc(c: &Cluster, file: &str, name: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(c.data.join("status").join(file)).unwrap_or_default();
    text.split("\n---\n")
        .skip(1)
        .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
        .find(|v| v["metadata"]["name"] == name)
}

/// (type, status, reason, message) of a condition.
fn condition(c: &serde_json::Value) -> (String, String, String, String) {
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (s("type"), s("status"), s("reason"), s("message"))
}

/// The conditions of a route's status, as the control plane wrote them to
/// `status/<file>`: (type, status, reason, message) of each parent, in order.
fn route_conditions(c: &Cluster, file: &str, name: &str) -> Vec<(String, String, String, String)> {
    let Some(v) = status_doc(c, file, name) else {
        return Vec::new();
    };
    v["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["conditions"].as_array().into_iter().flatten())
        .map(condition)
        .collect()
}

/// Waits until the route's status has a condition `type_` with `status`, and returns its
/// (reason, message).
async fn wait_condition(
    c: &Cluster,
    file: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> (String, String) {
    for _ in 0..300 {
        if let Some((_, _, reason, message)) = route_conditions(c, file, name)
            .into_iter()
            .find(|(t, s, _, _)| t == type_ && s == status)
        {
            return (reason, message);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "{name} never had {type_}={status}: {:?}",
        route_conditions(c, file, name)
    );
}

/// Waits until `w`'s sidecar holds `n` route rules for `shop/<svc>`.
async fn wait_rules(w: &Workload, svc: &str, n: usize) {
    let key = format!("shop/{svc}");
    w.wait_config(&format!("{n} route rules for {key}"), |t| {
        t.service_named(&key)
            .is_some_and(|e| e.policy.routes.len() == n)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premium_users_reach_v2_in_any_cluster_and_everyone_else_splits_90_10_by_version() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    // v1 runs in both clusters, v2 only in west. `reviews` is the name callers use; each version
    // is a Service of its own (selecting its pods by their `version` label, in Kubernetes).
    let (e1, _e1_app) = http_workload(east, "reviews-v1", "e1").await;
    let (w1, _w1_app) = http_workload(west, "reviews-v1", "w1").await;
    let (w2, _w2_app) = http_workload(west, "reviews-v2", "w1").await;
    serve_http(east, "reviews", &endpoints(&[&e1]));
    serve_http(east, "reviews-v1", &endpoints(&[&e1]));
    serve_http(west, "reviews", &endpoints(&[&w1]));
    serve_http(west, "reviews-v1", &endpoints(&[&w1]));
    serve_http(west, "reviews-v2", &endpoints(&[&w2]));
    let client = client_workload(east, "frontend", "e1").await;
    for svc in ["reviews", "reviews-v1"] {
        wait_routable(&tb, &client, svc, &["east", "west"]).await;
    }
    wait_routable(&tb, &client, "reviews-v2", &["west"]).await;

    // The caller's cluster routes: premium users to v2 wherever it runs, the rest 90/10.
    east.write(
        "reviews-route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]
  rules:
  - matches: [{headers: [{name: x-user, value: premium}]}]
    backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews-v2, port: 80}]
  - backendRefs:
    - {group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews-v1, port: 80, weight: 90}
    - {group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews-v2, port: 80, weight: 10}
"#,
    )
    .unwrap();
    wait_rules(&client, "reviews", 2).await;
    let (reason, _) = wait_condition(
        east,
        "httproutes.yaml",
        "reviews-canary",
        "Accepted",
        "True",
    )
    .await;
    assert_eq!(reason, "Accepted");
    wait_condition(
        east,
        "httproutes.yaml",
        "reviews-canary",
        "ResolvedRefs",
        "True",
    )
    .await;

    let mut c = ProxyClient::new(client.proxy);
    for _ in 0..50 {
        let r = get(&mut c, &url("reviews", "/"), &[("x-user", "premium")]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let echo = r.echo().unwrap();
        assert_eq!(
            (echo.workload.as_str(), echo.cluster.as_str()),
            ("reviews-v2", "west")
        );
    }
    let n = 5000;
    let mut by: BTreeMap<(String, String), usize> = BTreeMap::new();
    for _ in 0..n {
        let r = get(&mut c, &url("reviews", "/"), &[("x-user", "basic")]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let echo = r.echo().unwrap();
        *by.entry((echo.workload, echo.cluster)).or_default() += 1;
    }
    let v2: usize = by
        .iter()
        .filter(|((w, _), _)| w == "reviews-v2")
        .map(|(_, n)| n)
        .sum();
    let share = v2 as f64 / n as f64;
    assert!(
        (share - 0.10).abs() <= 0.03,
        "v2 got {:.1}% of {n} (want 10 ± 3): {by:?}",
        share * 100.0
    );
    // v1's share stays in the caller's cluster (locality within the version).
    assert_eq!(
        by.get(&("reviews-v1".into(), "west".into())),
        None,
        "{by:?}"
    );
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_its_share_of_copies_and_never_holds_up_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let (api, _api_app) = http_workload(east, "api", "e1").await;
    let shadow_app = HeldApp::start().await;
    let shadow = east
        .workload(
            &WorkloadSpec::new("shop", "api-shadow", "e1"),
            shadow_app.app.addr,
        )
        .await
        .unwrap();
    serve_http(east, "api", &endpoints(&[&api]));
    serve_http(east, "api-shadow", &endpoints(&[&shadow]));
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["east"]).await;
    wait_routable(&tb, &client, "api-shadow", &["east"]).await;
    east.write(
        "api-route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-mirror, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api, port: 80}]
  rules:
  - backendRefs: [{name: api, port: 80}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: api-shadow, port: 80}
        fraction: {numerator: 25, denominator: 100}
"#,
    )
    .unwrap();
    wait_rules(&client, "api", 1).await;
    wait_condition(
        east,
        "httproutes.yaml",
        "api-mirror",
        "ResolvedRefs",
        "True",
    )
    .await;

    let mut c = ProxyClient::new(client.proxy);
    let n = 400;
    for _ in 0..n {
        let r = get(&mut c, &url("api", "/orders"), &[]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let echo = r.echo().unwrap();
        assert_eq!(echo.workload, "api");
        assert!(
            !echo.headers.contains_key("fedmesh-mirror"),
            "live traffic is not marked"
        );
    }
    // Every request was answered while the mirror had answered none of its copies.
    // Copies go out from tasks of their own: wait until each one the caller's sidecar sent
    // (its `mirrored_requests{reason="sent"}`) has reached the mirror.
    let sent = || {
        client
            .metrics
            .encode()
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"fedmesh_sidecar_mirrored_requests_total{reason="sent"} "#)
                    .and_then(|v| v.trim().parse::<usize>().ok())
            })
            .unwrap_or(0)
    };
    for _ in 0..250 {
        if shadow_app.mirrored.load(Ordering::SeqCst) >= sent() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let copies = shadow_app.mirrored.load(Ordering::SeqCst);
    assert_eq!(copies, sent(), "every copy sent arrived");
    assert_eq!(
        shadow_app.answered.load(Ordering::SeqCst),
        0,
        "every caller request was answered while the mirror answered none"
    );
    // 25% of 400 is 100; a fair draw lands within ±35 (over 4 standard deviations).
    assert!(
        (65..=135).contains(&copies),
        "the mirror got {copies} of {n}"
    );
    let metrics = client.metrics.encode();
    assert!(
        metrics.contains("fedmesh_sidecar_mirrored_requests_total"),
        "{metrics}"
    );
    shadow_app.release.cancel();
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_filters_and_redirects_behave_as_the_gateway_api_mesh_suite_expects() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let (v1, _v1_app) = http_workload(east, "echo-v1", "e1").await;
    let (v2, _v2_app) = http_workload(east, "echo-v2", "e1").await;
    serve_http(east, "echo", &endpoints(&[&v1, &v2]));
    serve_http(east, "echo-v1", &endpoints(&[&v1]));
    serve_http(east, "echo-v2", &endpoints(&[&v2]));
    let client = client_workload(east, "frontend", "e1").await;
    for svc in ["echo", "echo-v1", "echo-v2"] {
        wait_routable(&tb, &client, svc, &["east"]).await;
    }
    east.write(
        "echo-routes.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-matching, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: version, value: one}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: version, value: two}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /exact}}, {method: POST, path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: RegularExpression, value: '/re/[0-9]+'}}, {queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-rewrite-and-headers, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /prefix/rewrite-path-and-modify-headers}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /prefix}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
        remove: [X-Header-Remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Served-By, value: fedmesh}]}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /original-prefix}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}
  - matches: [{path: {type: PathPrefix, value: /scheme-and-host}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, statusCode: 307}}]
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]
    backendRefs: [{name: echo-v1, port: 80}]
"#,
    )
    .unwrap();
    // Each match is a rule of its own in the sidecar: 2 + 2 + 2 + 1, and 6.
    wait_rules(&client, "echo", 13).await;
    wait_condition(east, "httproutes.yaml", "mesh-matching", "Accepted", "True").await;
    let (reason, message) = wait_condition(
        east,
        "httproutes.yaml",
        "mesh-rewrite-and-headers",
        "PartiallyInvalid",
        "True",
    )
    .await;
    assert_eq!(reason, "UnsupportedValue");
    assert!(message.contains("CORS"), "{message}");

    let mut c = ProxyClient::new(client.proxy);
    let echo = "http://echo.shop.svc.cluster.local";
    let mut workload = async |method: &str, path: &str, headers: &[(&str, &str)]| {
        let r = c
            .request(method, &format!("{echo}{path}"), headers, Bytes::new())
            .await
            .unwrap();
        match r.status.as_u16() {
            200 => r.echo().unwrap().workload,
            s => format!("{s}"),
        }
    };
    // MeshHTTPRouteMatching (headers), MeshHTTPRouteSimpleSameNamespace-style exact/prefix,
    // method and query matches, and 404 for what no rule matches.
    for _ in 0..5 {
        assert_eq!(workload("GET", "/", &[("version", "one")]).await, "echo-v1");
        assert_eq!(workload("GET", "/", &[("version", "two")]).await, "echo-v2");
    }
    assert_eq!(workload("GET", "/exact", &[]).await, "echo-v2");
    assert_eq!(workload("GET", "/exact/more", &[]).await, "404");
    assert_eq!(workload("POST", "/v2/x", &[]).await, "echo-v2");
    assert_eq!(workload("GET", "/v2/x", &[]).await, "404");
    assert_eq!(workload("GET", "/re/42", &[]).await, "echo-v2");
    assert_eq!(workload("GET", "/re/x", &[]).await, "404");
    assert_eq!(
        workload("GET", "/anything?animal=whale", &[]).await,
        "echo-v2"
    );
    assert_eq!(workload("GET", "/v1/path", &[]).await, "echo-v1");
    assert_eq!(
        workload("GET", "/v1x", &[]).await,
        "404",
        "prefixes match whole segments"
    );
    // A rule fedmesh cannot apply answers 500 rather than send its traffic elsewhere.
    assert_eq!(workload("GET", "/cors", &[]).await, "500");

    // MeshHTTPRouteRewritePath with header modifiers, and a response header modifier.
    let r = c
        .request(
            "GET",
            &format!("{echo}/prefix/rewrite-path-and-modify-headers/one"),
            &[
                ("X-Header-Remove", "remove-val"),
                ("X-Header-Add-Append", "append-val-1"),
                ("X-Header-Set", "set-val"),
            ],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["x-served-by"], "fedmesh");
    let e = r.echo().unwrap();
    assert_eq!(e.path, "/prefix/one");
    assert_eq!(e.headers["x-header-set"], "set-overwrites-values");
    assert_eq!(e.headers["x-header-add"], "header-val-1");
    assert_eq!(
        e.headers["x-header-add-append"],
        "append-val-1,header-val-2"
    );
    assert!(!e.headers.contains_key("x-header-remove"));
    let r = get(&mut c, &format!("{echo}/strip-prefix"), &[]).await;
    assert_eq!(r.echo().unwrap().path, "/");

    // Redirects answer from the sidecar with the Location the spec gives.
    let location = |r: &Reply| {
        (
            r.status.as_u16(),
            r.headers["location"].to_str().unwrap().to_string(),
        )
    };
    let r = get(&mut c, &format!("{echo}/original-prefix/lemon"), &[]).await;
    assert_eq!(
        location(&r),
        (
            302,
            "http://echo.shop.svc.cluster.local/replacement-prefix/lemon".into()
        )
    );
    let r = get(&mut c, &format!("{echo}/scheme-and-host"), &[]).await;
    assert_eq!(
        location(&r),
        (301, "https://example.org/scheme-and-host".into())
    );
    let r = get(&mut c, &format!("{echo}/port"), &[]).await;
    assert_eq!(
        location(&r),
        (307, "http://echo.shop.svc.cluster.local:8083/port".into())
    );
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistake_in_a_route_is_reported_in_its_status_and_never_sends_traffic_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let east = tb.cluster("east");
    let (_api, _api_app, client) = api_and_frontend(&tb, "east").await;
    east.write(
        "api-routes.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: typo-cluster, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /typo}}]
    backendRefs: [{group: fedmesh.io, kind: Cluster, name: wset}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: not-exported, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /ghost}}]
    backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: ghost, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: weightless, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /none}}]
    backendRefs: [{name: api, port: 80, weight: 0}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: nosuch, port: 80}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
"#,
    )
    .unwrap();
    let (reason, message) = wait_condition(
        east,
        "httproutes.yaml",
        "typo-cluster",
        "ResolvedRefs",
        "False",
    )
    .await;
    assert_eq!(reason, "BackendNotFound");
    assert!(message.contains("wset"), "{message}");
    let (reason, message) = wait_condition(
        east,
        "httproutes.yaml",
        "not-exported",
        "ResolvedRefs",
        "False",
    )
    .await;
    assert_eq!(reason, "BackendNotFound");
    assert!(message.contains("shop/ghost"), "{message}");
    let (reason, message) =
        wait_condition(east, "httproutes.yaml", "weightless", "Accepted", "False").await;
    assert_eq!(reason, "UnsupportedValue");
    assert!(message.contains("weight 0"), "{message}");
    let (reason, message) =
        wait_condition(east, "httproutes.yaml", "orphan", "Accepted", "False").await;
    assert_eq!(reason, "NoMatchingParent");
    assert!(message.contains("shop/nosuch"), "{message}");

    wait_rules(&client, "api", 3).await;
    let mut c = ProxyClient::new(client.proxy);
    for (path, status) in [
        ("/typo", 500),
        ("/ghost", 500),
        ("/none", 500),
        ("/other", 404),
    ] {
        let r = get(&mut c, &url("api", path), &[]).await;
        assert_eq!(
            r.status.as_u16(),
            status,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.headers.contains_key("fedmesh-proxy-error"), "{path}");
    }
    let r = get(&mut c, &url("api", "/typo"), &[]).await;
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("HTTPRoute shop/typo-cluster"), "{body}");

    // The clusterset's status shows every cluster's problems, and explain names them.
    let fedmesh = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedmesh"))
            .args(args)
            .env("FEDMESH_ADMIN", format!("http://{}", tb.hub_admin))
            .env("FEDMESH_ADMIN_TOKEN", &tb.hub_admin_token)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let mut status = String::new();
    for _ in 0..100 {
        status = fedmesh(&["status"]);
        if status.contains("typo-cluster") && status.contains("orphan") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for expected in [
        "HTTPRoute shop/typo-cluster",
        "ResolvedRefs=False",
        "BackendNotFound",
        "HTTPRoute shop/orphan",
        "NoMatchingParent",
    ] {
        assert!(status.contains(expected), "{expected} missing:\n{status}");
    }
    let explain = fedmesh(&["explain", "shop/api", "--from", "east"]);
    assert!(
        explain.contains("HTTPRoute shop/typo-cluster in east: ResolvedRefs False"),
        "{explain}"
    );
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_pods_own_address_reaches_it_with_mtls_past_the_services_routes() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let (api, _api_app, client) = api_and_frontend(&tb, "east").await;
    // Every request to the Service is redirected elsewhere.
    east.write(
        "api-route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-moved, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api, port: 80}]
  rules:
  - filters: [{type: RequestRedirect, requestRedirect: {hostname: elsewhere.example}}]
"#,
    )
    .unwrap();
    wait_rules(&client, "api", 1).await;
    let mut c = ProxyClient::new(client.proxy);
    assert_eq!(get(&mut c, &url("api", "/x"), &[]).await.status, 302);

    // The pod's own address: the endpoint answers, and knows its caller by mTLS.
    let r = get(&mut c, &format!("http://{}/x", api.inbound), &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let echo = r.echo().unwrap();
    assert_eq!(echo.workload, "api");
    assert_eq!(echo.caller, client.id.to_string());

    // An address outside the mesh gets plain HTTP, with no identity.
    let plain = fedmesh_testbed::apps::http_echo(
        support::mesh::app_listener().await,
        fedmesh_testbed::apps::AppInfo {
            cluster: "none".into(),
            zone: String::new(),
            workload: "outside".into(),
        },
    )
    .await;
    let r = get(&mut c, &format!("http://{}/y", plain.addr), &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let echo = r.echo().unwrap();
    assert_eq!(
        (echo.workload.as_str(), echo.caller.as_str()),
        ("outside", "")
    );
    tb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcroute_routes_by_method_and_a_grpc_fault_answers_with_a_status() {
    use fedmesh_testbed::pb::EchoRequest;
    use fedmesh_testbed::pb::echo_client::EchoClient;
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east")]).await;
    let east = tb.cluster("east");
    let (v1, _v1_app) = http_workload(east, "greeter", "e1").await;
    let (v2, _v2_app) = http_workload(east, "greeter-v2", "e1").await;
    for (name, w) in [("greeter", &v1), ("greeter-v2", &v2)] {
        east.serve("shop", name, &[("grpc", 9090, "")], &endpoints(&[w]))
            .unwrap();
        east.export("shop", name).unwrap();
    }
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "greeter", &["east"]).await;
    east.write(
        "greeter-route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: greeter, port: 9090}]
  rules:
  - name: streams
    matches: [{method: {service: fedmesh.testbed.v1.Echo, method: ServerStream}}]
    backendRefs: [{name: greeter-v2, port: 9090}]
  - name: rest
    backendRefs: [{name: greeter, port: 9090}]
---
apiVersion: fedmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: greeter-chaos, namespace: shop}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: GRPCRoute, name: greeter, sectionName: rest}
  faultInjection:
    headers: [{name: x-chaos, value: me}]
    abort: {grpcStatus: 14}
"#,
    )
    .unwrap();
    wait_rules(&client, "greeter", 2).await;
    wait_condition(east, "grpcroutes.yaml", "greeter", "Accepted", "True").await;
    let port = client.listen("shop/greeter:9090").await.unwrap();
    let mut grpc = EchoClient::connect(format!("http://{port}")).await.unwrap();
    let hi = || EchoRequest {
        message: "hi".into(),
        count: 3,
    };
    for _ in 0..5 {
        let r = grpc.unary(hi()).await.unwrap().into_inner();
        assert_eq!(r.workload, "greeter");
        let mut s = grpc.server_stream(hi()).await.unwrap().into_inner();
        let first = s.message().await.unwrap().unwrap();
        assert_eq!(first.workload, "greeter-v2");
    }
    // The tester's own calls of the `rest` rule fail with UNAVAILABLE; the others do not.
    let mut req = tonic::Request::new(hi());
    req.metadata_mut().insert("x-chaos", "me".parse().unwrap());
    let status = grpc.unary(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(grpc.unary(hi()).await.is_ok());
    tb.shutdown().await;
}

/// The conditions of a TrafficPolicy's status (`status/trafficpolicies.yaml`): (type, status,
/// message) of each.
fn policy_conditions(c: &Cluster, name: &str) -> Vec<(String, String, String)> {
    let Some(v) = status_doc(c, "trafficpolicies.yaml", name) else {
        return Vec::new();
    };
    v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let (t, s, _, m) = condition(c);
            (t, s, m)
        })
        .collect()
}

/// Inbound requests a workload's sidecar answered with `code` (its own metrics).
fn inbound_answers(w: &Workload, code: u16) -> u64 {
    w.metrics
        .encode()
        .lines()
        .filter(|l| {
            l.starts_with("fedmesh_sidecar_requests_total{")
                && l.contains(r#"reporter="destination""#)
                && l.contains(&format!(r#"response_code="{code}""#))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The first TrafficPolicy's routing fields (README "Migrating from TrafficPolicy routing") keep
/// working as routing, not just as configuration: `rules` match by path and pick a cluster,
/// `timeouts.request` answers 504, `retries` retry a 503 that many times; the status calls them
/// deprecated; and once an HTTPRoute binds the service they are ignored, which the status says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deprecated_traffic_policy_routes_times_out_and_retries_until_an_httproute_binds_the_service()
 {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (e1, _e1_app) = http_workload(east, "api", "e1").await;
    let (w1, _w1_app) = http_workload(west, "api", "w1").await;
    serve_http(east, "api", &endpoints(&[&e1]));
    serve_http(west, "api", &endpoints(&[&w1]));
    let client = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &client, "api", &["east", "west"]).await;

    east.write(
        "api-policy.yaml",
        r#"apiVersion: fedmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  rules:
  - matches: [{path: {value: /delay}}]
    backendRefs: [{cluster: west}]
    timeouts: {request: 300ms}
  - backendRefs: [{cluster: east}]
    retries: {attempts: 2}
"#,
    )
    .unwrap();
    wait_rules(&client, "api", 2).await;
    // The status is written beside the configuration push, not before it: wait for it.
    for _ in 0..300 {
        if policy_conditions(east, "api")
            .iter()
            .any(|(t, _, _)| t == "Accepted")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let conditions = policy_conditions(east, "api");
    let accepted = conditions
        .iter()
        .find(|(t, _, _)| t == "Accepted")
        .unwrap_or_else(|| panic!("{conditions:?}"));
    assert_eq!(accepted.1, "True", "{conditions:?}");
    assert!(
        accepted.2.contains("rules") && accepted.2.contains("deprecated"),
        "{conditions:?}"
    );

    let mut c = ProxyClient::new(client.proxy);
    let from = |r: &Reply| r.echo().map(|e| e.cluster).unwrap_or_default();
    for _ in 0..20 {
        let r = get(&mut c, &url("api", "/delay/1"), &[]).await;
        assert_eq!(from(&r), "west", "the path rule picks west");
        let r = get(&mut c, &url("api", "/x"), &[]).await;
        assert_eq!(from(&r), "east", "everything else stays in east");
    }
    // The /delay rule's request timeout: an answer the app holds for 5 s is cut at 300 ms.
    let r = get(&mut c, &url("api", "/delay/5000"), &[]).await;
    assert_eq!(r.status, 504, "{:?}", r.headers);
    assert_eq!(r.headers["fedmesh-proxy-error"], "timeout");
    // The other rule's retries: a 502, 503 or 504 of the app is tried three times (once, then
    // twice more). The first attempt goes where the rule says (east); a retry goes to an endpoint
    // not yet tried, and with east's one endpoint tried, failover takes it to west (README:
    // backends).
    for code in [502u16, 503, 504] {
        let answered = || inbound_answers(&e1, code) + inbound_answers(&w1, code);
        let (before, before_east) = (answered(), inbound_answers(&e1, code));
        let r = get(&mut c, &url("api", &format!("/status/{code}")), &[]).await;
        assert_eq!(r.status, code);
        // (A callee's sidecar counts an answer once it has sent it: the count may trail the
        // caller's by a moment.)
        for _ in 0..100 {
            if answered() - before >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            answered() - before,
            3,
            "{code}: one attempt and two retries"
        );
        assert!(
            inbound_answers(&e1, code) > before_east,
            "{code}: the first attempt went to east"
        );
    }
    // Other answers of the app are not retried.
    let before = inbound_answers(&e1, 500) + inbound_answers(&w1, 500);
    let r = get(&mut c, &url("api", "/status/500"), &[]).await;
    assert_eq!(r.status, 500);
    for _ in 0..100 {
        if inbound_answers(&e1, 500) + inbound_answers(&w1, 500) > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        inbound_answers(&e1, 500) + inbound_answers(&w1, 500) - before,
        1
    );

    // An HTTPRoute for the service takes over: everything to west, and the policy says its
    // routing fields are ignored.
    east.write(
        "api-route.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - backendRefs: [{group: fedmesh.io, kind: Cluster, name: west}]
"#,
    )
    .unwrap();
    wait_rules(&client, "api", 1).await;
    for _ in 0..10 {
        let r = get(&mut c, &url("api", "/x"), &[]).await;
        assert_eq!(from(&r), "west", "the HTTPRoute decides now");
    }
    let r = get(&mut c, &url("api", "/delay/600"), &[]).await;
    assert_eq!(
        r.status, 200,
        "the policy's 300 ms timeout no longer applies"
    );
    for _ in 0..300 {
        if policy_conditions(east, "api")
            .iter()
            .any(|(t, _, m)| t == "Accepted" && m.contains("so they are ignored"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        policy_conditions(east, "api")
            .iter()
            .any(|(t, _, m)| t == "Accepted" && m.contains("so they are ignored")),
        "{:?}",
        policy_conditions(east, "api")
    );
    tb.shutdown().await;
}
