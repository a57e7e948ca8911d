//! What requests see when the processes under them stop, in clusters that share only a WAN (as
//! `tests/netns.rs` builds them, every process the real binary in its own namespace): an app and
//! a sidecar killed with SIGKILL under concurrent clients, a sidecar draining on SIGTERM within
//! `--drain-timeout`, and a sidecar and a gateway restarted from `--config-cache` while their
//! control planes are down. Needs root and `ip netns`; elsewhere the tests say so and skip (CI
//! requires them).

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedmesh_testbed::apps::EchoResponse;
use support::netns::load::{Clients, Outcome};
use support::netns::{Mesh, Pod, SIDECAR_ADMIN, admin_metric, http_get, http_request, in_ns};
use support::pods::{call, clusterset_ip, export, wait_answer_from};
use support::wait_until;

const API: &str = "api.shop.svc.clusterset.local";

/// A sidecar's `fedmesh_sidecar_request_errors_total{reason=...}`, read in its pod.
fn proxy_errors(pod: &Pod, reason: &str) -> u64 {
    admin_metric(
        pod,
        &format!("fedmesh_sidecar_request_errors_total{{reason=\"{reason}\"}}"),
    )
}

/// A GET of the pod's sidecar admin `path` from inside the pod (loopback, as `/config` needs).
fn admin_get(pod: &Pod, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    in_ns(&pod.ns, move || {
        http_get(
            SocketAddr::from(([127, 0, 0, 1], SIDECAR_ADMIN)),
            &path,
            "x",
        )
        .ok()
    })
}

fn summary(outcomes: &[Outcome]) -> String {
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.ok()).collect();
    format!(
        "{} requests, {} failed: {failed:?}",
        outcomes.len(),
        failed.len()
    )
}

#[test]
fn an_app_or_a_sidecar_killed_with_sigkill_fails_only_the_requests_in_flight_on_it() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let zone = "us-east-1a";
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend", "api"]);
    let api1 = mesh.add_pod(&mut east, "api", zone, true);
    let api2 = mesh.add_pod(&mut east, "api", zone, true);
    let api3 = mesh.add_pod(&mut east, "api", zone, true);
    export(&east, "api", &[(&api1, zone), (&api2, zone), (&api3, zone)]);
    let frontend = mesh.add_pod(&mut east, "frontend", zone, false);
    let ip = clusterset_ip(&frontend, &east, "api");
    wait_answer_from(&frontend, ip, API, "east");

    // Six clients, each with one request in flight at a time, held 150 ms by the app: about two
    // on each endpoint at any moment. Half send GET, half POST.
    let methods = ["GET", "POST", "GET", "POST", "GET", "POST"];
    let clients = Clients::start(&frontend, ip, API, &methods, "/delay/150");
    clients.until_ok_after(Instant::now(), 60);

    // 1. api1's sidecar dies. Requests on their way to it are reset: a GET is retried on
    // another endpoint, a POST may have reached the app and is not. New requests find its
    // port closed and go elsewhere at no cost.
    wait_until("a request at api1", Duration::from_secs(30), || {
        admin_metric(&api1, "fedmesh_sidecar_inbound_requests_active") > 0
    });
    let sidecar_killed = Instant::now();
    mesh.net.procs[api1.sidecar].kill();
    clients.until_ok_after(sidecar_killed, 60);

    // 2. api2's app dies; its sidecar stays. Requests the app held are answered 502
    // `app-error` (it may have acted on them); new ones are refused before the app sees them
    // (`app-unreachable`) and the caller's sidecar sends them elsewhere.
    let errors_before = proxy_errors(&api2, "app_error");
    // The kill lands with the app holding a request (its sidecar says so).
    wait_until("a request at api2's app", Duration::from_secs(30), || {
        admin_metric(&api2, "fedmesh_sidecar_inbound_requests_active") > 0
    });
    let app_killed = Instant::now();
    mesh.net.procs[api2.app.unwrap()].kill();
    clients.until_ok_after(app_killed, 60);
    let outcomes = clients.finish();
    let report = summary(&outcomes);
    eprintln!("{report}");

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    for f in &failed {
        let at_sidecar_kill = f.in_flight_at(sidecar_killed);
        let at_app_kill = f.in_flight_at(app_killed);
        assert!(
            at_sidecar_kill || at_app_kill,
            "only requests in flight at a kill may fail: {f:?}\n{report}"
        );
        if at_app_kill && !at_sidecar_kill {
            assert_eq!(
                f.answer,
                Ok((502, Some("app-error".into()))),
                "a request the dead app held: {report}"
            );
        } else {
            assert_eq!(
                f.method, "POST",
                "a GET reset by a dead sidecar is retried: {report}"
            );
            assert_eq!(
                f.answer,
                Ok((502, Some("upstream-reset".into()))),
                "{report}"
            );
        }
    }
    // Exactly the requests the app held when it died failed: its sidecar counted each.
    let app_failures = failed
        .iter()
        .filter(|f| f.answer == Ok((502, Some("app-error".into()))))
        .count() as u64;
    assert_eq!(
        proxy_errors(&api2, "app_error") - errors_before,
        app_failures,
        "{report}"
    );
    // At most one request per client can be in flight at each kill.
    assert!(failed.len() <= 2 * methods.len(), "{report}");
    // The kills did happen with requests on the wire (else the test proved nothing).
    assert!(
        outcomes.iter().any(|o| o.in_flight_at(app_killed)),
        "{report}"
    );
    drop((api3, frontend));
}

