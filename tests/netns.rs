//! The data plane across clusters that share nothing but a WAN: every cluster in its own network
//! namespace, every pod in its own, sidecars intercepting with iptables (`fedmesh iptables`, as
//! the injected init container does), and only the east-west gateways reachable between
//! clusters. Needs root and `ip netns`; elsewhere the tests say so and skip (CI requires them).

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedmesh_testbed::apps::EchoResponse;
use fedmesh_testbed::yaml;
use support::netns::{Mesh, Pod, SIDECAR_ADMIN, http_get, in_ns};
use support::pods::{call, clusterset_ip, export, wait_answer_from};
use support::wait_until;

fn connects(ns: &str, addr: SocketAddr) -> bool {
    in_ns(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_ok()
    })
}

#[test]
fn clusters_reach_each_other_only_through_gateways_with_mtls_and_transparent_sidecars() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend"]);
    let mut west = mesh.add_cluster(2, "west", "us-west", &["api", "reports"]);
    let api = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    export(&west, "api", &[(&api, "us-west-1a")]);
    let frontend = mesh.add_pod(&mut east, "frontend", "us-east-1a", false);

    let ip = clusterset_ip(&frontend, &east, "api");
    let host = "api.shop.svc.clusterset.local";
    let answer = wait_answer_from(&frontend, ip, host, "west");
    eprintln!("east → west: {answer:?}");
    assert_eq!(answer.workload, "api");
    assert_eq!(
        answer.caller, "spiffe://east.fedmesh.test/ns/shop/sa/frontend",
        "the west app sees the east caller's SPIFFE ID (mTLS end to end)"
    );
    for _ in 0..20 {
        let r = call(&frontend, ip, host).expect("steady calls succeed");
        assert_eq!(r.cluster, "west");
    }

    // The request crossed the WAN only through west's gateway, routed by SNI.
    let metrics = in_ns(&west.node, {
        let a = west.gateway_admin();
        move || http_get(a, "/metrics", "gw").unwrap().1
    });
    assert!(
        metrics.contains("api.shop.west"),
        "the west gateway counted the api SNI: {metrics}"
    );

    // Only the gateway is reachable across clusters: not a pod, not the control plane.
    assert!(
        connects(&east.node, west.gateway()),
        "west's gateway is reachable"
    );
    // Even with a route to west's pod through west's node (as a flat WAN could give it), west's
    // node forwards nothing new from the WAN: the pod stays unreachable.
    let pod = api.app_addr().ip().to_string();
    let via = west.wan_ip.to_string();
    mesh.net.ip(
        &east.node,
        &["route", "replace", &format!("{pod}/32"), "via", &via],
    );
    assert!(
        !connects(&east.node, api.app_addr()),
        "a west pod must not be reachable from east, even routed through west's node"
    );
    assert!(
        !connects(&east.node, SocketAddr::from((west.wan_ip, 15012))),
        "west's control plane must not be reachable from the WAN"
    );
    // From inside west the pod is reachable, but a plain-text client meets the sidecar's
    // inbound (it wants mTLS), not the app.
    assert!(
        connects(&west.node, api.app_addr()),
        "west's node reaches the api pod"
    );
    let node_plain = in_ns(&west.node, {
        let a = api.app_addr();
        move || http_get(a, "/", "api")
    });
    assert!(
        !matches!(node_plain, Ok((200, _))),
        "plain text from west's node reached the app past its sidecar: {node_plain:?}"
    );
    // The sidecar's admin port answers the kubelet's probes at the pod's address, but its
    // routing table (services, endpoints, policies) only to loopback inside the pod.
    let admin = SocketAddr::from((api.ip, SIDECAR_ADMIN));
    let (probe, _) = in_ns(&west.node, move || http_get(admin, "/readyz", "x").unwrap());
    assert_eq!(probe, 200);
    let (code, body) = in_ns(&west.node, move || http_get(admin, "/config", "x").unwrap());
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("loopback only"), "{body}");
    let (code, body) = in_ns(&api.ns, || {
        http_get(
            SocketAddr::from(([127, 0, 0, 1], SIDECAR_ADMIN)),
            "/config",
            "x",
        )
        .unwrap()
    });
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("shop/api"), "{body}");

    // A meshed pod in west calling the api pod's own address: its sidecar sends it to that
    // endpoint with mTLS, so the app knows the caller.
    let reports = mesh.add_pod(&mut west, "reports", "us-west-1a", false);
    let start = Instant::now();
    let answer = loop {
        let a = api.app_addr();
        let r = in_ns(&reports.ns, move || http_get(a, "/", "api"));
        if let Ok((200, body)) = &r {
            break serde_json::from_str::<EchoResponse>(body).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the api pod's address never answered: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        answer.caller, "spiffe://west.fedmesh.test/ns/shop/sa/reports",
        "a pod's own address is reached with mTLS"
    );
    drop(reports);
    drop(frontend);
    drop(api);
}

