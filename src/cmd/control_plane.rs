//! `fedmesh control-plane`: one cluster's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedmesh_api::{ClusterName, TrustDomain};
use fedmesh_federation::control_plane::admin::AdminSocketClient;
use fedmesh_federation::control_plane::{ControlPlane, ControlPlaneConfig, SourceSpec};
use tokio_util::sync::CancellationToken;

use super::parse_duration;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControlPlaneCmd {
    #[command(subcommand)]
    command: Option<AdminCommand>,
    #[command(flatten)]
    run: ControlPlaneArgs,
}

/// Managing a running control plane through its admin socket (`<data-dir>/admin.sock`, 0600:
/// run these as the control plane's user).
#[derive(Subcommand)]
enum AdminCommand {
    /// One-time join tokens for node agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The workload identities registered for each node (plain hosts; on Kubernetes the pods on
    /// a node decide).
    #[command(subcommand)]
    Entry(EntryCommand),
    /// The nodes whose agents joined.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The sidecars and gateways this control plane serves now, and whether each holds its
    /// configuration.
    ProxyStatus {
        #[arg(short = 'o', long, value_enum, default_value_t = super::status::Output::Table)]
        output: super::status::Output,
        #[command(flatten)]
        socket: Socket,
    },
    /// The cluster's CA, rotated while it serves: prepare, then activate once every cluster
    /// trusts the prepared authority, then prune once the retired one's SVIDs have expired.
    #[command(subcommand)]
    Ca(CaAdminCommand),
}

#[derive(Subcommand)]
enum CaAdminCommand {
    /// The CA's authorities: prepared, active, retired (and when a retired one leaves the bundle).
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = super::status::Output::Table)]
        output: super::status::Output,
        #[command(flatten)]
        socket: Socket,
    },
    /// One rotation step; the bundle the control plane publishes (to the hub, so to every
    /// cluster, and to its agents) follows at once.
    Rotate {
        #[arg(long, value_enum)]
        step: super::ca::RotateStep,
        #[command(flatten)]
        socket: Socket,
    },
}

#[derive(Args)]
struct Socket {
    /// The control plane's --data-dir (its admin socket is admin.sock inside).
    #[arg(long, default_value = "/var/lib/fedmesh/control-plane")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token that lets one agent join once as NODE (printed on stdout, or written to
    /// --out with mode 0600).
    Create {
        #[arg(long)]
        node: String,
        /// How long the token may wait for its agent.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: Duration,
        /// Write the token to this file (0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        socket: Socket,
    },
}

#[derive(Args)]
struct EntryArgs {
    #[arg(long)]
    node: String,
    #[arg(long)]
    spiffe_id: String,
    #[command(flatten)]
    socket: Socket,
}

#[derive(Subcommand)]
enum EntryCommand {
    /// Let NODE's agent obtain SVIDs for SPIFFE_ID.
    Create(EntryArgs),
    /// Stop issuing SPIFFE_ID to NODE's agent (SVIDs already issued expire and are not renewed).
    Delete(EntryArgs),
    /// List the entries (of one node, or all).
    List {
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        socket: Socket,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// The nodes: their agent's registration and the identities they may hold.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t = super::status::Output::Table)]
        output: super::status::Output,
        #[command(flatten)]
        socket: Socket,
    },
    /// End a node's registration: its agent can no longer renew its identity or obtain SVIDs.
    Remove {
        node: String,
        #[command(flatten)]
        socket: Socket,
    },
}

