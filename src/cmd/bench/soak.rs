//! `fedmesh bench soak`: does anything grow without bound over a long run? Steady cross-cluster
//! load (HTTP/1.1 and HTTP/2, every answer checked) through real proxy processes while the
//! configuration churns and every SVID is renewed each minute; the resident memory and open file
//! descriptors of every process are sampled at intervals, and a process whose figures still
//! climb over the last half of the run fails it.
//!
//! ```text
//! client ─▶ client sidecar (east) ══mTLS══▶ gateway (west) ══▶ server sidecar (west) ─▶ app
//! ```
//!
//! The hub, both control planes and the agents run inside the benchmark process (as in
//! `fedmesh bench dataplane`), so they are sampled as that process, together with the load
//! generator; that process is judged on its heap in use, the others on their RSS. The proxies
//! send their sampled spans to the hub as they do by default; the hub keeps 5 minutes of them. Each interval, west exports one more service and withdraws an older one (the hub
//! and both control planes recompute, every proxy gets a new configuration), and east adds or
//! removes an HTTPRoute on the service under load (the client sidecar recompiles its routes).

use std::time::{Duration, Instant};

use bytes::Bytes;
use fedmesh_testbed::yaml::{self, EndpointSpec};
use fedmesh_testbed::{ClusterSpec, Testbed, apps};
use tokio::net::TcpListener;

use super::load::{
    FixedRate, Proc, Proto, fixed_rate, free_addr, http_client, http_status, ms, one, pct, spawn,
    wait_until,
};

pub struct Params {
    pub duration: Duration,
    /// Requests per second in all (half HTTP/1.1, half HTTP/2).
    pub rate: u64,
    /// How often processes are sampled (and the configuration churns).
    pub every: Duration,
    pub body: usize,
}

/// SVIDs live two minutes, so every proxy gets a new one each minute.
const SVID_TTL: Duration = Duration::from_secs(120);

/// How long the hub keeps a trace (`fedmesh hub --trace-window-age`).
const TRACE_WINDOW: Duration = Duration::from_secs(300);

/// One process's figures at one sample.
#[derive(Clone, Copy)]
struct Sample {
    /// Seconds since the load started.
    t: f64,
    rss_kib: u64,
    fds: u64,
    /// The benchmark process's own heap in use (malloc's count of live bytes): its RSS also
    /// holds what the allocator keeps after the load generator's tasks free it.
    heap_kib: Option<u64>,
}

struct Watched {
    name: &'static str,
    pid: u32,
    /// The proxy's admin port (its `/config` says which SVID it holds); none for the benchmark.
    admin: Option<std::net::SocketAddr>,
    samples: Vec<Sample>,
    svid: Option<String>,
    svid_changes: u32,
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(
        p.rate >= 2 && p.body > 0,
        "--rate must be at least 2 and --body positive"
    );
    anyhow::ensure!(
        p.every >= Duration::from_secs(1) && p.duration >= p.every * 8,
        "--duration must hold at least 8 intervals of --every (at least 1s) for a trend"
    );
    let dir = tempfile::tempdir()?;
    let dirp = dir.path().to_path_buf();
    let gw_addr = free_addr()?;
    let mut east = ClusterSpec::new("east", "us-east");
    east.svid_ttl = Some(SVID_TTL);
    let mut west = ClusterSpec::new("west", "us-west");
    west.svid_ttl = Some(SVID_TTL);
    west.publish_gateway = Some(gw_addr);
    // The proxies send their sampled spans to the hub (the product's default), whose window of
    // recent traces keeps them up to an age: 5 minutes here instead of the default hour, so the
    // window is full, and stops growing, early in the run.
    let tb = Testbed::start_with_hub(&dirp.join("clusterset"), &[east, west], |hub| {
        hub.traces.max_age = TRACE_WINDOW;
    })
    .await?;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let app = apps::http_fixed(TcpListener::bind("127.0.0.1:0").await?, p.body).await;

