//! Data-plane benchmark: what the sidecar and the east-west gateway add to a request, measured
//! against a direct connection in the same run, and the gateway's SNI passthrough beside HAProxy
//! and nginx doing the same job.
//!
//! An in-process clusterset (hub, east and west control planes) configures real `fedmesh-proxy
//! sidecar` and `fedmesh-proxy gateway` processes, so their CPU and memory are their own:
//!
//! ```text
//! direct:            client ─────────────────────────────────────────────▶ app
//! sidecar→sidecar:   client ─▶ S1 (east) ══mTLS══▶ S2 (east) ─▶ app
//! cross-cluster:     client ─▶ S1 (east) ══mTLS══▶ G (west) ══▶ S3 (west) ─▶ app
//! ```
//!
//! The cost of the L7 pipeline is measured on the sidecar→sidecar path twice over, alternately in
//! rounds (medians reported): to a service with no policy (the minimal route), and to one behind
//! the full policy stack — an HTTPRoute with path and method matches, a header filter, timeouts,
//! a retry and a weighted split, and a rate limit that never triggers.
//!
//! Latency is measured open-loop at a fixed rate: request i is due at `t0 + i/rate` and its
//! latency counts from then, not from when it was sent (coordinated-omission correction), so a
//! stall shows up in the percentiles instead of silently lowering the load.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedmesh_api::{ClusterName, ServiceKey};
use fedmesh_dataplane::sni::MeshSni;
use fedmesh_testbed::yaml::{self, EndpointSpec};
use fedmesh_testbed::{ClusterSpec, Testbed, apps};
use tokio::net::TcpListener;

use super::load::{
    FixedRate, HttpClient, Proto, cpu_seconds, fixed_rate, free_addr, http_client, http_status,
    max_throughput, memory, ms, one, pct, spawn, wait_until,
};
use super::sni::{TlsPair, tls_backend};
use super::{pairs, policy};

pub struct Params {
    pub rate: u64,
    pub duration: Duration,
    pub body: usize,
    pub concurrency: usize,
    pub sni_duration: Duration,
    /// The parts to run; empty: all of them.
    pub only: Vec<Part>,
}

/// A part of `fedmesh bench dataplane`, for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Part {
    /// Latency, throughput and CPU of the direct, sidecar and cross-cluster paths.
    Paths,
    /// The policy stack against the minimal route (time, and instructions under callgrind).
    Policy,
    /// What tracing costs (instructions under callgrind, and p99).
    Tracing,
    /// SNI passthrough: the gateway beside HAProxy and nginx.
    Sni,
    /// Our sidecar pair beside nginx and HAProxy set up as mTLS sidecar pairs (HTTP/1.1).
    Pairs,
    /// The cross-cluster path's p99 with 1,000 slow-loris connections held against each proxy.
    Slowloris,
}

