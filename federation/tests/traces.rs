//! The hub's trace window over the wire: a joined cluster exports spans with a real OTLP client
//! (the TraceService of `opentelemetry-proto`) over the federation port's mTLS, and an operator
//! finds and reads them through the admin API. Invalid spans are refused one by one with the
//! reason; an oversized batch is refused whole and the hub keeps serving; a flood stays within
//! the window; a cluster that is no longer joined may send nothing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedmesh_api::{ClusterName, TrustDomain};
use fedmesh_federation::control_plane::hub_link::HubCredentials;
use fedmesh_federation::hub::HubConfig;
use fedmesh_federation::hub::traces::TraceLimits;
use fedmesh_federation::store::{KvStore, RedbStore};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    admin_call(addr, "GET", path, token, "").await
}

async fn join(
    hub: &HubHandle,
    dir: &std::path::Path,
    name: &str,
) -> TraceServiceClient<tonic::transport::Channel> {
    TraceServiceClient::new(join_creds(hub, dir, name).await.channel().unwrap())
}

async fn join_creds(hub: &HubHandle, dir: &std::path::Path, name: &str) -> HubCredentials {
    let cluster = ClusterName::new(name).unwrap();
    let td = TrustDomain::new(&format!("{name}.example")).unwrap();
    let (token, _) = hub.hub.create_token(&cluster, &td, None).await.unwrap();
    hub.join(dir, name, &token).await
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
    let admin_addr = hub.serve_admin("t0ken").await;
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

    // A batch as large as a busy proxy's (~1 MiB: many spans) is taken whole.
    let many: Vec<Span> = (0..2_000u32)
        .map(|i| {
            let mut trace = [0x77u8; 16];
            trace[..4].copy_from_slice(&i.to_be_bytes());
            span(
                trace,
                1,
                None,
                SpanKind::Client,
                vec![kv("url.path", &"p".repeat(400))],
            )
        })
        .collect();
    let batch = export("frontend", many);
    assert!(batch.encoded_len() > 900 << 10, "{}", batch.encoded_len());
    let r = east
        .export(batch)
        .await
        .expect("a 1 MiB batch is within the OTLP limit")
        .into_inner();
    assert_eq!(r.partial_success, None);

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

/// An OTLP/HTTP POST of `body` as `content_type` on `s` (HTTP/1.1): the status and the body.
async fn post_traces<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    content_type: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: hub\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // An oversized body may be refused before it is all sent.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let status = String::from_utf8_lossy(&buf[9..12]).parse().unwrap();
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (status, buf[at..].to_vec())
}

