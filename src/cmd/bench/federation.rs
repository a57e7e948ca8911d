//! Federation benchmark: a real `fedmesh hub` process and N simulated control planes (real
//! protocol, real mTLS, in-memory state) holding S services in total. After steady state, single
//! export changes are made one at a time and timed until every cluster has received them.
//!
//! Baseline, measured in the same run: the publish round trip of the changing cluster (Publish →
//! PublishResult), i.e. what it costs the hub to accept one change; propagation is reported next
//! to it as a ratio.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fedmesh_api::pb::federation as pb;
use fedmesh_api::pb::federation::federation_client::FederationClient;
use fedmesh_api::{ClusterName, FEDERATION_PROTOCOL_VERSION, TrustDomain};
use fedmesh_federation::control_plane::hub_link::HubCredentials;
use tokio::sync::{Mutex, mpsc, watch};

pub struct Params {
    pub clusters: usize,
    pub services: usize,
    pub changes: usize,
    pub store: super::BenchStore,
}

/// An etcd for the hub on loopback, in `dir`: its client URL, and the server (stopped when
/// dropped, as etcd expects: SIGTERM).
fn start_etcd(dir: &Path) -> anyhow::Result<(String, super::thirdparty::Server)> {
    let bin = super::load::which("etcd")
        .context("etcd is not installed (apt-get install etcd-server)")?;
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "--name",
        "bench",
        "--data-dir",
        dir.to_str().unwrap_or_default(),
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--listen-peer-urls",
        &peer_url,
        "--initial-advertise-peer-urls",
        &peer_url,
        "--initial-cluster",
        &format!("bench={peer_url}"),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let server = super::thirdparty::Server::spawn(cmd, libc::SIGTERM, "etcd")?;
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "etcd did not answer at {url} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((url, server))
}

/// A simulated control plane: publishes its exports, keeps the imports it receives in memory.
struct SimCluster {
    name: String,
    tx: mpsc::Sender<pb::ClusterMessage>,
    /// service -> ready endpoint count of the first exporter, as last received.
    seen: Arc<Mutex<HashMap<String, u32>>>,
    /// Ticks on every applied update.
    updates: watch::Receiver<u64>,
    results: Arc<Mutex<HashMap<u64, Instant>>>,
    version: u64,
}

fn export(service: &str, ready: u32) -> pb::Export {
    pb::Export {
        service: service.to_string(),
        r#type: pb::ServiceType::ClusterSetIp as i32,
        ports: vec![pb::Port {
            name: "http".into(),
            protocol: "TCP".into(),
            port: 80,
            app_protocol: String::new(),
        }],
        endpoints: vec![pb::LocalityEndpoints {
            region: "r".into(),
            zone: "z".into(),
            ready,
            total: ready,
        }],
        created_unix: 1,
        ..Default::default()
    }
}

async fn start_cluster(
    dir: &Path,
    hub: &str,
    token: &str,
    name: &str,
    services: Vec<String>,
) -> anyhow::Result<SimCluster> {
    let cluster = ClusterName::new(name)?;
    let td = TrustDomain::new(&format!("{name}.bench"))?;
    let creds = HubCredentials::join(&dir.join(name), hub, token, &cluster, &td).await?;
    let mut client = FederationClient::new(creds.channel().map_err(anyhow::Error::msg)?)
        .max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(1024);
    tx.send(pb::ClusterMessage {
        msg: Some(pb::cluster_message::Msg::Hello(pb::Hello {
            protocol_version: FEDERATION_PROTOCOL_VERSION,
            resume_from: 0,
            region: "r".into(),
            update_parts: true,
        })),
    })
    .await?;
    let mut inbound = client
        .federate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("opening the Federate stream")?
        .into_inner();
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let results: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let (utx, urx) = watch::channel(0u64);
    {
        let (seen, results, tx) = (seen.clone(), results.clone(), tx.clone());
        tokio::spawn(async move {
            let mut parts = None;
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(pb::hub_message::Msg::Update(part)) => {
                        let Some(u) = fedmesh_federation::update_parts::gather(&mut parts, part)
                        else {
                            continue;
                        };
                        let now = Instant::now();
                        {
                            let mut s = seen.lock().await;
                            if u.snapshot {
                                s.clear();
                            }
                            for i in &u.imports {
                                let ready = i
                                    .clusters
                                    .first()
                                    .and_then(|c| c.endpoints.first())
                                    .map(|e| e.ready)
                                    .unwrap_or(0);
                                s.insert(i.service.clone(), ready);
                            }
                            for r in &u.removed_imports {
                                s.remove(r);
                            }
                        }
                        let _ = tx
                            .send(pb::ClusterMessage {
                                msg: Some(pb::cluster_message::Msg::Ack(pb::Ack {
                                    version: u.version,
                                    nack: false,
                                    error: String::new(),
                                })),
                            })
                            .await;
                        let _ = now;
                        utx.send_modify(|n| *n += 1);
                    }
                    Some(pb::hub_message::Msg::PublishResult(r)) => {
                        results.lock().await.insert(r.version, Instant::now());
                    }
                    _ => {}
                }
            }
        });
    }
    let mut sim = SimCluster {
        name: name.to_string(),
        tx,
        seen,
        updates: urx,
        results,
        version: 0,
    };
    sim.publish(services.iter().map(|s| export(s, 1)).collect(), true)
        .await?;
    Ok(sim)
}

