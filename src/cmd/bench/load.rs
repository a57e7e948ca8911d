//! What the benchmarks measure with: HTTP clients and load at a fixed rate or with a fixed
//! concurrency (latency from each request's scheduled start), percentiles, the proxy processes
//! they start, and those processes' CPU and memory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::federation::proc_stats;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    H1,
    H2,
}

impl Proto {
    pub(super) fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

/// A proxy process of the benchmark.
pub(super) struct Proc {
    pub(super) name: &'static str,
    child: Child,
}

impl Proc {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn spawn(dir: &Path, name: &'static str, args: &[String]) -> anyhow::Result<Proc> {
    // The proxies run from their own binary, as in a pod.
    let exe = match args.first().map(String::as_str) {
        Some("sidecar" | "gateway") => super::proxy_exe()?,
        _ => std::env::current_exe()?,
    };
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(exe)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("FEDMESH_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc { name, child })
}

pub(super) fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// GET `path` on `addr` with a bare HTTP/1.1 request; the status code.
pub(super) async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let buf = http_get_raw(addr, path).await?;
    std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()
}

/// GET `path` on `addr` with a bare HTTP/1.1 request: the body of a 200 answer.
pub(super) async fn http_get_body(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let mut buf = http_get_raw(addr, path).await?;
    if buf.get(9..12)? != b"200" {
        return None;
    }
    let start = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some(buf.split_off(start))
}

/// The whole answer to `GET path` (connection: close), read within 2 s.
async fn http_get_raw(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf)
}

pub(super) async fn wait_until<F, Fut>(what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting for {what}")
}

/// VmRSS, VmHWM, RssAnon and RssFile of a process, in KiB.
pub(super) fn memory(pid: u32) -> (u64, u64, u64, u64) {
    let v = super::status_kib(pid, &["VmRSS:", "VmHWM:", "RssAnon:", "RssFile:"]);
    (v[0], v[1], v[2], v[3])
}

pub(super) fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().map(|p| proc_stats(*p).1).sum()
}

pub(super) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(super) fn http_client(proto: Proto) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256);
    if proto == Proto::H2 {
        b.http2_only(true);
    }
    b.build(connector)
}

/// One request; the time from `due` to the whole answer.
pub(super) async fn one(
    client: &HttpClient,
    uri: &http::Uri,
    body: &Bytes,
    due: Instant,
) -> anyhow::Result<Duration> {
    let req = http::Request::post(uri.clone())
        .header("content-type", "application/octet-stream")
        .body(Full::new(body.clone()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("no answer within 10s")??;
    let status = resp.status();
    let got = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&got)
    );
    Ok(due.elapsed())
}

pub(super) struct FixedRate {
    pub latencies: Vec<Duration>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `rate` requests per second for `duration`, each timed from when it was due.
pub(super) async fn fixed_rate(
    client: &HttpClient,
    uri: &http::Uri,
    body: &Bytes,
    rate: u64,
    duration: Duration,
) -> FixedRate {
    let n = (rate as f64 * duration.as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (client, uri, body) = (client.clone(), uri.clone(), body.clone());
        tasks.spawn(async move { one(&client, &uri, &body, due).await });
    }
    let mut out = FixedRate {
        latencies: Vec::with_capacity(n as usize),
        errors: 0,
        first_error: None,
    };
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(d)) => out.latencies.push(d),
            Ok(Err(e)) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out.latencies.sort_unstable();
    out
}

/// Operations per second with `concurrency` of `op` always in flight for `duration`, and how
/// many failed.
pub(super) async fn closed_loop<F, Fut, T, E>(
    concurrency: usize,
    duration: Duration,
    op: F,
) -> (f64, u64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<T, E>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (op, done, errors) = (op.clone(), done.clone(), errors.clone());
        tasks.spawn(async move {
            while Instant::now() < end {
                match op().await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (
        done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
    )
}

/// Requests per second with `concurrency` requests always in flight, for `duration`.
pub(super) async fn max_throughput(
    client: &HttpClient,
    uri: &http::Uri,
    body: &Bytes,
    concurrency: usize,
    duration: Duration,
) -> (f64, u64) {
    let (client, uri, body) = (client.clone(), uri.clone(), body.clone());
    closed_loop(concurrency, duration, move || {
        let (client, uri, body) = (client.clone(), uri.clone(), body.clone());
        async move { one(&client, &uri, &body, Instant::now()).await }
    })
    .await
}

pub(super) fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}
