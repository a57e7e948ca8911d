//! `fedmesh-proxy`: the data plane alone (`sidecar`, `gateway`), for meshed pods and gateways.
//!
//! Built from the fedmesh-proxy crate only, it carries none of the hub, Kubernetes, the stores,
//! the DNS server, the testbed or the benchmarks: a smaller binary, and fewer pages of it in every
//! pod's memory. `fedmesh sidecar` and `fedmesh gateway` run the same code.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fedmesh-proxy",
    version,
    about = "The fedmesh data plane: the sidecar beside each workload and the east-west gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: fedmesh_proxy::GlobalArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy beside a workload.
    Sidecar(fedmesh_proxy::SidecarArgs),
    /// Run a cluster's east-west gateway (SNI-routed mTLS passthrough).
    Gateway(fedmesh_proxy::GatewayArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Sidecar(s) => fedmesh_proxy::ProxyCommand::Sidecar(s),
        Command::Gateway(g) => fedmesh_proxy::ProxyCommand::Gateway(g),
    };
    fedmesh_proxy::main(command, cli.global.log_format)
}
