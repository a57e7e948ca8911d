//! What a user would pick instead of our sidecars: an nginx pair and an HAProxy pair set up as
//! mTLS sidecars with our SVIDs, beside our sidecar pair on the same app in the same run. The
//! client side takes the app's plain HTTP/1.1 and originates mTLS with the client's SVID; the
//! server side terminates it, requiring a client certificate from the trust domain's bundle, and
//! forwards to the app; both keep connections alive (pools on both sides), one worker each (our
//! sidecar's default is one thread).
//!
//! Neither checks a SPIFFE ID (they verify the chain only) — less work than our sidecars do. nginx
//! checks a DNS name whenever it verifies a server certificate and SVIDs carry none, so its
//! client side cannot verify the server at all (`proxy_ssl_verify off`). HTTP/1.1 only: nginx
//! speaks HTTP/1.1 to its upstreams.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use bytes::Bytes;

use super::dataplane::{LatencyRow, Params, Path3, measure_path};
use super::load::{FixedRate, Proto, free_addr, memory, wait_until, which};
use super::thirdparty::{Server, all_pids};

/// A workload's SVID as files: `svid.pem`, `svid.key` and its trust domain's bundle.
pub(super) struct SvidFiles {
    dir: PathBuf,
    bundle: PathBuf,
}

impl SvidFiles {
    /// Fetches the SVID of whoever asks `endpoint` (a Workload API) into `dir`.
    pub(super) async fn fetch(endpoint: &str, dir: &Path) -> anyhow::Result<Self> {
        let source = spiffe::X509Source::builder()
            .endpoint(endpoint)
            .build()
            .await
            .with_context(|| format!("no SVID from {endpoint}"))?;
        let svid = source.svid()?;
        let bundles = source.bundle_set()?;
        crate::cmd::workload::write_pem_files(dir, &svid, &bundles)?;
        let td = svid.spiffe_id().trust_domain().to_string();
        source.shutdown().await;
        Ok(Self {
            dir: dir.to_path_buf(),
            bundle: dir.join(format!("bundle.{td}.pem")),
        })
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("svid.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("svid.key")
    }

    /// Chain and key in one file, as HAProxy's `crt` wants them (0600).
    fn combined(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("svid-and-key.pem");
        let mut pem = std::fs::read(self.cert())?;
        pem.extend(std::fs::read(self.key())?);
        fedmesh_trust::files::write_private(&path, &pem)?;
        Ok(path)
    }
}

/// A started pair: where the app sends its requests, and the servers.
struct Pair {
    name: &'static str,
    listen: SocketAddr,
    servers: Vec<Server>,
}

fn nginx_pair(
    dir: &Path,
    client: &SvidFiles,
    server: &SvidFiles,
    app: SocketAddr,
) -> anyhow::Result<Pair> {
    let bin = which("nginx").context("nginx is not installed (apt-get install nginx)")?;
    let (listen, peer) = (free_addr()?, free_addr()?);
    let start = |side: &str, http: String| -> anyhow::Result<Server> {
        let prefix = dir.join(format!("nginx-{side}"));
        std::fs::create_dir_all(&prefix)?;
        let cfg = prefix.join("nginx.conf");
        std::fs::write(
            &cfg,
            format!(
                "worker_processes 1;\ndaemon off;\npid {pid};\nerror_log {log} warn;\nevents {{ worker_connections 8000; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n{http}}}\n",
                pid = prefix.join("nginx.pid").display(),
                log = prefix.join("error.log").display(),
            ),
        )?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&cfg)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Server::spawn(cmd, libc::SIGQUIT, "nginx")
    };
    let forward = "proxy_http_version 1.1; proxy_set_header Connection \"\";";
    let server_side = start(
        "server",
        format!(
            "  upstream app {{ server {app}; keepalive 64; keepalive_requests 1000000; }}\n  server {{\n    listen {peer} ssl;\n    ssl_protocols TLSv1.3;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_client_certificate {bundle};\n    ssl_verify_client on;\n    location / {{ proxy_pass http://app; {forward} }}\n  }}\n",
            cert = server.cert().display(),
            key = server.key().display(),
            bundle = server.bundle.display(),
        ),
    )?;
    let client_side = start(
        "client",
        format!(
            "  upstream peer {{ server {peer}; keepalive 64; keepalive_requests 1000000; }}\n  server {{\n    listen {listen};\n    location / {{\n      proxy_pass https://peer; {forward}\n      proxy_ssl_protocols TLSv1.3;\n      proxy_ssl_session_reuse on;\n      proxy_ssl_certificate {cert};\n      proxy_ssl_certificate_key {key};\n      proxy_ssl_verify off;\n    }}\n  }}\n",
            cert = client.cert().display(),
            key = client.key().display(),
        ),
    )?;
    Ok(Pair {
        name: "nginx mTLS pair",
        listen,
        servers: vec![client_side, server_side],
    })
}

