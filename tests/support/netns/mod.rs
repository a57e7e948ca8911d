//! Clusters in network namespaces: each cluster a "node" namespace, each pod its own namespace
//! behind the node's bridge, the nodes and the hub joined by a "WAN" bridge. Nothing of a cluster
//! but its east-west gateway (and, for the control plane, the hub) is reachable from the WAN:
//! pods reach out through the node's masquerade; the node forwards nothing new inbound.
//!
//! ```text
//!   ns <p>-wan:  bridge wan 10.250.0.1/24 ── hub (federation :9443, admin :9080)
//!       │ veth                         │ veth
//!   ns <p>-east: wan0 10.250.0.11      ns <p>-west: wan0 10.250.0.12   ...
//!     gateway 10.250.0.11:15443          gateway 10.250.0.12:15443
//!     br0 10.101.0.1/24: control plane :15012, DNS :53, agent (unix socket)
//!       │ veth
//!   ns <p>-east-api: eth0 10.101.0.10, iptables REDIRECT → sidecar :15001/:15006, app :8080
//! ```
//!
//! Every process runs the real `fedmesh` binary inside its namespace (setns before exec), sidecars
//! and gateways under their own uid so the node agent attests them apart and iptables exempts
//! the sidecar's own traffic. Everything the harness made — processes, namespaces and with them
//! every link — is removed on drop, also when a test fails; namespaces left by a killed test run
//! are swept the next time.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{fedmesh_bin, proxy_bin, wait_until};

const PREFIX: &str = "fmt";
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const HUB_GRPC: u16 = 9443;
pub const HUB_ADMIN: u16 = 9080;
/// Hub replica b's admin port (with [`Mesh::start_with_etcd_replicas`]).
pub const HUB_ADMIN_B: u16 = 9081;
const GATEWAY_PORT: u16 = 15443;
const CP_PORT: u16 = 15012;
const APP_PORT: u16 = 8080;
pub const SIDECAR_ADMIN: u16 = 15020;
const GATEWAY_UID: u32 = 1500;
const GATEWAY_ADMIN: u16 = 15021;

/// Why network-namespace tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables", "iptables-restore"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 iptables)"
            ));
        }
    }
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &probe]).output();
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    match ok {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run ip: {e}")),
    }
}

/// Whether tests that need root (network namespaces, cgroups) must run rather than skip:
/// `FEDMESH_REQUIRE_NETNS` set to anything but `0` (CI, and `scripts/test` run as root).
pub fn privileged_required() -> bool {
    std::env::var("FEDMESH_REQUIRE_NETNS").is_ok_and(|v| v != "0")
}

/// Skips (returns true) when namespaces are unavailable, saying why — unless
/// `FEDMESH_REQUIRE_NETNS` is set to anything but `0` (CI, and `scripts/test` run as root), where
/// that is a failure.
pub fn skip() -> bool {
    match unavailable() {
        None => false,
        Some(why) => {
            assert!(
                !privileged_required(),
                "network-namespace tests are required here (FEDMESH_REQUIRE_NETNS) but cannot run: {why}"
            );
            eprintln!("SKIPPED: network-namespace tests need root and `ip netns`: {why}");
            true
        }
    }
}

/// Deletes namespaces of earlier runs whose process is gone.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// A process in a namespace; SIGKILLed and reaped on drop.
pub struct NsProc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl NsProc {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// SIGTERM, then wait up to `timeout` (SIGKILL after).
    pub fn terminate(&mut self, timeout: Duration) {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// SIGKILL, as a crash or the OOM killer ends a process; reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// How it exited, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole network: owns the namespaces (deleted on drop, after the processes are killed).
pub struct Net {
    pub prefix: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    pub procs: Vec<NsProc>,
    /// Environment for every `fedmesh` process started from now on.
    pub env: Vec<(String, String)>,
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ns_file(ns: &str) -> File {
    File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("open netns {ns}: {e}"))
}

/// Runs `f` on a thread that has entered `ns`: sockets it creates live in that namespace (and
/// keep working from any thread afterwards).
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let fd = ns_file(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("in_ns thread")
    })
}