impl SimCluster {
    async fn publish(&mut self, upserts: Vec<pb::Export>, full: bool) -> anyhow::Result<u64> {
        self.version += 1;
        self.tx
            .send(pb::ClusterMessage {
                msg: Some(pb::cluster_message::Msg::Publish(pb::Publish {
                    version: self.version,
                    cluster: self.name.clone(),
                    full,
                    upserts,
                    ..Default::default()
                })),
            })
            .await?;
        Ok(self.version)
    }
}

pub(super) fn proc_stats(pid: u32) -> (u64, f64) {
    let rss_kib = super::status_kib(pid, &["VmRSS:"])[0];
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let (u, s): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
            Some((u + s) / ticks)
        })
        .unwrap_or(0.0);
    (rss_kib, cpu)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(
        p.clusters >= 2 && p.services >= p.clusters,
        "need at least 2 clusters and one service per cluster"
    );
    let dir = tempfile::tempdir()?;
    let (grpc, admin) = (free_port()?, free_port()?);
    let exe = std::env::current_exe()?;
    let data = dir.path().join("hub");
    let etcd = match p.store {
        super::BenchStore::Redb => None,
        super::BenchStore::Etcd => Some(start_etcd(&dir.path().join("etcd"))?),
    };
    let mut args = vec![
        "hub".to_string(),
        "--data-dir".into(),
        data.to_str().unwrap_or_default().into(),
        "--listen".into(),
        format!("127.0.0.1:{grpc}"),
        "--admin-listen".into(),
        format!("127.0.0.1:{admin}"),
    ];
    if let Some((url, _)) = &etcd {
        args.extend(["--store".into(), format!("etcd:{url}")]);
    }
    let store = match p.store {
        super::BenchStore::Redb => "redb",
        super::BenchStore::Etcd => "etcd",
    };
    let mut hub = std::process::Command::new(exe)
        .args(&args)
        .env(
            "RUST_LOG",
            std::env::var("FEDMESH_BENCH_HUB_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(match std::env::var_os("FEDMESH_BENCH_HUB_LOG_FILE") {
            Some(f) => std::fs::File::create(f)
                .map(std::process::Stdio::from)
                .unwrap_or(std::process::Stdio::null()),
            None => std::process::Stdio::null(),
        })
        .spawn()
        .context("starting the hub")?;
    let hub_pid = hub.id();
    let result = async {
        let admin_url = format!("http://127.0.0.1:{admin}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the hub did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token = std::fs::read_to_string(data.join("admin-token"))?.trim().to_string();
        let client = fedmesh_federation::hub::client::AdminClient::new(&admin_url, Some(token), None)?;
        let hub_addr = format!("127.0.0.1:{grpc}");

        eprintln!("joining {} simulated clusters with {} services in total...", p.clusters, p.services);
        let joining = Instant::now();
        let mut sims = Vec::new();
        for c in 0..p.clusters {
            let name = format!("c{c:03}");
            let t = client
                .create_token(&name, &format!("{name}.bench"), None)
                .await?;
            let services: Vec<String> = (0..p.services)
                .filter(|s| s % p.clusters == c)
                .map(|s| format!("bench/svc-{s:05}"))
                .collect();
            sims.push(start_cluster(dir.path(), &hub_addr, &t.token, &name, services).await?);
        }
        // Steady state: every cluster holds every import.
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let mut done = 0;
            let mut held = Vec::with_capacity(sims.len());
            for s in &sims {
                let n = s.seen.lock().await.len();
                held.push(n);
                if n == p.services {
                    done += 1;
                }
            }
            if done == sims.len() {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                let min = held.iter().min().copied().unwrap_or(0);
                eprintln!("  waiting for steady state: {done}/{} clusters complete, the slowest holds {min}/{} imports", sims.len(), p.services);
                last_report = Instant::now();
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "no steady state after 10 minutes ({done}/{} clusters complete)", sims.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let converge = joining.elapsed();
        let (rss_steady, cpu_steady) = proc_stats(hub_pid);
        eprintln!("steady state after {converge:?}; measuring {} changes...", p.changes);

        let mut propagation = Vec::with_capacity(p.changes);
        let mut accept = Vec::with_capacity(p.changes);
        let cpu_before = proc_stats(hub_pid).1;
        for i in 0..p.changes {
            let c = i % sims.len();
            let svc_index = (0..p.services).filter(|s| s % p.clusters == c).nth(i / sims.len() % (p.services / p.clusters).max(1)).unwrap_or(c);
            let service = format!("bench/svc-{svc_index:05}");
            let ready = 2 + i as u32;
            let mut watchers: Vec<_> = sims.iter().map(|s| s.updates.clone()).collect();
            let t0 = Instant::now();
            let version = sims[c].publish(vec![export(&service, ready)], false).await?;
            // Wait until every cluster has the new value.
            for (k, s) in sims.iter().enumerate() {
                loop {
                    if s.seen.lock().await.get(&service) == Some(&ready) {
                        break;
                    }
                    anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "change {i} did not reach {} within 30s", s.name);
                    let _ = tokio::time::timeout(Duration::from_millis(50), watchers[k].changed()).await;
                }
            }
            propagation.push(t0.elapsed());
            if let Some(t) = sims[c].results.lock().await.get(&version) {
                accept.push(t.duration_since(t0));
            }
        }
        let (rss_end, cpu_end) = proc_stats(hub_pid);
        propagation.sort();
        accept.sort();
        let (p50, p99) = (percentile(&propagation, 0.5), percentile(&propagation, 0.99));
        let (a50, a99) = (percentile(&accept, 0.5), percentile(&accept, 0.99));
        println!("fedmesh bench federation — real hub process ({store}), {} simulated clusters, {} services, {} changes", p.clusters, p.services, p.changes);
        println!("  steady state {:.1}s after the first join (all clusters joined, published and hold all {} imports)", converge.as_secs_f64(), p.services);
        println!("  propagation of one export change to every cluster:  p50 {:>7.1} ms   p99 {:>7.1} ms   (goal p99 <= 100 ms)", ms(p50), ms(p99));
        println!("  baseline: publish accepted by the hub (round trip): p50 {:>7.1} ms   p99 {:>7.1} ms", ms(a50), ms(a99));
        println!("  ratio propagation/accept:                           p50 {:>7.2}      p99 {:>7.2}", ratio(p50, a50), ratio(p99, a99));
        println!("  hub RSS: {:.1} MiB at steady state, {:.1} MiB after the changes   (goals: <= 256 MiB at 50 clusters x 10,000 services, <= 1 GiB at 511 x 100,000)", rss_steady as f64 / 1024.0, rss_end as f64 / 1024.0);
        if let Some((_, server)) = &etcd {
            println!("  etcd RSS after the changes: {:.1} MiB", proc_stats(server.pid()).0 as f64 / 1024.0);
        }
        println!("  hub CPU: {:.1} s to reach steady state, {:.3} s for the {} changes ({:.2} ms per change)", cpu_steady, cpu_end - cpu_before, p.changes, (cpu_end - cpu_before) * 1000.0 / p.changes as f64);
        Ok(())
    }
    .await;
    let _ = hub.kill();
    let _ = hub.wait();
    drop(etcd);
    result
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        0.0
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
