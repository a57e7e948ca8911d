//! The clusterset's spans, forwarded to the operator's own trace backend (`fedmesh hub
//! --otlp-forward URL`: Jaeger, Tempo, an OpenTelemetry Collector). Every span the hub accepts
//! into its window is also sent there over OTLP/HTTP (protobuf), with the resource attribute
//! `fedmesh.cluster` set to the cluster that proved it sent the span (`(unverified)` from the
//! plain-text listener), as the hub's own views show it: a proxy cannot claim another cluster
//! there either.
//!
//! A bounded queue of batches keeps the intake from ever waiting on the backend. A batch the
//! backend refuses or does not answer is tried three times, then dropped; when the queue is full
//! new batches are dropped. Both are counted (`fedmesh_hub_spans_total{result="forward_dropped"}`,
//! beside `forwarded`) and logged at most once a minute. On shutdown the queue is flushed for up
//! to five seconds.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::ResultLabels;

/// The resource attribute that names a span's cluster (the proxies set it too).
pub const CLUSTER_ATTRIBUTE: &str = "fedmesh.cluster";
/// Batches waiting for the backend; beyond this new ones are dropped.
const QUEUE: usize = 256;
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);
const FLUSH_ON_SHUTDOWN: Duration = Duration::from_secs(5);
const WARN_EVERY: Duration = Duration::from_secs(60);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where accepted spans go besides the window.
pub struct Forwarder {
    tx: mpsc::Sender<(ExportTraceServiceRequest, u64)>,
    spans: Family<ResultLabels, Counter>,
}

impl Forwarder {
    /// Starts forwarding to `url`, an OTLP/HTTP traces endpoint (`http://` or `https://`, the
    /// latter verified with the system's roots), until `shutdown`. `spans` counts the outcome.
    pub fn start(
        url: &str,
        spans: Family<ResultLabels, Counter>,
        shutdown: CancellationToken,
    ) -> Result<Self, String> {
        let example = "such as http://jaeger-collector:4318/v1/traces";
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("--otlp-forward {url:?} is not a URL ({e}): give the backend's OTLP/HTTP traces endpoint, {example}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "--otlp-forward {url:?}: give an http:// or https:// URL of the backend's OTLP/HTTP traces endpoint, {example}"
            ));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("--otlp-forward: no system TLS roots to verify {url} ({e})"))?
            .https_or_http()
            .enable_http1()
            .build();
        let client: HttpsClient = Client::builder(TokioExecutor::new()).build(connector);
        let (tx, rx) = mpsc::channel(QUEUE);
        let backend = Backend {
            client,
            uri,
            spans: spans.clone(),
            last_warning: None,
        };
        tokio::spawn(backend.run(rx, shutdown));
        tracing::info!(url, "forwarding accepted spans over OTLP/HTTP");
        Ok(Self { tx, spans })
    }

    /// Queues the valid spans of `req` (as the window takes them), their resources stamped with
    /// `cluster`.
    pub fn send(&self, cluster: &str, mut req: ExportTraceServiceRequest) {
        let mut count = 0u64;
        for rs in &mut req.resource_spans {
            let resource = rs.resource.get_or_insert_with(Default::default);
            resource.attributes.retain(|kv| kv.key != CLUSTER_ATTRIBUTE);
            resource.attributes.push(KeyValue {
                key: CLUSTER_ATTRIBUTE.into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(cluster.into())),
                }),
                ..Default::default()
            });
            for ss in &mut rs.scope_spans {
                ss.spans.retain(|s| super::ids(s).is_ok());
                count += ss.spans.len() as u64;
            }
        }
        if count == 0 {
            return;
        }
        if self.tx.try_send((req, count)).is_err() {
            count_spans(&self.spans, "forward_dropped", count);
        }
    }
}

fn count_spans(spans: &Family<ResultLabels, Counter>, result: &str, n: u64) {
    spans
        .get_or_create(&ResultLabels {
            result: result.to_string(),
        })
        .inc_by(n);
}

struct Backend {
    client: HttpsClient,
    uri: http::Uri,
    spans: Family<ResultLabels, Counter>,
    last_warning: Option<Instant>,
}

