//! The data plane's processes, `sidecar` and `gateway`, with what every fedmesh process shares:
//! logging, signals and duration flags.
//!
//! Two binaries run them: `fedmesh-proxy` (only these two commands, the binary meshed pods and
//! gateways run) and `fedmesh` (every command). Both call [`main`], so their flags and behaviour
//! cannot drift apart.

pub mod cli;

use std::process::ExitCode;
use std::time::Duration;

pub use cli::{GatewayArgs, SidecarArgs};

/// A data-plane process to run.
pub enum ProxyCommand {
    Sidecar(SidecarArgs),
    Gateway(GatewayArgs),
}

/// Runs a proxy to completion (SIGTERM drains it) on its own runtime: a sidecar on `--threads`
/// workers (default one), a gateway on one per CPU unless told otherwise.
pub fn main(command: ProxyCommand, log_format: LogFormat) -> ExitCode {
    let (access, threads) = match &command {
        ProxyCommand::Sidecar(s) => (s.access_log(), Some(s.threads)),
        ProxyCommand::Gateway(g) => (g.access_log(), g.threads),
    };
    init_tracing("info", log_format, access);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    block_on(builder, async move {
        match command {
            ProxyCommand::Sidecar(s) => cli::sidecar(s).await,
            ProxyCommand::Gateway(g) => cli::gateway(g).await,
        }
    })
}

/// Runs `f` on a runtime from `builder`, printing its error (with causes) the way every fedmesh
/// command does.
pub fn block_on(
    mut builder: tokio::runtime::Builder,
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What every fedmesh binary takes besides its command's own flags.
#[derive(clap::Args)]
pub struct GlobalArgs {
    /// Log lines as text or as JSON objects (one per line, for log pipelines).
    #[arg(
        long,
        global = true,
        env = "FEDMESH_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr at `default` (e.g. "info") unless RUST_LOG says otherwise, as text (coloured
/// only on a terminal) or JSON. With `access`, the proxies' access log (target `access`) is on
/// whatever the level.
pub fn init_tracing(default: &str, format: LogFormat, access: bool) {
    use std::io::IsTerminal;
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    if access && let Ok(d) = "access=info".parse() {
        filter = filter.add_directive(d);
    }
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

/// Parses durations such as `90s`, `30m`, `1h`, `7d` for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 90s, 30m, 1h, 30d)"))
}
