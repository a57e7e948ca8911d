//! What tracing costs per request: the client sidecar's instructions per request (callgrind, the
//! stable figure on a shared machine) on the minimal route with tracing off, at 1% and at 100%
//! sampling, every kept span exported over OTLP/HTTP to a collector on loopback that accepts and
//! discards them (in process, so the figure is the sidecar's own cost, export included).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::policy::{Counted, count};

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

async fn measure(c: &Counted<'_>) -> anyhow::Result<TracingCost> {
    let (collector, received) = blackhole().await?;
    let mut per_request = Vec::new();
    for (tag, ratio) in [("off", None), ("1pct", Some("0.01")), ("all", Some("1"))] {
        let extra: Vec<String> = match ratio {
            None => Vec::new(),
            Some(r) => vec![
                "--otlp-endpoint".into(),
                format!("http://{collector}"),
                "--otlp-protocol".into(),
                "http/protobuf".into(),
                "--trace-sampling".into(),
                r.into(),
            ],
        };
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

/// The goals: CPU per request ≤ 1.05× of off at 1% and ≤ 1.20× at 100% (by instruction count).
pub(super) fn print_goals(t: Option<TracingCost>) {
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
