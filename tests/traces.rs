//! One request seen across clusters in a real OpenTelemetry collector: the calling sidecar's
//! CLIENT span and the called sidecar's SERVER span in one trace, parent and child, each saying
//! which clusters, identities and locality were involved; the caller's sampling decision kept;
//! failed requests kept whatever the sampling said, with the destination cluster and the reason.
//! Clusters in network namespaces as in `tests/netns.rs` (root and `ip netns`), the collector is
//! rotel from PyPI (`scripts/test` installs it), the proxies configured by the standard `OTEL_*`
//! variables.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedmesh_testbed::apps::EchoResponse;
use fedmesh_testbed::yaml::{self, EndpointSpec};
use support::netns::{Mesh, http_get_with, in_ns};
use support::otlp::{self, Span};
use support::pods::{clusterset_ip, export, wait_answer_from};

/// The sidecars' spans of `trace` the collector has logged, once there are at least `n` (export
/// batches leave every second). A gateway's admission span is in the trace of the request that
/// opened its connection, whichever that was; the gateway's hop is checked on its own below.
fn wait_spans(mesh: &Mesh, collector: usize, trace: &str, n: usize) -> Vec<Span> {
    let start = Instant::now();
    loop {
        let spans: Vec<Span> = otlp::parse(&mesh.net.procs[collector].log())
            .into_iter()
            .filter(|s| s.trace_id == trace && s.res("service.name") != Some("fedmesh-gateway"))
            .collect();
        if spans.len() >= n {
            return spans;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the collector has {} of {n} spans of trace {trace}: {spans:#?}\n{}",
            spans.len(),
            mesh.net.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn one<'a>(spans: &'a [Span], kind: &str) -> &'a Span {
    let of_kind: Vec<&Span> = spans.iter().filter(|s| s.kind == kind).collect();
    assert_eq!(of_kind.len(), 1, "one {kind} span expected: {spans:#?}");
    of_kind[0]
}

#[test]
fn a_request_across_clusters_is_one_trace_of_client_and_server_spans_and_failures_are_always_kept()
{
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let collector = mesh.start_collector();
    // Every process logs JSON, the proxies an access-log line per request and connection.
    mesh.net.env.extend([
        ("FEDMESH_LOG_FORMAT".into(), "json".into()),
        ("FEDMESH_ACCESS_LOG".into(), "1".into()),
    ]);
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend"]);
    let mut west = mesh.add_cluster(2, "west", "us-west", &["api"]);
    let api = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    export(&west, "api", &[(&api, "us-west-1a")]);
    // The same pods as an opaque TCP service: the sidecars relay its bytes without reading them.
    let eps = [EndpointSpec {
        addr: api.app_addr(),
        zone: "us-west-1a".into(),
        ready: true,
    }];
    west.write(
        "api-tcp.yaml",
        &yaml::service("shop", "api-tcp", &[("tcp", 80, "tcp")], &eps),
    );
    west.write(
        "api-tcp-export.yaml",
        &yaml::service_export("shop", "api-tcp"),
    );
    let frontend = mesh.add_pod(&mut east, "frontend", "us-east-1a", false);
    let ip = clusterset_ip(&frontend, &east, "api");
    let host = "api.shop.svc.clusterset.local";
    wait_answer_from(&frontend, ip, host, "west");

    let get = |path: &str, traceparent: &str| {
        let (path, tp) = (path.to_string(), traceparent.to_string());
        in_ns(&frontend.ns, move || {
            http_get_with(
                SocketAddr::from((ip, 80)),
                &path,
                host,
                &[("traceparent".into(), tp)],
            )
            .unwrap()
        })
    };

    // A sampled request: the app's tracer started trace 0af7…, span b7ad….
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let (status, body) = get("/", &format!("00-{trace}-b7ad6b7169203331-01"));
    assert_eq!(status, 200, "{body}");
    let echo: EchoResponse = serde_json::from_str(&body).unwrap();
    let spans = wait_spans(&mesh, collector, trace, 2);
    let client = one(&spans, "SPAN_KIND_CLIENT").clone();
    let server = one(&spans, "SPAN_KIND_SERVER").clone();
    eprintln!("{client:#?}\n{server:#?}");
    assert_eq!(
        client.parent_id, "b7ad6b7169203331",
        "the app's span is the parent"
    );
    assert_eq!(
        server.parent_id, client.span_id,
        "the server hop is the client's child"
    );
    assert!(
        echo.traceparent
            .contains(&format!("{trace}-{}", server.span_id)),
        "the app sees the server span as its parent: {}",
        echo.traceparent
    );
    for s in [&client, &server] {
        assert_eq!(s.name, "GET");
        assert_eq!(s.attr("fedmesh.source.cluster"), Some("east"));
        assert_eq!(s.attr("fedmesh.destination.cluster"), Some("west"));
        assert_eq!(
            s.attr("fedmesh.caller"),
            Some("spiffe://east.fedmesh.test/ns/shop/sa/frontend")
        );
        assert_eq!(s.attr("http.request.method"), Some("GET"));
        assert_eq!(s.attr("http.response.status_code"), Some("200"));
        assert_eq!(s.attr("url.path"), Some("/"));
        assert_eq!(s.attr("error.type"), None);
        assert_eq!(s.res("service.namespace"), Some("shop"));
        assert_eq!(s.res("k8s.namespace.name"), Some("shop"));
        // OTEL_RESOURCE_ATTRIBUTES joins the proxy's own resource (the injector sets k8s.* so).
        assert_eq!(s.res("k8s.node.name"), Some("netns-node"));
    }
    assert_eq!(client.res("service.name"), Some("frontend"));
    assert_eq!(client.res("fedmesh.cluster"), Some("east"));
    assert_eq!(
        client.res("fedmesh.trust_domain"),
        Some("east.fedmesh.test")
    );
    assert_eq!(client.attr("server.address"), Some(host));
    assert_eq!(client.attr("fedmesh.service"), Some("shop/api"));
    assert_eq!(
        client.attr("fedmesh.locality"),
        Some("other-region"),
        "east (us-east) reached west (us-west)"
    );
    assert_eq!(client.attr("fedmesh.attempts"), Some("1"));
    assert_eq!(client.attr("fedmesh.gateway"), Some("10.250.0.12:15443"));
    assert_eq!(client.attr("network.peer.address"), Some("10.250.0.12"));
    assert_eq!(
        client.attr("fedmesh.destination.trust_domain"),
        Some("west.fedmesh.test")
    );
    assert_eq!(server.res("service.name"), Some("api"));
    assert_eq!(server.res("fedmesh.cluster"), Some("west"));
    assert_eq!(
        server.attr("fedmesh.callee"),
        Some("spiffe://west.fedmesh.test/ns/shop/sa/api")
    );
    assert_eq!(server.attr("fedmesh.service"), Some("shop/api"));
    assert!(server.attr("network.peer.address").is_some(), "{server:#?}");

    // The access logs say the same, with the trace ID: JSON lines, no colour codes.
    let access = |proc_name: &str| -> Vec<serde_json::Value> {
        let p = mesh
            .net
            .procs
            .iter()
            .find(|p| p.name == proc_name)
            .unwrap_or_else(|| panic!("no process {proc_name}"));
        let log = p.log();
        assert!(
            !log.contains('\u{1b}'),
            "no ANSI codes in a log file: {log}"
        );
        log.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("{proc_name}: not a JSON line ({e}): {l}"))
            })
            .filter(|v| v["target"] == "access")
            .collect()
    };
    let out = access(&format!("{}-sidecar", frontend.name));
    let line = out
        .iter()
        .find(|v| v["trace_id"] == trace)
        .unwrap_or_else(|| panic!("no access line of trace {trace}: {out:#?}"));
    eprintln!("{line}");
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["status"], 200);
    assert_eq!(line["dst_cluster"], "west");
    assert_eq!(line["service"], "shop/api");
    assert_eq!(line["span_id"], client.span_id.as_str());
    let inb = access(&format!("{}-sidecar", api.name));
    let line = inb
        .iter()
        .find(|v| v["trace_id"] == trace)
        .unwrap_or_else(|| panic!("no inbound access line of trace {trace}: {inb:#?}"));
    assert_eq!(line["direction"], "inbound");
    assert_eq!(
        line["caller"],
        "spiffe://east.fedmesh.test/ns/shop/sa/frontend"
    );
    assert_eq!(line["span_id"], server.span_id.as_str());

    // The caller decided not to sample: a request that went well leaves no span...
    let quiet = "1af7651916cd43dd8448eb211c80319c";
    let (status, _) = get("/", &format!("00-{quiet}-b7ad6b7169203331-00"));
    assert_eq!(status, 200);
    // ...but one that failed is kept (both hops), with its reason. The collector logs batches
    // in order, so once this later trace is in, the quiet one would have been too.
    let failed = "2af7651916cd43dd8448eb211c80319c";
    let (status, _) = get("/status/503", &format!("00-{failed}-b7ad6b7169203331-00"));
    assert_eq!(status, 503);
    let spans = wait_spans(&mesh, collector, failed, 2);
    for s in &spans {
        assert_eq!(s.attr("error.type"), Some("503"), "{s:#?}");
        assert_eq!(s.attr("fedmesh.destination.cluster"), Some("west"));
    }
    let log = mesh.net.procs[collector].log();
    assert!(
        !otlp::parse(&log).iter().any(|s| s.trace_id == quiet),
        "an unsampled request that went well is not exported"
    );

    // Opaque TCP: a span per connection on the calling side (a trace of its own: TCP carries no
    // context of the app's); the gateway's span of that connection and the callee sidecar's
    // (its context sent first inside TLS) are its children. The echo app speaks HTTP, so the
    // bytes sent are a request.
    let tcp_ip = clusterset_ip(&frontend, &east, "api-tcp");
    let (status, body) = in_ns(&frontend.ns, move || {
        http_get_with(
            SocketAddr::from((tcp_ip, 80)),
            "/",
            "api-tcp.shop.svc.clusterset.local",
            &[],
        )
        .unwrap()
    });
    assert_eq!(status, 200, "{body}");
    let start = Instant::now();
    let (tcp, gw, relay, accept) = loop {
        let all = otlp::parse(&mesh.net.procs[collector].log());
        let tcp = all
            .iter()
            .find(|s| s.name == "connect shop/api-tcp" && s.attr("fedmesh.bytes.sent").is_some())
            .cloned();
        if let Some(tcp) = tcp
            && let Some(gw) = all.iter().find(|s| {
                s.parent_id == tcp.span_id && s.res("service.name") == Some("fedmesh-gateway")
            })
            && let Some(relay) = all.iter().find(|s| s.parent_id == gw.span_id)
            && let Some(accept) = all
                .iter()
                .find(|s| s.parent_id == tcp.span_id && s.name == "accept shop/api-tcp")
        {
            break (tcp, gw.clone(), relay.clone(), accept.clone());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no span of the TCP connection and its gateway hop: {:#?}",
            all.iter()
                .filter(|s| s.name.contains("api-tcp"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{tcp:#?}\n{gw:#?}");
    assert_eq!(tcp.kind, "SPAN_KIND_CLIENT");
    assert_eq!(tcp.attr("fedmesh.source.cluster"), Some("east"));
    assert_eq!(tcp.attr("fedmesh.destination.cluster"), Some("west"));
    assert_eq!(
        tcp.attr("fedmesh.caller"),
        Some("spiffe://east.fedmesh.test/ns/shop/sa/frontend")
    );
    let answered: u64 = tcp.attr("fedmesh.bytes.sent").unwrap().parse().unwrap();
    assert!(
        answered > 0,
        "the answer's bytes went back to the app: {tcp:#?}"
    );
    // The gateway's admission (exported at once) and, as its child, the relay until close.
    assert_eq!(gw.name, "admit shop/api-tcp");
    assert_eq!(gw.trace_id, tcp.trace_id);
    assert_eq!(gw.res("service.name"), Some("fedmesh-gateway"));
    assert_eq!(relay.name, "relay shop/api-tcp");
    assert_eq!(relay.kind, "SPAN_KIND_INTERNAL");
    assert!(relay.attr("fedmesh.bytes.sent").is_some(), "{relay:#?}");
    // The callee's span: same trace, caller proven by mTLS, in the callee's cluster.
    assert_eq!(accept.kind, "SPAN_KIND_SERVER");
    assert_eq!(accept.trace_id, tcp.trace_id);
    assert_eq!(accept.res("fedmesh.cluster"), Some("west"));
    assert_eq!(accept.res("service.name"), Some("api"));
    assert_eq!(accept.attr("fedmesh.source.cluster"), Some("east"));
    assert_eq!(
        accept.attr("fedmesh.caller"),
        Some("spiffe://east.fedmesh.test/ns/shop/sa/frontend")
    );
    assert_eq!(
        accept.attr("network.protocol.name"),
        Some("http"),
        "{accept:#?}"
    );
    let gw_lines = access("west-gateway");
    let line = gw_lines
        .iter()
        .find(|v| v["span_id"] == relay.span_id.as_str())
        .unwrap_or_else(|| panic!("no gateway access line of {}: {gw_lines:#?}", relay.span_id));
    assert_eq!(line["direction"], "gateway");
    assert_eq!(line["service"], "shop/api-tcp");
    assert!(line["bytes_sent"].as_u64().unwrap() > 0, "{line}");

    // The app is gone: west's sidecar answers for it, and both spans say why.
    let app = api.app.expect("the api pod has an app");
    mesh.net.procs[app].terminate(Duration::from_secs(5));
    let down = "3af7651916cd43dd8448eb211c80319c";
    let (status, body) = get("/", &format!("00-{down}-b7ad6b7169203331-00"));
    assert_eq!(status, 503, "{body}");
    let spans = wait_spans(&mesh, collector, down, 2);
    for s in [
        one(&spans, "SPAN_KIND_CLIENT"),
        one(&spans, "SPAN_KIND_SERVER"),
    ] {
        assert_eq!(s.attr("error.type"), Some("app-unreachable"), "{s:#?}");
        assert_eq!(s.attr("fedmesh.proxy_error"), Some("app-unreachable"));
        assert_eq!(s.attr("fedmesh.destination.cluster"), Some("west"));
    }

    // A failover, as the span tells it: a third cluster now exports shop/api too, and west's
    // app is still gone. A request that tries west first is answered there by west's sidecar
    // (the app never saw it), so east's sidecar retries it in central: one CLIENT span, two
    // attempts, both clusters tried, central the destination.
    let mut central = mesh.add_cluster(3, "central", "us-central", &["api"]);
    let api_c = mesh.add_pod(&mut central, "api", "us-central-1a", true);
    export(&central, "api", &[(&api_c, "us-central-1a")]);
    let start = Instant::now();
    let mut n = 0u32;
    let failover = loop {
        n += 1;
        let id = format!("4af7651916cd43dd8448eb21{n:08x}");
        let (status, body) = get("/", &format!("00-{id}-b7ad6b7169203331-01"));
        if status == 200 {
            let spans = wait_spans(&mesh, collector, &id, 2);
            let c = one(&spans, "SPAN_KIND_CLIENT").clone();
            if c.attr("fedmesh.attempts") == Some("2") {
                break c;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no request failed over from west to central in {n} tries: last {status} {body}"
        );
        // Until central's export reaches east, every try ends in west's 503.
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{failover:#?}");
    assert_eq!(
        failover.attr("fedmesh.destination.cluster"),
        Some("central")
    );
    let tried = failover.attr("fedmesh.tried").unwrap_or_default();
    assert!(
        tried.contains("(west)") && tried.contains("(central)"),
        "both clusters tried, in order: {tried}"
    );
    assert!(
        tried.find("(west)") < tried.find("(central)"),
        "west first: {tried}"
    );
    assert_eq!(failover.attr("error.type"), None, "the request succeeded");

    // The gateway hop. The sampled request rode a pooled connection that the gateway knows by
    // the ID its client span names; the gateway's admission span of that connection (exported
    // when it was admitted, with the connection ID as its span ID) is the child of the request
    // that opened the connection, in that request's trace. Its child, the relay, is recorded
    // when the connection closes: here, when the frontend's sidecar stops.
    let conn = client
        .attr("fedmesh.connection.id")
        .expect("a request through a gateway names its connection")
        .to_string();
    let gateway_span = |all: &[Span]| {
        all.iter()
            .find(|s| s.span_id == conn && s.res("service.name") == Some("fedmesh-gateway"))
            .cloned()
    };
    let start = Instant::now();
    while gateway_span(&otlp::parse(&mesh.net.procs[collector].log())).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the gateway's admission span {conn} is exported while its connection is open"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    mesh.net.procs[frontend.sidecar].terminate(Duration::from_secs(15));
    let start = Instant::now();
    let (gw, relay, all) = loop {
        let all = otlp::parse(&mesh.net.procs[collector].log());
        if let Some(gw) = gateway_span(&all)
            && let Some(relay) = all.iter().find(|s| s.parent_id == gw.span_id).cloned()
        {
            break (gw, relay, all);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no gateway span {conn}\n{}",
            mesh.net.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{gw:#?}");
    assert_eq!(gw.kind, "SPAN_KIND_SERVER");
    assert_eq!(gw.name, "admit shop/api");
    assert_eq!(relay.name, "relay shop/api");
    assert_eq!(relay.trace_id, gw.trace_id);
    assert_eq!(gw.res("fedmesh.cluster"), Some("west"));
    assert_eq!(gw.attr("fedmesh.admitted"), Some("true"));
    assert_eq!(gw.attr("fedmesh.connection.id"), Some(conn.as_str()));
    assert_eq!(gw.attr("fedmesh.service"), Some("shop/api"));
    assert_eq!(
        gw.attr("tls.client.server_name"),
        Some("p80.api.shop.west.fedmesh")
    );
    assert_eq!(
        gw.attr("fedmesh.endpoint"),
        Some(api.app_addr().to_string().as_str())
    );
    for dir in ["fedmesh.bytes.received", "fedmesh.bytes.sent"] {
        let n: u64 = relay.attr(dir).unwrap_or("0").parse().unwrap();
        assert!(n > 1000, "{dir}: {n} bytes (TLS and requests crossed)");
    }
    let opener = all
        .iter()
        .find(|s| s.span_id == gw.parent_id)
        .expect("the request that opened the connection is in the collector");
    assert_eq!(opener.kind, "SPAN_KIND_CLIENT");
    assert_eq!(opener.trace_id, gw.trace_id);
    assert_eq!(opener.attr("fedmesh.connection.id"), Some(conn.as_str()));

    // A connection the gateway refuses is a failed span of its own, with the reason.
    let gateway = west.gateway();
    in_ns(&east.node, move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(5)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
    });
    let start = Instant::now();
    loop {
        let refused: Vec<Span> = otlp::parse(&mesh.net.procs[collector].log())
            .into_iter()
            .filter(|s| s.attr("fedmesh.admitted") == Some("false"))
            .collect();
        if let Some(r) = refused.first() {
            assert_eq!(r.attr("error.type"), Some("not_tls"), "{r:#?}");
            assert!(r.attr("fedmesh.refusal").is_some());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no span of the refused connection"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// With no collector named, the proxies send their spans to their control plane, which relays
/// them to the hub: the hub's admin API shows one request's spans from both clusters.
#[test]
fn without_a_collector_spans_reach_the_hubs_trace_window_through_the_control_planes() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let trace = "5af7651916cd43dd8448eb211c80319c";
    let call = mesh.traced_call(trace);
    let start = Instant::now();
    let spans = loop {
        let (code, body) = mesh.hub_admin_get(&format!("/api/v1/traces/{trace}"));
        if code == 200 {
            let spans: serde_json::Value = serde_json::from_str(&body).unwrap();
            if spans.as_array().unwrap().len() >= 2 {
                break spans;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the hub never held the trace: {code} {body}\n{}",
            mesh.net.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let spans = spans.as_array().unwrap();
    let client = spans.iter().find(|s| s["kind"] == "client").unwrap();
    let server = spans
        .iter()
        .find(|s| s["kind"] == "server" && s["resource"]["fedmesh.proxy"] == "sidecar")
        .unwrap();
    assert_eq!(
        client["cluster"], "east",
        "stamped by the hub from the relaying cluster"
    );
    assert_eq!(client["service"], "frontend");
    assert_eq!(server["cluster"], "west");
    assert_eq!(server["service"], "api");
    assert_eq!(server["parent_span_id"], client["span_id"]);
    assert_eq!(server["attributes"]["fedmesh.source.cluster"], "east");
    let (code, body) = mesh.hub_admin_get("/api/v1/traces?service=api");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(trace), "{body}");

    // The same from a shell: the list, then the trace as a waterfall, each hop with its cluster.
    let list = mesh.fedmesh_admin(&["traces", "--service", "api"]);
    eprintln!("{list}");
    let row = list
        .lines()
        .find(|l| l.starts_with(trace))
        .unwrap_or_else(|| panic!("the trace is listed: {list}"));
    assert!(
        row.contains("frontend: GET") && row.contains("east,west"),
        "{row}"
    );
    let fall = mesh.fedmesh_admin(&["trace", trace]);
    eprintln!("{fall}");
    assert!(fall.starts_with(&format!("trace {trace}")), "{fall}");
    let client_line = fall
        .lines()
        .find(|l| l.contains("client frontend GET"))
        .unwrap();
    let server_line = fall.lines().find(|l| l.contains("server api GET")).unwrap();
    assert!(
        client_line.trim_start().starts_with("east"),
        "{client_line}"
    );
    assert!(
        server_line.trim_start().starts_with("west"),
        "{server_line}"
    );
    assert!(
        server_line.find("server").unwrap() > client_line.find("client").unwrap(),
        "the server hop is drawn under the client's: {fall}"
    );

    // The clusters' clocks are compared through the client/server pair: both run on this
    // machine's clock, so the estimate is the way there and back's asymmetry, well under 100 ms.
    let (code, body) = mesh.hub_admin_get(&format!("/api/v1/traces/{trace}/skew"));
    assert_eq!(code, 200, "{body}");
    let skew: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(skew["reference"], "east", "{skew}");
    let west_offset = &skew["offsets"][0];
    assert_eq!(west_offset["cluster"], "west", "{skew}");
    assert_eq!(west_offset["pairs"], 1, "{skew}");
    assert!(
        west_offset["offset_ns"].as_i64().unwrap().abs() < 100_000_000,
        "{skew}"
    );
    assert!(
        fall.contains("clock skew corrected (estimated from 1 client/server pair(s)): west "),
        "{fall}"
    );

    // The service graph: east's frontend calls west's api, with both sides' identities.
    let (code, body) = mesh.hub_admin_get("/api/v1/graph?minutes=5");
    assert_eq!(code, 200, "{body}");
    let graph: serde_json::Value = serde_json::from_str(&body).unwrap();
    let edge = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"].as_str().unwrap().starts_with("west/"))
        .unwrap_or_else(|| panic!("no edge into west: {graph}"));
    assert!(
        edge["source"].as_str().unwrap().starts_with("east/")
            && edge["source"].as_str().unwrap().ends_with("/frontend")
            && edge["target"].as_str().unwrap().ends_with("/api"),
        "{edge}"
    );
    assert!(edge["requests"].as_f64().unwrap() >= 1.0, "{edge}");
    assert_eq!(edge["error_share"], 0.0, "{edge}");
    assert!(
        edge["callers"][0]
            .as_str()
            .unwrap()
            .starts_with("spiffe://east")
            && edge["callees"][0]
                .as_str()
                .unwrap()
                .starts_with("spiffe://west"),
        "{edge}"
    );
    let (code, body) = mesh.hub_admin_get("/api/v1/graph?minutes=0");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("give 1 to 1440"), "{body}");
    // The app's own span — the request's root, whose ID the app sent in its traceparent — goes
    // from an OpenTelemetry SDK exporter to its sidecar's loopback OTLP port, and joins the
    // trace in the hub, stamped with the app's cluster.
    in_ns(&call.frontend.ns, move || {
        support::otlp::export_app_span(
            "http://127.0.0.1:4317",
            trace,
            "b7ad6b7169203331",
            "frontend-app",
            Duration::from_millis(50),
        )
    })
    .unwrap();
    let start = Instant::now();
    let app = loop {
        let (_, body) = mesh.hub_admin_get(&format!("/api/v1/traces/{trace}"));
        let spans: serde_json::Value = serde_json::from_str(&body).unwrap();
        if let Some(app) = spans
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["span_id"] == "b7ad6b7169203331")
        {
            break app.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the app's span never reached the hub: {body}\n{}",
            mesh.net.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(app["service"], "frontend-app", "{app}");
    assert_eq!(app["cluster"], "east", "{app}");
    assert_eq!(app["parent_span_id"], "", "{app}");
    assert_eq!(app["attributes"]["app.step"], "checkout", "{app}");
    assert_eq!(
        client["parent_span_id"], "b7ad6b7169203331",
        "the sidecar's span is the app span's child"
    );
}
