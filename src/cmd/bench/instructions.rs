//! Instructions per request of each proxy on the cross-cluster path (client sidecar → gateway →
//! server sidecar), for HTTP/1.1 and HTTP/2 with 1 KiB bodies, counted by callgrind. Unlike CPU
//! time the count does not move with the machine's load, so a regression shows as a number:
//! `--check FILE` compares the run with committed figures (`benchmarks/instructions.txt`) and
//! fails when one grew by more than 10%; `--write FILE` records a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fedmesh_testbed::apps;
use fedmesh_testbed::yaml::EndpointSpec;
use tokio::net::TcpListener;

use super::callgrind::UnderCallgrind;
use super::load::{Proto, free_addr, http_client, one};

pub struct Params {
    /// Requests counted per protocol (one at a time).
    pub requests: usize,
    pub check: Option<PathBuf>,
    pub write: Option<PathBuf>,
    /// Where to keep the callgrind dumps.
    pub keep: Option<PathBuf>,
}

/// Copies the callgrind dumps in `from` (`callgrind-<proxy>.out.<n>`) to `to`.
fn keep_dumps(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from)?.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("callgrind-") {
            std::fs::copy(e.path(), to.join(&name))
                .with_context(|| format!("copying {} to {}", e.path().display(), to.display()))?;
        }
    }
    println!(
        "  callgrind dumps kept in {} (callgrind_annotate --inclusive=yes FILE)",
        to.display()
    );
    Ok(())
}

/// The growth over the committed figure that fails `--check`.
const TOLERANCE: f64 = 1.10;
const BODY: usize = 1024;
/// The profile this binary (and the fedmesh-proxy beside it) was built with: counts of a debug
/// build are several times a release build's and never compared with them.
const BUILD: &str = if cfg!(debug_assertions) {
    "debug"
} else {
    "release"
};

/// A proxy of the path under callgrind, and its admin port.
fn start(
    dir: &Path,
    name: &'static str,
    admin: std::net::SocketAddr,
    args: &[String],
) -> anyhow::Result<(UnderCallgrind, std::net::SocketAddr)> {
    let mut args = args.to_vec();
    args.extend(["--admin".to_string(), admin.to_string()]);
    // Counted work is the proxying: no spans.
    let proc = UnderCallgrind::start(dir, name, &args, &[("OTEL_TRACES_EXPORTER", "none")])?;
    Ok((proc, admin))
}