#[derive(Args)]
pub struct ControlPlaneArgs {
    /// This cluster's name in the clusterset (a DNS label). Required.
    #[arg(long)]
    cluster: Option<String>,
    /// This cluster's SPIFFE trust domain, e.g. east.example. Required.
    #[arg(long)]
    trust_domain: Option<String>,
    /// The cluster's region (topology.kubernetes.io/region), for locality-aware routing.
    #[arg(long, default_value = "")]
    region: String,
    /// State, the trust domain's CA, hub credentials, status files.
    #[arg(long, default_value = "/var/lib/fedmesh/control-plane")]
    data_dir: PathBuf,
    /// Where Services/EndpointSlices/ServiceExports come from: dir:PATH or kubernetes. Required.
    #[arg(long)]
    source: Option<SourceSpec>,
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
    /// Longest SVID lifetime a workload may ask for (when the CA is created; default: 24h, or
    /// --svid-ttl if longer). A retired CA authority stays in the bundle this long.
    #[arg(long, value_parser = parse_duration)]
    max_svid_ttl: Option<Duration>,
    /// The namespace of fedmesh's own components (gateways, agents; where the trust bundle for
    /// agents is published on Kubernetes).
    #[arg(long, default_value = "fedmesh-system")]
    system_namespace: String,
    /// Kubernetes: the service account (in --system-namespace) whose pods' projected tokens may
    /// join as node agents.
    #[arg(long, default_value = "fedmesh-agent")]
    agent_service_account: String,
    /// How often the JWK Sets of RequestAuthentications (`jwksUri`) are fetched again; a new
    /// one is fetched at once.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    jwks_refresh: Duration,
    /// Serve this trust domain's bundle at a SPIFFE bundle endpoint on ADDR (e.g.
    /// 0.0.0.0:8443), for trust domains outside the clusterset (a SPIRE server) to federate with.
    /// Profile https_spiffe (the control plane's SVID) unless --bundle-endpoint-cert is given.
    #[arg(long, value_name = "ADDR")]
    bundle_endpoint: Option<SocketAddr>,
    /// https_web profile: the endpoint's certificate chain (PEM), e.g. from your Web PKI.
    #[arg(long, requires_all = ["bundle_endpoint", "bundle_endpoint_key"], value_name = "FILE")]
    bundle_endpoint_cert: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz over HTTP on ADDR (e.g. 0.0.0.0:15014), for
    /// Prometheus and the kubelet's probes. Off unless set (the admin socket serves the same
    /// metrics: curl --unix-socket <data-dir>/admin.sock http://cp/metrics).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// https_web profile: the certificate's private key (PEM, a 0600 file).
    #[arg(long, requires = "bundle_endpoint_cert", value_name = "FILE")]
    bundle_endpoint_key: Option<PathBuf>,
    /// Serve the sidecar injection webhook (HTTPS) on ADDR, e.g. 0.0.0.0:15017: the API server
    /// sends it the Pods created in namespaces labelled fedmesh.io/inject=enabled. Its
    /// certificate comes from this cluster's CA (the webhook configuration's caBundle is `fedmesh
    /// ca bundle --format pem`).
    #[arg(long, value_name = "ADDR")]
    webhook_listen: Option<SocketAddr>,
    /// A name (or IP address) the API server calls the webhook by; repeatable.
    #[arg(
        long = "webhook-host",
        value_name = "HOST",
        default_values_t = ["fedmesh-control-plane.fedmesh-system.svc".to_string()]
    )]
    webhook_hosts: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle this control plane keeps set to its CA
    /// (Kubernetes source).
    #[arg(long, default_value = "fedmesh-sidecar-injector")]
    webhook_configuration: String,
    /// The image the webhook injects (the sidecar and its iptables init container).
    #[arg(long, env = "FEDMESH_IMAGE", default_value = "fedmesh:dev")]
    inject_image: String,
    /// The control plane's address as injected sidecars reach it.
    #[arg(
        long,
        default_value = "fedmesh-control-plane.fedmesh-system.svc.cluster.local:15012"
    )]
    inject_control_plane: String,
}

pub async fn run(cmd: ControlPlaneCmd) -> anyhow::Result<()> {
    match cmd.command {
        Some(c) => admin(c).await,
        None => serve(cmd.run).await,
    }
}

async fn admin(c: AdminCommand) -> anyhow::Result<()> {
    let client = |s: &Socket| AdminSocketClient::new(&s.data_dir);
    let fail = |e: String| anyhow::anyhow!(e);
    match c {
        AdminCommand::Token(TokenCommand::Create {
            node,
            ttl,
            out,
            socket,
        }) => {
            let t = client(&socket)
                .create_token(&node, ttl)
                .await
                .map_err(fail)?;
            let until = fedmesh_trust::svid::rfc3339(fedmesh_trust::svid::from_unix_secs(
                t.expires_unix.max(0) as u64,
            ));
            match out {
                Some(path) => {
                    fedmesh_trust::files::write_private(
                        &path,
                        format!("{}\n", t.token).as_bytes(),
                    )?;
                    eprintln!(
                        "wrote a join token for node {} to {} (valid until {until}, usable once)",
                        t.node,
                        path.display()
                    );
                }
                None => {
                    eprintln!(
                        "join token for node {} (valid until {until}, usable once):",
                        t.node
                    );
                    println!("{}", t.token);
                }
            }
        }
        AdminCommand::Entry(EntryCommand::Create(EntryArgs {
            node,
            spiffe_id,
            socket,
        })) => {
            let r = client(&socket)
                .add_entry(&node, &spiffe_id)
                .await
                .map_err(fail)?;
            println!(
                "{} {spiffe_id} for node {node}",
                if r.changed {
                    "registered"
                } else {
                    "already registered:"
                }
            );
        }
        AdminCommand::Entry(EntryCommand::Delete(EntryArgs {
            node,
            spiffe_id,
            socket,
        })) => {
            client(&socket)
                .delete_entry(&node, &spiffe_id)
                .await
                .map_err(fail)?;
            println!("deleted {spiffe_id} from node {node}");
        }
        AdminCommand::Entry(EntryCommand::List { node, socket }) => {
            for n in client(&socket).nodes().await.map_err(fail)? {
                if node.as_ref().is_some_and(|want| want != &n.node) {
                    continue;
                }
                for id in &n.entries {
                    println!("{}\t{id}", n.node);
                }
            }
        }
        AdminCommand::Node(NodeCommand::List { output, socket }) => {
            let nodes = client(&socket).nodes().await.map_err(fail)?;
            if !super::status::print_doc(output, &serde_json::to_value(&nodes)?)? {
                {
                    println!("NODE\tAGENT\tJOINED\tENTRIES\tPOD IDENTITIES");
                    for n in nodes {
                        let (agent, joined) = match &n.agent {
                            Some(a) => (
                                "registered",
                                fedmesh_trust::svid::rfc3339(fedmesh_trust::svid::from_unix_secs(
                                    a.joined_unix.max(0) as u64,
                                )),
                            ),
                            None => ("-", "-".to_string()),
                        };
                        println!(
                            "{}\t{agent}\t{joined}\t{}\t{}",
                            n.node,
                            n.entries.len(),
                            n.pod_identities.len()
                        );
                    }
                }
            }
        }
        AdminCommand::ProxyStatus { output, socket } => {
            let v = client(&socket).proxies().await.map_err(fail)?;
            let rows: Vec<_> = v
                .proxies
                .into_iter()
                .map(|p| {
                    fedmesh_federation::hub::proxies::ProxyStatus::new(
                        &v.cluster,
                        v.config_version,
                        p,
                        0,
                    )
                })
                .collect();
            super::proxy_status::print(&rows, output)?;
        }
        AdminCommand::Ca(CaAdminCommand::Status { output, socket }) => {
            let view = client(&socket).ca().await.map_err(fail)?;
            if !super::status::print_doc(output, &serde_json::to_value(&view)?)? {
                super::ca::print_status(&view);
            }
        }
        AdminCommand::Ca(CaAdminCommand::Rotate { step, socket }) => {
            use fedmesh_federation::control_plane::admin::RotateStep as Step;
            let step = match step {
                super::ca::RotateStep::Prepare => Step::Prepare,
                super::ca::RotateStep::Activate => Step::Activate,
                super::ca::RotateStep::Prune => Step::Prune,
            };
            let view = client(&socket).rotate_ca(step).await.map_err(fail)?;
            super::ca::print_status(&view);
        }
        AdminCommand::Node(NodeCommand::Remove { node, socket }) => {
            client(&socket).remove_node(&node).await.map_err(fail)?;
            println!(
                "removed node {node}: its agent can no longer renew its identity or obtain SVIDs; a new agent joins with a new token"
            );
        }
    }
    Ok(())
}

