pub mod agent;
pub mod bench;
pub mod ca;
pub mod check;
pub mod cluster;
pub mod control_plane;
pub mod demo;
pub mod gateways;
pub mod hub;
pub mod inject;
pub mod iptables;
pub mod proxy_status;
pub mod rollout;
pub mod sample_app;
pub mod status;
pub mod traces;
pub mod workload;

pub use fedmesh_proxy::{init_tracing, parse_duration, shutdown_signal};

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
