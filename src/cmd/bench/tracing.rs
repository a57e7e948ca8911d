//! What tracing costs per request: the client sidecar's instructions per request (callgrind, the
//! stable figure on a shared machine) on the minimal route with tracing off, at 1% and at 100%
//! sampling, every kept span exported over OTLP/HTTP to a collector on loopback that accepts and
//! discards them (in process, so the figure is the sidecar's own cost, export included). And what
//! 1% sampling adds to p99: two client sidecars on the minimal route, one tracing off and one at
//! 1% exporting to that collector, driven at the fixed rate alternately, round after round.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use std::time::Duration;

use anyhow::Context;

use super::dataplane::Params;
use super::load::{Proc, Proto, fixed_rate, free_addr, http_client, ms, one, pct, spawn};
use super::policy::{Counted, count};

/// Rounds of the latency comparison (each runs both sidecars, in alternating order).
const LATENCY_ROUNDS: usize = 5;

/// p99 on the minimal route with tracing off and at 1%, and how much the off sidecar's own p99
/// varied between rounds (the noise the difference is judged against).
#[derive(Clone, Copy)]
pub(super) struct TracingLatency {
    off_p99: Duration,
    one_percent_p99: Duration,
    noise: Duration,
    errors: u64,
}

/// Instructions per request of the client sidecar at each setting.
#[derive(Clone, Copy)]
pub(super) struct TracingCost {
    off: f64,
    one_percent: f64,
    all: f64,
    /// Bytes of OTLP the collector received (from the runs with tracing on).
    exported: u64,
}

pub(super) async fn instructions(c: &Counted<'_>) -> Option<TracingCost> {
    println!(
        "\n  what tracing costs: instructions per request of the client sidecar (callgrind, minimal route),\n  spans exported over OTLP/HTTP to a collector that discards them:"
    );
    match measure(c).await {
        Ok(t) => {
            println!(
                "    off {:.0}, 1% sampled {:.0} ({:.2}×), 100% sampled {:.0} ({:.2}×); {} bytes of OTLP exported",
                t.off,
                t.one_percent,
                t.one_percent / t.off.max(1.0),
                t.all,
                t.all / t.off.max(1.0),
                t.exported
            );
            Some(t)
        }
        Err(e) => {
            println!("    skipped: {e:#}");
            None
        }
    }
}

/// A sidecar's flags for tracing at `ratio` to `collector` (none: tracing off).
fn tracing_flags(collector: SocketAddr, ratio: Option<&str>) -> Vec<String> {
    match ratio {
        None => Vec::new(),
        Some(r) => vec![
            "--otlp-endpoint".into(),
            format!("http://{collector}"),
            "--otlp-protocol".into(),
            "http/protobuf".into(),
            "--trace-sampling".into(),
            r.into(),
        ],
    }
}

async fn measure(c: &Counted<'_>) -> anyhow::Result<TracingCost> {
    let (collector, received) = blackhole().await?;
    let mut per_request = Vec::new();
    for (tag, ratio) in [("off", None), ("1pct", Some("0.01")), ("all", Some("1"))] {
        let extra = tracing_flags(collector, ratio);
        let (minimal, _) = count(c, &extra, &format!("tracing-{tag}")).await?;
        per_request.push(minimal);
    }
    let exported = received.load(Ordering::Relaxed);
    anyhow::ensure!(
        exported > 0,
        "the collector received no spans: the 100% run did not export"
    );
    Ok(TracingCost {
        off: per_request[0],
        one_percent: per_request[1],
        all: per_request[2],
        exported,
    })
}

/// What 1% sampling adds to the client sidecar's p99 (HTTP/1.1, minimal route, fixed rate);
/// `None` with the reason printed when the sidecars could not be run.
pub(super) async fn latency(c: &Counted<'_>, p: &Params) -> Option<TracingLatency> {
    let each = (p.duration / 2).max(Duration::from_secs(1));
    println!(
        "
  what 1% sampling adds to p99: a client sidecar tracing off and one at 1% (spans to the same collector),
  minimal route, HTTP/1.1 at {} rps, {LATENCY_ROUNDS} rounds of {each:?} each, alternately, medians:",
        p.rate
    );
    match compare_latency(c, p, each).await {
        Ok(t) => {
            println!(
                "    tracing off p99 {:.3} ms, 1% sampled p99 {:.3} ms ({:+.3} ms; tracing off's p99 varied by {:.3} ms between rounds){}",
                ms(t.off_p99),
                ms(t.one_percent_p99),
                ms(t.one_percent_p99) - ms(t.off_p99),
                ms(t.noise),
                if t.errors > 0 {
                    format!("  ({} errors)", t.errors)
                } else {
                    String::new()
                }
            );
            Some(t)
        }
        Err(e) => {
            println!("    skipped: {e:#}");
            None
        }
    }
}

