//! `fedmesh ca`: create and operate a trust domain's CA directory.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use fedmesh_trust::TrustDomain;
use fedmesh_trust::ca::{CaOptions, CaView, TrustDomainCa, UpstreamAuthority};
use fedmesh_trust::svid::rfc3339;

use super::parse_duration;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a CA for a trust domain (self-signed, or an intermediate under your root).
    Init(InitArgs),
    /// Print the trust domain's SPIFFE bundle (JWK Set JSON, or PEM with --format pem).
    Bundle {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = BundleFormat::Json)]
        format: BundleFormat,
    },
    /// Sign a PKCS#10 CSR (PEM or DER) as an X509-SVID; prints the chain as PEM.
    Sign {
        #[arg(long)]
        dir: PathBuf,
        /// The CSR file; it must ask for exactly one SPIFFE ID of this trust domain.
        #[arg(long)]
        csr: PathBuf,
        /// SVID lifetime (default: the CA's default SVID TTL).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Rotate the CA: prepare the next authority, activate it, or prune expired ones.
    Rotate(RotateArgs),
    /// Show the CA's authorities and their states.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value_t = super::status::Output::Table)]
        output: super::status::Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BundleFormat {
    Json,
    Pem,
}

#[derive(Args)]
pub struct InitArgs {
    /// The trust domain, e.g. east.example.
    #[arg(long)]
    trust_domain: String,
    /// Directory to create the CA in (created 0700; keys are written 0600).
    #[arg(long)]
    dir: PathBuf,
    /// Lifetime of each CA certificate.
    #[arg(long, value_parser = parse_duration, default_value = "30d")]
    ca_ttl: Duration,
    /// Default X509-SVID lifetime.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    svid_ttl: Duration,
    /// Longest lifetime an SVID may request.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    max_svid_ttl: Duration,
    /// Default JWT-SVID lifetime (a JWT cannot be revoked: keep it short).
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    jwt_ttl: Duration,
    /// Longest lifetime a JWT-SVID may request.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    max_jwt_ttl: Duration,
    /// Refresh hint published in the bundle.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    refresh_hint: Duration,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

#[derive(Args)]
pub struct UpstreamArgs {
    /// Your existing CA certificate (PEM): ours becomes an intermediate under it.
    #[arg(long, requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    /// The private key of --upstream-cert (PEM). Used once to sign; never stored.
    #[arg(long, requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// Roots to publish as the bundle (PEM); defaults to --upstream-cert.
    #[arg(long, requires = "upstream_cert")]
    upstream_bundle: Option<PathBuf>,
}

impl UpstreamArgs {
    fn load(&self) -> anyhow::Result<Option<UpstreamAuthority>> {
        let (Some(cert), Some(key)) = (&self.upstream_cert, &self.upstream_key) else {
            return Ok(None);
        };
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(Some(UpstreamAuthority {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            bundle_pem: self.upstream_bundle.as_ref().map(read).transpose()?,
        }))
    }
}

#[derive(Args)]
pub struct RotateArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Which step to run. Run the CA's owner (agent) stopped, or let it rotate on its own
    /// schedule; a running control plane's CA rotates with `fedmesh control-plane ca rotate`.
    #[arg(long, value_enum)]
    step: RotateStep,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RotateStep {
    /// Create the next authority and publish it in the bundle (it signs nothing yet).
    Prepare,
    /// Make the prepared authority the signer; retire the current one.
    Activate,
    /// Remove retired authorities whose SVIDs have all expired.
    Prune,
}

pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init(args) => {
            let td = TrustDomain::new(&args.trust_domain)
                .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
            let mut opts = CaOptions::new(td.clone());
            opts.ca_ttl = args.ca_ttl;
            opts.default_svid_ttl = args.svid_ttl;
            opts.max_svid_ttl = args.max_svid_ttl;
            opts.default_jwt_ttl = args.jwt_ttl;
            opts.max_jwt_ttl = args.max_jwt_ttl;
            opts.refresh_hint = args.refresh_hint;
            opts.upstream = args.upstream.load()?;
            let upstream = opts.upstream.is_some();
            let ca = TrustDomainCa::init(&args.dir, opts)?;
            let a = &ca.authorities()[0];
            eprintln!(
                "created {} CA for trust domain {td} in {} (authority {}, valid until {})",
                if upstream { "intermediate" } else { "root" },
                args.dir.display(),
                a.id,
                a.not_after
            );
            eprintln!("bundle: fedmesh ca bundle --dir {}", args.dir.display());
            Ok(())
        }
        CaCommand::Bundle { dir, format } => {
            let ca = TrustDomainCa::open(&dir)?;
            let bundle = ca.bundle();
            match format {
                BundleFormat::Json => println!("{}", bundle.to_json()),
                BundleFormat::Pem => print!("{}", bundle.x509_authorities_pem()),
            }
            Ok(())
        }
        CaCommand::Sign { dir, csr, ttl } => {
            let ca = TrustDomainCa::open(&dir)?;
            let raw = std::fs::read(&csr).with_context(|| format!("reading {}", csr.display()))?;
            let der = if raw.starts_with(b"-----BEGIN") {
                use rustls_pki_types::pem::PemObject;
                rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(&raw)
                    .with_context(|| format!("{} is not a PEM CSR", csr.display()))?
                    .as_ref()
                    .to_vec()
            } else {
                raw
            };
            let issued = ca.sign_csr(&der, None, ttl)?;
            eprintln!(
                "signed {} valid until {}",
                issued.id,
                rfc3339(issued.not_after)
            );
            for c in &issued.chain {
                print!("{}", fedmesh_trust::bundle::der_to_pem("CERTIFICATE", c));
            }
            Ok(())
        }
        CaCommand::Rotate(args) => {
            refuse_if_served(&args.dir)?;
            let ca = TrustDomainCa::open(&args.dir)?;
            match args.step {
                RotateStep::Prepare => ca.prepare_next(args.upstream.load()?.as_ref())?,
                RotateStep::Activate => ca.activate_next()?,
                RotateStep::Prune => {
                    let now = SystemTime::now();
                    if !ca.prune(now)? {
                        let blockers = ca.prune_blockers(now);
                        if blockers.is_empty() {
                            eprintln!("nothing to prune: no authority is retired");
                        } else {
                            eprintln!("nothing to prune yet: {}", blockers.join("; "));
                        }
                    }
                }
            }
            print_status(&ca.view());
            Ok(())
        }
        CaCommand::Status { dir, output } => {
            let view = TrustDomainCa::open(&dir)?.view();
            if !super::status::print_doc(output, &serde_json::to_value(&view)?)? {
                print_status(&view);
            }
            Ok(())
        }
    }
}

