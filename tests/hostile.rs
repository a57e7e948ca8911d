//! Hostile input at every port fedmesh opens, probed from outside against the real processes of
//! a namespaced clusterset (as `tests/netns.rs` builds it): idle and slow-loris connections (at the
//! TLS handshake and inside the protocol), oversized heads, an HTTP/2 rapid reset and header
//! flood, and garbage. Each listener must cut or refuse them within its documented limit, stay
//! within bounded memory, and serve good clients meanwhile: cross-cluster requests flow through
//! the probed sidecars, gateway, control planes and hub the whole time, and none fails. The
//! limits are listed in SECURITY.md. Needs root and `ip netns`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use fedmesh_test_support::attack::{self, CONTINUATION, HEADERS, frame, proc_kib};
use fedmesh_test_support::probe::{self, H1_HEAD_START, HoldReport, TLS_RECORD_START, Wire};
use support::netns::load::{Clients, report};
use support::netns::{HUB_IP, Mesh, SIDECAR_ADMIN, admin_metric, in_ns};
use support::pods::{clusterset_ip, export, wait_answer_from};

const API: &str = "api.shop.svc.clusterset.local";
/// Connections of each kind a probe holds open against one listener.
const HELD: usize = 40;
/// A probe gives up on a connection the listener has not cut after this long.
const GIVE_UP: Duration = Duration::from_secs(50);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/1.1 or HTTP/2 by detection, in plain text.
    Auto,
    /// HTTP/2 (gRPC) inside TLS.
    H2Tls,
    /// HTTP/2 (gRPC) in plain text.
    H2c,
    /// TLS passed through unread (the gateway); a client certificate required (the inbound).
    TlsOnly,
    /// DNS over TCP.
    DnsTcp,
}

struct Target {
    name: &'static str,
    ns: String,
    pid: u32,
    addr: SocketAddr,
    proto: Proto,
    /// How plain-text probes reach it: TCP, or the Unix socket of the Workload API.
    plain: Wire,
}

impl Target {
    fn tcp(name: &'static str, ns: &str, pid: u32, addr: SocketAddr, proto: Proto) -> Target {
        Target {
            name,
            ns: ns.to_string(),
            pid,
            addr,
            proto,
            plain: Wire::Tcp,
        }
    }
}

/// What one listener did with each probe.
#[derive(Debug)]
struct Findings {
    /// Connections that never sent a byte (after TLS, where the port speaks TLS).
    idle: HoldReport,
    /// Connections dribbling a request head (an HTTP/2 header block, a DNS message) a byte a
    /// second.
    slow: HoldReport,
    /// Connections dribbling their TLS ClientHello (ports that speak HTTP/2 inside TLS).
    slow_tls: Option<HoldReport>,
    /// A 1 MiB request head (HTTP/1.1: the status line answered, or how it ended), a 1 MiB
    /// HTTP/2 header list, a 16 KiB ClientHello record, a DNS message claiming more than it sends.
    oversized: Oversized,
    /// 2,000 streams opened and reset at once.
    rapid_reset: Option<probe::H2Outcome>,
    /// 64 KiB of garbage: how long until the connection was closed.
    garbage: Result<Duration, String>,
}

#[derive(Debug)]
enum Oversized {
    Http1(String),
    Http2(probe::H2Outcome),
    Closed(Result<Duration, String>),
}

/// A HEADERS frame whose block never ends, and the header of a CONTINUATION that claims 4 KiB:
/// what follows is dripped (an HTTP/2 slow-loris).
fn h2_slow_opening() -> Vec<u8> {
    let mut o = attack::client_start();
    o.extend(frame(HEADERS, 0, 1, &probe::h2_get("probe")));
    let mut c = frame(CONTINUATION, 0, 1, &[]);
    c[0..3].copy_from_slice(&4096u32.to_be_bytes()[1..]);
    o.extend(c);
    o
}

