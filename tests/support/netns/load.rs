//! Steady load from inside a pod's namespace, every answer kept: what the lifecycle and fault
//! tests count failures and gaps with.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::super::wait_until;
use super::{HttpAnswer, Pod, http_request};

/// One request of a [`Clients`] run: when it started and ended, and what came back.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub method: &'static str,
    pub started: Instant,
    pub ended: Instant,
    /// (status, `fedmesh-proxy-error`), or how the request failed.
    pub answer: Result<(u16, Option<String>), String>,
    /// The cluster that answered (from the sample app's echo), on a 200.
    pub cluster: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        matches!(self.answer, Ok((200, _)))
    }
    /// Whether it was on the wire at `t`.
    pub fn in_flight_at(&self, t: Instant) -> bool {
        self.started < t && self.ended > t
    }
}

/// Clients in a pod's namespace, each sending `method path` to `ip` one request after another
/// (a new connection each, as the pod's app would, 5 ms apart: a few hundred a second in all)
/// until stopped. Bounded: 20,000 requests or 3 minutes per client.
pub struct Clients {
    stop: Arc<AtomicBool>,
    pub outcomes: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    pub fn start(
        pod: &Pod,
        ip: Ipv4Addr,
        host: &str,
        methods: &[&'static str],
        path: &str,
    ) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let threads = methods
            .iter()
            .map(|&method| {
                let (stop, outcomes, path, host) = (
                    stop.clone(),
                    outcomes.clone(),
                    path.to_string(),
                    host.to_string(),
                );
                let ns = File::open(format!("/run/netns/{}", pod.ns)).unwrap();
                std::thread::spawn(move || {
                    use std::os::fd::AsRawFd;
                    assert_eq!(
                        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                        0
                    );
                    let begin = Instant::now();
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed)
                            || begin.elapsed() > Duration::from_secs(180)
                        {
                            break;
                        }
                        let started = Instant::now();
                        let got =
                            http_request(SocketAddr::from((ip, 80)), method, &path, &host, &[]);
                        let cluster = got
                            .as_ref()
                            .ok()
                            .filter(|a| a.status == 200)
                            .and_then(|a| serde_json::from_str::<serde_json::Value>(&a.body).ok())
                            .and_then(|v| v["cluster"].as_str().map(String::from));
                        let answer = got
                            .map(|a: HttpAnswer| {
                                (a.status, a.header("fedmesh-proxy-error").map(String::from))
                            })
                            .map_err(|e| e.to_string());
                        outcomes.lock().unwrap().push(Outcome {
                            method,
                            started,
                            ended: Instant::now(),
                            answer,
                            cluster,
                        });
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Clients {
            stop,
            outcomes,
            threads,
        }
    }

    /// Adds two clients in `pod`'s namespace that call as long-lived HTTP/2 callers do: one
    /// sending `GET /` over one kept HTTP/2 connection (prior knowledge), one calling the sample
    /// app's gRPC `Echo/Unary` over one tonic channel. Each reconnects after an error and sends
    /// one call after another, 5 ms apart, bounded like [`Clients::start`].
    pub fn with_h2_and_grpc(mut self, pod: &Pod, ip: Ipv4Addr, host: &str) -> Clients {
        let addr = SocketAddr::from((ip, 80));
        for kind in [H2::Get, H2::Grpc] {
            let (stop, outcomes, host) =
                (self.stop.clone(), self.outcomes.clone(), host.to_string());
            let ns = File::open(format!("/run/netns/{}", pod.ns)).unwrap();
            self.threads.push(std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on this thread only, with a namespace file we hold open.
                assert_eq!(
                    unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                    0
                );
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(h2_loop(kind, addr, host, stop, outcomes));
            }));
        }
        self
    }

    /// Waits until `n` requests that started after `t` have succeeded.
    pub fn until_ok_after(&self, t: Instant, n: usize) {
        wait_until(
            &format!("{n} good answers to requests sent after the fault"),
            Duration::from_secs(90),
            || {
                let o = self.outcomes.lock().unwrap();
                o.iter().filter(|o| o.started > t && o.ok()).count() >= n
            },
        );
    }

    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.outcomes.lock().unwrap().clone()
    }
}

/// Requests sent, failed, and the longest time between two successful answers (the outage a
/// client saw).
pub fn report(outcomes: &[Outcome]) -> (usize, usize, Duration) {
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    (outcomes.len(), failed, longest_gap(outcomes).0)
}

/// The longest time between two good answers, and how long after the first request it began.
pub fn longest_gap(outcomes: &[Outcome]) -> (Duration, Duration) {
    let mut ok: Vec<Instant> = outcomes
        .iter()
        .filter(|o| o.ok())
        .map(|o| o.ended)
        .collect();
    ok.sort();
    let first = outcomes.iter().map(|o| o.started).min();
    ok.windows(2).map(|w| (w[1] - w[0], w[0])).max().map_or(
        (Duration::ZERO, Duration::ZERO),
        |(gap, at)| {
            (
                gap,
                first.map_or(Duration::ZERO, |f| at.saturating_duration_since(f)),
            )
        },
    )
}

#[derive(Clone, Copy)]
enum H2 {
    Get,
    Grpc,
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

async fn h2_connect(addr: SocketAddr) -> Result<H2Sender, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

/// One HTTP/2 GET on `send`: (status, `fedmesh-proxy-error`) and the answering cluster.
async fn h2_get(
    send: &mut H2Sender,
    host: &str,
) -> Result<((u16, Option<String>), Option<String>), String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{host}/"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let error = resp
        .headers()
        .get("fedmesh-proxy-error")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let cluster = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["cluster"].as_str().map(String::from));
    Ok(((status, error), cluster.filter(|_| status == 200)))
}

async fn h2_loop(
    kind: H2,
    addr: SocketAddr,
    host: String,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
) {
    use fedmesh_testbed::pb::{EchoRequest, echo_client::EchoClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .origin(format!("http://{host}").parse().unwrap())
        .connect_lazy();
    let mut grpc = EchoClient::new(channel);
    let mut h2: Option<H2Sender> = None;
    let begin = Instant::now();
    for _ in 0..20_000 {
        if stop.load(Ordering::Relaxed) || begin.elapsed() > Duration::from_secs(180) {
            break;
        }
        let started = Instant::now();
        let call = async {
            match kind {
                H2::Get => {
                    // One kept connection, replaced after an error.
                    let mut send = match h2.take() {
                        Some(s) if !s.is_closed() => s,
                        _ => h2_connect(addr).await?,
                    };
                    let got = h2_get(&mut send, &host).await;
                    if got.is_ok() {
                        h2 = Some(send);
                    }
                    got
                }
                H2::Grpc => grpc
                    .unary(EchoRequest {
                        message: "load".into(),
                        count: 0,
                    })
                    .await
                    .map(|r| ((200, None), Some(r.into_inner().cluster)))
                    .map_err(|s| {
                        let kind = s.metadata().get("fedmesh-proxy-error");
                        let kind = kind.and_then(|v| v.to_str().ok()).unwrap_or("-");
                        format!("gRPC {:?} ({kind}): {}", s.code(), s.message())
                    }),
            }
        };
        let (answer, cluster) = match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok((answer, cluster))) => (Ok(answer), cluster),
            Ok(Err(e)) => (Err(e), None),
            Err(_) => (Err("no answer within 10 s".to_string()), None),
        };
        outcomes.lock().unwrap().push(Outcome {
            method: match kind {
                H2::Get => "HTTP/2 GET",
                H2::Grpc => "gRPC Echo/Unary",
            },
            started,
            ended: Instant::now(),
            answer,
            cluster,
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
