//! A hub and control planes as real processes, joined as a user joins them.

use std::path::Path;
use std::time::Duration;

use super::*;

pub struct Hub {
    pub proc: Proc,
    pub admin: String,
    pub grpc: String,
    pub token_file: std::path::PathBuf,
}

pub fn start_hub(dir: &Path) -> Hub {
    start_hub_with(dir, &["--stale-after", "2s"])
}

/// A hub (data in `<dir>/hub`) on free loopback ports, with more flags.
pub fn start_hub_with(dir: &Path, extra: &[&str]) -> Hub {
    let (grpc, admin) = (free_port(), free_port());
    let data = dir.join("hub");
    let (grpc_addr, admin_addr) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{admin}"));
    let mut args = vec![
        "hub",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        &grpc_addr,
        "--admin-listen",
        &admin_addr,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::start("hub", &args, dir);
    wait_until("the hub admin API", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok()
    });
    Hub {
        proc,
        admin: format!("http://127.0.0.1:{admin}"),
        grpc: grpc_addr,
        token_file: data.join("admin-token"),
    }
}

/// `METHOD path` on the hub's plain-HTTP admin API with its admin token and a JSON `body`:
/// (status, body).
pub fn admin_request(hub: &Hub, method: &str, path: &str, body: &str) -> (u16, String) {
    admin_request_as(hub, method, path, body, "application/json")
}

