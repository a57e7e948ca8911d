//! What each fuzz target feeds its input to, the way fedmesh meets such bytes from the network
//! or from a user. Every function here must return normally for any input; the checks inside
//! (round trips, invariants) panic when the code under test is wrong. The fuzz targets in
//! `fuzz_targets/` call these under libFuzzer; `tests/fuzz_corpus.rs` replays every committed
//! corpus and regression input through them in the ordinary test suite.

use std::collections::HashMap;
use std::sync::OnceLock;

use fedmesh_api::pb::dataplane as dp;
use fedmesh_api::pb::federation as fed;
use fedmesh_api::{ClusterName, SpiffeId, TrustDomain};
use fedmesh_dataplane::sni::{ClientHello, MeshSni};
use fedmesh_dataplane::trace::TraceContext;
use prost::Message;

/// A target: what one fuzz binary feeds its input to.
pub type Target = fn(&[u8]);

/// Every target, by name: the fuzz binaries and the corpus replay share this table.
pub const TARGETS: &[(&str, Target)] = &[
    ("client_hello", client_hello),
    ("mesh_sni", mesh_sni),
    ("spiffe_id", spiffe_id),
    ("trust_bundle", trust_bundle),
    ("trace_context", trace_context),
    ("hub_cluster_message", hub_cluster_message),
    ("config_update", config_update),
    ("source_yaml", source_yaml),
    ("http_head", http_head),
];

/// The gateway's ClientHello reader: at most one verdict, and an SNI it found is a name the
/// gateway then parses as a mesh SNI.
pub fn client_hello(data: &[u8]) {
    if let Some(Ok(hello)) = ClientHello::parse(data)
        && let Some(sni) = hello.sni
    {
        mesh_sni(sni.as_bytes());
    }
}

/// A mesh SNI (`p<port>.<service>.<namespace>.<cluster>.fedmesh`): what parses prints back to
/// the same name.
pub fn mesh_sni(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = MeshSni::parse(s) {
        let again = MeshSni::parse(&m.to_string()).expect("a printed mesh SNI parses");
        assert_eq!(again, m, "{s:?}");
    }
}

/// SPIFFE IDs and trust domains as the spec defines them: what parses prints back the same.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::new(s) {
        let again = SpiffeId::new(&id.to_string()).expect("a printed SPIFFE ID parses");
        assert_eq!(again, id, "{s:?}");
        assert!(id.is_member_of(id.trust_domain()));
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(
            TrustDomain::new(td.as_str()).expect("a printed trust domain parses"),
            td
        );
    }
}

/// A trust bundle (SPIFFE JWK Set, or PEM) as a bundle endpoint or the hub hands it over: what
/// parses serializes to JSON that parses to the same authorities.
pub fn trust_bundle(data: &[u8]) {
    let td = TrustDomain::new("fuzz.example").expect("a valid trust domain");
    if let Ok(b) = fedmesh_trust::bundle::SpiffeBundle::from_json_or_pem(td.clone(), data) {
        let again = fedmesh_trust::bundle::SpiffeBundle::from_json(td, b.to_json().as_bytes())
            .expect("a serialized bundle parses");
        assert_eq!(again.x509_authorities(), b.x509_authorities());
        assert_eq!(again.jwt_authorities().len(), b.jwt_authorities().len());
    }
}

/// `traceparent` (and the `tracestate` beside it) as a proxy propagates them.
pub fn trace_context(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(c) = TraceContext::parse(s) {
        assert_eq!(TraceContext::parse(&c.header()), Some(c), "{s:?}");
    }
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(s) {
        headers.insert("traceparent", v.clone());
        headers.insert("tracestate", v);
    }
    let hop = fedmesh_dataplane::trace::propagate(&mut headers, |_| true);
    let sent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .expect("a proxy always sends a valid traceparent");
    assert_eq!(sent.trace_id, hop.trace_id);
}

/// What a control plane sends the hub on its stream, decoded and checked as the hub does before
/// anything is stored.
pub fn hub_cluster_message(data: &[u8]) {
    let Ok(m) = fed::ClusterMessage::decode(data) else {
        return;
    };
    let cluster = ClusterName::new("east").expect("a valid cluster name");
    if let Some(fed::cluster_message::Msg::Publish(p)) = m.msg {
        let _ = fedmesh_federation::hub::check_publish(&cluster, &p);
    }
}

/// What a control plane sends a proxy, applied as the proxy applies it: a config update compiled
/// into a routing table (or refused with a reason).
pub fn config_update(data: &[u8]) {
    let Ok(u) = dp::ConfigUpdate::decode(data) else {
        return;
    };
    let services: HashMap<String, dp::Service> = u
        .services
        .iter()
        .map(|s| (s.key.clone(), s.clone()))
        .collect();
    let cluster = u.cluster.clone().unwrap_or_default();
    let _ = fedmesh_dataplane::config::compile(u.epoch, u.version, &cluster, &services);
}

/// A file of the control plane's directory source: YAML documents of Services, EndpointSlices,
/// ServiceExports, routes and policies.
pub fn source_yaml(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = fedmesh_federation::control_plane::source::dir::parse_file(s);
}

/// Route matches the sidecar holds for every request.
fn route_matches() -> &'static [fedmesh_dataplane::policy::RouteMatch] {
    static MATCHES: OnceLock<Vec<fedmesh_dataplane::policy::RouteMatch>> = OnceLock::new();
    MATCHES.get_or_init(|| {
        let value = |name: &str, value: &str, regex: bool| dp::ValueMatch {
            name: name.into(),
            value: value.into(),
            regex,
        };
        [
            dp::RouteMatch {
                path: Some(dp::PathMatch {
                    r#type: dp::path_match::Type::Prefix as i32,
                    value: "/api".into(),
                }),
                method: "GET".into(),
                ..Default::default()
            },
            dp::RouteMatch {
                path: Some(dp::PathMatch {
                    r#type: dp::path_match::Type::Regex as i32,
                    value: "/v[0-9]+/.*".into(),
                }),
                header_matches: vec![value("x-canary", "^(1|true)$", true)],
                query_params: vec![value("user", "alice", false)],
                ..Default::default()
            },
            dp::RouteMatch {
                grpc_service: "shop.Cart".into(),
                ..Default::default()
            },
        ]
        .iter()
        .map(|m| m.try_into().expect("the fixed matches compile"))
        .collect()
    })
}

/// An HTTP/1 request head as the sidecar takes it from its app: parsed as hyper parses it
/// (`httparse`), then what the sidecar does with it: the destination named by `Host`, hop-by-hop
/// headers removed, the trace context propagated, and the routes' matches evaluated.
pub fn http_head(data: &[u8]) {
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = path.parse::<http::Uri>() else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) {
            headers.append(n, v);
        }
    }
    if let Some(host) = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        let _ = fedmesh_sidecar::dest::subject_of_host(host);
        let table = fedmesh_dataplane::config::RoutingTable::default();
        let _ = fedmesh_sidecar::dest::from_host(host, &table);
    }
    fedmesh_dataplane::http::strip_hop_by_hop(&mut headers);
    assert!(!headers.contains_key(http::header::CONNECTION));
    let _ = fedmesh_dataplane::trace::propagate(&mut headers, |_| false);
    for m in route_matches() {
        let _ = m.matches(&method, &uri, &headers);
    }
}
