pub mod agent;
pub mod bench;
pub mod ca;
pub mod control_plane;
pub mod demo;
pub mod hub;
pub mod inject;
pub mod iptables;
pub mod proxy;
pub mod sample_app;
pub mod status;
pub mod traces;
pub mod workload;

use std::time::Duration;

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

/// A token from a file only its owner can read, trimmed; a clear error otherwise.
pub fn read_token(f: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let bytes = fedmesh_trust::files::read_private(f).with_context(|| {
        format!(
            "the token file {} must exist and be readable only by its owner (chmod 600)",
            f.display()
        )
    })?;
    let token = String::from_utf8(bytes)
        .with_context(|| format!("{} is not text", f.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!token.is_empty(), "the token file {} is empty", f.display());
    Ok(token)
}

/// Parses durations such as `90s`, `30m`, `1h`, `7d` for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 90s, 30m, 1h, 30d)"))
}
