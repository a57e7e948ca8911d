//! `fedmesh`: one binary for every part of the mesh.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "fedmesh",
    version,
    about = "A multi-cluster service mesh with SPIFFE identity",
    long_about = "fedmesh joins many clusters into one clusterset: each cluster is its own SPIFFE trust \
domain, control planes exchange bundles and service exports through a federation hub, and east-west \
gateways carry end-to-end mTLS between clusters."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: fedmesh_proxy::GlobalArgs,
}

#[derive(Subcommand)]
enum Command {
    /// A hub and three clusters on this machine with traffic flowing: no setup.
    Demo(cmd::demo::DemoArgs),
    /// Manage a trust domain's certificate authority.
    #[command(subcommand)]
    Ca(cmd::ca::CaCommand),
    /// Run the federation hub (or manage it: `fedmesh hub token create`).
    Hub(Box<cmd::hub::HubArgs>),
    /// Run one cluster's control plane (or manage it: `fedmesh control-plane token create --node`).
    ControlPlane(Box<cmd::control_plane::ControlPlaneCmd>),
    /// Run a cluster's east-west gateway (SNI-routed mTLS passthrough).
    Gateway(fedmesh_proxy::GatewayArgs),
    /// Run the sidecar proxy beside a workload.
    Sidecar(fedmesh_proxy::SidecarArgs),
    /// Serve the SPIFFE Workload API to local workloads.
    Agent(cmd::agent::AgentArgs),
    /// Show the clusterset: clusters, exported services, conflicts.
    Status(cmd::status::StatusArgs),
    /// Explain why a service is or is not routable from a cluster.
    Explain(cmd::status::ExplainArgs),
    /// Every sidecar and gateway of the clusterset, and whether it holds its configuration.
    ProxyStatus(cmd::proxy_status::ProxyStatusArgs),
    /// Every cluster's east-west gateways as every other cluster reaches them (mTLS probes, latency).
    Gateways(cmd::gateways::GatewaysArgs),
    /// The clusters of the clusterset: list, link (join in one step), remove.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCommand),
    /// Join a cluster in one step (the same as `fedmesh cluster link`).
    Link(cmd::cluster::LinkArgs),
    /// Check the clusterset end to end: clusters, trust, gateways, control planes, proxies (exit 1 on a failure).
    Check(cmd::check::CheckArgs),
    /// A cluster's Rollouts: status (with every decision and its numbers), pause, resume,
    /// promote, abort.
    #[command(subcommand)]
    Rollout(cmd::rollout::RolloutCommand),
    /// List the recent traces the hub holds (search by service, cluster, failure, duration).
    Traces(cmd::traces::TracesArgs),
    /// Show one trace as a waterfall: every hop, its cluster, and why it failed.
    Trace(cmd::traces::TraceArgs),
    /// Print the Multi-Cluster Services CRDs (ServiceExport, ServiceImport).
    Crds,
    /// Act as a workload against a SPIFFE Workload API (debugging).
    #[command(subcommand)]
    Workload(cmd::workload::WorkloadCommand),
    /// Add the sidecar and its iptables init container to Kubernetes workloads (YAML in, YAML out).
    Inject(cmd::inject::InjectArgs),
    /// Install (or --print, --remove) the iptables rules of transparent interception.
    Iptables(cmd::iptables::IptablesArgs),
    /// The sample app: HTTP echo and gRPC echo on one port.
    SampleApp(cmd::sample_app::SampleAppArgs),
    /// Measure fedmesh against a baseline in the same run.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The proxies run exactly as `fedmesh-proxy` runs them.
    let command = match cli.command {
        Command::Sidecar(s) => {
            return fedmesh_proxy::main(
                fedmesh_proxy::ProxyCommand::Sidecar(s),
                cli.global.log_format,
            );
        }
        Command::Gateway(g) => {
            return fedmesh_proxy::main(
                fedmesh_proxy::ProxyCommand::Gateway(g),
                cli.global.log_format,
            );
        }
        other => other,
    };
    // The demo and the benchmarks print tables; their many in-process parts log only problems.
    cmd::init_tracing(
        match command {
            Command::Demo(_) | Command::Bench(_) => "warn",
            _ => "info",
        },
        cli.global.log_format,
        false,
    );
    let builder = tokio::runtime::Builder::new_multi_thread();
    fedmesh_proxy::block_on(builder, async move {
        match command {
            Command::Demo(d) => cmd::demo::run(d).await,
            Command::Ca(c) => cmd::ca::run(c),
            Command::Inject(i) => cmd::inject::run(i),
            Command::Iptables(i) => cmd::iptables::run(i),
            Command::SampleApp(s) => cmd::sample_app::run(s).await,
            Command::Hub(h) => cmd::hub::run(*h).await,
            Command::ControlPlane(c) => cmd::control_plane::run(*c).await,
            Command::Agent(a) => cmd::agent::run(a).await,
            Command::Status(s) => cmd::status::status(s).await,
            Command::Explain(e) => cmd::status::explain(e).await,
            Command::ProxyStatus(p) => cmd::proxy_status::run(p).await,
            Command::Gateways(g) => cmd::gateways::run(g).await,
            Command::Check(c) => cmd::check::run(c).await,
            Command::Cluster(c) => cmd::cluster::run(c).await,
            Command::Link(l) => {
                cmd::cluster::run(cmd::cluster::ClusterCommand::Link(Box::new(l))).await
            }
            Command::Rollout(r) => cmd::rollout::run(r).await,
            Command::Traces(t) => cmd::traces::traces(t).await,
            Command::Trace(t) => cmd::traces::trace(t).await,
            Command::Crds => {
                print!("{}", fedmesh_api::mcs::crd_yaml());
                Ok(())
            }
            Command::Workload(w) => cmd::workload::run(w).await,
            Command::Bench(b) => cmd::bench::run(b).await,
            Command::Sidecar(_) | Command::Gateway(_) => {
                unreachable!("the proxies returned above")
            }
        }
    })
}

#[cfg(test)]
mod tests {
    /// Every command's arguments are consistent (no two with one name, ...): clap checks this
    /// only when a command is used, so check all of them here.
    #[test]
    fn every_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