    let ag_c = east.agent("soak", "client").await?;
    let ag_s = west.agent("soak", "server").await?;
    let ag_g = west.agent("fedmesh-system", "east-west-gateway").await?;
    let (c_admin, s_admin, g_admin) = (free_addr()?, free_addr()?, free_addr()?);
    let (c_local, s_in) = (free_addr()?, free_addr()?);
    west.serve_http(
        "soak",
        "api",
        &[EndpointSpec {
            addr: s_in,
            zone: "w1".into(),
            ready: true,
        }],
    )?;
    let common = |cp: &str, api: &str, admin: std::net::SocketAddr, zone: &str| -> Vec<String> {
        [
            "--control-plane",
            cp,
            "--workload-api",
            api,
            "--admin",
            &admin.to_string(),
            "--zone",
            zone,
        ]
        .map(String::from)
        .to_vec()
    };
    let (east_cp, west_cp) = (east.cp_addr.to_string(), west.cp_addr.to_string());
    let mut a = vec!["sidecar".to_string()];
    a.extend(common(&east_cp, &ag_c.endpoint, c_admin, "e1"));
    a.extend(["--listen".into(), format!("{c_local}=soak/api:80")]);
    let client = spawn(&dirp, "client-sidecar", &a)?;
    let mut a = vec!["sidecar".to_string()];
    a.extend(common(&west_cp, &ag_s.endpoint, s_admin, "w1"));
    a.extend(["--inbound".into(), format!("{s_in}={}", app.addr)]);
    let server = spawn(&dirp, "server-sidecar", &a)?;
    let mut a = vec!["gateway".to_string()];
    a.extend(common(&west_cp, &ag_g.endpoint, g_admin, "w1"));
    a.extend(["--listen".into(), gw_addr.to_string()]);
    let gateway = spawn(&dirp, "gateway", &a)?;
    for (name, admin) in [
        ("the client sidecar", c_admin),
        ("the server sidecar", s_admin),
        ("the gateway", g_admin),
    ] {
        wait_until(
            &format!("{name} ready (see {})", dirp.display()),
            || async move { http_status(admin, "/readyz").await == Some(200) },
        )
        .await?;
    }
    let uri: http::Uri = format!("http://{c_local}/").parse()?;
    let body = Bytes::from(vec![b's'; p.body]);
    let (h1, h2) = (http_client(Proto::H1), http_client(Proto::H2));
    wait_until("a first answer across the clusters", || {
        let (h1, uri, body) = (h1.clone(), uri.clone(), body.clone());
        async move { one(&h1, &uri, &body, Instant::now()).await.is_ok() }
    })
    .await?;