/// Requests one after another from `pod` until stopped: who answered, and what failed.
struct Stream {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Stream {
    fn start(pod: &Pod, ip: Ipv4Addr, host: &str) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let fd = std::fs::File::open(format!("/run/netns/{}", pod.ns)).unwrap();
        let (s, se, f, host) = (stop.clone(), seen.clone(), failed.clone(), host.to_string());
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            assert_eq!(
                unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            // Bounded: at most 20,000 requests or 5 minutes.
            let start = Instant::now();
            for _ in 0..20_000 {
                if s.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(300) {
                    break;
                }
                match http_get(SocketAddr::from((ip, 80)), "/", &host) {
                    Ok((200, body)) => match serde_json::from_str::<EchoResponse>(&body) {
                        Ok(e) => se.lock().unwrap().push(format!("{}/{}", e.cluster, e.zone)),
                        Err(e) => f.lock().unwrap().push(format!("{e}: {body}")),
                    },
                    Ok((code, body)) => f.lock().unwrap().push(format!("{code}: {body}")),
                    Err(e) => f.lock().unwrap().push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Stream {
            stop,
            seen,
            failed,
            thread,
        }
    }

    /// Waits until the last `n` answers all came from `place` ("cluster/zone").
    fn until_all_from(&self, place: &str, n: usize) {
        wait_until(
            &format!("{n} answers in a row from {place}"),
            Duration::from_secs(90),
            || {
                let seen = self.seen.lock().unwrap();
                seen.len() >= n && seen[seen.len() - n..].iter().all(|s| s == place)
            },
        );
    }

    fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let seen = self.seen.lock().unwrap().clone();
        let failed = self.failed.lock().unwrap().clone();
        (seen, failed)
    }
}

#[test]
fn failover_with_zero_failed_requests_and_a_split_across_three_namespaced_clusters() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend", "api"]);
    let mut west = mesh.add_cluster(2, "west", "us-west", &["api", "reviews"]);
    let mut central = mesh.add_cluster(3, "central", "eu-central", &["reviews"]);
    let mut api_e = mesh.add_pod(&mut east, "api", "us-east-1a", true);
    let api_w = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    let rev_w = mesh.add_pod(&mut west, "reviews", "us-west-1a", true);
    let rev_c = mesh.add_pod(&mut central, "reviews", "eu-central-1a", true);
    export(&east, "api", &[(&api_e, "us-east-1a")]);
    export(&west, "api", &[(&api_w, "us-west-1a")]);
    export(&west, "reviews", &[(&rev_w, "us-west-1a")]);
    export(&central, "reviews", &[(&rev_c, "eu-central-1a")]);
    east.write(
        "reviews-split.yaml",
        &yaml::cluster_split("shop", "reviews", &[("west", 70), ("central", 30)]),
    );
    let frontend = mesh.add_pod(&mut east, "frontend", "us-east-1a", false);

    // The split: 70/30 between west and central, for a caller in east.
    let reviews = clusterset_ip(&frontend, &east, "reviews");
    let rhost = "reviews.shop.svc.clusterset.local";
    wait_answer_from(&frontend, reviews, rhost, "west");
    wait_answer_from(&frontend, reviews, rhost, "central");
    let mut by_cluster = BTreeMap::<String, usize>::new();
    let n = 1200;
    for _ in 0..n {
        let r = call(&frontend, reviews, rhost).expect("split calls succeed");
        *by_cluster.entry(r.cluster).or_default() += 1;
    }
    let west_n = by_cluster.get("west").copied().unwrap_or(0);
    let central_n = by_cluster.get("central").copied().unwrap_or(0);
    eprintln!("reviews split: {by_cluster:?}");
    assert_eq!(west_n + central_n, n, "{by_cluster:?}");
    // 70% of 1,200 is 840 (σ 15.9): within four standard deviations, 776..=904 (64.7–75.3%),
    // which a 60/40 (720) or 80/20 (960) split would miss.
    assert!((776..=904).contains(&west_n), "70/30 split: {by_cluster:?}");