async fn battery(t: &Target) -> Findings {
    let (wire, opening, drip): (Wire, Vec<u8>, &[u8]) = match t.proto {
        Proto::Http1 | Proto::Auto => (t.plain.clone(), H1_HEAD_START.to_vec(), b"a"),
        Proto::H2Tls => (Wire::Tls(vec![b"h2".to_vec()]), h2_slow_opening(), b"a"),
        Proto::H2c => (t.plain.clone(), h2_slow_opening(), b"a"),
        Proto::TlsOnly => (Wire::Tcp, TLS_RECORD_START.to_vec(), b"a"),
        // A length prefix that promises 512 bytes.
        Proto::DnsTcp => (Wire::Tcp, vec![0x02, 0x00, 0x12], b"a"),
    };
    let second = Duration::from_secs(1);
    let idle = probe::hold(t.addr, wire.clone(), HELD, &[], &[], second, GIVE_UP);
    let slow = probe::hold(t.addr, wire.clone(), HELD, &opening, drip, second, GIVE_UP);
    let slow_tls = async {
        match t.proto {
            Proto::H2Tls => Some(
                probe::hold(
                    t.addr,
                    Wire::Tcp,
                    HELD,
                    TLS_RECORD_START,
                    b"a",
                    second,
                    GIVE_UP,
                )
                .await,
            ),
            _ => None,
        }
    };
    let oversized = async {
        match t.proto {
            Proto::Http1 | Proto::Auto => Oversized::Http1(
                probe::h1_exchange(t.addr, wire.clone(), &probe::h1_oversized_request(1 << 20))
                    .await,
            ),
            Proto::H2Tls | Proto::H2c => Oversized::Http2(
                probe::h2_frames(
                    t.addr,
                    wire.clone(),
                    probe::h2_oversized_headers(&probe::h2_get("probe"), 1 << 20),
                    Duration::from_secs(10),
                )
                .await,
            ),
            Proto::TlsOnly => {
                let mut hello = vec![0x16, 0x03, 0x01, 0x40, 0x00];
                hello.extend(std::iter::repeat_n(0x01, 0x4000));
                Oversized::Closed(
                    probe::garbage(t.addr, Wire::Tcp, hello.len(), Duration::from_secs(30)).await,
                )
            }
            Proto::DnsTcp => Oversized::Closed(
                probe::garbage(t.addr, Wire::Tcp, 70_000, Duration::from_secs(30)).await,
            ),
        }
    };
    let rapid_reset = async {
        match t.proto {
            Proto::H2Tls | Proto::H2c | Proto::Auto => Some(
                probe::h2_frames(
                    t.addr,
                    if t.proto == Proto::H2Tls {
                        wire.clone()
                    } else {
                        t.plain.clone()
                    },
                    probe::rapid_reset(2000, &probe::h2_get("probe")),
                    Duration::from_secs(10),
                )
                .await,
            ),
            _ => None,
        }
    };
    let garbage = probe::garbage(
        t.addr,
        match t.proto {
            Proto::H2Tls => Wire::Tls(vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
            Proto::TlsOnly | Proto::DnsTcp => Wire::Tcp,
            _ => t.plain.clone(),
        },
        64 * 1024,
        Duration::from_secs(30),
    );
    let (idle, slow, slow_tls, oversized, rapid_reset, garbage) =
        tokio::join!(idle, slow, slow_tls, oversized, rapid_reset, garbage);
    Findings {
        idle,
        slow,
        slow_tls,
        oversized,
        rapid_reset,
        garbage,
    }
}

/// The longest time to a cut, as a report's cell.
fn cut_cell(r: &HoldReport) -> String {
    match r.all_cut_within() {
        Some(d) => format!("{:.1} s", d.as_secs_f64()),
        None => format!(
            "{} of {} held past {GIVE_UP:?}",
            r.count(|h| matches!(h, probe::Held::Open)),
            r.held.len()
        ),
    }
}

/// What is wrong with how `t` handled the probes (empty: nothing).
fn judge(t: &Target, f: &Findings) -> Vec<String> {
    let mut wrong = Vec::new();
    for (what, r) in [
        ("idle", Some(&f.idle)),
        ("slow", Some(&f.slow)),
        ("slow TLS", f.slow_tls.as_ref()),
    ] {
        if let Some(r) = r
            && r.all_cut_within().is_none()
        {
            wrong.push(format!("{what} connections not cut: {}", cut_cell(r)));
        }
    }
    match &f.oversized {
        Oversized::Http1(answer) => {
            if !(answer.starts_with("HTTP/1.1 431")
                || answer.contains("closed")
                || answer.contains("reset"))
            {
                wrong.push(format!("a 1 MiB head got {answer:?}, not 431 or a close"));
            }
        }
        Oversized::Http2(o) => {
            if o.responses > 0 || !(o.closed || o.goaway.is_some() || o.resets > 0) {
                wrong.push(format!("a 1 MiB header list was not refused: {o:?}"));
            }
        }
        Oversized::Closed(r) => {
            if let Err(e) = r {
                wrong.push(format!("an oversized message was not refused: {e}"));
            }
        }
    }
    if let Some(o) = &f.rapid_reset
        && !(o.closed || o.goaway == Some(0xb))
    {
        wrong.push(format!("a rapid reset was not cut: {o:?}"));
    }
    if let Err(e) = &f.garbage {
        wrong.push(format!("garbage: {e}"));
    }
    if wrong.is_empty() {
        return wrong;
    }
    wrong.iter().map(|w| format!("{}: {w}", t.name)).collect()
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn every_listener_cuts_slow_idle_oversized_and_garbage_clients_and_keeps_serving() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let otlp = format!("{HUB_IP}:4318");
    let otlp_tls = format!("{HUB_IP}:4317");
    let mut mesh = Mesh::start_with_hub_args(
        dir.path(),
        &["--otlp-plaintext-listen", &otlp, "--otlp-listen", &otlp_tls],
    );
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend"]);
    let mut west = mesh.add_cluster(2, "west", "us-west", &["api"]);
    mesh.net.procs[west.control_plane].terminate(Duration::from_secs(10));
    let bundle = format!("{}:8443", west.node_ip);
    mesh.restart_control_plane_with(&mut west, &["--bundle-endpoint", &bundle]);
    let api = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    export(&west, "api", &[(&api, "us-west-1a")]);
    let frontend = mesh.add_pod(&mut east, "frontend", "us-east-1a", false);
    let api_ip = clusterset_ip(&frontend, &east, "api");
    wait_answer_from(&frontend, api_ip, API, "west");

    let pid = |i: usize| mesh.net.procs[i].pid() as u32;
    let agent = mesh
        .net
        .procs
        .iter()
        .find(|p| p.name == "west-agent")
        .expect("west's node agent")
        .pid() as u32;
    let (wan, node) = (mesh.wan.as_str(), west.node.as_str());
    let targets = vec![
        Target::tcp(
            "hub federation (gRPC, TLS)",
            wan,
            pid(mesh.hub),
            SocketAddr::from((HUB_IP, 9443)),
            Proto::H2Tls,
        ),
        Target::tcp(
            "hub admin",
            wan,
            pid(mesh.hub),
            SocketAddr::from((HUB_IP, 9080)),
            Proto::Http1,
        ),
        Target::tcp(
            "hub OTLP (plain text)",
            wan,
            pid(mesh.hub),
            otlp.parse().unwrap(),
            Proto::Auto,
        ),
        Target::tcp(
            "hub OTLP (TLS)",
            wan,
            pid(mesh.hub),
            otlp_tls.parse().unwrap(),
            Proto::H2Tls,
        ),
        Target::tcp(
            "gateway",
            wan,
            pid(west.gateway),
            west.gateway(),
            Proto::TlsOnly,
        ),
        Target::tcp(
            "gateway admin",
            node,
            pid(west.gateway),
            west.gateway_admin(),
            Proto::Http1,
        ),
        Target::tcp(
            "control plane (gRPC, TLS)",
            node,
            pid(west.control_plane),
            SocketAddr::from((west.node_ip, 15012)),
            Proto::H2Tls,
        ),
        Target::tcp(
            "control plane DNS (TCP)",
            node,
            pid(west.control_plane),
            west.dns(),
            Proto::DnsTcp,
        ),
        Target::tcp(
            "control plane bundle endpoint",
            node,
            pid(west.control_plane),
            bundle.parse().unwrap(),
            Proto::TlsOnly,
        ),
        Target {
            name: "Workload API socket",
            ns: node.to_string(),
            pid: agent,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            proto: Proto::H2c,
            plain: Wire::Unix(west.agent_socket.clone()),
        },
        Target::tcp(
            "sidecar inbound",
            node,
            pid(api.sidecar),
            SocketAddr::from((api.ip, 15006)),
            Proto::TlsOnly,
        ),
        Target::tcp(
            "sidecar admin",
            node,
            pid(api.sidecar),
            SocketAddr::from((api.ip, SIDECAR_ADMIN)),
            Proto::Http1,
        ),
        // As the app's own connections reach it: to a service's address, redirected by iptables.
        Target::tcp(
            "sidecar outbound",
            &frontend.ns,
            pid(frontend.sidecar),
            SocketAddr::from((api_ip, 80)),
            Proto::Auto,
        ),
        // Dialled directly, the outbound port must not forward a connection to itself.
        Target::tcp(
            "sidecar outbound port dialled directly",
            &frontend.ns,
            pid(frontend.sidecar),
            SocketAddr::from(([127, 0, 0, 1], 15001)),
            Proto::Auto,
        ),
        Target::tcp(
            "sidecar app OTLP",
            &frontend.ns,
            pid(frontend.sidecar),
            SocketAddr::from(([127, 0, 0, 1], 4317)),
            Proto::H2c,
        ),
    ];

    let mut pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
    pids.sort();
    pids.dedup();
    let before: Vec<(u32, u64, usize)> = pids
        .iter()
        .map(|&p| (p, proc_kib(p, "VmRSS"), open_fds(p)))
        .collect();
    let clients = Clients::start(&frontend, api_ip, API, &["GET", "GET"], "/");
    let findings: Vec<Findings> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || in_ns(&t.ns, || runtime().block_on(battery(t)))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let outcomes = clients.finish();

    let mut wrong = Vec::new();
    for (t, f) in targets.iter().zip(&findings) {
        eprintln!(
            "HOSTILE | {} | idle cut {} | slow cut {} | slow TLS cut {} | oversized {:?} | rapid reset {:?} | garbage {:?}",
            t.name,
            cut_cell(&f.idle),
            cut_cell(&f.slow),
            f.slow_tls
                .as_ref()
                .map(cut_cell)
                .unwrap_or_else(|| "-".into()),
            f.oversized,
            f.rapid_reset.as_ref().map(|o| (o.goaway, o.closed)),
            f.garbage,
        );
        wrong.extend(judge(t, f));
    }
    // Memory stays bounded, and every connection the probes held is released.
    for (p, rss, fds) in &before {
        let peak = proc_kib(*p, "VmHWM");
        eprintln!("HOSTILE | pid {p} | RSS {rss} KiB before, peak {peak} KiB | {fds} fds before");
        if peak > rss + 64 * 1024 {
            wrong.push(format!(
                "pid {p}: memory grew from {rss} KiB to a peak of {peak} KiB"
            ));
        }
        let released = support::eventually(Duration::from_secs(30), || open_fds(*p) <= fds + 16);
        if !released {
            wrong.push(format!(
                "pid {p}: {} fds open after the probes, {fds} before",
                open_fds(*p)
            ));
        }
    }
    let loops = admin_metric(&frontend, "fedmesh_sidecar_refused_total{reason=\"loop\"}");
    if loops == 0 {
        wrong.push("the outbound port dialled directly was not refused as a loop".into());
    }
    let (sent, failed, gap) = report(&outcomes);
    eprintln!("HOSTILE | good client | {sent} requests | {failed} failed | longest gap {gap:?}");
    if failed > 0 {
        let bad: Vec<_> = outcomes.iter().filter(|o| !o.ok()).take(5).collect();
        wrong.push(format!(
            "{failed} of {sent} good requests failed meanwhile: {bad:?}"
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The control plane's DNS over UDP: malformed and oversized datagrams get no answer or an error
/// and cost nothing, a name outside the clusterset is not resolved (no open recursion), and
/// clusterset names still are.
#[test]
fn cluster_dns_refuses_malformed_queries_and_does_not_recurse() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let mut west = mesh.add_cluster(2, "west", "us-west", &["api"]);
    let api = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    export(&west, "api", &[(&api, "us-west-1a")]);
    let dns = west.dns();
    in_ns(&west.node, || {
        runtime().block_on(async {
            let answered = |q: Vec<u8>| async move { probe::dns_udp(dns, &q).await };
            // Garbage, a truncated header, 4 KiB of junk, a question with a label past 63 bytes.
            let mut long_label = probe::dns_query(7, "x.clusterset.local", 1);
            long_label[12] = 200;
            for junk in [
                vec![0xff; 5],
                vec![0x13, 0x37, 0x01],
                vec![0xab; 4096],
                long_label,
            ] {
                if let Some(a) = answered(junk.clone()).await {
                    let (_, rcode, _, count) = probe::dns_header(&a).unwrap_or((0, 1, false, 0));
                    assert!(
                        rcode != 0 && count == 0,
                        "junk {:?}… answered {a:?}",
                        &junk[..junk.len().min(8)]
                    );
                }
            }
            for name in ["example.com", "kubernetes.io"] {
                let a = answered(probe::dns_query(9, name, 1))
                    .await
                    .unwrap_or_else(|| panic!("no answer for {name}"));
                let (id, rcode, recursion, count) = probe::dns_header(&a).unwrap();
                assert_eq!(
                    (id, count, recursion),
                    (9, 0, false),
                    "{name} is not resolved: {a:?}"
                );
                assert_ne!(rcode, 0, "{name}: an error code, not NOERROR");
            }
            wait_dns(dns, API).await;
        })
    });
}

/// Waits until `name` resolves (the export reached the control plane) and checks the answer.
async fn wait_dns(dns: SocketAddr, name: &str) {
    for _ in 0..300 {
        if let Some(a) = probe::dns_udp(dns, &probe::dns_query(11, name, 1)).await
            && let Some((11, 0, _, n)) = probe::dns_header(&a)
            && n > 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never resolved");
}