    let procs: [(&'static str, &Proc, std::net::SocketAddr); 3] = [
        ("client sidecar", &client, c_admin),
        ("gateway", &gateway, g_admin),
        ("server sidecar", &server, s_admin),
    ];
    let mut watched: Vec<Watched> = procs
        .iter()
        .map(|(name, proc, admin)| Watched {
            name,
            pid: proc.pid(),
            admin: Some(*admin),
            samples: Vec::new(),
            svid: None,
            svid_changes: 0,
        })
        .collect();
    watched.push(Watched {
        name: "bench (hub, control planes, agents, load)",
        pid: std::process::id(),
        admin: None,
        samples: Vec::new(),
        svid: None,
        svid_changes: 0,
    });

    println!(
        "fedmesh bench soak: {} at {} req/s (half HTTP/1.1, half HTTP/2, {} B bodies) across east → west; \
         config churn and a sample every {}; SVIDs of {}s (a new one each minute); the hub keeps traces {}s",
        humantime::format_duration(p.duration),
        p.rate,
        p.body,
        humantime::format_duration(p.every),
        SVID_TTL.as_secs(),
        TRACE_WINDOW.as_secs()
    );
    print!(
        "{:>7} {:>9} {:>6} {:>8}",
        "t", "requests", "errors", "p99 ms"
    );
    for w in &watched {
        print!(" | {:>14}", short(w.name));
    }
    println!("\n{:>34}{}", "", " |   RSS MiB  fds".repeat(watched.len()));

    let start = Instant::now();
    let (mut requests, mut errors, mut first_error) = (0u64, 0u64, None::<String>);
    let mut worst_p99 = Duration::ZERO;
    let mut i = 0u64;
    while start.elapsed() + p.every / 2 < p.duration {
        churn(east, west, i, s_in)?;
        let half = (p.rate / 2).max(1);
        let (a, b) = tokio::join!(
            fixed_rate(&h1, &uri, &body, half, p.every),
            fixed_rate(&h2, &uri, &body, p.rate - half, p.every)
        );
        let latencies = merged(&a, &b);
        let p99 = pct(&latencies, 0.99);
        worst_p99 = worst_p99.max(p99);
        requests += (a.latencies.len() + b.latencies.len()) as u64 + a.errors + b.errors;
        errors += a.errors + b.errors;
        if first_error.is_none() {
            first_error = a.first_error.clone().or(b.first_error.clone());
        }
        let t = start.elapsed().as_secs_f64();
        print!("{:>6.0}s {:>9} {:>6} {:>8.2}", t, requests, errors, ms(p99));
        for w in watched.iter_mut() {
            let s = Sample {
                t,
                rss_kib: super::status_kib(w.pid, &["VmRSS:"])[0],
                fds: open_fds(w.pid),
                heap_kib: (w.pid == std::process::id()).then(heap_in_use_kib),
            };
            print!(" | {:>9.1} {:>4}", s.rss_kib as f64 / 1024.0, s.fds);
            w.samples.push(s);
            if let Some(admin) = w.admin {
                let svid = svid_not_after(admin).await;
                if svid.is_some() && w.svid.is_some() && svid != w.svid {
                    w.svid_changes += 1;
                }
                w.svid = svid.or(w.svid.take());
            }
        }
        println!();
        i += 1;
    }

    println!(
        "\n{requests} requests, {errors} failed{}; worst interval p99 {:.2} ms",
        first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        ms(worst_p99)
    );
    println!(
        "{:<42} {:>22} {:>18} {:>16} {:>14} {:>6}  verdict",
        "process",
        "RSS MiB first → last",
        "RSS slope MiB/h",
        "fds first → last",
        "fds slope /h",
        "SVIDs"
    );
    let mut unbounded = Vec::new();
    let mut heap_line = None;
    for w in &watched {
        let rss: Vec<(f64, f64)> = w
            .samples
            .iter()
            .map(|s| (s.t, s.rss_kib as f64 / 1024.0))
            .collect();
        let fds: Vec<(f64, f64)> = w.samples.iter().map(|s| (s.t, s.fds as f64)).collect();
        let span = p.duration.as_secs_f64();
        let rss_trend = Trend::of(&rss, span, 4.0);
        let fd_trend = Trend::of(&fds, span, 8.0);
        let heap: Vec<(f64, f64)> = w
            .samples
            .iter()
            .filter_map(|s| Some((s.t, s.heap_kib? as f64 / 1024.0)))
            .collect();
        let heap_trend = (!heap.is_empty()).then(|| Trend::of(&heap, span, 4.0));
        // A process is judged on its RSS, except the benchmark's own: its load generator frees
        // tens of thousands of tasks' memory each interval into per-thread arenas, which RSS
        // keeps; what it still holds is its heap in use.
        let memory_grows = match &heap_trend {
            Some(h) => h.grows,
            None => rss_trend.grows,
        };
        let verdict = if memory_grows {
            unbounded.push(format!("{}: memory", w.name));
            "MEMORY GROWS"
        } else if fd_trend.grows {
            unbounded.push(format!("{}: file descriptors", w.name));
            "FDS GROW"
        } else {
            "bounded"
        };
        if let (Some(h), Some(f), Some(l)) = (&heap_trend, heap.first(), heap.last()) {
            heap_line = Some(format!(
                "  {}: heap in use {:.1} → {:.1} MiB, slope {:.2} MiB/h over the last half (RSS {:.2} MiB/h)",
                w.name, f.1, l.1, h.per_hour, rss_trend.per_hour
            ));
        }
        let (f, l) = (w.samples.first().unwrap(), w.samples.last().unwrap());
        println!(
            "{:<42} {:>22} {:>18.2} {:>16} {:>14.1} {:>6}  {verdict}",
            w.name,
            format!(
                "{:.1} → {:.1}",
                f.rss_kib as f64 / 1024.0,
                l.rss_kib as f64 / 1024.0
            ),
            rss_trend.per_hour,
            format!("{} → {}", f.fds, l.fds),
            fd_trend.per_hour,
            if w.admin.is_some() {
                w.svid_changes.to_string()
            } else {
                "-".into()
            },
        );
    }
    if let Some(l) = heap_line {
        println!("{l}");
    }
    drop((client, server, gateway));
    tb.shutdown().await;
    anyhow::ensure!(
        unbounded.is_empty(),
        "still growing over the last half of the run: {} (logs in {})",
        unbounded.join(", "),
        dir.keep().display()
    );
    anyhow::ensure!(
        errors == 0,
        "{errors} of {requests} requests failed; first: {}",
        first_error.unwrap_or_default()
    );
    println!("every process bounded; no request failed");
    Ok(())
}

/// Column header of a process.
fn short(name: &str) -> &str {
    name.split(" (").next().unwrap_or(name)
}

/// One interval's change: west exports `soak/churn-i` and withdraws the one two intervals older;
/// east's route on `soak/api` comes and goes.
fn churn(
    east: &fedmesh_testbed::Cluster,
    west: &fedmesh_testbed::Cluster,
    i: u64,
    endpoint: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let name = format!("churn-{i}");
    west.write(
        &format!("{name}.yaml"),
        &yaml::service(
            "soak",
            &name,
            &[("http", 80, "")],
            &[EndpointSpec {
                addr: endpoint,
                zone: "w1".into(),
                ready: true,
            }],
        ),
    )?;
    west.export("soak", &name)?;
    if let Some(old) = i.checked_sub(2) {
        west.remove(&format!("churn-{old}.yaml"));
        west.remove(&format!("churn-{old}-export.yaml"));
    }
    if i.is_multiple_of(2) {
        east.write(
            "api-route.yaml",
            &yaml::cluster_split("soak", "api", &[("west", 100)]),
        )?;
    } else {
        east.remove("api-route.yaml");
    }
    Ok(())
}

fn merged(a: &FixedRate, b: &FixedRate) -> Vec<Duration> {
    let mut v: Vec<Duration> = a.latencies.iter().chain(&b.latencies).copied().collect();
    v.sort_unstable();
    v
}

/// Bytes malloc has handed out and not had back, in every arena and in mmapped blocks.
fn heap_in_use_kib() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) / 1024) as u64
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// The proxy's current SVID expiry, from its admin `/config`.
async fn svid_not_after(admin: std::net::SocketAddr) -> Option<String> {
    let body = super::load::http_get_body(admin, "/config").await?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["svidNotAfter"].as_str().map(String::from)
}