    // Failover: api is in east (local) and west. Traffic stays local, then east's api pod goes
    // away and traffic moves to west with no failed request, then comes back.
    let api = clusterset_ip(&frontend, &east, "api");
    let ahost = "api.shop.svc.clusterset.local";
    wait_answer_from(&frontend, api, ahost, "east");
    let stream = Stream::start(&frontend, api, ahost);
    stream.until_all_from("east/us-east-1a", 50);
    mesh.stop_pod(&api_e);
    stream.until_all_from("west/us-west-1a", 100);
    mesh.restart_pod(&east, &mut api_e, "api", "us-east-1a");
    stream.until_all_from("east/us-east-1a", 100);
    let (seen, failed) = stream.finish();
    eprintln!(
        "failover stream: {} answers, {} failed",
        seen.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during failover ({} answered): {failed:?}",
        seen.len()
    );
    drop((api_w, rev_w, rev_c, frontend));
}

/// `fedmesh iptables` as the README and the injected init container use it, in a namespace of
/// the test's own: it installs the interception rules in FEDMESH_* chains, running it again
/// replaces them rather than adding a second set, and `--remove` takes them all out.
#[test]
fn fedmesh_iptables_installs_replaces_and_removes_its_rules() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut net = support::netns::Net::new(dir.path());
    let ns = net.add_ns("ipt");
    let fedmesh = env!("CARGO_BIN_EXE_fedmesh");
    let nat = |net: &support::netns::Net| {
        String::from_utf8(net.exec(&ns, "iptables-save", &["-t", "nat"]).stdout).unwrap()
    };
    // Each chain's rules in order, as iptables-save writes them (without the `-m tcp` it adds).
    let rules = |text: &str| -> Vec<String> {
        [
            "PREROUTING",
            "OUTPUT",
            "FEDMESH_INBOUND",
            "FEDMESH_OUTBOUND",
        ]
        .iter()
        .flat_map(|chain| {
            text.lines()
                .filter(move |l| l.starts_with(&format!("-A {chain} ")))
                .filter(|l| l.contains("FEDMESH"))
                .map(|l| l.replace(" -m tcp", ""))
        })
        .collect()
    };
    let args = [
        "iptables",
        "--proxy-uid",
        "1337",
        "--exclude-inbound-ports",
        "15020",
    ];
    net.exec(&ns, fedmesh, &args);
    let first = rules(&nat(&net));
    assert!(
        first
            .iter()
            .any(|r| r.contains("REDIRECT --to-ports 15006"))
            && first
                .iter()
                .any(|r| r.contains("REDIRECT --to-ports 15001"))
            && first
                .iter()
                .any(|r| r.contains("--uid-owner 1337") && r.ends_with("RETURN"))
            && first
                .iter()
                .any(|r| r.contains("--dport 15020") && r.ends_with("RETURN")),
        "{first:#?}"
    );
    // What --print shows is what was installed.
    let printed = String::from_utf8(
        std::process::Command::new(fedmesh)
            .args(args)
            .arg("--print")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(
        first,
        rules(&printed),
        "--print shows the installed rules, in order"
    );
    // The exclusion comes before the redirect it exempts from.
    let inbound: Vec<&String> = first
        .iter()
        .filter(|r| r.starts_with("-A FEDMESH_INBOUND"))
        .collect();
    assert!(
        inbound[0].contains("--dport 15020") && inbound[1].contains("REDIRECT"),
        "{inbound:#?}"
    );
    // Again: the same rules, once.
    net.exec(&ns, fedmesh, &args);
    assert_eq!(
        rules(&nat(&net)),
        first,
        "running it again replaces, never duplicates"
    );
    // --remove: no FEDMESH chain or rule is left.
    net.exec(
        &ns,
        fedmesh,
        &["iptables", "--proxy-uid", "1337", "--remove"],
    );
    let left = nat(&net);
    assert!(!left.contains("FEDMESH"), "{left}");
}