#[test]
fn a_sidecar_on_sigterm_finishes_requests_in_flight_and_cuts_them_at_the_drain_timeout() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let zone = "us-east-1a";
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend", "api"]);
    let api = mesh.add_pod_with(&mut east, "api", zone, true, &["--drain-timeout", "3s"]);
    export(&east, "api", &[(&api, zone)]);
    let frontend = mesh.add_pod(&mut east, "frontend", zone, false);
    let ip = clusterset_ip(&frontend, &east, "api");
    wait_answer_from(&frontend, ip, API, "east");

    // One request the app holds for 1.5 s, well inside the drain timeout, and one it holds
    // for 60 s, far past it.
    let short = Clients::start(&frontend, ip, API, &["GET"], "/delay/1500");
    let long = Clients::start(&frontend, ip, API, &["GET"], "/delay/60000");
    // Both are on the wire before SIGTERM: the api's sidecar holds two requests for its app.
    wait_until(
        "two requests in flight at the api",
        Duration::from_secs(30),
        || admin_metric(&api, "fedmesh_sidecar_inbound_requests_active") == 2,
    );
    let term = Instant::now();
    let pid = mesh.net.procs[api.sidecar].pid();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // It stops answering ready at once, so a load balancer stops sending new work.
    wait_until(
        "the draining sidecar to stop being ready",
        Duration::from_secs(10),
        || admin_get(&api, "/readyz").is_none_or(|(code, _)| code != 200),
    );
    wait_until("the sidecar to exit", Duration::from_secs(30), || {
        mesh.net.procs[api.sidecar].exited()
    });
    let short = short.finish();
    let long = long.finish();
    let first = |o: &[Outcome]| o.first().cloned().expect("a request was sent");
    let (s, l) = (first(&short), first(&long));
    eprintln!("short: {s:?}\nlong: {l:?}");
    assert!(s.started < term && l.started < term);
    assert!(
        s.ok(),
        "the request in flight finished during the drain: {s:?}"
    );
    // The long one was cut when the drain timed out: the caller's sidecar answered for it.
    assert!(
        matches!(&l.answer, Ok((502, Some(_)))),
        "the request past the drain timeout is cut: {l:?}"
    );
    assert!(
        l.ended > s.ended,
        "cut after the short one finished: {s:?} {l:?}"
    );
    let log = mesh.net.procs[api.sidecar].log();
    assert!(log.contains("drain timeout"), "{log}");
    drop(frontend);
}

/// A directory `uid` may write (the proxies do not run as root).
fn cache_dir(root: &Path, name: &str, uid: u32) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    chown(&d, Some(uid), Some(uid)).unwrap();
    d
}

fn connected(pod: &Pod) -> Option<bool> {
    let (code, body) = admin_get(pod, "/config")?;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["controlPlaneConnected"].as_bool()
}

fn answer_from(pod: &Pod, ip: Ipv4Addr) -> Result<EchoResponse, String> {
    call(pod, ip, API)
}

