//! The gateway's SNI passthrough beside HAProxy (`mode tcp`, `req.ssl_sni`) and nginx (`stream`,
//! `ssl_preread`) doing the same job: one TLS backend, the same client, new connections per second
//! and throughput, with the CPU each proxy (and its worker processes) spent.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::dataplane::Params;
use super::load::{closed_loop, cpu_seconds, free_addr, wait_until, which};
use super::thirdparty::{Server, all_pids};

/// A proxy in the SNI passthrough comparison.
struct Contender {
    name: String,
    addr: SocketAddr,
    pid: u32,
    /// Started by the benchmark (HAProxy, nginx): stopped when dropped.
    server: Option<Server>,
}

pub(super) struct SniRow {
    name: String,
    conns_per_s: f64,
    conn_errors: u64,
    cpu_ms_per_1k_conns: f64,
    mib_per_s: f64,
    cpu_s_per_gib: f64,
}

/// Measures the gateway (its address and pid) and whichever of HAProxy and nginx are installed,
/// each passing TLS for `sni` to `backend`; one row per proxy, the gateway's first.
pub(super) async fn compare(
    dirp: &Path,
    (gw_addr, gw_pid): (SocketAddr, u32),
    tls: &TlsPair,
    sni: &str,
    backend_addr: SocketAddr,
    p: &Params,
) -> anyhow::Result<Vec<SniRow>> {
    let sni = sni.to_string();
    // SNI passthrough: the gateway beside HAProxy and nginx, same backend, same client.
    println!(
        "\n  SNI passthrough to one TLS backend ({sni}), {:?} per measurement:",
        p.sni_duration
    );
    let mut contenders = vec![Contender {
        name: "fedmesh gateway".into(),
        addr: gw_addr,
        pid: gw_pid,
        server: None,
    }];
    for (name, started) in [
        (
            "HAProxy (mode tcp, req.ssl_sni)",
            start_haproxy(dirp, &sni, backend_addr),
        ),
        (
            "nginx (stream, ssl_preread)",
            start_nginx(dirp, &sni, backend_addr),
        ),
    ] {
        match started {
            Ok((addr, server)) => contenders.push(Contender {
                name: name.into(),
                addr,
                pid: server.pid(),
                server: Some(server),
            }),
            Err(e) => println!("    {name} skipped: {e:#}"),
        }
    }
    let mut ready = Vec::new();
    for c in contenders {
        let what = format!("{} to pass a TLS connection", c.name);
        let passed = wait_until(&what, || {
            let (addr, tls) = (c.addr, tls.client.clone());
            let sni = sni.clone();
            async move { tls_exchange(addr, &tls, &sni, b'h').await.is_ok() }
        })
        .await;
        match passed {
            Ok(()) => ready.push(c),
            Err(e) if c.server.is_some() => {
                let log = ["haproxy.log", "nginx.log"]
                    .iter()
                    .filter_map(|f| std::fs::read_to_string(dirp.join(f)).ok())
                    .collect::<Vec<_>>()
                    .join("\n");
                println!("    {} skipped: {e:#}\n{log}", c.name);
            }
            Err(e) => return Err(e),
        }
    }
    let contenders = ready;
    let mut sni_rows = Vec::new();
    for c in &contenders {
        let pids = all_pids(&[c.pid]);
        let cpu0 = cpu_seconds(&pids);
        let (conns, conn_errors) =
            new_connections(c.addr, &tls.client, &sni, p.concurrency, p.sni_duration).await;
        let cpu_c = cpu_seconds(&pids) - cpu0;
        let cpu0 = cpu_seconds(&pids);
        let (mbps, bytes) = throughput(c.addr, &tls.client, &sni, 4, p.sni_duration).await;
        let cpu_t = cpu_seconds(&pids) - cpu0;
        let row = SniRow {
            name: c.name.clone(),
            conns_per_s: conns,
            conn_errors,
            cpu_ms_per_1k_conns: cpu_c / (conns * p.sni_duration.as_secs_f64()).max(1.0) * 1e6,
            mib_per_s: mbps,
            cpu_s_per_gib: cpu_t / (bytes as f64 / (1u64 << 30) as f64).max(1e-9),
        };
        sni_rows.push(row);
    }
    let base = sni_rows.first().map(|r| (r.conns_per_s, r.mib_per_s));
    for r in &sni_rows {
        let (c, m) = base.unwrap_or((1.0, 1.0));
        println!(
            "    {:<34} {:>8.0} conn/s ({:>4.2}× gateway)  {:>5.1} ms CPU/1k conns  {:>7.1} MiB/s ({:>4.2}× gateway)  {:>5.2} CPU s/GiB{}",
            r.name,
            r.conns_per_s,
            r.conns_per_s / c,
            r.cpu_ms_per_1k_conns,
            r.mib_per_s,
            r.mib_per_s / m,
            r.cpu_s_per_gib,
            if r.conn_errors > 0 {
                format!("  ({} failed connections)", r.conn_errors)
            } else {
                String::new()
            }
        );
    }
    drop(contenders);
    Ok(sni_rows)
}