/// `google.rpc.Status`, an OTLP/HTTP error body.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hubs_otlp_listener_takes_grpc_and_http_from_joined_clusters_and_plain_text_only_where_configured()
 {
    use fedmesh_federation::hub::traces::listener;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KvStore> = Arc::new(RedbStore::open(&dir.path().join("hub.redb")).unwrap());
    let hub = start_hub(
        dir.path(),
        store,
        "127.0.0.1:0".parse().unwrap(),
        hub_config(),
    )
    .await;
    let east = join_creds(&hub, dir.path(), "east").await;
    let serve = |tls| async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(listener::serve(
            hub.hub.clone(),
            l,
            tls,
            hub.shutdown.clone(),
        ));
        addr
    };
    let mtls = serve(Some(hub.hub.otlp_tls())).await;
    let plain = serve(None).await;
    let one = |t: u8, service: &str| {
        export(
            service,
            vec![span([t; 16], 1, None, SpanKind::Client, vec![])],
        )
    };
    let tls_to = |alpn: &[u8], with_identity: bool| {
        let config = if with_identity {
            east.client_tls(vec![alpn.to_vec()])
        } else {
            // The hub's certificate verified, no client certificate.
            let anonymous = fedmesh_trust::tls::MeshIdentity::new();
            let mut bundles = fedmesh_trust::bundle::BundleSet::new();
            bundles.update_arc(hub.hub.ca().bundle());
            anonymous.set_bundles(bundles);
            let mut c = (*anonymous.anonymous_client_config(
                fedmesh_trust::tls::Authorizer::trust_domain(hub.hub.trust_domain()),
            ))
            .clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(c)
        };
        async move {
            let tcp = tokio::net::TcpStream::connect(mtls).await.unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect("hub.fedmesh".try_into().unwrap(), tcp)
                .await
                .unwrap()
        }
    };

    // OTLP/HTTP over mTLS as a joined cluster: kept, stamped with the cluster.
    let (status, body) = post_traces(
        tls_to(b"http/1.1", true).await,
        "application/x-protobuf",
        &one(21, "frontend").encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let resp = ExportTraceServiceResponse::decode(&body[..]).unwrap();
    assert_eq!(resp.partial_success, None);
    let spans = hub.hub.traces.get(&hex::encode([21u8; 16])).unwrap();
    assert_eq!(spans[0].cluster, "east");
    // OTLP/gRPC on the same port, same identity.
    let channel = fedmesh_trust::grpc::channel(
        &mtls.to_string(),
        east.client_tls(vec![b"h2".to_vec()]),
        "hub.fedmesh",
    )
    .unwrap();
    TraceServiceClient::new(channel)
        .export(one(22, "frontend"))
        .await
        .expect("OTLP/gRPC over mTLS");
    assert_eq!(
        hub.hub.traces.get(&hex::encode([22u8; 16])).unwrap()[0].cluster,
        "east"
    );
    // Without a client certificate: 401, saying what to do; nothing kept.
    let (status, body) = post_traces(
        tls_to(b"http/1.1", false).await,
        "application/x-protobuf",
        &one(23, "frontend").encode_to_vec(),
    )
    .await;
    assert_eq!(status, 401);
    let why = RpcStatus::decode(&body[..]).unwrap();
    assert!(why.message.contains("joined cluster's identity"), "{why:?}");
    assert!(hub.hub.traces.get(&hex::encode([23u8; 16])).is_none());

    // The plain-text listener takes anyone's spans, stamped unverified whatever they claim.
    let tcp = || tokio::net::TcpStream::connect(plain);
    let mut claiming = one(24, "checkout");
    claiming.resource_spans[0]
        .resource
        .as_mut()
        .unwrap()
        .attributes
        .push(kv("fedmesh.cluster", "east"));
    let (status, _) = post_traces(
        tcp().await.unwrap(),
        "application/x-protobuf; charset=binary",
        &claiming.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let spans = hub.hub.traces.get(&hex::encode([24u8; 16])).unwrap();
    assert_eq!(spans[0].cluster, "(unverified)");
    assert_eq!(
        spans[0].resource.get("fedmesh.cluster").map(String::as_str),
        Some("east")
    );
    let mut grpc = TraceServiceClient::connect(format!("http://{plain}"))
        .await
        .unwrap();
    grpc.export(one(25, "checkout"))
        .await
        .expect("OTLP/gRPC, h2c");
    assert_eq!(
        hub.hub.traces.get(&hex::encode([25u8; 16])).unwrap()[0].cluster,
        "(unverified)"
    );
    // Bad input: each refused with a reason, and the listener keeps serving.
    let (status, body) = post_traces(tcp().await.unwrap(), "application/json", b"{}").await;
    assert_eq!(status, 415);
    assert!(
        RpcStatus::decode(&body[..])
            .unwrap()
            .message
            .contains("http/protobuf")
    );
    let (status, body) = post_traces(
        tcp().await.unwrap(),
        "application/x-protobuf",
        b"\xff\xff\xff",
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        RpcStatus::decode(&body[..])
            .unwrap()
            .message
            .contains("not an OTLP ExportTraceServiceRequest")
    );
    let huge = vec![0u8; fedmesh_api::MAX_OTLP_EXPORT_BYTES + 1];
    let (status, _) = post_traces(tcp().await.unwrap(), "application/x-protobuf", &huge).await;
    assert_eq!(status, 413);
    let (status, _) = post_traces(
        tcp().await.unwrap(),
        "application/x-protobuf",
        &one(26, "checkout").encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200, "still serving");
    hub.stop().await;
}
