//! Helpers shared by fedmesh's tests: a real etcd on loopback, child processes that are always
//! killed, bounded waiting, and DNS queries. Nothing here mocks a component.

pub mod attack;
pub mod fake_kube;

use std::net::{SocketAddr, TcpListener};
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
    _guard: ChildGuard,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics with how to install it when it is missing.
    pub fn start() -> Self {
        let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .map(String::from)
            .or_else(|| which("etcd"))
            .expect("etcd is required for these tests; run scripts/test (it installs Debian's etcd-server)");
        let dir = tempfile::tempdir().expect("tempdir");
        for _attempt in 0..5 {
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
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
            cmd.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
            let mut guard = ChildGuard::spawn("etcd", &mut cmd, dir.path()).expect("spawn etcd");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                    return Self {
                        url,
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

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned())
    })
}

/// Asks a DNS server for the A records of `name`.
pub async fn dns_a(server: SocketAddr, name: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let mut config = ResolverConfig::from_parts(None, vec![], vec![]);
    let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
    udp.port = server.port();
    tcp.port = server.port();
    config.add_name_server(NameServerConfig::new(server.ip(), true, vec![udp, tcp]));
    let resolver =
        hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
            .build()
            .map_err(|e| e.to_string())?;
    let lookup = resolver
        .ipv4_lookup(name)
        .await
        .map_err(|e| e.to_string())?;
    Ok(lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            hickory_resolver::proto::rr::RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}