/// The trend of a series over the last half of the run.
#[derive(Debug)]
struct Trend {
    /// Least-squares slope over the last half, per hour.
    per_hour: f64,
    /// Whether the slope, kept up for a whole run of `span` seconds, would add more than
    /// `floor` or a tenth of the last half's mean, whichever is larger.
    grows: bool,
}

impl Trend {
    fn of(series: &[(f64, f64)], span: f64, floor: f64) -> Trend {
        let half = &series[series.len() / 2..];
        if half.len() < 3 {
            return Trend {
                per_hour: 0.0,
                grows: false,
            };
        }
        let n = half.len() as f64;
        let (mt, mv) = (
            half.iter().map(|s| s.0).sum::<f64>() / n,
            half.iter().map(|s| s.1).sum::<f64>() / n,
        );
        let cov: f64 = half.iter().map(|s| (s.0 - mt) * (s.1 - mv)).sum();
        let var: f64 = half.iter().map(|s| (s.0 - mt).powi(2)).sum();
        let slope = if var > 0.0 { cov / var } else { 0.0 };
        Trend {
            per_hour: slope * 3600.0,
            grows: slope * span > floor.max(mv / 10.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Trend;

    fn series(f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..60).map(|i| (i as f64 * 30.0, f(i as f64))).collect()
    }

    #[test]
    fn a_leak_grows_and_a_plateau_or_noise_does_not() {
        let span = 1800.0;
        // 0.5 MiB a minute from 20 MiB: 15 MiB over the run.
        let leak = Trend::of(&series(|i| 20.0 + i * 0.25), span, 4.0);
        assert!(leak.grows, "{leak:?}");
        // Warm-up growth in the first half, flat after.
        let plateau = Trend::of(&series(|i| 20.0 + i.min(25.0) * 0.5), span, 4.0);
        assert!(!plateau.grows, "{plateau:?}");
        // ±1 MiB of noise around 30 MiB.
        let noise = Trend::of(
            &series(|i| {
                30.0 + if (i as u64).is_multiple_of(2) {
                    1.0
                } else {
                    -1.0
                }
            }),
            span,
            4.0,
        );
        assert!(!noise.grows, "{noise:?}");
        // One file descriptor more every interval.
        let fds = Trend::of(&series(|i| 30.0 + i), span, 8.0);
        assert!(fds.grows, "{fds:?}");
    }
}