/// A control plane's CA lives in `<data-dir>/ca`: changing its files under the running process
/// would be lost at its next write (and the bundle it publishes would not follow).
fn refuse_if_served(dir: &std::path::Path) -> anyhow::Result<()> {
    let Some(data_dir) = dir.parent() else {
        return Ok(());
    };
    let socket = fedmesh_federation::control_plane::admin::socket_path(data_dir);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!(
            "a running control plane owns this CA (its admin socket {} answers): rotate it there, \
             so the bundle it publishes follows: fedmesh control-plane ca rotate --step STEP \
             --data-dir {}",
            socket.display(),
            data_dir.display()
        );
    }
    Ok(())
}

/// The table of `fedmesh ca status` and `fedmesh control-plane ca status`.
pub(crate) fn print_status(v: &CaView) {
    println!(
        "trust domain {}  bundle sequence {}  longest SVID {}s",
        v.trust_domain, v.bundle_sequence, v.max_svid_ttl_secs
    );
    println!(
        "{:<18} {:<9} {:<22} {:<22} JWT KID",
        "AUTHORITY", "STATE", "NOT AFTER", "LEAVES BUNDLE"
    );
    for a in &v.authorities {
        println!(
            "{:<18} {:<9} {:<22} {:<22} {}",
            a.id,
            format!("{:?}", a.state).to_lowercase(),
            a.not_after,
            a.retire_at.as_deref().unwrap_or("-"),
            a.jwt_kid
        );
    }
}
