//! `fedmesh control-plane`: one cluster's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fedmesh_api::{ClusterName, TrustDomain};
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, SourceSpec};
use tokio_util::sync::CancellationToken;

use super::parse_duration;

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// This cluster's name in the clusterset (a DNS label).
    #[arg(long)]
    cluster: String,
    /// This cluster's SPIFFE trust domain, e.g. east.example.
    #[arg(long)]
    trust_domain: String,
    /// The cluster's region (topology.kubernetes.io/region), for locality-aware routing.
    #[arg(long, default_value = "")]
    region: String,
    /// State, the trust domain's CA, hub credentials, status files.
    #[arg(long, default_value = "/var/lib/fedmesh/control-plane")]
    data_dir: PathBuf,
    /// Where Services/EndpointSlices/ServiceExports come from: dir:PATH or kubernetes.
    #[arg(long)]
    source: SourceSpec,
    /// The hub's federation address(es), HOST:PORT[,HOST:PORT]. Omit to run without a hub.
    #[arg(long)]
    hub: Option<String>,
    /// One-time join token (first start only): `fedmesh hub token create --cluster NAME
    /// --trust-domain TD`. Prefer $FEDMESH_JOIN_TOKEN or --join-token-file: a command line is
    /// visible to every user of the machine (`ps`).
    #[arg(
        long,
        env = "FEDMESH_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    join_token: Option<String>,
    /// A file (mode 0600) holding the one-time join token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// This cluster's east-west gateway address(es), HOST:PORT, published to other clusters.
    #[arg(long = "gateway")]
    gateways: Vec<String>,
    /// gRPC for node agents and data-plane components.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// DNS for *.svc.clusterset.local (UDP and TCP).
    #[arg(long, default_value = "127.0.0.1:15053")]
    dns_listen: SocketAddr,
    /// Clusterset IPs are allocated from this range.
    #[arg(long, default_value = "240.240.0.0/16")]
    clusterset_cidr: String,
    /// Default workload SVID lifetime (when the CA is created).
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    svid_ttl: Duration,
}

pub async fn run(a: ControlPlaneArgs) -> anyhow::Result<()> {
    let cluster = ClusterName::new(&a.cluster).context("--cluster")?;
    let td = TrustDomain::new(&a.trust_domain).context("--trust-domain")?;
    let mut config = ControlPlaneConfig::new(cluster, td, a.data_dir.clone(), a.source);
    config.region = a.region;
    config.hub = a.hub;
    config.join_token = match (a.join_token, &a.join_token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(super::read_token(f)?),
        (None, None) => None,
    };
    for g in &a.gateways {
        fedmesh_api::names::check_gateway_address(g)
            .map_err(|e| anyhow::anyhow!("--gateway {g:?}: {e}"))?;
    }
    config.gateways = a.gateways;
    config.listen = Some(a.listen);
    config.dns_listen = Some(a.dns_listen);
    config.clusterset_cidr = a.clusterset_cidr;
    config.svid_ttl = a.svid_ttl;
    let shutdown = CancellationToken::new();
    let cp = ControlPlane::start(config, shutdown.clone()).await?;
    eprintln!(
        "fedmesh control plane for cluster {}: agents and data plane on {}, DNS on {}; status in {}",
        cp.config.cluster,
        cp.listen_addr.map(|a| a.to_string()).unwrap_or_default(),
        cp.dns_addr.map(|a| a.to_string()).unwrap_or_default(),
        cp.status_dir().display()
    );
    eprintln!(
        "  agents join with: fedmesh agent --control-plane {} --join-token-file {} --node NAME ...",
        cp.listen_addr.map(|a| a.to_string()).unwrap_or_default(),
        a.data_dir.join("agent-token").display()
    );
    super::shutdown_signal().await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
