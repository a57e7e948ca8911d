//! The hub's trace window over the wire: a joined cluster exports spans with a real OTLP client
//! (the TraceService of `opentelemetry-proto`) over the federation port's mTLS, and an operator
//! finds and reads them through the admin API. Invalid spans are refused one by one with the
//! reason; an oversized batch is refused whole and the hub keeps serving; a flood stays within
//! the window; a cluster that is no longer joined may send nothing.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedmesh_api::{ClusterName, TrustDomain};
use fedmesh_federation::control_plane::hub_link::HubCredentials;
use fedmesh_federation::hub::admin::AdminState;
use fedmesh_federation::hub::traces::TraceLimits;
use fedmesh_federation::hub::{self, HubConfig};
use fedmesh_federation::store::{KvStore, RedbStore};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn span(trace: [u8; 16], id: u8, parent: Option<u8>, kind: SpanKind, attrs: Vec<KeyValue>) -> Span {
    Span {
        trace_id: trace.to_vec(),
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: "GET".into(),
        kind: kind as i32,
        start_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(id) * 1_000,
        end_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(id) * 1_000 + 2_000_000,
        attributes: attrs,
        ..Default::default()
    }
}

fn export(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A GET on the admin API with the token (or without): status and body.
async fn admin_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: hub\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn join(
    hub: &HubHandle,
    dir: &std::path::Path,
    name: &str,
) -> TraceServiceClient<tonic::transport::Channel> {
    let cluster = ClusterName::new(name).unwrap();
    let td = TrustDomain::new(&format!("{name}.example")).unwrap();
    let (token, _) = hub.hub.create_token(&cluster, &td, None).await.unwrap();
    let creds = HubCredentials::join(
        &dir.join(name),
        &hub.addr.to_string(),
        &token,
        &cluster,
        &td,
    )
    .await
    .unwrap();
    // Joined: the cluster is in the hub's view once its record is written.
    let start = std::time::Instant::now();
    while hub.hub.view().cluster(&cluster).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{name} never joined"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    TraceServiceClient::new(creds.channel().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_clusters_send_spans_and_operators_find_them_in_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KvStore> = Arc::new(RedbStore::open(&dir.path().join("hub.redb")).unwrap());
    let config = HubConfig {
        traces: TraceLimits {
            max_spans: 50,
            ..TraceLimits::default()
        },
        ..hub_config()
    };
    let hub = start_hub(dir.path(), store, "127.0.0.1:0".parse().unwrap(), config).await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    tokio::spawn(hub::serve_admin(
        AdminState {
            hub: hub.hub.clone(),
            token: Arc::new("t0ken".into()),
            admin_ids: Arc::new(BTreeSet::new()),
        },
        admin,
        None,
        hub.shutdown.clone(),
    ));
    let mut east = join(&hub, dir.path(), "east").await;
    let mut west = join(&hub, dir.path(), "west").await;

    // One request across two clusters: east's client span, west's server span.
    let trace = [7u8; 16];
    let id = hex::encode(trace);
    let r = east
        .export(export(
            "frontend",
            vec![span(
                trace,
                1,
                None,
                SpanKind::Client,
                vec![kv("fedmesh.destination.cluster", "west")],
            )],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.partial_success, None);
    west.export(export(
        "api",
        vec![span(
            trace,
            2,
            Some(1),
            SpanKind::Server,
            vec![kv("error.type", "503")],
        )],
    ))
    .await
    .unwrap();

    let (status, body) = admin_get(
        admin_addr,
        "/api/v1/traces?service=api&error=true",
        Some("t0ken"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["trace_id"], id.as_str());
    assert_eq!(list[0]["clusters"], serde_json::json!(["east", "west"]));
    assert_eq!(list[0]["root"], "frontend: GET");
    assert_eq!(list[0]["error"], true);
    let (status, body) =
        admin_get(admin_addr, &format!("/api/v1/traces/{id}"), Some("t0ken")).await;
    assert_eq!(status, 200, "{body}");
    let spans: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(spans[0]["cluster"], "east");
    assert_eq!(spans[0]["kind"], "client");
    assert_eq!(spans[1]["cluster"], "west");
    assert_eq!(spans[1]["parent_span_id"], spans[0]["span_id"]);
    assert_eq!(spans[1]["error"], "503");
    // Bad and unknown IDs, and no token.
    let (status, body) = admin_get(admin_addr, "/api/v1/traces/xyz", Some("t0ken")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a trace ID"), "{body}");
    let (status, body) = admin_get(
        admin_addr,
        &format!("/api/v1/traces/{}", hex::encode([8u8; 16])),
        Some("t0ken"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not in the hub's window"), "{body}");
    assert_eq!(admin_get(admin_addr, "/api/v1/traces", None).await.0, 401);
    let (_, doc) = admin_get(admin_addr, "/api/openapi.json", None).await;
    assert!(
        doc.contains("/api/v1/traces/{id}") && doc.contains("SpanView"),
        "documented"
    );

    // Invalid spans are refused one by one; the valid one in the same batch is kept.
    let mut bad = span([9u8; 16], 1, None, SpanKind::Client, vec![]);
    bad.span_id = vec![1, 2];
    let r = east
        .export(export(
            "frontend",
            vec![bad, span([10u8; 16], 1, None, SpanKind::Client, vec![])],
        ))
        .await
        .unwrap()
        .into_inner();
    let partial = r.partial_success.expect("a partial success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial.error_message.contains("span_id must be 8 bytes"),
        "{}",
        partial.error_message
    );
    assert!(hub.hub.traces.get(&hex::encode([10u8; 16])).is_some());

    // An oversized batch is refused whole, and the hub keeps serving.
    let huge = kv("blob", &"x".repeat(5 << 20));
    let e = east
        .export(export(
            "frontend",
            vec![span([11u8; 16], 1, None, SpanKind::Client, vec![huge])],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    east.export(export(
        "frontend",
        vec![span([12u8; 16], 1, None, SpanKind::Client, vec![])],
    ))
    .await
    .expect("the hub still takes spans");

    // A flood stays within the window (50 spans): the oldest traces go, counted.
    for t in 0..100u8 {
        let mut trace = [t; 16];
        trace[0] = 0xf0;
        east.export(export(
            "frontend",
            vec![span(trace, 1, None, SpanKind::Client, vec![])],
        ))
        .await
        .unwrap();
    }
    let (held, dropped) = hub.hub.traces.sizes();
    assert_eq!(held, 50);
    assert!(dropped >= 50, "{dropped}");
    assert!(
        hub.hub.traces.get(&id).is_none(),
        "the first trace was the oldest"
    );
    let metrics = hub.hub.metrics.encode();
    assert!(
        metrics.contains("fedmesh_hub_spans_total{result=\"dropped\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fedmesh_hub_trace_window_spans 50"),
        "{metrics}"
    );

    // A cluster that is no longer joined may not send (its identity is still valid).
    assert!(
        hub.hub
            .remove_cluster(&ClusterName::new("west").unwrap())
            .await
            .unwrap()
    );
    let start = std::time::Instant::now();
    while hub
        .hub
        .view()
        .cluster(&ClusterName::new("west").unwrap())
        .is_some()
    {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = west
        .export(export(
            "api",
            vec![span([13u8; 16], 1, None, SpanKind::Server, vec![])],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("west is not joined"),
        "{}",
        e.message()
    );
    hub.stop().await;
}
