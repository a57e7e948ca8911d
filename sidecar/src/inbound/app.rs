//! The last inbound step: the hand-off to the app on loopback. HTTP/2 from a peer goes to the
//! app as h2c on one pooled connection, unless the caller's sidecar marked it as HTTP/1.1 at
//! origin (`fedmesh-orig-proto`), in which case it goes as HTTP/1.1 on pooled keep-alive
//! connections; HTTP/1 found inside a tunnel goes as HTTP/1.1, and an upgrade (WebSocket) goes
//! on a connection of its own that is relayed both ways once the app switches protocols.
//!
//! A connection the app refused is answered 503 `app-unreachable` (the app never saw the
//! request: the caller's sidecar may retry it elsewhere); a request the app failed is answered
//! 502 `app-error` (it may have acted on it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::h2pool::H2Pool;
use fedmesh_dataplane::http::{Body, strip_hop_by_hop};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::relay::relay;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower::Service;

use super::identity::inbound_ctx;
use crate::ORIG_PROTO;
use crate::net;
use crate::outbound::BoxFuture;

/// The app, reached on loopback.
#[derive(Clone)]
pub(crate) struct App {
    inner: Arc<Inner>,
}

struct Inner {
    /// HTTP/1.1 (pooled keep-alive connections).
    h1: Client<HttpConnector, Body>,
    /// HTTP/2 cleartext, one multiplexed connection per app address.
    h2: H2Pool<SocketAddr>,
    connect_timeout: Duration,
    /// An upgraded connection with no bytes moving this long is closed.
    idle_timeout: Duration,
    metrics: Arc<ProxyMetrics>,
}

/// An HTTP/1.1 client with pooled keep-alive connections that sends the request's own `Host`.
pub(crate) fn h1_client(connect_timeout: Duration) -> Client<HttpConnector, Body> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .set_host(false)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(http)
}

impl App {
    /// `h1` is the sidecar's one HTTP/1.1 client (its pool serves the app and plain-HTTP
    /// destinations alike).
    pub fn new(
        h1: Client<HttpConnector, Body>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                h1,
                h2: H2Pool::default(),
                connect_timeout,
                idle_timeout,
                metrics,
            }),
        }
    }
}

impl Inner {
    async fn h2(&self, app: SocketAddr) -> Result<SendRequest<Body>, String> {
        let timeout = self.connect_timeout;
        self.h2
            .get(&app, || async move {
                let tcp = net::connect_addr(app, timeout, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok((sender, ()))
            })
            .await
            .map(|(sender, ())| sender)
    }

    async fn call(&self, req: Request<Body>) -> Result<Response<Body>, ProxyError> {
        let ctx = inbound_ctx(&req)?;
        let (app, tunnel_h1) = (ctx.app, ctx.tunnel_h1);
        if tunnel_h1 && req.headers().contains_key(header::UPGRADE) {
            return self.upgrade(req, app).await;
        }
        let (mut parts, body) = req.into_parts();
        let h1 = tunnel_h1
            || parts
                .headers
                .get(ORIG_PROTO)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"HTTP/1.1"));
        parts.headers.remove(ORIG_PROTO);
        strip_hop_by_hop(&mut parts.headers);
        let unreachable = |error: String| ProxyError::AppUnreachable {
            app: app.to_string(),
            error,
        };
        let failed = |error: String| ProxyError::AppError {
            app: app.to_string(),
            error,
        };
        let resp = if h1 {
            if !parts.headers.contains_key(header::HOST)
                && let Some(a) = parts.uri.authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                parts.headers.insert(header::HOST, v);
            }
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            parts.uri = format!("http://{app}{path}")
                .parse::<Uri>()
                .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
            parts.version = Version::HTTP_11;
            self.h1
                .request(Request::from_parts(parts, body))
                .await
                .map_err(|e| {
                    if e.is_connect() {
                        unreachable(e.to_string())
                    } else {
                        failed(e.to_string())
                    }
                })?
        } else {
            let mut sender = self.h2(app).await.map_err(unreachable)?;
            sender
                .send_request(Request::from_parts(parts, body))
                .await
                .map_err(|e| failed(e.to_string()))?
        };
        Ok(resp.map(fedmesh_dataplane::http::body))
    }

    /// An HTTP/1.1 upgrade: sent to the app on a connection of its own; when the app switches
    /// protocols, both sides are relayed.
    async fn upgrade(
        &self,
        mut req: Request<Body>,
        app: SocketAddr,
    ) -> Result<Response<Body>, ProxyError> {
        let caller_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(u) = upgrade {
            parts.headers.insert(header::UPGRADE, u);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let tcp = net::connect_addr(app, self.connect_timeout, None)
            .await
            .map_err(|e| ProxyError::AppUnreachable {
                app: app.to_string(),
                error: e.to_string(),
            })?;
        let failed = |e: hyper::Error| ProxyError::AppError {
            app: app.to_string(),
            error: format!("the upgrade request failed: {e}"),
        };
        let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            let _ = c.with_upgrades().await;
        });
        let mut resp = sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(failed)?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let app_side = hyper::upgrade::on(&mut resp);
            let idle = self.idle_timeout;
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                if let (Ok(a), Ok(b)) = tokio::join!(caller_side, app_side) {
                    metrics.tcp_active.inc();
                    let _ = relay(TokioIo::new(a), TokioIo::new(b), idle).await;
                    metrics.tcp_active.dec();
                }
            });
        }
        Ok(resp.map(fedmesh_dataplane::http::body))
    }
}

