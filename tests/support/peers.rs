//! Real peers built by `scripts/peers` from their own Go modules (SPIRE, Jaeger; kube-apiserver is
//! in `fedmesh_test_support::kube_apiserver`): where to find them, and a SPIRE server + agent run
//! as processes on loopback.
//!
//! A test that needs a peer calls [`bin`]: without it the test says why and skips, unless
//! `FEDMESH_REQUIRE_PEERS=1` (CI), where a missing peer fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Proc, free_port, wait_until};

pub use fedmesh_test_support::peer_bin as bin;

/// How a SPIRE server is set up.
#[derive(Default)]
pub struct SpireOptions {
    /// `UpstreamAuthority "disk"`: SPIRE's CA is an intermediate under this certificate and key
    /// (PEM files), so its SVIDs chain to a root others already trust.
    pub upstream: Option<(PathBuf, PathBuf)>,
    /// Serve SPIRE's bundle endpoint on a loopback port, with this profile.
    pub bundle_endpoint: Option<EndpointProfile>,
    /// `federates_with`: (trust domain, bundle endpoint URL, how the endpoint is authenticated).
    pub federates_with: Vec<(String, String, PeerProfile)>,
    /// Extra environment for the server, e.g. `SSL_CERT_FILE`: the roots Go's `https_web`
    /// client trusts.
    pub env: Vec<(String, PathBuf)>,
}

/// How SPIRE's own bundle endpoint authenticates itself.
pub enum EndpointProfile {
    /// With SPIRE's SVID (`spiffe://<td>/spire/server`).
    HttpsSpiffe,
    /// With a Web PKI certificate chain and key (PEM files).
    HttpsWeb { cert: PathBuf, key: PathBuf },
}

/// How SPIRE authenticates a trust domain's bundle endpoint it federates with.
pub enum PeerProfile {
    /// The endpoint's SPIFFE ID, verified against the bundle SPIRE already holds.
    HttpsSpiffe(String),
    /// Web PKI: the server's system roots (or `SSL_CERT_FILE`).
    HttpsWeb,
}

/// A SPIRE server and one agent (join-token node attestation, unix workload attestation), as
/// processes, torn down on drop.
pub struct Spire {
    pub trust_domain: String,
    pub dir: PathBuf,
    server_bin: PathBuf,
    pub server_socket: PathBuf,
    /// The agent's Workload API socket.
    pub agent_socket: PathBuf,
    /// `https://127.0.0.1:PORT` when the bundle endpoint is on.
    pub bundle_endpoint: Option<String>,
    /// The agent's SPIFFE ID (the parent of workload entries).
    pub agent_id: String,
    _server: Proc,
    _agent: Proc,
}