fn haproxy_pair(
    dir: &Path,
    client: &SvidFiles,
    server: &SvidFiles,
    app: SocketAddr,
) -> anyhow::Result<Pair> {
    let bin = which("haproxy").context("haproxy is not installed (apt-get install haproxy)")?;
    let (listen, peer) = (free_addr()?, free_addr()?);
    let start = |side: &str, proxies: String| -> anyhow::Result<Server> {
        let cfg = dir.join(format!("haproxy-{side}.cfg"));
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread 1\n  maxconn 8000\n  log stderr format raw local0 err\ndefaults\n  mode http\n  log global\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n{proxies}"
            ),
        )?;
        let mut cmd = Command::new(&bin);
        cmd.args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("haproxy-{side}.log")),
            )?);
        Server::spawn(cmd, libc::SIGTERM, "haproxy")
    };
    let server_side = start(
        "server",
        format!(
            "frontend mtls\n  bind {peer} ssl crt {crt} ca-file {bundle} verify required ssl-min-ver TLSv1.3\n  default_backend app\nbackend app\n  server a1 {app}\n",
            crt = server.combined()?.display(),
            bundle = server.bundle.display(),
        ),
    )?;
    let client_side = start(
        "client",
        format!(
            "frontend app\n  bind {listen}\n  default_backend peer\nbackend peer\n  server p1 {peer} ssl crt {crt} ca-file {bundle} verify required ssl-min-ver TLSv1.3\n",
            crt = client.combined()?.display(),
            bundle = client.bundle.display(),
        ),
    )?;
    Ok(Pair {
        name: "HAProxy mTLS pair",
        listen,
        servers: vec![client_side, server_side],
    })
}

/// One pair's figures beside ours.
pub(super) struct PairRow {
    name: &'static str,
    /// Ours over theirs: CPU per request, added p99 (None: a run too noisy to say).
    cpu_ratio: f64,
    p99_ratio: Option<f64>,
}

/// Measures the nginx and HAProxy pairs (whichever are installed) on `app` beside `ours` (our
/// sidecar pair's HTTP/1.1 row of this run); prints their rows and ours/theirs ratios.
pub(super) async fn compare(
    dir: &Path,
    (client, server): (&SvidFiles, &SvidFiles),
    app: SocketAddr,
    body: &Bytes,
    p: &Params,
    (direct, ours): (&FixedRate, &LatencyRow),
) -> anyhow::Result<Vec<PairRow>> {
    println!(
        "\n  our sidecar pair beside nginx and HAProxy as mTLS sidecar pairs with the same SVIDs (one worker each,\n  keep-alive pools on both sides; they check the chain, not the SPIFFE ID), HTTP/1.1, same app:"
    );
    let mut rows = Vec::new();
    for started in [
        nginx_pair(dir, client, server, app),
        haproxy_pair(dir, client, server, app),
    ] {
        let pair = match started {
            Ok(pair) => pair,
            Err(e) => {
                println!("    skipped: {e:#}");
                continue;
            }
        };
        let url = format!("http://{}/", pair.listen);
        let answered = wait_until(&format!("the {} to answer", pair.name), || {
            let uri: http::Uri = url.parse().expect("a valid URI");
            let client = super::load::http_client(Proto::H1);
            let body = body.clone();
            async move {
                super::load::one(&client, &uri, &body, std::time::Instant::now())
                    .await
                    .is_ok()
            }
        })
        .await;
        if let Err(e) = answered {
            println!(
                "    {} skipped: {e:#} (logs in {})",
                pair.name,
                dir.display()
            );
            continue;
        }
        let roots: Vec<u32> = pair.servers.iter().map(Server::pid).collect();
        let path = Path3 {
            name: pair.name,
            url,
            pids: all_pids(&roots),
        };
        let (row, _) = measure_path(&path, Proto::H1, body, p, Some(direct)).await?;
        row.print();
        let rss: u64 = path.pids.iter().map(|pid| memory(*pid).0).sum();
        let cpu_ratio = ours.cpu_per_1k.unwrap_or(f64::NAN) / row.cpu_per_1k.unwrap_or(f64::NAN);
        // An added p99 at or below zero means the direct path's tail was hit by something else.
        let p99_ratio = match (ours.added.map(|a| a.1), row.added.map(|a| a.1)) {
            (Some(o), Some(t)) if o > 0.0 && t > 0.0 => Some(o / t),
            _ => None,
        };
        println!(
            "      ours / {}: CPU per request {cpu_ratio:.2}×, added p99 {}, max req/s {:.2}×; its {} processes' RSS {:.1} MiB",
            pair.name,
            p99_ratio.map_or(
                "inconclusive (a negative added p99: noise)".into(),
                |r| format!("{r:.2}×")
            ),
            ours.throughput / row.throughput.max(1.0),
            path.pids.len(),
            rss as f64 / 1024.0
        );
        rows.push(PairRow {
            name: pair.name,
            cpu_ratio,
            p99_ratio,
        });
    }
    Ok(rows)
}

/// The goal: our pair at most 0.8× of each of theirs in CPU per request and added p99.
pub(super) fn print_goals(rows: &[PairRow]) {
    for r in rows {
        let verdict = match r.p99_ratio {
            _ if r.cpu_ratio > 0.8 => "NOT met",
            Some(p) if p <= 0.8 => "met",
            Some(_) => "NOT met",
            None => "inconclusive: re-run",
        };
        println!(
            "    our sidecar pair ≤ 0.8× the {} (CPU per request, added p99): {:.2}×, {} — {verdict}",
            r.name,
            r.cpu_ratio,
            r.p99_ratio.map_or("n/a".into(), |p| format!("{p:.2}×")),
        );
    }
}