/// The goal: the gateway at least as fast as HAProxy.
pub(super) fn print_goal(rows: &[SniRow]) {
    if let (Some(g), Some(h)) = (
        rows.first(),
        rows.iter().find(|r| r.name.starts_with("HAProxy")),
    ) {
        let c = g.conns_per_s / h.conns_per_s.max(1e-9);
        let t = g.mib_per_s / h.mib_per_s.max(1e-9);
        println!(
            "    gateway ≥ HAProxy: {c:.2}× new connections/s, {t:.2}× throughput — {}",
            if c >= 0.95 && t >= 0.95 {
                "met (within 5% noise or better)"
            } else {
                "NOT met"
            }
        );
    }
}

fn start_haproxy(
    dir: &Path,
    sni: &str,
    backend: SocketAddr,
) -> anyhow::Result<(SocketAddr, Server)> {
    let bin = which("haproxy").context("haproxy is not installed (apt-get install haproxy)")?;
    let addr = free_addr()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 8000\n  log stderr format raw local0 err\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend sni\n  bind {addr}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req_ssl_hello_type 1 }}\n  use_backend tlsb if {{ req.ssl_sni -i {sni} }}\nbackend tlsb\n  server b1 {backend}\n"
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log"))?);
    Ok((addr, Server::spawn(cmd, libc::SIGTERM, "haproxy")?))
}

fn start_nginx(dir: &Path, sni: &str, backend: SocketAddr) -> anyhow::Result<(SocketAddr, Server)> {
    let bin = which("nginx")
        .context("nginx is not installed (apt-get install nginx libnginx-mod-stream)")?;
    let module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
        .into_iter()
        .find(|m| Path::new(m).exists())
        .context("the nginx stream module is missing (apt-get install libnginx-mod-stream)")?;
    let addr = free_addr()?;
    let cfg = dir.join("nginx.conf");
    std::fs::write(
        &cfg,
        format!(
            "load_module {module};\nworker_processes auto;\ndaemon off;\npid {pid};\nerror_log {log} warn;\nevents {{ worker_connections 8000; }}\nstream {{\n  map $ssl_preread_server_name $tlsb {{ {sni} {backend}; default 127.0.0.1:1; }}\n  server {{ listen {addr}; ssl_preread on; proxy_pass $tlsb; }}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            log = dir.join("nginx.log").display(),
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&cfg)
        .arg("-e")
        .arg(dir.join("nginx.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok((addr, Server::spawn(cmd, libc::SIGQUIT, "nginx")?))
}

/// A TLS server for the SNI name and a client that trusts it (its own throwaway CA).
pub(super) struct TlsPair {
    pub(super) server: Arc<rustls::ServerConfig>,
    pub(super) client: Arc<rustls::ClientConfig>,
}

impl TlsPair {
    pub(super) fn new(sni: &str) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let provider = fedmesh_trust::tls::crypto_provider();
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec![sni.to_string()])?.signed_by(&key, &issuer)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone())?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The backend: `h` → one byte back, then close; `b` → a stream of data until the client goes.
pub(super) async fn tls_backend(l: TcpListener, cfg: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    loop {
        let Ok((s, _)) = l.accept().await else { return };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let Ok(mut t) = acceptor.accept(s).await else {
                return;
            };
            let mut b = [0u8; 1];
            if t.read_exact(&mut b).await.is_err() {
                return;
            }
            if b[0] == b'h' {
                let _ = t.write_all(b"k").await;
                let _ = t.shutdown().await;
            } else {
                let chunk = vec![0u8; 64 * 1024];
                while t.write_all(&chunk).await.is_ok() {}
            }
        });
    }
}

/// A new connection through `addr`: TCP, TLS handshake with the backend, one byte each way.
async fn tls_exchange(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    sni: &str,
    op: u8,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_string())?;
    let mut t = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, s),
    )
    .await
    .context("handshake timed out")??;
    t.write_all(&[op]).await?;
    if op == b'h' {
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await?;
    }
    Ok(t)
}

/// New connections per second through `addr` (`concurrency` at a time), and how many failed.
async fn new_connections(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    sni: &str,
    concurrency: usize,
    duration: Duration,
) -> (f64, u64) {
    let (cfg, sni) = (cfg.clone(), sni.to_string());
    closed_loop(concurrency, duration, move || {
        let (cfg, sni) = (cfg.clone(), sni.clone());
        async move { tls_exchange(addr, &cfg, &sni, b'h').await }
    })
    .await
}

/// MiB/s the backend streams through `addr` over `conns` connections; and the bytes moved.
async fn throughput(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    sni: &str,
    conns: usize,
    duration: Duration,
) -> (f64, u64) {
    let total = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (cfg, sni, total) = (cfg.clone(), sni.to_string(), total.clone());
        tasks.spawn(async move {
            let Ok(mut t) = tls_exchange(addr, &cfg, &sni, b'b').await else {
                return;
            };
            let mut buf = vec![0u8; 256 * 1024];
            while Instant::now() < end {
                match tokio::time::timeout(Duration::from_secs(2), t.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        total.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => return,
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let bytes = total.load(Ordering::Relaxed);
    (
        bytes as f64 / (1u64 << 20) as f64 / start.elapsed().as_secs_f64(),
        bytes,
    )
}