#[test]
fn proxies_restarted_with_their_control_planes_down_route_from_their_config_cache() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path());
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend"]);
    let mut west = mesh.add_cluster(2, "west", "us-west", &["api"]);
    let frontend_uid = east.uid_of("frontend");
    let sidecar_cache = cache_dir(dir.path(), "frontend-cache", frontend_uid).join("config.pb");
    let gateway_cache = cache_dir(dir.path(), "gateway-cache", 1500).join("config.pb");
    let sidecar_flags = ["--config-cache", sidecar_cache.to_str().unwrap()];
    let gateway_flags = ["--config-cache", gateway_cache.to_str().unwrap()];
    mesh.net.procs[west.gateway].terminate(Duration::from_secs(15));
    mesh.start_gateway(&mut west, &gateway_flags);
    let api = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    export(&west, "api", &[(&api, "us-west-1a")]);
    let mut frontend =
        mesh.add_pod_with(&mut east, "frontend", "us-east-1a", false, &sidecar_flags);
    let ip = clusterset_ip(&frontend, &east, "api");
    wait_answer_from(&frontend, ip, API, "west");
    assert_eq!(connected(&frontend), Some(true));
    assert!(sidecar_cache.exists() && gateway_cache.exists());

    // Both control planes die. The proxies say so and keep routing on what they have.
    mesh.net.procs[east.control_plane].kill();
    mesh.net.procs[west.control_plane].kill();
    wait_until(
        "the sidecar to notice its control plane is gone",
        Duration::from_secs(30),
        || connected(&frontend) == Some(false),
    );
    assert_eq!(
        answer_from(&frontend, ip).map(|e| e.cluster),
        Ok("west".into())
    );

    // Restarted from their caches, the sidecar and the gateway are ready at once and route.
    mesh.net.procs[frontend.sidecar].terminate(Duration::from_secs(15));
    mesh.net.procs[west.gateway].terminate(Duration::from_secs(15));
    mesh.start_gateway(&mut west, &gateway_flags);
    mesh.restart_sidecar(
        &east,
        &mut frontend,
        "frontend",
        "us-east-1a",
        &sidecar_flags,
    );
    wait_until(
        "the restarted sidecar to be ready",
        Duration::from_secs(30),
        || admin_get(&frontend, "/readyz").is_some_and(|(code, _)| code == 200),
    );
    assert_eq!(connected(&frontend), Some(false));
    assert_eq!(
        answer_from(&frontend, ip).map(|e| e.cluster),
        Ok("west".into())
    );
    let gw_log = mesh.net.procs[west.gateway].log();
    assert!(
        gw_log.contains("cache"),
        "the gateway says it started from its cache: {gw_log}"
    );

    // Without a cache, a sidecar has nothing to route with until its control plane is back:
    // not ready, and its answers say why.
    mesh.net.procs[frontend.sidecar].terminate(Duration::from_secs(15));
    mesh.restart_sidecar(&east, &mut frontend, "frontend", "us-east-1a", &[]);
    let (code, _) = admin_get(&frontend, "/readyz").unwrap();
    assert_eq!(code, 503, "/readyz without configuration");
    let answer = in_ns(&frontend.ns, || {
        http_request(SocketAddr::from((ip, 80)), "GET", "/", API, &[]).unwrap()
    });
    assert_eq!(
        answer.header("fedmesh-proxy-error"),
        Some("not-ready"),
        "{answer:?}"
    );
    assert_eq!(answer.status, 503, "{answer:?}");

    // The control planes come back: the sidecar converges and routes.
    mesh.restart_control_plane(&mut east);
    mesh.restart_control_plane(&mut west);
    wait_answer_from(&frontend, ip, API, "west");
    assert_eq!(connected(&frontend), Some(true));

    // The gateway's limits, as flags: with `--max-connections 2`, two connections that never
    // say hello fill it and a third from the WAN is turned away (`overloaded`); the two are
    // closed by `--hello-timeout` (`hello_timeout`); then it carries traffic again.
    mesh.net.procs[west.gateway].terminate(Duration::from_secs(15));
    mesh.start_gateway(
        &mut west,
        &["--max-connections", "2", "--hello-timeout", "1s"],
    );
    let gateway = west.gateway();
    let closed_without_a_word = |mut s: std::net::TcpStream| {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        matches!(s.read_to_end(&mut buf), Ok(0))
    };
    let (overloaded, timed_out) = in_ns(&mesh.wan, || {
        let idle: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(gateway).unwrap())
            .collect();
        let third = std::net::TcpStream::connect(gateway).unwrap();
        let overloaded = closed_without_a_word(third);
        let timed_out = idle.into_iter().all(closed_without_a_word);
        (overloaded, timed_out)
    });
    assert!(overloaded && timed_out);
    let refused = |reason: &str| {
        let (_, metrics) = in_ns(&west.node, || {
            http_get(west.gateway_admin(), "/metrics", "x")
        })
        .expect("the gateway's admin port");
        let series = format!("fedmesh_gateway_refused_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!((refused("overloaded"), refused("hello_timeout")), (1, 2));
    wait_answer_from(&frontend, ip, API, "west");
    drop(api);
}
