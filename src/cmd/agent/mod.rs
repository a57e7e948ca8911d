//! `fedmesh agent`: serves the SPIFFE Workload API to the workloads on this node.

mod pods;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use fedmesh_trust::TrustDomain;
use fedmesh_trust::bundle::SpiffeBundle;
use fedmesh_trust::ca::TrustDomainCa;
use fedmesh_trust::workload::k8s::expand_entries;
use fedmesh_trust::workload::{
    self, ControlPlaneSigner, EntryFile, JoinCredential, K8sAttestor, LocalCaSigner, PodIndex,
    SvidCache, SvidSigner, load_entry_file,
};
use tokio::sync::watch;
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
    /// A one-time join token made for this node (first start only): `fedmesh control-plane token
    /// create --node NAME`. Prefer --join-token-file: a command line is visible in `ps`.
    #[arg(long, env = "FEDMESH_AGENT_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file (mode 0600) holding this node's join token.
    #[arg(long, conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// Kubernetes: join with this pod's projected service-account token (audience `fedmesh`)
    /// instead of a join token; the control plane checks it with TokenReview and the pod's
    /// node. Needs --control-plane-bundle and --trust-domain.
    #[arg(long, conflicts_with_all = ["join_token", "join_token_file"], requires_all = ["control_plane_bundle", "trust_domain"])]
    service_account_token_file: Option<PathBuf>,
    /// The trust bundle (SPIFFE JWK Set JSON) to verify the control plane with when joining by
    /// service-account token: the key `bundle.spiffe` of the ConfigMap fedmesh-ca-bundle, which
    /// the control plane keeps current.
    #[arg(long, requires = "service_account_token_file")]
    control_plane_bundle: Option<PathBuf>,
    /// The trust domain of this cluster (with --service-account-token-file).
    #[arg(long, requires = "service_account_token_file")]
    trust_domain: Option<String>,
    /// Where the agent keeps its own identity and the last bundles (with --control-plane).
    #[arg(long, default_value = "/var/lib/fedmesh/agent")]
    data_dir: PathBuf,
    /// Unix socket to serve the Workload API on; workloads find it via SPIFFE_ENDPOINT_SOCKET=unix:PATH.
    #[arg(long, default_value = "/run/fedmesh/agent.sock")]
    socket: PathBuf,
    /// Registration entries (YAML). Reloaded when it changes; a bad edit is reported and the
    /// previous entries are kept.
    #[arg(long)]
    entries: PathBuf,
    /// Attest Kubernetes pods on this node (NAME, e.g. from the downward API's spec.nodeName):
    /// the agent watches the pods bound to it through the API server (in-cluster config or
    /// KUBECONFIG; needs list/watch on pods) and gives callers in a pod k8s:* selectors, which
    /// also expand {ns}/{sa} entry templates. Needs the host's PID namespace (hostPID).
    #[arg(long, value_name = "NAME")]
    k8s_node: Option<String>,
    /// How long a caller in a pod the agent does not know yet waits for the pod watch to catch
    /// up before it is refused.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    k8s_attest_wait: Duration,
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
            let credential = match (
                &args.join_token,
                &args.join_token_file,
                &args.service_account_token_file,
            ) {
                (Some(t), _, _) => Some(JoinCredential::Token(t.clone())),
                (None, Some(f), _) => Some(JoinCredential::Token(super::read_token(f)?)),
                (None, None, Some(f)) => Some(JoinCredential::ServiceAccount {
                    token_file: f.clone(),
                    bundle_file: args.control_plane_bundle.clone().unwrap_or_default(),
                    trust_domain: TrustDomain::new(
                        args.trust_domain.as_deref().unwrap_or_default(),
                    )
                    .context("--trust-domain")?,
                }),
                (None, None, None) => None,
            };
            let node = args.node.clone().unwrap_or_default();
            ControlPlaneSigner::start(
                addr,
                &args.data_dir,
                &node,
                credential.as_ref(),
                shutdown.clone(),
            )
            .await?
        }
        (None, None) => anyhow::bail!("pass --ca-dir or --control-plane"),
    };
    let td = signer.trust_domain();
    let file = load_entry_file(&args.entries, &td)?;
    if args.k8s_node.is_none()
        && let Some(t) = file.templates.first()
    {
        anyhow::bail!(
            "{}: {} is a template ({{ns}}/{{sa}}), which needs the Kubernetes attestor: pass --k8s-node",
            args.entries.display(),
            t.spiffe_id
        );
    }
    let pods = PodIndex::new();
    let k8s = match &args.k8s_node {
        Some(node) => {
            let client = kube::Client::try_default().await.context(
                "--k8s-node: no Kubernetes API access (in-cluster service account or KUBECONFIG)",
            )?;
            tokio::spawn(pods::watch(
                client,
                node.clone(),
                pods.clone(),
                shutdown.clone(),
            ));
            Some(Arc::new(K8sAttestor::new(
                pods.clone(),
                args.k8s_attest_wait,
            )))
        }
        None => None,
    };
    let listener = workload::bind_socket(&args.socket)?;
    let cache = SvidCache::new(signer, expand_entries(&file, &pods.snapshot()).0);
    tokio::spawn(cache.clone().run(shutdown.clone().cancelled_owned()));
    let (file_tx, file_rx) = watch::channel(Arc::new(file));
    tokio::spawn(watch_entries(
        args.entries.clone(),
        td.clone(),
        file_tx,
        args.k8s_node.is_some(),
        shutdown.clone(),
    ));
    tokio::spawn(keep_entries(file_rx, pods, cache.clone(), shutdown.clone()));
    tracing::info!(trust_domain = %td, socket = %args.socket.display(), entries = cache.entries().len(), "Workload API listening");

    let signal = shutdown.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        signal.cancel();
    });
    workload::serve_with_attestor(
        listener,
        args.socket.clone(),
        cache,
        k8s,
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

/// Gives the cache the file's entries with its templates expanded for the pods on the node,
/// whenever either changes.
async fn keep_entries(
    mut file: watch::Receiver<Arc<EntryFile>>,
    pods: PodIndex,
    cache: Arc<SvidCache>,
    shutdown: CancellationToken,
) {
    let mut pod_changes = pods.subscribe();
    let mut last = cache
        .entries()
        .iter()
        .map(|e| (**e).clone())
        .collect::<Vec<_>>();
    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = file.changed() => if r.is_err() { return },
            r = pod_changes.changed() => if r.is_err() { return },
        }
        let (entries, problems) =
            expand_entries(&file.borrow_and_update(), &pod_changes.borrow_and_update());
        for p in problems.difference(&reported) {
            tracing::warn!(problem = %p, "a service account gets no identity from a template");
        }
        reported = problems;
        if entries != last {
            tracing::info!(count = entries.len(), "registration entries changed");
            last = entries.clone();
            cache.set_entries(entries);
        }
    }
}

/// Reloads the entries file when its modification time changes; keeps the last good entries.
/// Templates are refused without the Kubernetes attestor, as at start.
async fn watch_entries(
    path: PathBuf,
    td: TrustDomain,
    file: watch::Sender<Arc<EntryFile>>,
    templates_allowed: bool,
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
        match load_entry_file(&path, &td) {
            Ok(f) if !templates_allowed && !f.templates.is_empty() => {
                tracing::error!(template = %f.templates[0].spiffe_id, "entries file has a template ({{ns}}/{{sa}}) but the agent runs without --k8s-node; keeping the previous entries")
            }
            Ok(f) => {
                tracing::info!(
                    entries = f.entries.len(),
                    templates = f.templates.len(),
                    "reloaded registration entries"
                );
                file.send_replace(Arc::new(f));
            }
            Err(e) => {
                tracing::error!(error = %e, "entries file is invalid; keeping the previous entries")
            }
        }
    }
}
