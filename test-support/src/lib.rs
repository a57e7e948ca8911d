//! Helpers shared by fedmesh's tests: a real etcd on loopback, child processes that are always
//! killed, bounded waiting, and DNS queries. Nothing here mocks a component.

pub mod attack;
pub mod kube_apiserver;
pub mod probe;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port free on 127.0.0.1 for both TCP and UDP, for a child process that must be told its
/// address. It is released before returning, so it is picked below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): no `bind(0)` or outgoing connection of a parallel test can
/// take it in between, only another explicit pick, which is random and checked.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12000 {
        (10000, low)
    } else {
        (61000, 65535)
    };
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for _ in 0..1000 {
        // splitmix64 over a shared counter: distinct picks within a process, varied across.
        let mut z = STATE
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(seed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let port = from + (z % u64::from(to - from)) as u16;
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `target/peers/<peer>/bin/<cmd>`, where `scripts/peers` puts the real systems the tests run
/// against (or `$FEDMESH_PEERS/<peer>/bin/<cmd>`). Without it the caller skips with the reason
/// printed, unless `FEDMESH_REQUIRE_PEERS=1` (CI), where a missing peer fails the test.
pub fn peer_bin(peer: &str, cmd: &str) -> Option<PathBuf> {
    let root = std::env::var_os("FEDMESH_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peers"));
    let path = root.join(peer).join("bin").join(cmd);
    if path.exists() {
        return Some(path);
    }
    let why = format!(
        "{} is missing: run scripts/peers (needs Go)",
        path.display()
    );
    assert!(
        std::env::var("FEDMESH_REQUIRE_PEERS").as_deref() != Ok("1"),
        "real peers are required here (FEDMESH_REQUIRE_PEERS=1) but {why}"
    );
    eprintln!("SKIPPED: this test runs against {peer}, and {why}");
    None
}

/// Writes `data` to a file only its owner can read (0600), as a secret or key is kept.
pub fn write_private(path: &Path, data: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::io::Write::write_all(&mut f, data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Polls `cond` every 20 ms; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed and reaped on drop, its stderr kept in a log file shown on panic.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
    pub log_path: PathBuf,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> std::io::Result<Self> {
        let log_path = log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn()?;
        Ok(Self {
            child,
            name: name.to_string(),
            log_path,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}) ---\n{}",
                self.name,
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// A real etcd (Debian's etcd-server) on loopback, in its own temporary data directory.
pub struct EtcdServer {
    pub url: String,
    /// With [`EtcdServer::start_secure`]: what a client needs to reach it.
    pub secure: Option<EtcdCredentials>,
    _guard: ChildGuard,
    _dir: tempfile::TempDir,
}

/// TLS material and the user of an etcd started by [`EtcdServer::start_secure`], as PEM and as
/// files (keys and the password 0600).
#[derive(Clone, Debug)]
pub struct EtcdCredentials {
    pub ca_pem: Vec<u8>,
    pub client_cert_pem: Vec<u8>,
    pub client_key_pem: Vec<u8>,
    pub user: String,
    pub password: String,
    pub ca_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub password_file: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, written into `dir`.
fn etcd_pki(dir: &Path) -> (EtcdCredentials, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use std::os::unix::fs::PermissionsExt;
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test etcd CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("names");
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "etcd");
    let (client_pem, client_key) = leaf(vec!["fedmesh-hub".into()], "root");
    let write = |name: &str, data: &[u8], mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, data).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };
    let password = format!("pw-{}", std::process::id());
    let creds = EtcdCredentials {
        ca_pem: ca.pem().into_bytes(),
        client_cert_pem: client_pem.clone().into_bytes(),
        client_key_pem: client_key.clone().into_bytes(),
        user: "root".into(),
        password: password.clone(),
        ca_file: write("ca.pem", ca.pem().as_bytes(), 0o644),
        client_cert_file: write("client.pem", client_pem.as_bytes(), 0o644),
        client_key_file: write("client.key", client_key.as_bytes(), 0o600),
        password_file: write("password", password.as_bytes(), 0o600),
    };
    let server_cert = write("server.pem", server_pem.as_bytes(), 0o644);
    let server_key = write("server.key", server_key.as_bytes(), 0o600);
    (creds, server_cert, server_key)
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics with how to install it when it is missing.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// Starts etcd as it should run for a hub: clients over TLS with a certificate of its CA
    /// (`--client-cert-auth`), and authentication enabled with a `root` user and password.
    pub fn start_secure() -> Self {
        Self::launch(true)
    }

    fn launch(secure: bool) -> Self {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .map(String::from)
            .or_else(|| which("etcd"))
            .expect("etcd is required for these tests; run scripts/test (it installs Debian's etcd-server)");
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = secure.then(|| etcd_pki(dir.path()));
        for _attempt in 0..5 {
            let (client, peer) = (free_port(), free_port());
            let scheme = if secure { "https" } else { "http" };
            let url = format!("{scheme}://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let data = dir.path().join(format!("data-{client}"));
            let mut cmd = Command::new(&bin);
            cmd.args([
                "--name",
                "test",
                "--data-dir",
                data.to_str().unwrap_or_default(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("test={peer_url}"),
                "--log-level",
                "warn",
            ]);
            if let Some((creds, cert, key)) = &pki {
                cmd.args([
                    "--cert-file",
                    cert.to_str().unwrap_or_default(),
                    "--key-file",
                    key.to_str().unwrap_or_default(),
                    "--client-cert-auth",
                    "--trusted-ca-file",
                    creds.ca_file.to_str().unwrap_or_default(),
                ]);
            }
            cmd.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
            let mut guard = ChildGuard::spawn("etcd", &mut cmd, dir.path()).expect("spawn etcd");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                    let secure = match &pki {
                        Some((creds, _, _)) => match enable_auth(&url, creds) {
                            Ok(()) => Some(creds.clone()),
                            Err(e) => panic!("enabling etcd authentication: {e}\n{}", guard.log()),
                        },
                        None => None,
                    };
                    return Self {
                        url,
                        secure,
                        _guard: guard,
                        _dir: dir,
                    };
                }
                if let Ok(Some(_)) = guard.child.try_wait() {
                    break; // port taken or similar: try other ports
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("etcd did not start on {url}:\n{}", guard.log());
        }
        panic!("could not start etcd after 5 attempts");
    }
}

/// Adds the `root` user with its password and turns etcd's authentication on (on a thread of
/// its own: the caller may be inside a Tokio runtime).
fn enable_auth(url: &str, creds: &EtcdCredentials) -> Result<(), String> {
    let (url, creds) = (url.to_string(), creds.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&creds.ca_pem))
                .identity(etcd_client::Identity::from_pem(
                    &creds.client_cert_pem,
                    &creds.client_key_pem,
                ));
            let opts = etcd_client::ConnectOptions::new()
                .with_tls(tls)
                .with_connect_timeout(Duration::from_secs(5));
            let mut c = etcd_client::Client::connect([url.as_str()], Some(opts))
                .await
                .map_err(|e| e.to_string())?;
            c.user_add(creds.user.as_str(), creds.password.as_str(), None)
                .await
                .map_err(|e| e.to_string())?;
            c.user_grant_role(creds.user.as_str(), "root")
                .await
                .map_err(|e| e.to_string())?;
            c.auth_enable().await.map_err(|e| e.to_string())?;
            Ok(())
        })
    })
    .join()
    .map_err(|_| "the auth setup thread panicked".to_string())?
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
    })
}

pub use fedmesh_testbed::client::dns_a;
