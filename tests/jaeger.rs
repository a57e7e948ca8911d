//! Our spans in Jaeger, the trace backend most users read: the proxies send their spans to
//! their control planes as they do by default, the control planes relay them to the hub, and
//! the hub forwards every span it accepts to Jaeger's OTLP/HTTP receiver (`fedmesh hub
//! --otlp-forward`; Jaeger built from its own module by `scripts/peers`, run all-in-one with
//! in-memory storage). One request across two clusters then reads back through Jaeger's query
//! API (`/api/traces/{id}`) exactly as the hub's own API shows it: the same spans, the same
//! parents, each with the cluster that proved it sent it. Clusters in network namespaces as in
//! `tests/netns.rs` (root and `ip netns`).
//!
//! Skipped (with the reason) without network namespaces or where `scripts/peers` could not build
//! Jaeger; both are required in CI.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::netns::{HUB_IP, Mesh, http_get_with, in_ns};

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

/// Polls `fetch` every 300 ms until it gives a value, for at most 30 s.
fn poll<T>(what: &str, mut fetch: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match fetch() {
            Ok(v) => return v,
            Err(last) => assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what} never came: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
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
    let forward = format!("http://{HUB_IP}:4318/v1/traces");
    let mut mesh = Mesh::start_with_hub_args(dir.path(), &["--otlp-forward", &forward]);
    let jaeger = mesh.start_jaeger(&jaeger);
    // The app's tracer started trace 3af7…, span b7ad…; it asks east for west's api.
    let trace = "3af7651916cd43dd8448eb211c80319c";
    let _call = mesh.traced_call(trace);

    // The hub's view: both sidecars' spans (the gateways' admission spans are checked in
    // tests/traces.rs).
    let hub_spans: Vec<Value> = poll("both sidecars' spans in the hub", || {
        let (code, body) = mesh.hub_admin_get(&format!("/api/v1/traces/{trace}"));
        let spans: Vec<Value> = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s["resource"]["fedmesh.proxy"] == "sidecar")
            .collect();
        if code == 200 && spans.len() >= 2 {
            Ok(spans)
        } else {
            Err(format!("{code} {body}"))
        }
    });
    assert_eq!(hub_spans.len(), 2, "{hub_spans:#?}");

    // Jaeger's view, once the hub's batch has been forwarded (404 until then).
    let wan = mesh.wan.clone();
    let (spans, processes) = poll("the trace in Jaeger", || {
        let wan = wan.clone();
        let (code, body) = in_ns(&wan, move || {
            http_get_with(
                SocketAddr::from((HUB_IP, 16686)),
                &format!("/api/traces/{trace}"),
                "jaeger",
                &[],
            )
        })
        .unwrap_or_else(|e| (0, e.to_string()));
        let doc: Value = serde_json::from_str(&body).unwrap_or_default();
        let found = &doc["data"][0];
        let sidecars: Vec<Value> = found["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| {
                let p = s["processID"].as_str().unwrap_or_default();
                tag(&found["processes"][p]["tags"], "fedmesh.proxy").as_deref() == Some("sidecar")
            })
            .cloned()
            .collect();
        if code == 200 && sidecars.len() >= 2 {
            Ok((sidecars, found["processes"].clone()))
        } else {
            Err(format!("{code} {body}\n{}", mesh.net.procs[jaeger].log()))
        }
    });
    assert_eq!(spans.len(), 2, "one span per sidecar: {spans:#?}");

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
    let process = |s: &Value| processes[s["processID"].as_str().unwrap()].clone();

    // Span by span, Jaeger shows what the hub shows.
    for h in &hub_spans {
        let id = h["span_id"].as_str().unwrap();
        let j = spans
            .iter()
            .find(|s| s["spanID"] == id)
            .unwrap_or_else(|| panic!("the hub's span {id} is not in Jaeger: {spans:#?}"));
        assert_eq!(j["operationName"], h["name"]);
        assert_eq!(
            tag(&j["tags"], "span.kind").as_deref(),
            h["kind"].as_str(),
            "{j:#}"
        );
        assert_eq!(parent(j), h["parent_span_id"].as_str().unwrap());
        let p = process(j);
        assert_eq!(p["serviceName"], h["service"]);
        assert_eq!(
            tag(&p["tags"], "fedmesh.cluster").as_deref(),
            h["cluster"].as_str(),
            "the cluster the hub stamped: {p:#}"
        );
        assert_eq!(
            j["startTime"].as_u64(),
            h["start_unix_nano"].as_u64().map(|n| n / 1000),
            "microseconds in Jaeger"
        );
    }

    // And what that structure is: the app's span, the client hop in east, the server hop in
    // west as its child.
    let of_kind = |kind: &str| {
        spans
            .iter()
            .find(|s| tag(&s["tags"], "span.kind").as_deref() == Some(kind))
            .unwrap_or_else(|| panic!("a {kind} span: {spans:#?}"))
    };
    let (client, server) = (of_kind("client"), of_kind("server"));
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
    // The hub counted what it forwarded.
    let (code, metrics) = mesh.hub_admin_get("/metrics");
    assert_eq!(code, 200);
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("fedmesh_hub_spans_total"))
    {
        eprintln!("{l}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fedmesh_hub_spans_total{result=\"forwarded\"}")),
        "{metrics}"
    );
}