impl Params {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

pub(super) struct Path3 {
    pub name: &'static str,
    pub url: String,
    /// The proxies this path crosses (for CPU per request).
    pub pids: Vec<u32>,
}

/// One path at one protocol: latency at the fixed rate (after a second of warm-up), the
/// proxies' CPU over it, then the maximum throughput. `direct`: the baseline for "added".
pub(super) async fn measure_path(
    path: &Path3,
    proto: Proto,
    body: &Bytes,
    p: &Params,
    direct: Option<&FixedRate>,
) -> anyhow::Result<(LatencyRow, FixedRate)> {
    let uri: http::Uri = path.url.parse()?;
    let client = http_client(proto);
    // Warm up: connections open, pools fill.
    let _ = fixed_rate(&client, &uri, body, p.rate, Duration::from_secs(1)).await;
    let cpu0 = cpu_seconds(&path.pids);
    let r = fixed_rate(&client, &uri, body, p.rate, p.duration).await;
    let cpu = cpu_seconds(&path.pids) - cpu0;
    let (tput, tput_errors) = max_throughput(
        &client,
        &uri,
        body,
        p.concurrency,
        p.duration.min(Duration::from_secs(5)),
    )
    .await;
    let n = r.latencies.len() as f64;
    let row = LatencyRow {
        proto: proto.name(),
        path: path.name,
        p50: pct(&r.latencies, 0.50),
        p99: pct(&r.latencies, 0.99),
        p999: pct(&r.latencies, 0.999),
        added: direct.map(|d| {
            (
                pct(&r.latencies, 0.50).as_secs_f64() - pct(&d.latencies, 0.50).as_secs_f64(),
                pct(&r.latencies, 0.99).as_secs_f64() - pct(&d.latencies, 0.99).as_secs_f64(),
                pct(&r.latencies, 0.999).as_secs_f64() - pct(&d.latencies, 0.999).as_secs_f64(),
            )
        }),
        errors: r.errors + tput_errors,
        first_error: r.first_error.clone(),
        cpu_per_1k: if path.pids.is_empty() || n == 0.0 {
            None
        } else {
            Some(cpu / n * 1000.0)
        },
        throughput: tput,
    };
    Ok((row, r))
}

/// Two clusters in-process, east and west (under `dir`/clusterset), west publishing `gateway` — a
/// gateway process the benchmark starts there — instead of its in-process gateway's address.
///
/// The control planes do not probe the gateways here: a probe is an mTLS handshake every 5 s, a
/// fixed cost that would show as instructions or latency per request of the gateway measured.
pub(super) async fn east_west(dir: &Path, gateway: SocketAddr) -> anyhow::Result<Testbed> {
    let mut east = ClusterSpec::new("east", "us-east");
    let mut west = ClusterSpec::new("west", "us-west");
    west.publish_gateway = Some(gateway);
    east.probe_gateways = false;
    west.probe_gateways = false;
    Testbed::start(&dir.join("clusterset"), &[east, west]).await
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(
        p.rate > 0 && p.body > 0,
        "--rate and --body must be positive"
    );
    if p.runs(Part::Slowloris) {
        super::slowloris::raise_fd_limit();
    }
    let dir = tempfile::tempdir()?;
    let dirp = dir.path().to_path_buf();

    let gw_addr = free_addr()?;
    let tb = east_west(&dirp, gw_addr).await?;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));

    // The apps: the same fixed answer of `body` bytes.
    let app_e = apps::http_fixed(TcpListener::bind("127.0.0.1:0").await?, p.body).await;
    let app_w = apps::http_fixed(TcpListener::bind("127.0.0.1:0").await?, p.body).await;

    // Identities for the proxy processes, from each cluster's Workload API.
    let ag_s1 = east.agent("bench", "client").await?;
    let ag_s2 = east.agent("bench", "server").await?;
    let ag_s3 = west.agent("bench", "server").await?;
    let ag_g = west.agent("fedmesh-system", "east-west-gateway").await?;

    let (s1_admin, s2_admin, s3_admin, g_admin) =
        (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let (s1_local, s1_remote, s1_policied) = (free_addr()?, free_addr()?, free_addr()?);
    let (s2_in, s3_in) = (free_addr()?, free_addr()?);

    // Services: bench/local in east (not exported), bench/remote and bench/tlsb exported by west.
    east.write(
        "local.yaml",
        &yaml::service(
            "bench",
            "local",
            &[("http", 80, "")],
            &[EndpointSpec {
                addr: s2_in,
                zone: "e1".into(),
                ready: true,
            }],
        ),
    )?;
    // bench/policied: the same endpoint as bench/local, behind the whole policy stack.
    east.write(
        "policied.yaml",
        &yaml::service(
            "bench",
            "policied",
            &[("http", 80, "")],
            &[EndpointSpec {
                addr: s2_in,
                zone: "e1".into(),
                ready: true,
            }],
        ),
    )?;
    east.write("policied-route.yaml", policy::POLICY_STACK)?;
    west.serve_http(
        "bench",
        "remote",
        &[EndpointSpec {
            addr: s3_in,
            zone: "w1".into(),
            ready: true,
        }],
    )?;

    // The TLS backend of the SNI passthrough comparison, exported by west as bench/tlsb.
    let sni = MeshSni::new(
        443,
        "bench/tlsb".parse::<ServiceKey>()?,
        ClusterName::new("west")?,
    )
    .to_string();
    let tls = TlsPair::new(&sni)?;
    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(tls_backend(backend, tls.server.clone()));
    west.write(
        "tlsb.yaml",
        &yaml::service(
            "bench",
            "tlsb",
            &[("tls", 443, "")],
            &[EndpointSpec {
                addr: backend_addr,
                zone: "w1".into(),
                ready: true,
            }],
        ),
    )?;
    west.write("tlsb-export.yaml", &yaml::service_export("bench", "tlsb"))?;

    let east_cp = east.cp_addr.to_string();
    let west_cp = west.cp_addr.to_string();
    let common = |cp: &str, api: &str, admin: SocketAddr, zone: &str| -> Vec<String> {
        vec![
            "--control-plane".into(),
            cp.into(),
            "--workload-api".into(),
            api.into(),
            "--admin".into(),
            admin.to_string(),
            "--zone".into(),
            zone.into(),
        ]
    };
    let mut a = vec!["sidecar".to_string()];
    a.extend(common(&east_cp, &ag_s1.endpoint, s1_admin, "e1"));
    a.extend([
        "--listen".into(),
        format!("{s1_local}=bench/local:80"),
        "--listen".into(),
        format!("{s1_remote}=bench/remote:80"),
        "--listen".into(),
        format!("{s1_policied}=bench/policied:80"),
    ]);
    let s1 = spawn(&dirp, "sidecar-east-client", &a)?;
    let mut a = vec!["sidecar".to_string()];
    a.extend(common(&east_cp, &ag_s2.endpoint, s2_admin, "e1"));
    a.extend(["--inbound".into(), format!("{s2_in}={}", app_e.addr)]);
    let s2 = spawn(&dirp, "sidecar-east-server", &a)?;
    let mut a = vec!["sidecar".to_string()];
    a.extend(common(&west_cp, &ag_s3.endpoint, s3_admin, "w1"));
    a.extend(["--inbound".into(), format!("{s3_in}={}", app_w.addr)]);
    let s3 = spawn(&dirp, "sidecar-west-server", &a)?;
    let mut a = vec!["gateway".to_string()];
    a.extend(common(&west_cp, &ag_g.endpoint, g_admin, "w1"));
    a.extend(["--listen".into(), gw_addr.to_string()]);
    let g = spawn(&dirp, "gateway-west", &a)?;

    for (name, admin) in [
        ("S1", s1_admin),
        ("S2", s2_admin),
        ("S3", s3_admin),
        ("G", g_admin),
    ] {
        wait_until(
            &format!("{name} ready (see {})", dirp.display()),
            || async move { http_status(admin, "/readyz").await == Some(200) },
        )
        .await?;
    }

    let body = Bytes::from(vec![b'q'; p.body]);
    let paths = [
        Path3 {
            name: "direct",
            url: format!("http://{}/", app_e.addr),
            pids: vec![],
        },
        Path3 {
            name: "sidecar→sidecar",
            url: format!("http://{s1_local}/"),
            pids: vec![s1.pid(), s2.pid()],
        },
        Path3 {
            name: "sidecar→gateway→sidecar",
            url: format!("http://{s1_remote}/"),
            pids: vec![s1.pid(), g.pid(), s3.pid()],
        },
    ];
    let policied = Path3 {
        name: "policy stack",
        url: format!("http://{s1_policied}/"),
        pids: vec![s1.pid(), s2.pid()],
    };
    // Every path answers before anything is measured.
    for path in paths.iter().chain([&policied]) {
        let uri: http::Uri = path.url.parse()?;
        let c = http_client(Proto::H1);
        let mut last = String::new();
        let ok = wait_until_ok(&c, &uri, &body, &mut last).await;
        anyhow::ensure!(ok, "{} never answered: {last}", path.name);
    }

    println!("fedmesh bench dataplane");
    println!(
        "  {} rps for {:?} per path and protocol, {} B request and response bodies, open loop (latency from the scheduled start)",
        p.rate, p.duration, p.body
    );
    let mut report = Report::default();
    let protos: &[Proto] = if p.runs(Part::Paths) {
        &[Proto::H1, Proto::H2]
    } else {
        &[]
    };
    let mut direct_h1: Option<FixedRate> = None;
    for &proto in protos {
        let mut direct: Option<FixedRate> = None;
        for path in &paths {
            let (row, r) = measure_path(path, proto, &body, &p, direct.as_ref()).await?;
            row.print();
            report.rows.push(row);
            if path.name == "direct" {
                direct = Some(r);
            }
        }
        if proto == Proto::H1 {
            direct_h1 = direct;
        }
    }
    if p.runs(Part::Pairs) {
        // The baseline and our pair come from this run: measured above, or now.
        let direct = match direct_h1 {
            Some(d) => d,
            None => measure_path(&paths[0], Proto::H1, &body, &p, None).await?.1,
        };
        let ours_at = |rows: &[LatencyRow]| {
            rows.iter()
                .position(|r| r.proto == Proto::H1.name() && r.path == paths[1].name)
        };
        if ours_at(&report.rows).is_none() {
            let (row, _) = measure_path(&paths[1], Proto::H1, &body, &p, Some(&direct)).await?;
            row.print();
            report.rows.push(row);
        }
        let ours = ours_at(&report.rows).map(|i| &report.rows[i]);
        let client = pairs::SvidFiles::fetch(&ag_s1.endpoint, &dirp.join("svid-client")).await?;
        let server = pairs::SvidFiles::fetch(&ag_s2.endpoint, &dirp.join("svid-server")).await?;
        let rows = match ours {
            Some(ours) => {
                pairs::compare(
                    &dirp,
                    (&client, &server),
                    app_e.addr,
                    &body,
                    &p,
                    (&direct, ours),
                )
                .await?
            }
            None => Vec::new(),
        };
        report.pairs = rows;
    }
    let counted = policy::Counted {
        dir: &dirp,
        control_plane: &east_cp,
        workload_api: &ag_s1.endpoint,
        body: &body,
    };
    if p.runs(Part::Policy) {
        report.policy = policy::compare(&paths[1], &policied, &body, &p).await?;
        report.instructions = policy::instructions(&counted).await;
    }
    if p.runs(Part::Tracing) {
        report.tracing = super::tracing::instructions(&counted).await;
        report.tracing_latency = super::tracing::latency(&counted, &p).await;
    }
    if p.runs(Part::Slowloris) {
        report.slowloris = Some(
            super::slowloris::compare(&paths[2], (s1_remote, gw_addr, s3_in), &body, &p).await?,
        );
    }
    println!(
        "\n  proxy memory after the runs (RSS / peak RSS; of the RSS, private anonymous memory and\n  file-backed pages, mostly the fedmesh binary's code, shared by every process running it):"
    );
    for proc in [&s1, &s2, &s3, &g] {
        let (rss, hwm, anon, file) = memory(proc.pid());
        println!(
            "    {:<22} {:>6.1} MiB / {:>6.1} MiB   anon {:>5.1} MiB, file {:>5.1} MiB",
            proc.name,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            anon as f64 / 1024.0,
            file as f64 / 1024.0
        );
        report.memory.push((proc.name, rss, hwm));
    }

    if p.runs(Part::Sni) {
        report.sni =
            super::sni::compare(&dirp, (gw_addr, g.pid()), &tls, &sni, backend_addr, &p).await?;
    }
    report.print_goals();
    drop((s1, s2, s3, g));
    drop((ag_s1, ag_s2, ag_s3, ag_g));
    tb.shutdown().await;
    Ok(())
}

