//! File to visible: an export written into one cluster's source directory, timed until the DNS
//! of its own cluster and of another cluster answer for it (`NAME.NS.svc.clusterset.local`).
//! The path: the directory watch, the control plane, the hub, the other control plane, DNS.
//!
//! Baseline, in the same run: a DNS question for a name already answered (how long asking takes,
//! i.e. the floor of this measurement).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use fedmesh_testbed::client::dns_a;
use fedmesh_testbed::yaml::{self, EndpointSpec};
use fedmesh_testbed::{ClusterSpec, Testbed};

use super::load::{ms, pct};

pub struct Params {
    /// Exports to write and time, one at a time.
    pub changes: usize,
}

/// Asks `server` for `name` until it answers (at most 30 s); the time from `since`.
async fn visible(server: SocketAddr, name: &str, since: Instant) -> anyhow::Result<Duration> {
    let deadline = since + Duration::from_secs(30);
    loop {
        if dns_a(server, name).await.is_ok_and(|a| !a.is_empty()) {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} never became visible at {server}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(p.changes > 0, "--changes must be positive");
    let dir = tempfile::tempdir()?;
    let tb = Testbed::start(
        &dir.path().join("clusterset"),
        &[
            ClusterSpec::new("east", "us-east"),
            ClusterSpec::new("west", "us-west"),
        ],
    )
    .await?;
    let (east, west) = (tb.cluster("east"), tb.cluster("west"));
    let endpoint = EndpointSpec {
        addr: SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1), 9)),
        zone: "w1".into(),
        ready: true,
    };
    println!("fedmesh bench federation --mode files");
    println!(
        "  {} exports written one at a time into west's source directory (Service, EndpointSlice,\n  ServiceExport in one file, renamed into place), each timed until DNS answers for it",
        p.changes
    );
    let (mut own, mut other) = (Vec::new(), Vec::new());
    // One more than measured: the first warms up (connections to the hub, DNS sockets).
    for i in 0..=p.changes {
        let name = format!("f{i}");
        let text = format!(
            "{}---\n{}",
            yaml::service(
                "bench",
                &name,
                &[("http", 80, "")],
                std::slice::from_ref(&endpoint)
            ),
            yaml::service_export("bench", &name)
        );
        let fqdn = format!("{name}.bench.svc.clusterset.local");
        let t0 = Instant::now();
        west.write(&format!("{name}.yaml"), &text)?;
        let (w, e) = tokio::join!(
            visible(west.dns_addr, &fqdn, t0),
            visible(east.dns_addr, &fqdn, t0)
        );
        if i > 0 {
            own.push(w?);
            other.push(e?);
        }
    }
    // The floor: asking for a name that is already answered.
    let mut floor = Vec::new();
    for _ in 0..p.changes.max(20) {
        let t0 = Instant::now();
        anyhow::ensure!(
            dns_a(east.dns_addr, "f0.bench.svc.clusterset.local")
                .await
                .is_ok_and(|a| !a.is_empty()),
            "a visible name stopped answering"
        );
        floor.push(t0.elapsed());
    }
    for v in [&mut own, &mut other, &mut floor] {
        v.sort();
    }
    let row = |what: &str, v: &[Duration]| {
        println!(
            "    {what:<44} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
            ms(pct(v, 0.50)),
            ms(pct(v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        );
    };
    row("DNS question, name already answered (floor)", &floor);
    row("file → visible in its own cluster (west)", &own);
    row("file → visible in another cluster (east)", &other);
    let p99 = pct(&other, 0.99);
    println!(
        "    ratio to the floor: p50 {:.1}×, p99 {:.1}×",
        ms(pct(&other, 0.50)) / ms(pct(&floor, 0.50)).max(1e-3),
        ms(p99) / ms(pct(&floor, 0.99)).max(1e-3)
    );
    println!("\n  goals:");
    println!(
        "    export written to a dir source → visible in another cluster, p99 ≤ 50 ms: {:.1} ms — {}",
        ms(p99),
        if p99 <= Duration::from_millis(50) {
            "met"
        } else {
            "NOT met"
        }
    );
    tb.shutdown().await;
    Ok(())
}