/// [`admin_request`] with the body's `Content-Type`.
pub fn admin_request_as(
    hub: &Hub,
    method: &str,
    path: &str,
    body: &str,
    content_type: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let token = std::fs::read_to_string(&hub.token_file).unwrap();
    let addr = hub.admin.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        token.trim(),
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

pub fn admin_args(hub: &Hub) -> Vec<String> {
    vec![
        "--admin".into(),
        hub.admin.clone(),
        "--admin-token-file".into(),
        hub.token_file.display().to_string(),
    ]
}

pub fn run(args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    fedmesh(&a)
}

/// A control plane for cluster `name` (trust domain `<name>.example`) joined to `hub`.
pub fn start_cp(dir: &Path, hub: &Hub, name: &str) -> Proc {
    start_cp_on(dir, hub, name, free_port())
}

/// [`start_cp`] with its gRPC port (agents, data plane) at `listen`.
pub fn start_cp_on(dir: &Path, hub: &Hub, name: &str, listen: u16) -> Proc {
    let token_file = join_token_file(dir, hub, name);
    let args = cp_args(dir, hub, name, &format!("{name}-data"), &token_file, listen);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start(name, &args, dir)
}

/// A join token for cluster `name` (trust domain `<name>.example`) from the hub's CLI, kept as
/// the README keeps it: in a 0600 file (`<dir>/<name>.token`), never on a command line.
pub fn join_token_file(dir: &Path, hub: &Hub, name: &str) -> std::path::PathBuf {
    let mut args = vec![
        "hub".to_string(),
        "token".into(),
        "create".into(),
        "--cluster".into(),
        name.into(),
        "--trust-domain".into(),
        format!("{name}.example"),
    ];
    args.extend(admin_args(hub));
    let out = run(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("fmj1."), "{token}");
    let token_file = dir.join(format!("{name}.token"));
    write_secret(&token_file, &token);
    token_file
}

/// The flags of a control plane of cluster `name` (trust domain `<name>.example`, sources in
/// `<dir>/<name>-src`, data in `<dir>/<data>`) joining `hub` with the token in `token_file`.
pub fn cp_args(
    dir: &Path,
    hub: &Hub,
    name: &str,
    data: &str,
    token_file: &Path,
    listen: u16,
) -> Vec<String> {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    [
        "control-plane",
        "--cluster",
        name,
        "--trust-domain",
        &format!("{name}.example"),
        "--region",
        &format!("{name}-1"),
        "--data-dir",
        dir.join(data).to_str().unwrap(),
        "--source",
        &format!("dir:{}", src.display()),
        "--hub",
        &hub.grpc,
        "--join-token-file",
        token_file.to_str().unwrap(),
        "--gateway",
        &format!("127.0.0.1:{}", free_port()),
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--dns-listen",
        &format!("127.0.0.1:{}", free_port()),
    ]
    .map(String::from)
    .to_vec()
}

/// The flags of hub replica `name` on the secured `etcd` (data in `<dir>/<name>`, the replicas'
/// shared CA in `<dir>/hub-ca`, their shared admin token in `token`), listening on `grpc` and
/// `admin` (HOST:PORT).
pub fn etcd_replica_args(
    etcd: &fedmesh_test_support::EtcdServer,
    dir: &Path,
    name: &str,
    token: &Path,
    grpc: &str,
    admin: &str,
) -> Vec<String> {
    let creds = etcd.secure.as_ref().expect("a secured etcd");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    vec![
        "hub".into(),
        "--data-dir".into(),
        p(&dir.join(name)),
        "--store".into(),
        format!("etcd:{}", etcd.url),
        "--etcd-ca".into(),
        p(&creds.ca_file),
        "--etcd-cert".into(),
        p(&creds.client_cert_file),
        "--etcd-key".into(),
        p(&creds.client_key_file),
        "--etcd-user".into(),
        creds.user.clone(),
        "--etcd-password-file".into(),
        p(&creds.password_file),
        "--ca-dir".into(),
        p(&dir.join("hub-ca")),
        "--admin-token-file".into(),
        p(token),
        "--replica".into(),
        name.into(),
        "--listen".into(),
        grpc.into(),
        "--admin-listen".into(),
        admin.into(),
    ]
}

/// `fedmesh control-plane ARGS --data-dir <data>` against a running control plane; panics with
/// its stderr on failure.
pub fn cp_admin(data: &Path, args: &[&str]) {
    let mut a = vec!["control-plane"];
    a.extend_from_slice(args);
    a.extend(["--data-dir", data.to_str().unwrap()]);
    let out = fedmesh(&a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Enrolls node `node` of the control plane at `data` for `id` and makes it a one-time join
/// token, as an operator does (`entry create`, `token create`); the token's file.
pub fn enroll(data: &Path, node: &str, id: &str, token: &Path) -> std::path::PathBuf {
    cp_admin(
        data,
        &["entry", "create", "--node", node, "--spiffe-id", id],
    );
    cp_admin(
        data,
        &[
            "token",
            "create",
            "--node",
            node,
            "--out",
            token.to_str().unwrap(),
        ],
    );
    token.to_path_buf()
}

/// Writes an entries file giving this test's uid the identity `id`.
pub fn entries_for_me(file: &Path, id: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "entries:\n  - spiffe_id: {id}\n    selectors: [\"unix:uid:{}\"]\n",
            uid()
        ),
    )
    .unwrap();
    std::fs::rename(tmp, file).unwrap();
}

/// `fedmesh agent --control-plane` for `node`, joined with `token`, serving on `socket`.
pub fn start_agent(
    d: &Path,
    name: &str,
    cp_port: u16,
    node: &str,
    token: &Path,
    entries: &Path,
) -> (Proc, std::path::PathBuf) {
    let socket = d.join(format!("{name}.sock"));
    let p = Proc::start(
        name,
        &[
            "agent",
            "--control-plane",
            &format!("127.0.0.1:{cp_port}"),
            "--node",
            node,
            "--join-token-file",
            token.to_str().unwrap(),
            "--data-dir",
            d.join(name).to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--entries",
            entries.to_str().unwrap(),
        ],
        d,
    );
    wait_until("the agent's socket", Duration::from_secs(30), || {
        socket.exists()
    });
    (p, socket)
}

/// `fedmesh workload fetch --socket S`: the SPIFFE ID it printed, if it got an SVID.
pub fn fetched_id(socket: &Path) -> Option<String> {
    let out = fedmesh(&[
        "workload",
        "fetch",
        "--socket",
        socket.to_str().unwrap(),
        "--timeout",
        "2s",
    ]);
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("spiffe://"))
        .map(String::from)
}