impl Service<Request<Body>> for App {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.call(req).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::test_support::{request_from, web_entry};
    use fedmesh_api::pb::dataplane as pb;
    use fedmesh_dataplane::http::full;

    /// An app on loopback that answers with the HTTP version it was spoken to in.
    async fn app() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(
                            TokioIo::new(s),
                            hyper::service::service_fn(
                                |req: Request<hyper::body::Incoming>| async move {
                                    Ok::<_, std::convert::Infallible>(Response::new(full(format!(
                                        "{:?}",
                                        req.version()
                                    ))))
                                },
                            ),
                        )
                        .into_owned(),
                );
            }
        });
        addr
    }

    async fn text(resp: Response<Body>) -> String {
        let b = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        String::from_utf8(b.to_bytes().to_vec()).unwrap()
    }

    fn to(app: SocketAddr, orig_h1: bool) -> Request<Body> {
        let entry = web_entry(pb::TrafficPolicy::default());
        let mut req = request_from(&entry, "spiffe://west.example/ns/shop/sa/frontend");
        req.extensions_mut()
            .get_mut::<super::super::identity::InboundCtx>()
            .unwrap()
            .app = app;
        if orig_h1 {
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        req
    }

    #[tokio::test]
    async fn requests_reach_the_app_in_the_protocol_they_had_at_origin() {
        let addr = app().await;
        let mut svc = App::new(
            h1_client(Duration::from_secs(1)),
            Duration::from_secs(1),
            Duration::from_secs(60),
            Arc::new(ProxyMetrics::new("t")),
        );
        assert_eq!(
            text(svc.call(to(addr, false)).await.unwrap()).await,
            "HTTP/2.0"
        );
        assert_eq!(
            text(svc.call(to(addr, true)).await.unwrap()).await,
            "HTTP/1.1"
        );
    }

    #[tokio::test]
    async fn an_app_that_refuses_connections_is_unreachable_not_failed() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut svc = App::new(
            h1_client(Duration::from_secs(1)),
            Duration::from_secs(1),
            Duration::from_secs(60),
            Arc::new(ProxyMetrics::new("t")),
        );
        for orig_h1 in [false, true] {
            let e = svc.call(to(closed, orig_h1)).await.unwrap_err();
            assert_eq!(e.kind(), "app-unreachable", "{e}");
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}
