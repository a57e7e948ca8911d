//! The metrics every component exports, held to a committed list (`tests/golden/metrics.txt`:
//! each family's name and type, per component), so a rename or a removal — which breaks users'
//! dashboards and alerts — shows in review; and the request metrics carry the labels Istio users
//! query (`reporter`, `source_principal`, `source_cluster`, `destination_cluster`,
//! `destination_service`, `response_code`), the caller's proven identity on the callee's side,
//! and never an empty value.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::mesh::{
    client_workload, endpoints, get, http_workload, serve_http, testbed, url, wait_routable,
};

/// `# TYPE name type` lines of a Prometheus text exposition.
fn families(component: &str, text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| format!("{component} {l}"))
        .collect()
}

/// Each sample's metric name and labels.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (head, _) = l.rsplit_once(' ').unwrap();
            match head.split_once('{') {
                None => (head.to_string(), BTreeMap::new()),
                Some((name, labels)) => {
                    let labels = labels.trim_end_matches('}');
                    let mut map = BTreeMap::new();
                    // Values never contain `",` in these families' label values.
                    for pair in labels.split("\",") {
                        let (k, v) = pair.split_once("=\"").unwrap();
                        map.insert(k.to_string(), v.trim_end_matches('"').to_string());
                    }
                    (name.to_string(), map)
                }
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_exports_the_metrics_on_the_list_with_istios_labels() {
    let dir = tempfile::tempdir().unwrap();
    let tb = testbed(dir.path(), &[("east", "us-east"), ("west", "us-west")]).await;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let (api, _app) = http_workload(west, "api", "w1").await;
    serve_http(west, "api", &endpoints(&[&api]));
    let frontend = client_workload(east, "frontend", "e1").await;
    wait_routable(&tb, &frontend, "api", &["west"]).await;
    let mut http = fedmesh_testbed::client::ProxyClient::new(frontend.proxy);
    assert_eq!(get(&mut http, &url("api", "/hello"), &[]).await.status, 200);
    // An answer of the proxy's own (no such service) is counted too.
    assert_eq!(get(&mut http, &url("nope", "/"), &[]).await.status, 404);

    let (outbound, inbound) = (frontend.metrics.encode(), api.metrics.encode());
    let gateway = west.gateway.metrics().encode();
    let cp = east.control_plane().unwrap().metrics.encode();
    let hub = tb.hub.metrics.encode();

    let mut seen: Vec<String> = Vec::new();
    seen.extend(families("sidecar", &outbound));
    seen.extend(families("sidecar", &inbound));
    seen.extend(families("gateway", &gateway));
    seen.extend(families("control-plane", &cp));
    seen.extend(families("hub", &hub));
    let seen: BTreeSet<String> = seen.into_iter().collect();
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/metrics.txt");
    let list = std::fs::read_to_string(golden).unwrap();
    let rows: Vec<(String, bool)> = list
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (family, when) = l.rsplit_once(' ').unwrap();
            (family.to_string(), when == "always")
        })
        .collect();
    let listed: BTreeSet<&str> = rows.iter().map(|(f, _)| f.as_str()).collect();
    let unlisted: Vec<&String> = seen
        .iter()
        .filter(|f| !listed.contains(f.as_str()))
        .collect();
    assert!(
        unlisted.is_empty(),
        "metric families not in tests/golden/metrics.txt (new, renamed or retyped? add them, and say so in the README): {unlisted:?}"
    );
    let missing: Vec<&String> = rows
        .iter()
        .filter(|(f, always)| *always && !seen.contains(f))
        .map(|(f, _)| f)
        .collect();
    assert!(
        missing.is_empty(),
        "metric families this scenario always exports are gone: {missing:?}"
    );

    // The request families: Istio's label names, both directions.
    let request_labels: BTreeSet<&str> = [
        "reporter",
        "source_principal",
        "source_cluster",
        "destination_cluster",
        "destination_service",
        "response_code",
    ]
    .into();
    let mut duration_labels = request_labels.clone();
    duration_labels.remove("response_code");
    duration_labels.insert("le");
    for (side, text) in [("outbound", &outbound), ("inbound", &inbound)] {
        let all = samples(text);
        let requests: Vec<_> = all
            .iter()
            .filter(|(n, _)| n == "fedmesh_sidecar_requests_total")
            .collect();
        assert!(!requests.is_empty(), "{side}: {text}");
        for (_, l) in &requests {
            let names: BTreeSet<&str> = l.keys().map(String::as_str).collect();
            assert_eq!(names, request_labels, "{side}: {l:?}");
        }
        for (n, l) in all
            .iter()
            .filter(|(n, _)| n == "fedmesh_sidecar_request_duration_seconds_bucket")
        {
            let names: BTreeSet<&str> = l.keys().map(String::as_str).collect();
            assert_eq!(names, duration_labels, "{side} {n}: {l:?}");
        }
        for (n, l) in &all {
            assert!(
                l.values().all(|v| !v.is_empty()),
                "{side}: an empty label in {n}{l:?}"
            );
        }
    }
    let frontend_id = "spiffe://east.fedmesh.test/ns/shop/sa/frontend";
    let find = |text: &str, want: &[(&str, &str)]| {
        samples(text).into_iter().any(|(n, l)| {
            n == "fedmesh_sidecar_requests_total"
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
    };
    assert!(
        find(
            &inbound,
            &[
                ("reporter", "destination"),
                ("source_principal", frontend_id),
                ("source_cluster", "east"),
                ("destination_cluster", "west"),
                ("destination_service", "shop/api"),
                ("response_code", "200"),
            ]
        ),
        "the callee names the caller it verified: {inbound}"
    );
    assert!(
        find(
            &outbound,
            &[
                ("reporter", "source"),
                ("source_principal", frontend_id),
                ("destination_cluster", "west"),
                ("response_code", "200"),
            ]
        ),
        "{outbound}"
    );
    assert!(
        find(
            &outbound,
            &[
                ("destination_cluster", "unknown"),
                ("destination_service", "shop/nope"),
                ("response_code", "404"),
            ]
        ),
        "the no-route answer is counted, with the service asked for: {outbound}"
    );
    tb.shutdown().await;
}