impl Spire {
    /// Starts the server, waits until it is healthy, joins an agent with a one-time token, and
    /// waits until the agent serves its Workload API.
    pub fn start(dir: &Path, trust_domain: &str, opts: SpireOptions) -> Option<Self> {
        let server_bin = bin("spire", "spire-server")?;
        let agent_bin = bin("spire", "spire-agent")?;
        std::fs::create_dir_all(dir).unwrap();
        let server_socket = dir.join("server.sock");
        let agent_socket = dir.join("agent.sock");
        let server_port = free_port();
        let mut plugins = format!(
            r#"
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{data}/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
"#,
            data = dir.join("server-data").display()
        );
        if let Some((cert, key)) = &opts.upstream {
            plugins.push_str(&format!(
                r#"  UpstreamAuthority "disk" {{
    plugin_data {{
      cert_file_path = "{}"
      key_file_path = "{}"
    }}
  }}
"#,
                cert.display(),
                key.display()
            ));
        }
        plugins.push_str("}\n");
        let mut federation = String::new();
        let mut bundle_endpoint = None;
        if opts.bundle_endpoint.is_some() || !opts.federates_with.is_empty() {
            federation.push_str("  federation {\n");
            if let Some(profile) = &opts.bundle_endpoint {
                let port = free_port();
                // SPIRE's shortest refresh hint is a minute.
                let profile = match profile {
                    EndpointProfile::HttpsSpiffe => String::new(),
                    EndpointProfile::HttpsWeb { cert, key } => format!(
                        r#"      profile "https_web" {{
        serving_cert_file {{
          cert_file_path = "{}"
          key_file_path = "{}"
          file_sync_interval = "1m"
        }}
      }}
"#,
                        cert.display(),
                        key.display()
                    ),
                };
                federation.push_str(&format!(
                    "    bundle_endpoint {{\n      address = \"127.0.0.1\"\n      port = {port}\n      refresh_hint = \"1m\"\n{profile}    }}\n"
                ));
                bundle_endpoint = Some(format!("https://127.0.0.1:{port}"));
            }
            for (td, url, profile) in &opts.federates_with {
                let profile = match profile {
                    PeerProfile::HttpsSpiffe(id) => format!(
                        "bundle_endpoint_profile \"https_spiffe\" {{\n        endpoint_spiffe_id = \"{id}\"\n      }}"
                    ),
                    PeerProfile::HttpsWeb => "bundle_endpoint_profile \"https_web\" {}".to_string(),
                };
                federation.push_str(&format!(
                    "    federates_with \"{td}\" {{\n      bundle_endpoint_url = \"{url}\"\n      {profile}\n    }}\n"
                ));
            }
            federation.push_str("  }\n");
        }
        let server_conf = format!(
            r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{server_port}"
  socket_path = "{socket}"
  trust_domain = "{trust_domain}"
  data_dir = "{data}"
  log_level = "INFO"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
{federation}}}
{plugins}"#,
            socket = server_socket.display(),
            data = dir.join("server-data").display(),
        );
        std::fs::write(dir.join("server.conf"), server_conf).unwrap();
        let mut server_cmd = Command::new(&server_bin);
        server_cmd
            .args(["run", "-config"])
            .arg(dir.join("server.conf"))
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        let server = Proc::spawn("spire-server", server_cmd, dir);
        let healthy = |args: &[&str], bin: &Path, sock: &Path| {
            Command::new(bin)
                .args(args)
                .arg("-socketPath")
                .arg(sock)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        wait_until(
            "the SPIRE server to be healthy",
            Duration::from_secs(60),
            || healthy(&["healthcheck"], &server_bin, &server_socket),
        );

        // The agent trusts the server's bundle (no insecure bootstrap) and joins with a token.
        let bundle = spire_cli(&server_bin, &server_socket, &["bundle", "show"]);
        std::fs::write(dir.join("bootstrap.pem"), bundle).unwrap();
        let token_out = spire_cli(&server_bin, &server_socket, &["token", "generate"]);
        let token = token_out
            .lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .unwrap_or_else(|| panic!("spire-server token generate said {token_out:?}"))
            .to_string();
        let agent_conf = format!(
            r#"agent {{
  data_dir = "{data}"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = "{server_port}"
  socket_path = "{socket}"
  trust_bundle_path = "{bundle}"
  trust_domain = "{trust_domain}"
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"#,
            data = dir.join("agent-data").display(),
            socket = agent_socket.display(),
            bundle = dir.join("bootstrap.pem").display(),
        );
        std::fs::write(dir.join("agent.conf"), agent_conf).unwrap();
        let mut agent_cmd = Command::new(&agent_bin);
        agent_cmd
            .args(["run", "-config"])
            .arg(dir.join("agent.conf"))
            .args(["-joinToken", &token]);
        let agent = Proc::spawn("spire-agent", agent_cmd, dir);
        wait_until(
            "the SPIRE agent to be healthy",
            Duration::from_secs(60),
            || healthy(&["healthcheck"], &agent_bin, &agent_socket),
        );
        Some(Self {
            trust_domain: trust_domain.to_string(),
            dir: dir.to_path_buf(),
            server_bin,
            server_socket,
            agent_socket,
            bundle_endpoint,
            agent_id: format!("spiffe://{trust_domain}/spire/agent/join_token/{token}"),
            _server: server,
            _agent: agent,
        })
    }

    /// `spire-server ARGS -socketPath ...`; panics with its output on failure.
    pub fn server(&self, args: &[&str]) -> String {
        spire_cli(&self.server_bin, &self.server_socket, args)
    }

    /// `spire-server ARGS -socketPath ...`: its output, or what it said when it failed.
    pub fn server_try(&self, args: &[&str]) -> Result<String, String> {
        spire_cli_try(&self.server_bin, &self.server_socket, args)
    }

    /// Registers `spiffe_id` for this user's processes on the agent (`unix:uid`), federating
    /// with `federates_with` (trust domains whose bundles the workload gets too), and waits
    /// until the agent (which syncs entries every few seconds) issues it.
    pub fn register(&self, spiffe_id: &str, federates_with: &[&str]) {
        let uid = super::uid().to_string();
        let selector = format!("unix:uid:{uid}");
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            &self.agent_id,
            "-spiffeID",
            spiffe_id,
            "-selector",
            &selector,
        ];
        let tds: Vec<String> = federates_with
            .iter()
            .map(|td| format!("spiffe://{td}"))
            .collect();
        for td in &tds {
            args.extend(["-federatesWith", td]);
        }
        self.server(&args);
        let agent_bin = bin("spire", "spire-agent").unwrap();
        wait_until(
            &format!("the SPIRE agent to issue {spiffe_id}"),
            Duration::from_secs(60),
            || {
                Command::new(&agent_bin)
                    .args(["api", "fetch", "x509", "-socketPath"])
                    .arg(&self.agent_socket)
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(spiffe_id))
            },
        );
    }

    /// The Workload API endpoint (`unix:...`), for `SPIFFE_ENDPOINT_SOCKET`.
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.agent_socket.display())
    }
}

fn spire_cli(bin: &Path, socket: &Path, args: &[&str]) -> String {
    spire_cli_try(bin, socket, args).unwrap_or_else(|e| panic!("{e}"))
}

fn spire_cli_try(bin: &Path, socket: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .arg("-socketPath")
        .arg(socket)
        .output()
        .expect("run spire-server");
    if !out.status.success() {
        return Err(format!(
            "spire-server {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
