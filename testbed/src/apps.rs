//! Apps to put behind sidecars: an HTTP echo server (HTTP/1.1 and HTTP/2), a gRPC echo service,
//! and a TCP echo server. Each answers with who it is and who called, so a caller sees which
//! cluster and zone served it and under which identity it arrived.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pb;

/// Who an app is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppInfo {
    pub cluster: String,
    pub zone: String,
    pub workload: String,
}

/// What the HTTP echo app answers (JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EchoResponse {
    pub cluster: String,
    pub zone: String,
    pub workload: String,
    /// The caller's SPIFFE ID (from `x-forwarded-client-cert`).
    pub caller: String,
    pub method: String,
    pub path: String,
    pub version: String,
    pub traceparent: String,
    pub body_bytes: usize,
    /// The query string ("" when none).
    #[serde(default)]
    pub query: String,
    /// Every request header, values of a repeated one joined with ",".
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The `URI=` of an `x-forwarded-client-cert` value.
pub fn xfcc_uri(v: &str) -> Option<&str> {
    v.split(';').find_map(|kv| kv.trim().strip_prefix("URI="))
}

/// A running app; stops (closing its connections) when `stop` is called or it is dropped.
pub struct RunningApp {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl RunningApp {
    /// An app served by the caller's own loop at `addr`, which ends when `stop` is cancelled.
    pub fn from_parts(addr: SocketAddr, stop: CancellationToken) -> Self {
        Self { addr, stop }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_loop<F, Fut>(listener: TcpListener, stop: CancellationToken, f: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tracker = TaskTracker::new();
    loop {
        let s = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
        };
        let _ = s.set_nodelay(true);
        let fut = f(s);
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = fut => {}
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

async fn echo(info: AppInfo, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let xfcc = header("x-forwarded-client-cert");
    let mut out = EchoResponse {
        cluster: info.cluster,
        zone: info.zone,
        workload: info.workload,
        caller: xfcc_uri(&xfcc).unwrap_or_default().to_string(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        version: format!("{:?}", req.version()),
        traceparent: header("traceparent"),
        body_bytes: 0,
        query: req.uri().query().unwrap_or_default().to_string(),
        headers: req
            .headers()
            .keys()
            .map(|k| {
                let joined: Vec<&str> = req
                    .headers()
                    .get_all(k)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (k.to_string(), joined.join(","))
            })
            .collect(),
    };
    let path = out.path.clone();
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|s| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    out.body_bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let body = serde_json::to_vec(&out).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// An HTTP echo app (HTTP/1.1 and h2c). `GET /status/503` answers 503, `/delay/100` waits.
pub async fn http_echo(listener: TcpListener, info: AppInfo) -> RunningApp {
    let addr = listener.local_addr().expect("bound listener");
    let stop = CancellationToken::new();
    tokio::spawn(serve_loop(listener, stop.clone(), move |s| {
        let info = info.clone();
        async move {
            let svc = service_fn(move |req| {
                let info = info.clone();
                async move { Ok::<_, Infallible>(echo(info, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    }));
    RunningApp { addr, stop }
}

/// A TCP echo app: writes back what it reads, prefixed once with `<workload>@<cluster>\n`.
pub async fn tcp_echo(listener: TcpListener, info: AppInfo) -> RunningApp {
    let addr = listener.local_addr().expect("bound listener");
    let stop = CancellationToken::new();
    tokio::spawn(serve_loop(listener, stop.clone(), move |mut s| {
        let hello = format!("{}@{}\n", info.workload, info.cluster);
        async move {
            if s.write_all(hello.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        }
    }));
    RunningApp { addr, stop }
}

struct EchoService {
    info: AppInfo,
}

fn caller_of<T>(req: &tonic::Request<T>) -> String {
    req.metadata()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(xfcc_uri)
        .unwrap_or_default()
        .to_string()
}

impl EchoService {
    fn reply(&self, message: String, caller: &str, seq: u32) -> pb::EchoReply {
        pb::EchoReply {
            message,
            cluster: self.info.cluster.clone(),
            zone: self.info.zone.clone(),
            workload: self.info.workload.clone(),
            caller: caller.to_string(),
            seq,
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::EchoReply, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn unary(
        &self,
        req: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<pb::EchoReply>, tonic::Status> {
        let caller = caller_of(&req);
        Ok(tonic::Response::new(self.reply(
            req.into_inner().message,
            &caller,
            0,
        )))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: tonic::Request<pb::EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, tonic::Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        let replies: Vec<_> = (0..r.count.min(10_000))
            .map(|i| Ok(self.reply(r.message.clone(), &caller, i)))
            .collect();
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(
            replies,
        ))))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: tonic::Request<tonic::Streaming<pb::EchoRequest>>,
    ) -> Result<tonic::Response<Self::BidiStream>, tonic::Status> {
        let caller = caller_of(&req);
        let mut inbound = req.into_inner();
        let info = self.info.clone();
        let out = async_stream(move |tx| async move {
            let me = EchoService { info };
            let mut seq = 0;
            while let Ok(Some(m)) = inbound.message().await {
                if tx
                    .send(Ok(me.reply(m.message, &caller, seq)))
                    .await
                    .is_err()
                {
                    break;
                }
                seq += 1;
            }
        });
        Ok(tonic::Response::new(out))
    }
}

/// A stream fed by a task.
fn async_stream<F, Fut>(f: F) -> ReplyStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::EchoReply, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The gRPC echo service on h2c.
pub async fn grpc_echo(listener: TcpListener, info: AppInfo) -> RunningApp {
    let addr = listener.local_addr().expect("bound listener");
    let stop = CancellationToken::new();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tonic::transport::Server::builder()
        .add_service(pb::echo_server::EchoServer::new(EchoService { info }))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(async move {
        let _ = server.await;
    });
    RunningApp { addr, stop }
}

/// An HTTP app (HTTP/1.1 and h2c) that reads the request body and answers `size` bytes: the
/// server of the data-plane benchmark.
pub async fn http_fixed(listener: TcpListener, size: usize) -> RunningApp {
    let addr = listener.local_addr().expect("bound listener");
    let stop = CancellationToken::new();
    let body = Bytes::from(vec![b'x'; size]);
    tokio::spawn(serve_loop(listener, stop.clone(), move |s| {
        let body = body.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    }));
    RunningApp { addr, stop }
}

/// How a [`version_app`] answers.
#[derive(Clone, Default)]
pub struct VersionBehaviour {
    /// Every `fail_every`th request (the first included) gets 503; 0: none.
    pub fail_every: u64,
    /// Every answer waits this long.
    pub delay: Duration,
    /// While set, every request gets 503.
    pub broken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests that arrived.
    pub count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// An app that answers its version's name (`v1`, `v2`) as the body: a version of a service for
/// the rollout tests and benchmark.
pub async fn version_app(
    listener: TcpListener,
    version: &'static str,
    b: VersionBehaviour,
) -> RunningApp {
    use std::sync::atomic::Ordering;
    let addr = listener.local_addr().expect("bound listener");
    let stop = CancellationToken::new();
    tokio::spawn(serve_loop(listener, stop.clone(), move |s| {
        let b = b.clone();
        async move {
            let svc = service_fn(move |_req: Request<Incoming>| {
                let n = b.count.fetch_add(1, Ordering::SeqCst);
                let fail = b.broken.load(Ordering::SeqCst)
                    || (b.fail_every > 0 && n.is_multiple_of(b.fail_every));
                let delay = b.delay;
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let mut r = Response::new(Full::new(Bytes::from(version)));
                    if fail {
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    }));
    RunningApp { addr, stop }
}

/// The sample app of the demo and the kind deployment: the HTTP echo (HTTP/1.1 and h2c) and the
/// gRPC echo service on one port, told apart by `content-type: application/grpc`.
pub async fn sample_app(listener: TcpListener, info: AppInfo) -> RunningApp {
    let addr = listener.local_addr().expect("bound listener");
    let stop = CancellationToken::new();
    let grpc = pb::echo_server::EchoServer::new(EchoService { info: info.clone() });
    tokio::spawn(serve_loop(listener, stop.clone(), move |s| {
        let info = info.clone();
        let grpc = grpc.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let info = info.clone();
                let mut grpc = grpc.clone();
                async move {
                    let is_grpc = req
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    if is_grpc {
                        use tower::Service;
                        let req = req.map(tonic::body::Body::new);
                        grpc.call(req).await
                    } else {
                        Ok(echo(info, req).await.map(tonic::body::Body::new))
                    }
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    }));
    RunningApp { addr, stop }
}
