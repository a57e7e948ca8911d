//! `fedmesh hub`: the federation hub, and its admin commands (`fedmesh hub token|admin-token|cluster`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedmesh_api::{ClusterName, SpiffeId, TrustDomain};
use fedmesh_federation::hub::{self, Hub, HubConfig, admin::AdminState};
use fedmesh_trust::ca::{CaOptions, TrustDomainCa};
use tokio_util::sync::CancellationToken;

use super::parse_duration;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HubArgs {
    #[command(subcommand)]
    command: Option<HubCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum HubCommand {
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage named admin tokens with a role (read-only or admin).
    #[command(subcommand)]
    AdminToken(AdminTokenCommand),
    /// Manage the clusters of the clusterset (the same as `fedmesh cluster`).
    #[command(subcommand)]
    Cluster(super::cluster::ClusterCommand),
}

#[derive(Subcommand)]
enum AdminTokenCommand {
    /// Create a named admin token (printed once on stdout, or written to --out with mode 0600).
    Create {
        #[arg(long)]
        name: String,
        /// read-only: status, services, explain, traces, the audit log; admin: also changes.
        #[arg(long, value_parser = ["read-only", "admin"])]
        role: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the named admin tokens (never their secrets).
    List(ListArgs),
    /// Revoke a named admin token: the next request with it is refused.
    Revoke {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a one-time join token for a cluster (prints it).
    Create {
        #[arg(long)]
        cluster: String,
        /// The trust domain the cluster registers with (its control plane's --trust-domain); the
        /// token registers this one and no other.
        #[arg(long)]
        trust_domain: String,
        /// Lifetime (default: the hub's --token-ttl).
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List join tokens: ID, cluster, trust domain, expiry and state (never their secrets).
    List(ListArgs),
    /// Revoke a join token by its ID (the hex after `fmj1.`): it can no longer join.
    Revoke {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args)]
struct ListArgs {
    /// table (tab-separated, for awk), wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value_t = super::status::Output::Table)]
    output: super::status::Output,
    #[command(flatten)]
    admin: AdminArgs,
}

/// The hub's trust domain unless `fedmesh hub --trust-domain` says otherwise.
const HUB_TRUST_DOMAIN: &str = "hub.fedmesh";

/// How to reach the hub's admin API.
#[derive(Args, Clone)]
pub struct AdminArgs {
    /// The hub admin API.
    #[arg(
        long = "admin",
        env = "FEDMESH_ADMIN",
        default_value = "http://127.0.0.1:7080"
    )]
    pub url: String,
    /// The admin token (or FEDMESH_ADMIN_TOKEN).
    #[arg(
        long = "admin-token",
        env = "FEDMESH_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A file holding the admin token (the hub writes <data-dir>/admin-token).
    #[arg(
        long = "admin-token-file",
        default_value = "/var/lib/fedmesh/hub/admin-token"
    )]
    pub token_file: PathBuf,
    /// For https:// admin URLs: the hub's CA bundle (PEM or JWK Set).
    #[arg(long = "admin-ca")]
    pub ca: Option<PathBuf>,
    /// For a hub run with --admin-tls: a client certificate chain (PEM) whose SPIFFE ID the hub
    /// lists with --admin-id; replaces the token.
    #[arg(long = "admin-cert", env = "FEDMESH_ADMIN_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, mode 0600).
    #[arg(long = "admin-key", env = "FEDMESH_ADMIN_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl AdminArgs {
    pub fn client(&self) -> anyhow::Result<hub::client::AdminClient> {
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            // A token file others can read is refused, as a key would be.
            None if self.token_file.exists() => Some(super::read_token(&self.token_file)?),
            None => None,
        };
        if token.is_none() && self.cert.is_none() {
            anyhow::bail!(
                "no admin token: pass --admin-token, set FEDMESH_ADMIN_TOKEN, point --admin-token-file at the hub's <data-dir>/admin-token ({} does not exist), or give a client certificate (--admin-cert/--admin-key) to a hub run with --admin-tls",
                self.token_file.display()
            );
        }
        let https = self.url.starts_with("https://");
        if self.cert.is_some() && !(https && self.ca.is_some()) {
            anyhow::bail!(
                "a client certificate needs an https:// --admin URL and the hub's CA (--admin-ca): the hub asks for it only with --admin-tls"
            );
        }
        // The hub's certificate carries its SPIFFE ID, not a host name: it is verified as a
        // SPIFFE peer of the bundle given (any ID of the hub's trust domain), whatever address
        // the hub was reached at.
        let tls = match &self.ca {
            Some(p) => {
                let data = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                let td = TrustDomain::new(HUB_TRUST_DOMAIN)?;
                let bundle =
                    fedmesh_trust::bundle::SpiffeBundle::from_json_or_pem(td.clone(), &data)?;
                let mut bundles = fedmesh_trust::bundle::BundleSet::new();
                bundles.update(bundle);
                let identity = fedmesh_trust::tls::MeshIdentity::new();
                identity.set_bundles(bundles);
                let authorizer = fedmesh_trust::tls::Authorizer::trust_domain(td);
                Some(match (&self.cert, &self.key) {
                    (Some(cert), Some(key)) => {
                        let (chain, key) = client_identity(cert, key)?;
                        identity
                            .set_svid_parts(chain, key)
                            .context("the admin client certificate is not a usable X509-SVID")?;
                        identity.client_config(authorizer, vec![b"http/1.1".to_vec()])
                    }
                    _ => identity.anonymous_client_config(authorizer),
                })
            }
            None => None,
        };
        Ok(hub::client::AdminClient::new(&self.url, token, tls)?)
    }
}