/// `proto proxy` → instructions per request, from a figures file (`# comments` allowed), which
/// must be of this build's profile (`build release`).
fn read_figures(path: &Path) -> anyhow::Result<BTreeMap<(String, String), f64>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the committed figures {}", path.display()))?;
    let mut out = BTreeMap::new();
    let mut build = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if let ["build", b] = f[..] {
            build = Some(b.to_string());
            continue;
        }
        let [proto, proxy, value] = f[..] else {
            anyhow::bail!(
                "{}:{}: expected `PROTOCOL PROXY INSTRUCTIONS`, got {line:?}",
                path.display(),
                n + 1
            );
        };
        let value: f64 = value
            .parse()
            .with_context(|| format!("{}:{}: {value:?} is not a number", path.display(), n + 1))?;
        out.insert((proto.to_string(), proxy.to_string()), value);
    }
    match build.as_deref() {
        Some(b) if b == BUILD => Ok(out),
        Some(b) => anyhow::bail!(
            "{} holds figures of a {b} build and this is a {BUILD} build; compare like with like \
             (e.g. target/{b}/fedmesh bench instructions --check {})",
            path.display(),
            path.display()
        ),
        None => anyhow::bail!(
            "{} does not say which build its figures are from (a line `build release`)",
            path.display()
        ),
    }
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(p.requests > 0, "--requests must be positive");
    let committed = match &p.check {
        Some(f) => Some(read_figures(f)?),
        None => None,
    };
    let dir = tempfile::tempdir()?;
    let dirp = dir.path();
    let gw_addr = free_addr()?;
    let tb = super::dataplane::east_west(dirp, gw_addr).await?;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let app = apps::http_fixed(TcpListener::bind("127.0.0.1:0").await?, BODY).await;
    let ag_client = east.agent("bench", "client").await?;
    let ag_server = west.agent("bench", "server").await?;
    let ag_gateway = west.agent("fedmesh-system", "east-west-gateway").await?;
    let (listen, inbound) = (free_addr()?, free_addr()?);
    west.serve_http(
        "bench",
        "remote",
        &[EndpointSpec {
            addr: inbound,
            zone: "w1".into(),
            ready: true,
        }],
    )?;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (east_cp, west_cp) = (east.cp_addr.to_string(), west.cp_addr.to_string());
    let proxies = [
        start(
            dirp,
            "client-sidecar",
            free_addr()?,
            &s(&[
                "sidecar",
                "--control-plane",
                &east_cp,
                "--workload-api",
                &ag_client.endpoint,
                "--zone",
                "e1",
                "--listen",
                &format!("{listen}=bench/remote:80"),
            ]),
        )?,
        start(
            dirp,
            "gateway",
            free_addr()?,
            &s(&[
                "gateway",
                "--control-plane",
                &west_cp,
                "--workload-api",
                &ag_gateway.endpoint,
                "--zone",
                "w1",
                "--listen",
                &gw_addr.to_string(),
            ]),
        )?,
        start(
            dirp,
            "server-sidecar",
            free_addr()?,
            &s(&[
                "sidecar",
                "--control-plane",
                &west_cp,
                "--workload-api",
                &ag_server.endpoint,
                "--zone",
                "w1",
                "--inbound",
                &format!("{inbound}={}", app.addr),
            ]),
        )?,
    ];
    for (proxy, admin) in &proxies {
        proxy.ready(*admin).await?;
    }
    let body = Bytes::from(vec![b'q'; BODY]);
    let uri: http::Uri = format!("http://{listen}/").parse()?;
    println!("fedmesh bench instructions");
    println!(
        "  instructions per request of each proxy on the cross-cluster path (callgrind, {BUILD} build\n  of fedmesh-proxy), {} requests per protocol one at a time, {BODY} B request and response bodies:",
        p.requests
    );
    let mut measured: Vec<(&str, &str, f64)> = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        let client = http_client(proto);
        // Warm: connections open, pools filled, first-use allocations done.
        let warm = Instant::now() + Duration::from_secs(120);
        while one(&client, &uri, &body, Instant::now()).await.is_err() {
            anyhow::ensure!(Instant::now() < warm, "the path never answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for _ in 0..50 {
            one(&client, &uri, &body, Instant::now()).await?;
        }
        for (proxy, _) in &proxies {
            proxy.reset()?;
        }
        for _ in 0..p.requests {
            one(&client, &uri, &body, Instant::now()).await?;
        }
        for (proxy, _) in &proxies {
            let total = proxy.dump().await?;
            measured.push((proto.name(), proxy.name.as_str(), total / p.requests as f64));
        }
    }
    let mut failed = Vec::new();
    for (proto, proxy, value) in &measured {
        let line = format!("    {proto:<8} {proxy:<15} {value:>10.0}");
        match committed
            .as_ref()
            .map(|c| c.get(&(proto.to_string(), proxy.to_string())))
        {
            None => println!("{line}"),
            Some(None) => {
                println!("{line}  (no committed figure)");
                failed.push(format!("{proto} {proxy}: no committed figure"));
            }
            Some(Some(&c)) => {
                let ratio = value / c.max(1.0);
                println!("{line}  committed {c:>10.0}  {ratio:.2}×");
                if ratio > TOLERANCE {
                    failed.push(format!(
                        "{proto} {proxy}: {value:.0} instructions per request, {ratio:.2}× the committed {c:.0}"
                    ));
                }
            }
        }
    }
    let total = |proto: &str| -> f64 {
        measured
            .iter()
            .filter(|(p, _, _)| *p == proto)
            .map(|(_, _, v)| v)
            .sum()
    };
    println!(
        "    all three proxies: HTTP/1.1 {:.0}, HTTP/2 {:.0} instructions per request",
        total("HTTP/1.1"),
        total("HTTP/2")
    );
    if let Some(f) = &p.write {
        let mut text = format!(
            "# Instructions per request of each proxy on the cross-cluster path, 1 KiB bodies,\n\
             # counted by callgrind: `fedmesh bench instructions --write FILE`. CI runs `--check`\n\
             # against this file and fails when a figure grows by more than 10%.\nbuild {BUILD}\n",
        );
        for (proto, proxy, value) in &measured {
            text.push_str(&format!("{proto} {proxy} {value:.0}\n"));
        }
        std::fs::write(f, text).with_context(|| format!("writing {}", f.display()))?;
        println!("  written to {}", f.display());
    }
    drop(proxies);
    if let Some(to) = &p.keep {
        keep_dumps(dirp, to)?;
    }
    drop((ag_client, ag_server, ag_gateway));
    tb.shutdown().await;
    if let Some(f) = &p.check {
        anyhow::ensure!(
            failed.is_empty(),
            "instructions per request grew by more than {:.0}% over {}:\n  {}\n(find the cause with callgrind_annotate on the dumps, kept with --keep DIR; if the growth is intended, record it with --write)",
            (TOLERANCE - 1.0) * 100.0,
            f.display(),
            failed.join("\n  ")
        );
        println!(
            "  within {:.0}% of {}: ok",
            (TOLERANCE - 1.0) * 100.0,
            f.display()
        );
    }
    Ok(())
}