/// A `Command` that enters `ns` (and switches to `uid` if given) before exec.
fn ns_command(ns: &str, program: &str, uid: Option<u32>) -> Command {
    let fd = ns_file(ns);
    let mut cmd = Command::new(program);
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(u) = uid
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(u) != 0
                    || libc::setuid(u) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

impl Net {
    pub fn new(dir: &Path) -> Net {
        sweep_stale();
        // Sidecars and gateways run under their own uids and must reach the agent's socket.
        let mut p = dir.to_path_buf();
        loop {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
            if !p.pop() || p == Path::new("/tmp") || p == Path::new("/") {
                break;
            }
        }
        Net {
            prefix: format!("{PREFIX}{}-", std::process::id()),
            dir: dir.to_path_buf(),
            namespaces: Vec::new(),
            procs: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn add_ns(&mut self, short: &str) -> String {
        let name = format!("{}{short}", self.prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        self.namespaces.push(name.clone());
        self.ip(&name, &["link", "set", "lo", "up"]);
        name
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, ns: &str, args: &[&str]) {
        run_ok(Command::new("ip").arg("-n").arg(ns).args(args));
    }

    /// Runs a program inside `ns` to completion; its output (it must succeed).
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        run_ok(ns_command(ns, program, None).args(args))
    }

    /// Runs a program inside `ns` as user `uid` to completion; its output (it must succeed).
    pub fn exec_as(&self, ns: &str, uid: u32, program: &str, args: &[&str]) -> Output {
        run_ok(ns_command(ns, program, Some(uid)).args(args))
    }

    /// Runs a program inside `ns` to completion; its output, whether it succeeded or not.
    pub fn exec_unchecked(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        ns_command(ns, program, None)
            .args(args)
            .output()
            .expect("run a command")
    }

    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let v = value.to_string();
        in_ns(ns, move || std::fs::write(&path, v).expect("sysctl"));
    }

    /// Starts `fedmesh ARGS` inside `ns` (as `uid` if given), stderr to `<dir>/<name>.log`;
    /// `sidecar` and `gateway` from `fedmesh-proxy`, the binary pods run them from.
    pub fn spawn(&mut self, ns: &str, name: &str, uid: Option<u32>, args: &[&str]) -> usize {
        let bin = match args.first() {
            Some(&"sidecar" | &"gateway") => proxy_bin(),
            _ => fedmesh_bin(),
        };
        let mut cmd = ns_command(ns, bin, uid);
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null());
        self.start(name, cmd, false)
    }

    /// Starts another program inside `ns`, stdout and stderr to `<dir>/<name>.log`.
    pub fn spawn_program(&mut self, ns: &str, name: &str, program: &str, args: &[String]) -> usize {
        let mut cmd = ns_command(ns, program, None);
        cmd.args(args);
        self.start(name, cmd, true)
    }

    /// Runs `cmd` with stderr (and `stdout` too, if asked) to `<dir>/<name>.log`; its index in
    /// `procs`.
    fn start(&mut self, name: &str, mut cmd: Command, stdout: bool) -> usize {
        let log = self.dir.join(format!("{name}.log"));
        let f = File::create(&log).unwrap();
        if stdout {
            cmd.stdout(f.try_clone().unwrap());
        }
        let child = cmd
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({:?}): {e}", cmd.get_program()));
        self.procs.push(NsProc {
            name: name.into(),
            child,
            log,
        });
        self.procs.len() - 1
    }

    /// A veth pair between two namespaces, `a_if` in `a`, `b_if` in `b`, both up.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        self.ip(
            a,
            &[
                "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
            ],
        );
        self.ip(a, &["link", "set", a_if, "up"]);
        self.ip(b, &["link", "set", b_if, "up"]);
    }

    /// Every process's log, for a failing test.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            s += &format!("--- {} ---\n{}\n", p.name, p.log());
        }
        s
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.procs.clear();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A bare HTTP/1.1 GET with `Host: host` (connection: close): (status, body).
pub fn http_get(addr: SocketAddr, path: &str, host: &str) -> std::io::Result<(u16, String)> {
    http_get_with(addr, path, host, &[])
}

/// [`http_get`] with more request headers.
pub fn http_get_with(
    addr: SocketAddr,
    path: &str,
    host: &str,
    headers: &[(String, String)],
) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, host, headers).map(|a| (a.status, a.body))
}

/// An HTTP answer with its headers (names lowercased).
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A bare HTTP/1.1 request without a body (`Connection: close`), with `Host: host` and more
/// request headers.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(String, String)],
) -> std::io::Result<HttpAnswer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let length = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}{length}Connection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

/// A `Transfer-Encoding: chunked` body, joined.
fn dechunk(body: &str) -> std::io::Result<String> {
    let bad = |what: &str| std::io::Error::other(format!("bad chunked body ({what}): {body:?}"));
    let mut rest = body;
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or_else(|| bad("no size line"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("size"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or_else(|| bad("short chunk"))?;
        out.push_str(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| bad("no CRLF after a chunk"))?;
    }
}

pub mod load;
mod mesh;
#[allow(unused_imports)] // not every test binary builds a clusterset
pub use mesh::{ClusterNet, Mesh, Pod, admin_config, admin_metric, admin_metric_sum};