/// An operator's client certificate chain and key (PEM files; the key readable by its owner only).
fn client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate chain {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let pem = fedmesh_trust::files::read_private(key).with_context(|| {
        format!(
            "the key file {} must exist and be readable only by its owner (chmod 600)",
            key.display()
        )
    })?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("{} holds no private key (PEM)", key.display()))?;
    Ok((chain, key))
}

/// How the hub reaches etcd. Whoever can write to the hub's etcd can rewrite trust bundles and
/// join tokens: use TLS and an etcd user.
#[derive(Args)]
struct EtcdArgs {
    /// CA certificate(s) (PEM) that sign etcd's server certificate; needed for https:// endpoints.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM, mode 0600).
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// An etcd user; its password comes from --etcd-password-file or $FEDMESH_ETCD_PASSWORD,
    /// never from the command line.
    #[arg(long)]
    etcd_user: Option<String>,
    /// A file (mode 0600) holding the etcd user's password.
    #[arg(long, requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Accept a plain http:// etcd that is not on this host (only when nobody untrusted can reach
    /// it).
    #[arg(long, env = "FEDMESH_ETCD_ALLOW_PLAINTEXT")]
    etcd_allow_plaintext: bool,
}

impl EtcdArgs {
    fn security(&self) -> anyhow::Result<fedmesh_federation::store::EtcdSecurity> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let user = match &self.etcd_user {
            None => None,
            Some(u) => {
                let password = match &self.etcd_password_file {
                    Some(f) => String::from_utf8(fedmesh_trust::files::read_private(f)?)
                        .with_context(|| format!("{} is not UTF-8", f.display()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                    None => std::env::var("FEDMESH_ETCD_PASSWORD").map_err(|_| {
                        anyhow::anyhow!(
                            "--etcd-user {u} needs its password: --etcd-password-file FILE or $FEDMESH_ETCD_PASSWORD"
                        )
                    })?,
                };
                Some((u.clone(), password))
            }
        };
        Ok(fedmesh_federation::store::EtcdSecurity {
            ca_pem: self.etcd_ca.as_ref().map(read).transpose()?,
            client_cert_pem: self.etcd_cert.as_ref().map(read).transpose()?,
            client_key_pem: self
                .etcd_key
                .as_ref()
                .map(|k| fedmesh_trust::files::read_private(k))
                .transpose()?,
            user,
            allow_plaintext: self.etcd_allow_plaintext,
        })
    }
}

#[derive(Args)]
struct RunArgs {
    /// Where the hub keeps its CA, admin token and (by default) its redb store.
    #[arg(long, default_value = "/var/lib/fedmesh/hub")]
    data_dir: PathBuf,
    /// redb:PATH (default: redb:<data-dir>/hub.redb) or etcd:https://HOST:2379[,...] for HA.
    #[arg(long)]
    store: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The hub's own trust domain (cluster identities are issued in it).
    #[arg(long, default_value = HUB_TRUST_DOMAIN)]
    trust_domain: String,
    /// The hub CA directory (default: <data-dir>/ca). HA replicas must share it.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Federation gRPC (control planes connect here).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Admin API and metrics.
    #[arg(long, default_value = "127.0.0.1:7080")]
    admin_listen: SocketAddr,
    /// Admin token file (default: <data-dir>/admin-token, created 0600 if missing).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Serve the admin API over HTTPS with the hub's certificate.
    #[arg(long)]
    admin_tls: bool,
    /// SPIFFE IDs allowed to use the admin API with a client certificate (with --admin-tls).
    #[arg(long = "admin-id")]
    admin_ids: Vec<String>,
    /// A cluster silent this long is marked stale (its exports stay routable).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    stale_after: Duration,
    /// A cluster silent this long has its exports withdrawn.
    #[arg(long, value_parser = parse_duration, default_value = "72h")]
    expire_after: Duration,
    /// Default join token lifetime.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    token_ttl: Duration,
    /// This replica's name (default: hostname-pid).
    #[arg(long)]
    replica: Option<String>,
    /// Spans the window of recent traces keeps; beyond it the oldest traces go (counted in
    /// fedmesh_hub_spans_total{result="dropped"}).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    trace_window_spans: u32,
    /// Memory the window of recent traces may take, in MiB; whichever bound comes first applies.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    trace_window_mib: u32,
    /// How long the audit log (GET /api/v1/audit) keeps a record of each change.
    #[arg(long, value_parser = parse_duration, default_value = "90d")]
    audit_retention: Duration,
    /// Traces older than this leave the window.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    trace_window_age: Duration,
    /// Also take OTLP (gRPC and HTTP/protobuf at /v1/traces) here, over TLS: only joined
    /// clusters' identities may send (as on --listen, which takes OTLP/gRPC already).
    #[arg(long)]
    otlp_listen: Option<SocketAddr>,
    /// Take OTLP (gRPC and HTTP/protobuf) in plain text here from anyone who can reach it (apps,
    /// collectors outside the mesh); their spans are stamped cluster "(unverified)". Off unless set.
    #[arg(long)]
    otlp_plaintext_listen: Option<SocketAddr>,
    /// Also send every span the hub accepts to your trace backend (Jaeger, Tempo, an OpenTelemetry
    /// Collector) at this OTLP/HTTP traces URL, e.g. http://jaeger-collector:4318/v1/traces
    /// (https: verified with the system's roots). Each span's resource names the cluster that
    /// proved it sent it (fedmesh.cluster), as the hub's views do.
    #[arg(long, value_name = "URL")]
    otlp_forward: Option<String>,
}

pub async fn run(args: HubArgs) -> anyhow::Result<()> {
    match args.command {
        Some(HubCommand::Token(TokenCommand::Create {
            cluster,
            trust_domain,
            ttl,
            admin,
        })) => {
            ClusterName::new(&cluster)?;
            TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let t = admin
                .client()?
                .create_token(&cluster, &trust_domain, ttl.as_deref())
                .await?;
            eprintln!(
                "join token for cluster {} in trust domain {} (valid until {}, usable once):",
                t.cluster, t.trust_domain, t.expires
            );
            println!("{}", t.token);
            Ok(())
        }
        Some(HubCommand::Token(TokenCommand::List(ListArgs { output, admin }))) => {
            let tokens = admin.client()?.join_tokens().await?;
            if !super::status::print_doc(output, &serde_json::to_value(&tokens)?)? {
                println!("ID\tCLUSTER\tTRUST DOMAIN\tEXPIRES\tSTATE");
                for t in tokens {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        t.id, t.cluster, t.trust_domain, t.expires, t.state
                    );
                }
            }
            Ok(())
        }
        Some(HubCommand::Token(TokenCommand::Revoke { id, admin })) => {
            admin.client()?.revoke_join_token(&id).await?;
            println!("revoked join token {id}");
            Ok(())
        }
        Some(HubCommand::AdminToken(c)) => admin_token_command(c).await,
        Some(HubCommand::Cluster(c)) => super::cluster::run(c).await,
        None => serve(args.run).await,
    }
}

