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

/// Every request allocates (header maps, boxed futures, buffers): glibc's allocator took a fifth
/// of the proxy's instructions per request; mimalloc takes a fraction of that (see
/// benchmarks/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option `arena_eager_commit` (v3's `mi_option_t` 4; libmimalloc-sys does not name
/// it).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Memory is committed page by page as it is used, not a whole arena at once: with eager commit
/// the proxy held megabytes it never touched (sidecar RSS 26–33 MiB instead of 15–19). It must
/// be set before the first allocation reserves the first arena, so it runs as an ELF constructor,
/// before the Rust runtime allocates anything.
extern "C" fn commit_lazily() {
    // SAFETY: mi_option_set takes two integers and only stores the value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[unsafe(link_section = ".init_array.00101")]
static COMMIT_LAZILY: extern "C" fn() = commit_lazily;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Sidecar(s) => fedmesh_proxy::ProxyCommand::Sidecar(s),
        Command::Gateway(g) => fedmesh_proxy::ProxyCommand::Gateway(g),
    };
    fedmesh_proxy::main(command, cli.global.log_format)
}
