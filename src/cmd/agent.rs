//! `fedmesh agent`: serves the SPIFFE Workload API to the workloads on this node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use fedmesh_trust::TrustDomain;
use fedmesh_trust::bundle::SpiffeBundle;
use fedmesh_trust::ca::TrustDomainCa;
use fedmesh_trust::workload::{self, LocalCaSigner, SvidCache, load_entries};
use tokio_util::sync::CancellationToken;

use super::parse_duration;

#[derive(Args)]
pub struct AgentArgs {
    /// The trust domain's CA directory (`fedmesh ca init`).
    #[arg(long)]
    ca_dir: PathBuf,
    /// Unix socket to serve the Workload API on; workloads find it via SPIFFE_ENDPOINT_SOCKET=unix:PATH.
    #[arg(long, default_value = "/tmp/fedmesh/agent.sock")]
    socket: PathBuf,
    /// Registration entries (YAML). Reloaded when it changes; a bad edit is reported and the
    /// previous entries are kept.
    #[arg(long)]
    entries: PathBuf,
    /// A foreign trust domain's bundle to trust, as TD=FILE (JWK Set JSON or PEM). Repeatable.
    #[arg(long = "federated-bundle", value_name = "TD=FILE")]
    federated_bundles: Vec<String>,
    /// How often to check the CA's rotation schedule.
    #[arg(long, value_parser = parse_duration, default_value = "1m")]
    rotation_check: Duration,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let ca = Arc::new(TrustDomainCa::open(&args.ca_dir)?);
    let td = ca.trust_domain();
    let federated = args
        .federated_bundles
        .iter()
        .map(|spec| load_federated(spec, &td))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let entries = load_entries(&args.entries, &td)?;
    let listener = workload::bind_socket(&args.socket)?;

    let shutdown = CancellationToken::new();
    let signer = LocalCaSigner::new(ca.clone(), federated);
    let cache = SvidCache::new(signer, entries);
    tokio::spawn(cache.clone().run(shutdown.clone().cancelled_owned()));
    tokio::spawn(
        ca.clone()
            .run_rotation(args.rotation_check, shutdown.clone().cancelled_owned()),
    );
    tokio::spawn(watch_entries(
        args.entries.clone(),
        td.clone(),
        cache.clone(),
        shutdown.clone(),
    ));
    tracing::info!(trust_domain = %td, socket = %args.socket.display(), entries = cache.entries().len(), "Workload API listening");

    let signal = shutdown.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        signal.cancel();
    });
    workload::serve(
        listener,
        args.socket.clone(),
        cache,
        shutdown.clone().cancelled_owned(),
    )
    .await
    .context("Workload API server failed")?;
    shutdown.cancel();
    Ok(())
}

fn load_federated(spec: &str, own: &TrustDomain) -> anyhow::Result<SpiffeBundle> {
    let (td, file) = spec
        .split_once('=')
        .with_context(|| format!("--federated-bundle {spec:?}: expected TD=FILE"))?;
    let td = TrustDomain::new(td).with_context(|| format!("--federated-bundle {spec:?}"))?;
    if &td == own {
        anyhow::bail!("--federated-bundle {spec:?}: that is this agent's own trust domain");
    }
    let data = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    Ok(SpiffeBundle::from_json_or_pem(td, &data)?)
}

/// Reloads the entries file when its modification time changes; keeps the last good entries.
async fn watch_entries(
    path: PathBuf,
    td: TrustDomain,
    cache: Arc<SvidCache>,
    shutdown: CancellationToken,
) {
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last: Option<SystemTime> = mtime(&path);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let now = mtime(&path);
        if now == last {
            continue;
        }
        last = now;
        match load_entries(&path, &td) {
            Ok(entries) => {
                tracing::info!(count = entries.len(), "reloaded registration entries");
                cache.set_entries(entries);
            }
            Err(e) => {
                tracing::error!(error = %e, "entries file is invalid; keeping the previous entries")
            }
        }
    }
}