async fn compare_latency(
    c: &Counted<'_>,
    p: &Params,
    each: Duration,
) -> anyhow::Result<TracingLatency> {
    let (collector, _) = blackhole().await?;
    let mut sidecars: Vec<(Proc, http::Uri)> = Vec::new();
    for (name, ratio) in [
        ("sidecar-trace-off", None),
        ("sidecar-trace-1pct", Some("0.01")),
    ] {
        let (admin, listen) = (free_addr()?, free_addr()?);
        let mut args = c.sidecar_args(admin, &[(listen, "bench/local:80")]);
        args.extend(tracing_flags(collector, ratio));
        let proc = spawn(c.dir, name, &args)?;
        let uri: http::Uri = format!("http://{listen}/").parse()?;
        sidecars.push((proc, uri));
    }
    // Both answer before anything is measured.
    let client = http_client(Proto::H1);
    for (proc, uri) in &sidecars {
        let start = std::time::Instant::now();
        loop {
            match one(&client, uri, c.body, std::time::Instant::now()).await {
                Ok(_) => break,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    return Err(e).with_context(|| format!("{} never answered", proc.name));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let mut p99: [Vec<f64>; 2] = Default::default();
    let mut errors = 0;
    for round in 0..LATENCY_ROUNDS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let uri = &sidecars[i].1;
            let client = http_client(Proto::H1);
            let _ = fixed_rate(&client, uri, c.body, p.rate, Duration::from_millis(500)).await;
            let r = fixed_rate(&client, uri, c.body, p.rate, each).await;
            errors += r.errors;
            p99[i].push(pct(&r.latencies, 0.99).as_secs_f64());
        }
    }
    let noise = p99[0].iter().cloned().fold(f64::MIN, f64::max)
        - p99[0].iter().cloned().fold(f64::MAX, f64::min);
    let [off, one_percent] = p99.map(super::median);
    Ok(TracingLatency {
        off_p99: Duration::from_secs_f64(off),
        one_percent_p99: Duration::from_secs_f64(one_percent),
        noise: Duration::from_secs_f64(noise.max(0.0)),
        errors,
    })
}

/// An OTLP/HTTP collector on loopback that answers every export with success (an empty
/// `ExportTraceServiceResponse`) and keeps only the count of bytes it received.
async fn blackhole() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    use http_body_util::BodyExt;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let count = count.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let count = count.clone();
                async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    count.fetch_add(body.len() as u64, Ordering::Relaxed);
                    let mut resp =
                        http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/x-protobuf"),
                    );
                    Ok::<_, hyper::Error>(resp)
                }
            });
            tokio::spawn(
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .into_owned(),
            );
        }
    });
    Ok((addr, received))
}

/// The goals: CPU per request ≤ 1.05× of off at 1% and ≤ 1.20× at 100% (by instruction count),
/// and p99 at 1% within the noise of tracing off.
pub(super) fn print_goals(t: Option<TracingCost>, l: Option<TracingLatency>) {
    if let Some(l) = l {
        let added = l.one_percent_p99.as_secs_f64() - l.off_p99.as_secs_f64();
        println!(
            "    tracing at 1% sampling adds to p99 within noise: {:+.3} ms against a round-to-round spread of {:.3} ms — {}",
            added * 1e3,
            ms(l.noise),
            if added <= l.noise.as_secs_f64() {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let Some(t) = t else {
        return;
    };
    for (what, value, goal) in [
        ("1% sampling", t.one_percent, 1.05),
        ("100% sampling", t.all, 1.20),
    ] {
        let ratio = value / t.off.max(1.0);
        println!(
            "    tracing at {what}: client sidecar instructions per request ≤ {goal:.2}× of tracing off: {ratio:.2}× — {}",
            if ratio <= goal { "met" } else { "NOT met" }
        );
    }
}
