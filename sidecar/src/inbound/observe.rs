//! The outermost inbound layer: makes the request a hop of its trace (`traceparent`), turns a
//! proxy error into the response the caller gets, counts it by reason, and records every
//! request admitted to a service — source and destination cluster, service, status, latency —
//! whatever happened below. (Requests on a connection that was not admitted are counted once,
//! as the connection's refusal.) Every request, admitted or not, gets a SERVER span: caller and
//! callee identities and clusters, and the reason it was refused.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use fedmesh_dataplane::access;
use fedmesh_dataplane::config::ConfigHandle;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::telemetry::{RequestSpan, Spans};
use fedmesh_dataplane::trace;
use fedmesh_trust::tls::MeshIdentity;
use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tower::{Layer, Service};

use super::identity::InboundConn;
use crate::outbound::BoxFuture;

#[derive(Clone)]
pub(crate) struct ObserveLayer {
    pub metrics: Arc<ProxyMetrics>,
    pub config: ConfigHandle,
    pub spans: Spans,
    pub identity: MeshIdentity,
    /// One access-log line per request.
    pub access_log: bool,
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let start = Instant::now();
        let conn = req.extensions().get::<Arc<InboundConn>>().cloned();
        let spans = &self.layer.spans;
        let hop = trace::propagate(req.headers_mut(), |id| spans.sample_new(id));
        let span = RequestSpan::start(spans, hop, SpanKind::Server, &req);
        let logged = self
            .layer
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let grpc = fedmesh_dataplane::http::is_grpc(req.headers());
        let call: BoxFuture<_> = Box::pin(self.inner.call(req));
        let layer = self.layer.clone();
        let active = layer.metrics.inbound_request();
        Box::pin(async move {
            let result = call.await;
            drop(active);
            let admitted = conn
                .as_ref()
                .and_then(|c| c.admitted.as_ref().ok().map(|(mesh, _)| (c, mesh)));
            let resp = match result {
                Ok(r) => r,
                Err(e) => {
                    if admitted.is_some() {
                        layer.metrics.count_error(e.kind());
                    }
                    e.into_response_for(grpc)
                }
            };
            let table = layer.config.table();
            if let Some((conn, mesh)) = admitted {
                let caller = conn.caller.as_ref().map(ToString::to_string);
                layer.metrics.record(
                    "inbound",
                    caller.as_deref().unwrap_or(""),
                    &conn.caller_cluster,
                    table.cluster_name(),
                    &mesh.service.to_string(),
                    resp.status(),
                    start.elapsed(),
                );
            }
            if let (Some((method, path)), Some(conn)) = (logged, &conn) {
                let (service, app) = match &conn.admitted {
                    Ok((mesh, app)) => (mesh.service.to_string(), app.to_string()),
                    Err(_) => (String::new(), String::new()),
                };
                access::request(&access::Request {
                    direction: "inbound",
                    method: method.as_str(),
                    path: &path,
                    status: resp.status().as_u16(),
                    duration: start.elapsed(),
                    src_cluster: &conn.caller_cluster,
                    dst_cluster: table.cluster_name(),
                    service: &service,
                    caller: &conn.caller_name(),
                    upstream: &app,
                    attempts: 1,
                    proxy_error: resp
                        .headers()
                        .get(fedmesh_dataplane::http::PROXY_ERROR)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                    hop: &hop,
                });
            }
            Ok(match (span, conn) {
                (Some(s), Some(conn)) => {
                    // Built only if the span is kept.
                    let (identity, cluster) = (layer.identity.clone(), table.clone());
                    s.end_with(resp, move |a, _| {
                        server_attributes(a, &conn, &identity, cluster.cluster_name())
                    })
                }
                (Some(s), None) => s.end_with(resp, |_, _| {}),
                (None, _) => resp,
            })
        })
    }
}

/// What a SERVER span says beyond HTTP: who called from where, and what it asked for.
fn server_attributes(
    attrs: &mut Vec<KeyValue>,
    conn: &InboundConn,
    identity: &MeshIdentity,
    cluster: &str,
) {
    attrs.push(KeyValue::new(
        "fedmesh.source.cluster",
        conn.caller_cluster.clone(),
    ));
    attrs.push(KeyValue::new(
        "fedmesh.destination.cluster",
        cluster.to_string(),
    ));
    attrs.push(KeyValue::new("fedmesh.caller", conn.caller_name()));
    if let Some(id) = identity.spiffe_id() {
        attrs.push(KeyValue::new("fedmesh.callee", id.to_string()));
    }
    attrs.push(KeyValue::new(
        "network.peer.address",
        conn.peer.ip().to_string(),
    ));
    attrs.push(KeyValue::new(
        "network.peer.port",
        i64::from(conn.peer.port()),
    ));
    if let Ok((mesh, _)) = &conn.admitted {
        attrs.push(KeyValue::new("fedmesh.service", mesh.service.to_string()));
        attrs.push(KeyValue::new("server.port", i64::from(mesh.port)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_support::table_with_policy;
    use fedmesh_api::pb::dataplane as pb;
    use fedmesh_dataplane::http::full;
    use fedmesh_dataplane::sni::MeshSni;
    use http::StatusCode;

    fn request(admitted: bool) -> Request<Body> {
        let mut req = Request::get("/").body(full("")).unwrap();
        req.extensions_mut().insert(Arc::new(InboundConn::new(
            "127.0.0.1:40000".parse().unwrap(),
            Some("spiffe://west.example/ns/shop/sa/frontend".parse().unwrap()),
            "west".into(),
            if admitted {
                Ok((
                    MeshSni::new(80, "shop/web".parse().unwrap(), "east".parse().unwrap()),
                    "127.0.0.1:1001".parse().unwrap(),
                ))
            } else {
                Err(ProxyError::NotAdmitted {
                    status: StatusCode::MISDIRECTED_REQUEST,
                    kind: "unknown-service",
                    message: "shop/nope is not a service of this cluster".into(),
                })
            },
        )));
        req
    }

    #[tokio::test]
    async fn errors_become_answers_and_admitted_requests_are_recorded() {
        let metrics = Arc::new(ProxyMetrics::new("test"));
        let layer = ObserveLayer {
            metrics: metrics.clone(),
            config: ConfigHandle::fixed(table_with_policy(pb::TrafficPolicy::default())),
            spans: Spans::off(),
            identity: MeshIdentity::new(),
            access_log: false,
        };
        let mut svc = layer.layer(tower::service_fn(|req: Request<Body>| {
            let conn = req.extensions().get::<Arc<InboundConn>>().unwrap().clone();
            std::future::ready(match &conn.admitted {
                Ok(_) => Err(ProxyError::AppUnreachable {
                    app: "127.0.0.1:1001".into(),
                    error: "refused".into(),
                }),
                Err(e) => Err(e.clone()),
            })
        }));
        let resp = svc.call(request(true)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[crate::PROXY_ERROR], "app-unreachable");
        let resp = svc.call(request(false)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
        let text = metrics.encode();
        assert!(text.contains("reason=\"app_unreachable\"} 1"), "{text}");
        assert!(!text.contains("unknown_service"), "{text}");
        assert!(
            text.contains("reporter=\"destination\",source_principal=\"spiffe://west.example/ns/shop/sa/frontend\",source_cluster=\"west\",destination_cluster=\"east\",destination_service=\"shop/web\",response_code=\"503\"} 1"),
            "{text}"
        );
    }
}