async fn admin_token_command(c: AdminTokenCommand) -> anyhow::Result<()> {
    use hub::access::Role;
    match c {
        AdminTokenCommand::Create {
            name,
            role,
            out,
            admin,
        } => {
            let role = if role == "admin" {
                Role::Admin
            } else {
                Role::ReadOnly
            };
            let t = admin.client()?.create_admin_token(&name, role).await?;
            match out {
                Some(path) => {
                    fedmesh_trust::files::write_private(&path, t.token.as_bytes())?;
                    eprintln!(
                        "wrote admin token {} ({}) to {}",
                        t.name,
                        t.role,
                        path.display()
                    );
                }
                None => {
                    eprintln!("admin token {} ({}), shown once:", t.name, t.role);
                    println!("{}", t.token);
                }
            }
        }
        AdminTokenCommand::List(ListArgs { output, admin }) => {
            let tokens = admin.client()?.admin_tokens().await?;
            if !super::status::print_doc(output, &serde_json::to_value(&tokens)?)? {
                println!("NAME\tROLE\tCREATED\tCREATED BY");
                for t in tokens {
                    println!("{}\t{}\t{}\t{}", t.name, t.role, t.created, t.created_by);
                }
            }
        }
        AdminTokenCommand::Revoke { name, admin } => {
            admin.client()?.revoke_admin_token(&name).await?;
            println!("revoked admin token {name}");
        }
    }
    Ok(())
}

