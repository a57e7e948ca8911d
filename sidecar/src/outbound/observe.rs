//! The outermost layer: makes the request a hop of its trace (`traceparent`), turns a proxy
//! error into the response the caller gets, and records every request — source and
//! destination cluster, service, status, latency — whatever happened below, in the metrics and
//! in its CLIENT span: the rule that matched, the backend drawn, the targets tried and their
//! locality tier, ejections, and the proxy's reason when it answered.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use fedmesh_dataplane::access;
use fedmesh_dataplane::config::ConfigHandle;
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::target::Place;
use fedmesh_dataplane::telemetry::{RequestSpan, SpanLink, Spans};
use fedmesh_dataplane::trace::{self, HopSpan};
use fedmesh_trust::tls::MeshIdentity;
use http::{Request, Response};
use opentelemetry::trace::SpanKind;
use opentelemetry::{KeyValue, StringValue, Value};
use tower::{Layer, Service};

use super::ctx::{BoxFuture, Journal, Tried};
use crate::dest::Dest;

#[derive(Clone)]
pub(crate) struct ObserveLayer {
    pub metrics: Arc<ProxyMetrics>,
    pub config: ConfigHandle,
    pub spans: Spans,
    pub identity: MeshIdentity,
    /// One access-log line per request.
    pub access_log: bool,
    /// Requests to backends a rollout watches.
    pub signals: Arc<fedmesh_dataplane::signals::Signals>,
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
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let start = Instant::now();
        let tried = Tried::default();
        req.extensions_mut().insert(tried.clone());
        let spans = &self.layer.spans;
        let hop = trace::propagate(req.headers_mut(), |id| spans.sample_new(id));
        let span = RequestSpan::start(spans, hop, SpanKind::Client, &req);
        // The endpoint names this request as the trigger of a gateway connection it opens.
        req.extensions_mut().insert(hop);
        let logged = self
            .layer
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let dest = req.extensions().get::<Dest>().cloned();
        let service = dest
            .as_ref()
            .map(|d| d.service.to_string())
            .unwrap_or_default();
        let grpc = fedmesh_dataplane::http::is_grpc(req.headers());
        let call: BoxFuture<_> = Box::pin(self.inner.call(req));
        let layer = self.layer.clone();
        Box::pin(async move {
            let resp = match call.await {
                Ok(r) => r,
                Err(e) => {
                    layer.metrics.count_error(e.kind());
                    e.into_response_for(grpc)
                }
            };
            let last = tried.last();
            let dst = last.as_ref().map_or("", |t| t.cluster().as_str());
            let table = layer.config.table();
            let resp = match span {
                Some(span) => {
                    // Built only if the span is kept.
                    let (tried, table, dest) = (tried.clone(), table.clone(), dest.clone());
                    let identity = layer.identity.clone();
                    span.end_with(resp, move |a, links| {
                        client_attributes(
                            a,
                            links,
                            hop,
                            &tried.journal(),
                            table.cluster_name(),
                            dest.as_ref(),
                            &identity,
                        )
                    })
                }
                None => resp,
            };
            if let Some(name) = tried.signals() {
                let failed =
                    fedmesh_dataplane::signals::failed(resp.status().as_u16(), resp.headers());
                layer.signals.record(&name, failed, start.elapsed());
            }
            let own = layer.identity.spiffe_id().map(|id| id.to_string());
            layer.metrics.record(
                "outbound",
                own.as_deref().unwrap_or(""),
                table.cluster_name(),
                dst,
                &service,
                resp.status(),
                start.elapsed(),
            );
            if let Some((method, path)) = logged {
                let journal = tried.journal();
                access::request(&access::Request {
                    direction: "outbound",
                    method: method.as_str(),
                    path: &path,
                    status: resp.status().as_u16(),
                    duration: start.elapsed(),
                    src_cluster: table.cluster_name(),
                    dst_cluster: dst,
                    service: &service,
                    caller: &layer
                        .identity
                        .spiffe_id()
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                    upstream: journal.targets.last().map_or("", |t| t.key()),
                    attempts: journal.targets.len(),
                    proxy_error: resp
                        .headers()
                        .get(fedmesh_dataplane::http::PROXY_ERROR)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                    hop: &hop,
                });
            }
            Ok(resp)
        })
    }
}