impl Backend {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<(ExportTraceServiceRequest, u64)>,
        shutdown: CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                _ = shutdown.cancelled() => break,
            };
            let Some((req, count)) = next else { return };
            self.deliver(req, count).await;
        }
        rx.close();
        let flush = async {
            while let Some((req, count)) = rx.recv().await {
                self.deliver(req, count).await;
            }
        };
        if tokio::time::timeout(FLUSH_ON_SHUTDOWN, flush)
            .await
            .is_err()
        {
            tracing::warn!(
                "shutting down before every queued span reached the --otlp-forward backend"
            );
        }
    }

    async fn deliver(&mut self, req: ExportTraceServiceRequest, count: u64) {
        let body = Bytes::from(req.encode_to_vec());
        let mut error = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt - 1)).await;
            }
            match self.post(body.clone()).await {
                Ok(()) => {
                    count_spans(&self.spans, "forwarded", count);
                    return;
                }
                Err(e) => error = e,
            }
        }
        count_spans(&self.spans, "forward_dropped", count);
        if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_warning = Some(Instant::now());
            tracing::warn!(url = %self.uri, %error, spans = count, "the --otlp-forward backend did not take a batch of spans after {ATTEMPTS} attempts; dropped (counted in fedmesh_hub_spans_total{{result=\"forward_dropped\"}})");
        }
    }

    async fn post(&self, body: Bytes) -> Result<(), String> {
        let req = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
            .map_err(|e| crate::error_chain(&e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", resp.status()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes as Body;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn export(claimed_cluster: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: CLUSTER_ATTRIBUTE.into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(claimed_cluster.into())),
                        }),
                        ..Default::default()
                    }],
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

    fn span(id: u8) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![id; 8],
            name: "GET".into(),
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            ..Default::default()
        }
    }

    fn counted(spans: &Family<ResultLabels, Counter>, result: &str) -> u64 {
        spans
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .get()
    }

    #[tokio::test]
    async fn spans_go_out_with_the_proven_cluster_and_a_dead_backend_costs_only_counted_drops() {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Body)>();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: Body| {
                let tx = tx.clone();
                async move {
                    let kind = headers[http::header::CONTENT_TYPE]
                        .to_str()
                        .unwrap()
                        .to_string();
                    tx.send((kind, body)).unwrap();
                    ""
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let shutdown = CancellationToken::new();
        let spans = Family::<ResultLabels, Counter>::default();
        let f = Forwarder::start(
            &format!("http://{addr}/v1/traces"),
            spans.clone(),
            shutdown.clone(),
        )
        .unwrap();

        // A proxy of east claims west; one span has a truncated ID.
        let mut bad = span(3);
        bad.span_id = vec![3; 4];
        f.send("east", export("west", vec![span(1), span(2), bad]));
        let (kind, body) = rx.recv().await.unwrap();
        assert_eq!(kind, "application/x-protobuf");
        let got = ExportTraceServiceRequest::decode(body).unwrap();
        let rs = &got.resource_spans[0];
        let clusters: Vec<_> = rs
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .filter(|kv| kv.key == CLUSTER_ATTRIBUTE)
            .map(|kv| kv.value.clone().unwrap().value.unwrap())
            .collect();
        assert_eq!(
            clusters,
            vec![any_value::Value::StringValue("east".into())],
            "the cluster that proved it, not the claim"
        );
        assert_eq!(
            rs.scope_spans[0].spans.len(),
            2,
            "the invalid span stays out"
        );
        for _ in 0..100 {
            if counted(&spans, "forwarded") == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counted(&spans, "forwarded"), 2);

        // A backend that answers nothing (a closed port): dropped after the attempts, counted.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        let f = Forwarder::start(
            &format!("http://{dead}/v1/traces"),
            spans.clone(),
            shutdown.clone(),
        )
        .unwrap();
        f.send("east", export("east", vec![span(4)]));
        for _ in 0..500 {
            if counted(&spans, "forward_dropped") == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counted(&spans, "forward_dropped"), 1);
        shutdown.cancel();
    }

    #[test]
    fn a_url_that_is_not_an_otlp_http_endpoint_is_refused_with_an_example() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        for url in ["jaeger:4318", "grpc://jaeger:4317", "not a url"] {
            let err = Forwarder::start(url, Family::default(), CancellationToken::new())
                .err()
                .unwrap();
            assert!(
                err.contains("http://jaeger-collector:4318/v1/traces"),
                "{err}"
            );
        }
    }
}
