//! `fedmesh workload`: talk to a Workload API (ours or a SPIRE agent's) as a workload would.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use fedmesh_trust::bundle::der_to_pem;
use fedmesh_trust::svid::{inspect, rfc3339};

use super::parse_duration;

#[derive(Subcommand)]
pub enum WorkloadCommand {
    /// Fetch this process's X509-SVID and bundles, print a summary, optionally write PEM files.
    Fetch {
        /// The Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET).
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// Write svid.pem, svid.key (0600) and bundle.<trust domain>.pem here.
        #[arg(long)]
        write: Option<PathBuf>,
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        timeout: Duration,
    },
}

pub async fn run(cmd: WorkloadCommand) -> anyhow::Result<()> {
    match cmd {
        WorkloadCommand::Fetch {
            socket,
            write,
            timeout,
        } => {
            let endpoint = if socket.starts_with("unix:") || socket.starts_with("tcp:") {
                socket
            } else {
                format!("unix:{socket}")
            };
            // A socket that is not there will never answer: say so now, not after --timeout.
            if let Some(path) = endpoint.strip_prefix("unix:") {
                let path = path.strip_prefix("//").unwrap_or(path);
                if !std::path::Path::new(path).exists() {
                    anyhow::bail!(
                        "there is no Workload API socket at {path}: is the agent running, and is --socket (or SPIFFE_ENDPOINT_SOCKET) its --socket?"
                    );
                }
            }
            // One call, as `spire-agent api fetch` makes: a refusal (this process is not
            // registered) is the answer, not something to retry until --timeout.
            let context = tokio::time::timeout(timeout, async {
                let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await?;
                client.fetch_x509_context().await
            })
            .await
            .with_context(|| format!("no answer from the Workload API at {endpoint} within {timeout:?}"))?
            .map_err(|e| match e {
                spiffe::WorkloadApiError::NoIdentityIssued | spiffe::WorkloadApiError::PermissionDenied(_) => {
                    anyhow::anyhow!(
                        "the Workload API at {endpoint} has no identity for this process ({e}): no registration entry matches it (uid {}); check the agent's --entries",
                        unsafe { libc::getuid() }
                    )
                }
                e => anyhow::anyhow!("cannot fetch an SVID from {endpoint}: {e}; is the agent running?"),
            })?;
            let svid = context
                .default_svid()
                .context("the Workload API answered with no SVID")?;
            let leaf = inspect(svid.leaf().as_bytes())?;
            println!("SPIFFE ID:   {}", svid.spiffe_id());
            println!("valid until: {}", rfc3339(leaf.not_after));
            println!("chain:       {} certificate(s)", svid.cert_chain().len());
            let bundles = context.bundle_set();
            let mut tds: Vec<_> = bundles.iter().collect();
            tds.sort_by_key(|(td, _)| td.to_string());
            for (td, b) in &tds {
                println!("bundle:      {td} ({} authorities)", b.authorities().len());
            }
            if let Some(dir) = write {
                write_pem_files(&dir, svid, bundles)?;
                println!("wrote svid.pem, svid.key and bundles to {}", dir.display());
            }
            Ok(())
        }
    }
}

/// Writes `svid.pem` (the chain), `svid.key` (0600) and `bundle.<trust domain>.pem` into `dir`:
/// the files a TLS server or client that speaks no Workload API (nginx, HAProxy) is given.
pub(crate) fn write_pem_files(
    dir: &std::path::Path,
    svid: &spiffe::X509Svid,
    bundles: &spiffe::X509BundleSet,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let chain: String = svid
        .cert_chain()
        .iter()
        .map(|c| der_to_pem("CERTIFICATE", c.as_bytes()))
        .collect();
    fedmesh_trust::files::write_public(&dir.join("svid.pem"), chain.as_bytes())?;
    fedmesh_trust::files::write_private(
        &dir.join("svid.key"),
        der_to_pem("PRIVATE KEY", svid.private_key().as_bytes()).as_bytes(),
    )?;
    for (td, b) in bundles.iter() {
        let pem: String = b
            .authorities()
            .iter()
            .map(|c| der_to_pem("CERTIFICATE", c.as_bytes()))
            .collect();
        fedmesh_trust::files::write_public(&dir.join(format!("bundle.{td}.pem")), pem.as_bytes())?;
    }
    Ok(())
}