/// What a CLIENT span says beyond HTTP: where the request went and why.
fn client_attributes(
    attrs: &mut Vec<KeyValue>,
    links: &mut Vec<SpanLink>,
    hop: HopSpan,
    journal: &Journal,
    cluster: &str,
    dest: Option<&Dest>,
    identity: &MeshIdentity,
) {
    attrs.push(KeyValue::new("fedmesh.source.cluster", cluster.to_string()));
    if let Some(id) = identity.spiffe_id() {
        attrs.push(KeyValue::new("fedmesh.caller", id.to_string()));
    }
    if let Some(d) = dest {
        attrs.push(KeyValue::new(
            "server.address",
            format!(
                "{}.{}.svc.{}.local",
                d.service.name,
                d.service.namespace,
                if d.scope == fedmesh_dataplane::config::Scope::Local {
                    "cluster"
                } else {
                    "clusterset"
                }
            ),
        ));
        attrs.push(KeyValue::new("server.port", i64::from(d.port)));
        attrs.push(KeyValue::new("fedmesh.service", d.service.to_string()));
    }
    if let Some(ctx) = &journal.route {
        if let Some(r) = ctx.route_name() {
            attrs.push(KeyValue::new("fedmesh.route", r));
        }
        if let Some(b) = ctx.backend_name() {
            attrs.push(KeyValue::new("fedmesh.backend", b));
        }
    }
    if let Some(last) = journal.targets.last() {
        attrs.push(KeyValue::new(
            "fedmesh.destination.cluster",
            last.cluster().to_string(),
        ));
        attrs.push(KeyValue::new(
            "fedmesh.destination.trust_domain",
            last.trust_domain().to_string(),
        ));
        let peer = match last.place() {
            Place::Local { addr, .. } => (addr.ip().to_string(), addr.port().to_string()),
            Place::Remote { gateway, .. } => {
                attrs.push(KeyValue::new("fedmesh.gateway", gateway.to_string()));
                match gateway.rsplit_once(':') {
                    Some((h, p)) => (h.trim_matches(['[', ']']).to_string(), p.to_string()),
                    None => (gateway.to_string(), String::new()),
                }
            }
        };
        attrs.push(KeyValue::new("network.peer.address", peer.0));
        if let Ok(port) = peer.1.parse::<i64>() {
            attrs.push(KeyValue::new("network.peer.port", port));
        }
    }
    if let Some(tier) = journal.tiers.last() {
        attrs.push(KeyValue::new("fedmesh.locality", *tier));
    }
    attrs.push(KeyValue::new(
        "fedmesh.attempts",
        journal.targets.len() as i64,
    ));
    if journal.targets.len() > 1 {
        let tried: Vec<StringValue> = journal
            .targets
            .iter()
            .map(|t| format!("{} ({})", t.key(), t.cluster()).into())
            .collect();
        attrs.push(KeyValue::new("fedmesh.tried", Value::Array(tried.into())));
    }
    if let Some(c) = &journal.connection {
        attrs.push(KeyValue::new("fedmesh.connection.id", c.id_hex()));
        // The gateway's span of the connection is a child of the request that opened it; a
        // later request on the pooled connection links to it.
        if let Some(t) = c.trigger
            && t.span_id != hop.span_id
        {
            links.push((t.trace_id, c.connection_id));
        }
    }
    if journal.ejected > 0 {
        attrs.push(KeyValue::new(
            "fedmesh.ejections",
            i64::from(journal.ejected),
        ));
    }
}
