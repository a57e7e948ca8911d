//! `fedmesh agent`: serves the SPIFFE Workload API to the workloads on this node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use fedmesh_trust::TrustDomain;
use fedmesh_trust::bundle::SpiffeBundle;
use fedmesh_trust::ca::TrustDomainCa;
use fedmesh_trust::workload::{
    self, ControlPlaneSigner, LocalCaSigner, SvidCache, SvidSigner, load_entries,
};
use tokio_util::sync::CancellationToken;

use super::parse_duration;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("signer").required(true).args(["ca_dir", "control_plane"])))]
pub struct AgentArgs {
    /// Sign SVIDs with a local CA directory (`fedmesh ca init`): single hosts and tests.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Get SVIDs from the cluster's control plane (HOST:PORT): the production mode.
    #[arg(long, requires = "node")]
    control_plane: Option<String>,
    /// This node's name (with --control-plane).
    #[arg(long)]
    node: Option<String>,
    /// The control plane's agent bootstrap token (first start only; it writes
    /// <data-dir>/agent-token).
    #[arg(long, env = "FEDMESH_AGENT_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the agent bootstrap token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Where the agent keeps its own identity and the last bundles (with --control-plane).
    #[arg(long, default_value = "/var/lib/fedmesh/agent")]
    data_dir: PathBuf,
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
    let shutdown = CancellationToken::new();
    let signer: Arc<dyn SvidSigner> = match (&args.ca_dir, &args.control_plane) {
        (Some(ca_dir), _) => {
            let ca = Arc::new(TrustDomainCa::open(ca_dir)?);
            let td = ca.trust_domain();
            let federated = args
                .federated_bundles
                .iter()
                .map(|spec| load_federated(spec, &td))
                .collect::<anyhow::Result<Vec<_>>>()?;
            tokio::spawn(
                ca.clone()
                    .run_rotation(args.rotation_check, shutdown.clone().cancelled_owned()),
            );
            LocalCaSigner::new(ca, federated)
        }
        (None, Some(addr)) => {
            let token = match (&args.join_token, &args.join_token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                (None, None) => None,
            };
            let node = args.node.clone().unwrap_or_default();
            ControlPlaneSigner::start(
                addr,
                &args.data_dir,
                &node,
                token.as_deref(),
                shutdown.clone(),
            )
            .await?
        }
        (None, None) => anyhow::bail!("pass --ca-dir or --control-plane"),
    };
    let td = signer.trust_domain();
    let entries = load_entries(&args.entries, &td)?;
    let listener = workload::bind_socket(&args.socket)?;
    let cache = SvidCache::new(signer, entries);
    tokio::spawn(cache.clone().run(shutdown.clone().cancelled_owned()));
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