async fn wait_until_ok(c: &HttpClient, uri: &http::Uri, body: &Bytes, last: &mut String) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match one(c, uri, body, Instant::now()).await {
            Ok(_) => return true,
            Err(e) => *last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[derive(Default)]
struct Report {
    rows: Vec<LatencyRow>,
    policy: Vec<policy::PolicyRow>,
    /// Instructions per request of the client sidecar: minimal route, policy stack.
    instructions: Option<(f64, f64)>,
    /// Instructions per request of the client sidecar with tracing off, at 1%, at 100%.
    tracing: Option<super::tracing::TracingCost>,
    tracing_latency: Option<super::tracing::TracingLatency>,
    memory: Vec<(&'static str, u64, u64)>,
    sni: Vec<super::sni::SniRow>,
    pairs: Vec<pairs::PairRow>,
    slowloris: Option<super::slowloris::SlowlorisRow>,
}

pub(super) struct LatencyRow {
    pub(super) proto: &'static str,
    pub(super) path: &'static str,
    p50: Duration,
    pub(super) p99: Duration,
    p999: Duration,
    /// Over the direct path: p50, p99, p99.9 in seconds.
    pub(super) added: Option<(f64, f64, f64)>,
    errors: u64,
    first_error: Option<String>,
    pub(super) cpu_per_1k: Option<f64>,
    pub(super) throughput: f64,
}

impl LatencyRow {
    pub(super) fn print(&self) {
        let added = match self.added {
            Some((a, b, c)) => format!(
                "added p50 {:+.3} / p99 {:+.3} / p99.9 {:+.3} ms",
                a * 1e3,
                b * 1e3,
                c * 1e3
            ),
            None => "(baseline)".into(),
        };
        println!(
            "    {:<8} {:<24} p50 {:>6.3} p99 {:>6.3} p99.9 {:>6.3} ms  {:<44} max {:>6.0} req/s{}{}",
            self.proto,
            self.path,
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            added,
            self.throughput,
            self.cpu_per_1k
                .map(|c| format!("  {:.3} CPU s/1k req", c))
                .unwrap_or_default(),
            if self.errors > 0 {
                format!(
                    "  {} ERRORS, first: {}",
                    self.errors,
                    self.first_error.as_deref().unwrap_or("")
                )
            } else {
                String::new()
            }
        );
    }
}

impl Report {
    fn print_goals(&self) {
        println!("\n  goals:");
        let full = self
            .rows
            .iter()
            .filter(|r| r.path == "sidecar→gateway→sidecar")
            .filter_map(|r| r.added.map(|a| (r.proto, a.1)));
        for (proto, p99) in full {
            println!(
                "    cross-cluster path adds ≤ 0.5 ms p99 at the fixed rate ({proto}): {:+.3} ms — {}",
                p99 * 1e3,
                if p99 < 0.0 {
                    // The direct baseline's tail was hit by something else on the machine.
                    "inconclusive: the direct path's p99 was worse than the proxied one (noise); re-run"
                } else if p99 <= 0.0005 {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
        policy::print_goals(&self.policy, self.instructions);
        super::tracing::print_goals(self.tracing, self.tracing_latency);
        let sidecar_max = self
            .memory
            .iter()
            .filter(|(n, _, _)| n.starts_with("sidecar"))
            .map(|(_, _, hwm)| *hwm)
            .max()
            .unwrap_or(0);
        println!(
            "    sidecar peak RSS ≤ 20 MiB: {:.1} MiB — {}",
            sidecar_max as f64 / 1024.0,
            if sidecar_max <= 20 * 1024 {
                "met"
            } else {
                "NOT met"
            }
        );
        super::sni::print_goal(&self.sni);
        pairs::print_goals(&self.pairs);
        super::slowloris::print_goal(&self.slowloris);
    }
}