async fn serve(a: RunArgs) -> anyhow::Result<()> {
    fedmesh_trust::files::create_private_dir(&a.data_dir)?;
    let td = TrustDomain::new(&a.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", a.trust_domain))?;
    let ca_dir = a.ca_dir.clone().unwrap_or_else(|| a.data_dir.join("ca"));
    let ca = if ca_dir.join(fedmesh_trust::ca::STATE_FILE).exists() {
        TrustDomainCa::open(&ca_dir)?
    } else {
        let mut opts = CaOptions::new(td.clone());
        opts.ca_ttl = Duration::from_secs(365 * 24 * 3600);
        opts.max_svid_ttl = Duration::from_secs(7 * 24 * 3600);
        opts.default_svid_ttl = Duration::from_secs(24 * 3600);
        TrustDomainCa::init(&ca_dir, opts)?
    };
    let location = a
        .store
        .clone()
        .unwrap_or_else(|| format!("redb:{}", a.data_dir.join("hub.redb").display()));
    let store = fedmesh_federation::store::open_with(&location, &a.etcd.security()?).await?;
    let token_path = a
        .admin_token_file
        .clone()
        .unwrap_or_else(|| a.data_dir.join("admin-token"));
    let admin_token = admin_token(&token_path)?;
    let admin_ids = a
        .admin_ids
        .iter()
        .map(|s| SpiffeId::new(s).with_context(|| format!("--admin-id {s:?}")))
        .collect::<anyhow::Result<BTreeSet<_>>>()?;

    let grpc = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--listen); is another hub running?",
                a.listen
            )
        })?;
    let admin = tokio::net::TcpListener::bind(a.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", a.admin_listen))?;

    let shutdown = CancellationToken::new();
    let config = HubConfig {
        replica: a
            .replica
            .clone()
            .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id())),
        stale_after: a.stale_after,
        expire_after: a.expire_after,
        token_ttl: a.token_ttl,
        audit_retention: a.audit_retention,
        otlp_forward: a.otlp_forward.clone(),
        traces: fedmesh_federation::hub::traces::TraceLimits {
            max_spans: a.trace_window_spans as usize,
            max_bytes: (a.trace_window_mib as usize) << 20,
            max_age: a.trace_window_age,
            ..Default::default()
        },
        ..HubConfig::default()
    };
    let hub = Hub::start(config, store, Arc::new(ca), shutdown.clone()).await?;
    let state = AdminState {
        hub: hub.clone(),
        token: Arc::new(admin_token),
        admin_ids: Arc::new(admin_ids),
    };
    let tls = a.admin_tls.then(|| hub.admin_tls());
    let scheme = if a.admin_tls { "https" } else { "http" };
    eprintln!(
        "fedmesh hub: federation on {}, admin API on {scheme}://{}",
        grpc.local_addr()?,
        admin.local_addr()?
    );
    eprintln!(
        "  create a join token:  fedmesh hub token create --cluster NAME --trust-domain TD --admin {scheme}://{} --admin-token-file {}",
        admin.local_addr()?,
        token_path.display()
    );
    let signal = shutdown.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        signal.cancel();
    });
    let admin_task = tokio::spawn(hub::serve_admin(state, admin, tls, shutdown.clone()));
    let otlp = [
        (a.otlp_listen, Some(hub.otlp_tls()), "--otlp-listen"),
        (a.otlp_plaintext_listen, None, "--otlp-plaintext-listen"),
    ];
    for (addr, tls, flag) in otlp {
        let Some(addr) = addr else { continue };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({flag})"))?;
        let how = if tls.is_some() {
            "TLS, joined clusters only"
        } else {
            "plain text, spans marked (unverified)"
        };
        eprintln!(
            "  OTLP (gRPC and HTTP /v1/traces) on {} ({how})",
            listener.local_addr()?
        );
        let (hub, shutdown) = (hub.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) =
                fedmesh_federation::hub::traces::listener::serve(hub, listener, tls, shutdown).await
            {
                tracing::error!(error = %e, "the OTLP listener stopped");
            }
        });
    }
    hub::serve_grpc(hub, grpc, shutdown.clone()).await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    Ok(())
}

/// Reads the admin token, creating a random one (0600) on first start.
fn admin_token(path: &std::path::Path) -> anyhow::Result<String> {
    if path.exists() {
        let t = String::from_utf8(fedmesh_trust::files::read_private(path)?)?
            .trim()
            .to_string();
        anyhow::ensure!(
            t.len() >= 16,
            "{} holds an admin token shorter than 16 characters",
            path.display()
        );
        return Ok(t);
    }
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    let t = hex::encode(b);
    fedmesh_trust::files::write_private(path, format!("{t}\n").as_bytes())?;
    Ok(t)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "hub".into())
}
