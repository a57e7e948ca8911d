//! Our proxies' spans in Jaeger, the trace backend most users read: the sidecars send their
//! spans to Jaeger's OTLP receiver (Jaeger built from its own module by `scripts/peers`, run
//! all-in-one with in-memory storage), and one request across two clusters reads back through
//! Jaeger's query API (`/api/traces/{id}`) as the hub shows it (`tests/traces.rs`): the calling
//! sidecar's CLIENT span, the called sidecar's SERVER span as its child, each with its cluster.
//! Clusters in network namespaces as in `tests/netns.rs` (root and `ip netns`).
//!
//! Skipped (with the reason) without network namespaces or where `scripts/peers` could not build
//! Jaeger; both are required in CI.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::netns::{Mesh, http_get_with, in_ns};
use support::pods::{clusterset_ip, export, wait_answer_from};

/// A tag's value, from a span's or a process's `tags` (`[{key, type, value}]`), as a string.
fn tag(tags: &Value, key: &str) -> Option<String> {
    tags.as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| match &t["value"] {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        })
}

#[test]
fn a_cross_cluster_request_reads_back_from_jaeger_as_one_trace_with_its_clusters() {
    if support::netns::skip() {
        return;
    }
    let Some(jaeger) = support::peers::bin("jaeger", "jaeger") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let jaeger = mesh.start_jaeger(&jaeger);
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend"]);
    let mut west = mesh.add_cluster(2, "west", "us-west", &["api"]);
    let api = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    export(&west, "api", &[(&api, "us-west-1a")]);
    let frontend = mesh.add_pod(&mut east, "frontend", "us-east-1a", false);
    let ip = clusterset_ip(&frontend, &east, "api");
    let host = "api.shop.svc.clusterset.local";
    wait_answer_from(&frontend, ip, host, "west");

    // The app's tracer started trace 3af7…, span b7ad…; it asks east for west's api.
    let trace = "3af7651916cd43dd8448eb211c80319c";
    let (status, body) = in_ns(&frontend.ns, move || {
        http_get_with(
            SocketAddr::from((ip, 80)),
            "/",
            host,
            &[(
                "traceparent".into(),
                format!("00-{trace}-b7ad6b7169203331-01"),
            )],
        )
        .unwrap()
    });
    assert_eq!(status, 200, "{body}");

    // Jaeger answers 404 until the spans arrive (the proxies export a batch every second).
    let hub = support::netns::HUB_IP;
    let wan = mesh.wan.clone();
    let start = Instant::now();
    let (spans, processes) = loop {
        let wan = wan.clone();
        let (code, body) = in_ns(&wan, move || {
            http_get_with(
                SocketAddr::from((hub, 16686)),
                &format!("/api/traces/{trace}"),
                "jaeger",
                &[],
            )
        })
        .unwrap_or_else(|e| (0, e.to_string()));
        if code == 200 {
            let doc: Value = serde_json::from_str(&body).unwrap();
            let found = &doc["data"][0];
            // The sidecars' spans; the gateways' admission spans are checked in tests/traces.rs.
            let sidecars: Vec<Value> = found["spans"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| {
                    let p = s["processID"].as_str().unwrap_or_default();
                    found["processes"][p]["serviceName"] != "fedmesh-gateway"
                })
                .cloned()
                .collect();
            if sidecars.len() >= 2 {
                break (sidecars, found["processes"].clone());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Jaeger never held both sidecars' spans of trace {trace}: {code} {body}\n{}",
            mesh.net.procs[jaeger].log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(spans.len(), 2, "one span per sidecar: {spans:#?}");
    let of_kind = |kind: &str| {
        spans
            .iter()
            .find(|s| tag(&s["tags"], "span.kind").as_deref() == Some(kind))
            .unwrap_or_else(|| panic!("a {kind} span: {spans:#?}"))
    };
    let (client, server) = (of_kind("client"), of_kind("server"));
    // Jaeger shows the parent as a CHILD_OF reference, and a span link as FOLLOWS_FROM.
    let refs = |s: &Value, kind: &str| -> Vec<Value> {
        s["references"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["refType"] == kind)
            .cloned()
            .collect()
    };
    let parent = |s: &Value| {
        let parents = refs(s, "CHILD_OF");
        assert_eq!(parents.len(), 1, "one parent: {s:#}");
        assert_eq!(parents[0]["traceID"], trace);
        parents[0]["spanID"].as_str().unwrap().to_string()
    };
    assert_eq!(
        parent(client),
        "b7ad6b7169203331",
        "the app's span is the parent"
    );
    assert_eq!(
        parent(server),
        client["spanID"].as_str().unwrap(),
        "the server hop is the client's child"
    );
    // The client's link to the span of the connection it rode (that connection's own trace).
    let links = refs(client, "FOLLOWS_FROM");
    assert_eq!(links.len(), 1, "{client:#}");
    assert_eq!(
        Some(links[0]["spanID"].as_str().unwrap().to_string()),
        tag(&client["tags"], "fedmesh.connection.id")
    );
    for s in [client, server] {
        assert_eq!(s["operationName"], "GET");
        let t = &s["tags"];
        assert_eq!(tag(t, "fedmesh.source.cluster").as_deref(), Some("east"));
        assert_eq!(
            tag(t, "fedmesh.destination.cluster").as_deref(),
            Some("west")
        );
        assert_eq!(
            tag(t, "fedmesh.caller").as_deref(),
            Some("spiffe://east.fedmesh.test/ns/shop/sa/frontend")
        );
        assert_eq!(tag(t, "http.response.status_code").as_deref(), Some("200"));
    }
    // Each span's process is the proxy's resource: which service, in which cluster.
    let process = |s: &Value| processes[s["processID"].as_str().unwrap()].clone();
    let (caller, callee) = (process(client), process(server));
    assert_eq!(caller["serviceName"], "frontend");
    assert_eq!(callee["serviceName"], "api");
    assert_eq!(
        tag(&caller["tags"], "fedmesh.cluster").as_deref(),
        Some("east")
    );
    assert_eq!(
        tag(&callee["tags"], "fedmesh.cluster").as_deref(),
        Some("west")
    );
    assert_eq!(
        tag(&callee["tags"], "k8s.node.name").as_deref(),
        Some("netns-node")
    );
}