async fn serve(a: ControlPlaneArgs) -> anyhow::Result<()> {
    let required = |what: &str| {
        anyhow::anyhow!(
            "{what} is required to run a control plane (or name a command: token, entry, node, ca)"
        )
    };
    let cluster = ClusterName::new(a.cluster.as_deref().ok_or_else(|| required("--cluster"))?)
        .context("--cluster")?;
    let td = TrustDomain::new(
        a.trust_domain
            .as_deref()
            .ok_or_else(|| required("--trust-domain"))?,
    )
    .context("--trust-domain")?;
    let source = a.source.ok_or_else(|| required("--source"))?;
    let mut config = ControlPlaneConfig::new(cluster, td, a.data_dir.clone(), source);
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
    config.max_svid_ttl = a.max_svid_ttl;
    config.system_namespace = a.system_namespace;
    config.agent_service_account = a.agent_service_account;
    config.jwks_refresh = a.jwks_refresh;
    config.bundle_endpoint = a.bundle_endpoint;
    config.admin_listen = a.admin_listen;
    config.webhook =
        a.webhook_listen.map(
            |listen| fedmesh_federation::inject::webhook::WebhookConfig {
                listen,
                hosts: a.webhook_hosts.clone(),
                configuration: a.webhook_configuration.clone(),
                inject: fedmesh_federation::inject::InjectOptions {
                    image: a.inject_image.clone(),
                    control_plane: a.inject_control_plane.clone(),
                    ..Default::default()
                },
            },
        );
    config.bundle_endpoint_web = a.bundle_endpoint_cert.zip(a.bundle_endpoint_key);
    let shutdown = CancellationToken::new();
    let cp = ControlPlane::start(config, shutdown.clone()).await?;
    eprintln!(
        "fedmesh control plane for cluster {}: agents and data plane on {}, DNS on {}; status in {}",
        cp.config.cluster,
        cp.listen_addr.map(|a| a.to_string()).unwrap_or_default(),
        cp.dns_addr.map(|a| a.to_string()).unwrap_or_default(),
        cp.status_dir().display()
    );
    if let Some(addr) = cp.bundle_endpoint_addr {
        let profile = if cp.config.bundle_endpoint_web.is_some() {
            "https_web".to_string()
        } else {
            format!(
                "https_spiffe, endpoint SPIFFE ID spiffe://{}{}",
                cp.config.trust_domain,
                fedmesh_trust::workload::remote::CONTROL_PLANE_PATH
            )
        };
        eprintln!(
            "  bundle endpoint of {} on https://{addr} ({profile})",
            cp.config.trust_domain
        );
    }
    eprintln!(
        "  a node's agent joins with a token made for it: fedmesh control-plane token create --node NAME --data-dir {} --out FILE",
        a.data_dir.display()
    );
    eprintln!(
        "  then: fedmesh agent --control-plane {} --node NAME --join-token-file FILE ...",
        cp.listen_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    super::shutdown_signal().await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
