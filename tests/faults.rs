//! Faults under steady load, in clusters that share only a WAN (as `tests/netns.rs` builds them,
//! every part the real binary in its own namespace): the hub killed with SIGKILL and restarted
//! on its store, one of two hub replicas on etcd killed, a cluster partitioned from the WAN and
//! reconnected, a whole remote cluster dying while it serves half of a split, a gateway replica
//! killed (and a cluster's only gateway), and the disk under the hub's store filling up. Six
//! clients (HTTP/1.1, HTTP/2 and gRPC) call across clusters the whole time; each case reports
//! requests sent, failed and the longest gap between answers (the figures of
//! benchmarks/RELIABILITY.md), and asserts what the README promises. Needs root and `ip netns`;
//! elsewhere the tests say so and skip (CI requires them).

mod support;

use std::time::{Duration, Instant};

use support::faults::{Setup, assert_none_failed, load, setup, setup_on, setup_with};
use support::netns::load::Outcome;
use support::netns::{HUB_ADMIN, HUB_ADMIN_B, Mesh, Pod};
use support::pods::export;
use support::wait_until;

/// After central failed at `t` (`what`), every request of the `reviews` split answered by west;
/// reports how many, and when central last answered.
fn only_west_after(case: &str, what: &str, reviews: &[Outcome], t: Instant) {
    let last_central = reviews
        .iter()
        .filter(|o| o.cluster.as_deref() == Some("central"))
        .map(|o| o.ended)
        .max()
        .unwrap();
    let after: Vec<&Outcome> = reviews.iter().filter(|o| o.started > t).collect();
    eprintln!(
        "RELIABILITY | {case} | {} requests after {what}, all answered by west; last answer from central {:?} after it",
        after.len(),
        last_central.saturating_duration_since(t)
    );
    assert!(
        after
            .iter()
            .all(|o| !o.ok() || o.cluster.as_deref() == Some("west")),
        "after {what}, only west answers"
    );
}

/// SIGKILLs the hub process `hub` (no warning); west then exports another service, `ratings`,
/// from a new pod. When the kill happened, and the pod.
fn kill_hub_then_export(s: &mut Setup, hub: usize) -> (Instant, Pod) {
    let killed = Instant::now();
    s.mesh.net.procs[hub].kill();
    let ratings = s.mesh.add_pod(&mut s.west, "api", "us-west-1a", true);
    export(&s.west, "ratings", &[(&ratings, "us-west-1a")]);
    (killed, ratings)
}

/// Waits until the hub replica at admin `port` shows west's `ratings`, and checks that its view
/// is `before` plus that export and nothing else; the view.
fn expect_ratings_added(
    mesh: &Mesh,
    port: u16,
    before: &(Vec<String>, Vec<String>),
) -> (Vec<String>, Vec<String>) {
    let mut after = view_at(mesh, port);
    wait_until(
        "west's ratings export at the hub",
        Duration::from_secs(60),
        || {
            after = view_at(mesh, port);
            after.1.contains(&"shop/ratings@west".to_string())
        },
    );
    let mut expected = before.clone();
    expected.1.push("shop/ratings@west".into());
    expected.1.sort();
    assert_eq!(
        after, expected,
        "the hub's view is the one before, plus the new export"
    );
    after
}

/// The clusterset as the hub's admin API shows it: clusters and who exports what.
fn view(mesh: &Mesh) -> (Vec<String>, Vec<String>) {
    view_at(mesh, HUB_ADMIN)
}

/// [`view`] through the hub replica whose admin port is `port`.
fn view_at(mesh: &Mesh, port: u16) -> (Vec<String>, Vec<String>) {
    let s = status_at(mesh, port);
    let mut clusters: Vec<String> = s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    clusters.sort();
    let mut exports: Vec<String> = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|svc| {
            let name = svc["service"].as_str().unwrap().to_string();
            svc["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |c| format!("{name}@{}", c["cluster"].as_str().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect();
    exports.sort();
    (clusters, exports)
}

/// `fedmesh status -o json` through the hub replica whose admin port is `port`.
fn status_at(mesh: &Mesh, port: u16) -> serde_json::Value {
    let out = mesh.fedmesh_admin_at(port, &["status", "-o", "json"]);
    assert!(
        out.status.success(),
        "fedmesh status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn cluster_state(mesh: &Mesh, name: &str) -> serde_json::Value {
    let s: serde_json::Value =
        serde_json::from_str(&mesh.fedmesh_admin(&["status", "-o", "json"])).unwrap();
    s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn the_hub_killed_and_restarted_on_its_store_costs_no_request_and_loses_nothing() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path(), &[]);
    let before = view(&s.mesh);
    let (api, reviews) = load(&s);
    api.until_ok_after(Instant::now(), 50);

    // SIGKILL, no warning. While the hub is away, west exports another service.
    let hub = s.mesh.hub;
    let (killed, ratings) = kill_hub_then_export(&mut s, hub);
    // The clusterset keeps working without it: a few hundred answers with the hub down.
    api.until_ok_after(killed, 200);
    reviews.until_ok_after(killed, 200);
    s.mesh.start_hub();
    let restarted = Instant::now();
    // The change made during the outage arrives; nothing else changed.
    expect_ratings_added(&s.mesh, HUB_ADMIN, &before);
    api.until_ok_after(restarted, 50);
    let (api, reviews) = (api.finish(), reviews.finish());
    let outage = restarted - killed;
    eprintln!("RELIABILITY | hub SIGKILL | hub down for {outage:?}");
    assert_none_failed("hub SIGKILL", "api (west)", &api);
    assert_none_failed("hub SIGKILL", "reviews (west/central split)", &reviews);
    drop((ratings, s.pods));
}

#[test]
fn a_hub_replica_on_etcd_killed_costs_no_request_and_the_other_carries_the_clusterset() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup_on(Mesh::start_with_etcd_replicas(dir.path()), 1);
    let before = view(&s.mesh);
    assert_eq!(
        view_at(&s.mesh, HUB_ADMIN_B),
        before,
        "both replicas read one clusterset"
    );
    let (api, reviews) = load(&s);
    api.until_ok_after(Instant::now(), 50);

    // Replica a (where every control plane started) dies without a word; west exports another
    // service meanwhile.
    let hub = s.mesh.hub;
    let (killed, ratings) = kill_hub_then_export(&mut s, hub);
    let expected = expect_ratings_added(&s.mesh, HUB_ADMIN_B, &before);
    let moved = killed.elapsed();
    wait_until(
        "every cluster connected to replica b",
        Duration::from_secs(60),
        || {
            let st = status_at(&s.mesh, HUB_ADMIN_B);
            st["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["connected"] == true && c["hub_replica"] == "hub-b")
        },
    );
    api.until_ok_after(killed, 200);
    reviews.until_ok_after(killed, 200);

    // Replica a comes back and reads the same clusterset from etcd.
    s.mesh.start_hub();
    assert_eq!(view(&s.mesh), expected, "a restarted replica lost nothing");
    let (api, reviews) = (api.finish(), reviews.finish());
    eprintln!(
        "RELIABILITY | hub replica killed (etcd) | the new export visible through replica b {moved:?} after the kill"
    );
    assert_none_failed("hub replica killed (etcd)", "api (west)", &api);
    assert_none_failed(
        "hub replica killed (etcd)",
        "reviews (west/central split)",
        &reviews,
    );
    drop((ratings, s.pods));
}

#[test]
fn a_partitioned_cluster_goes_stale_keeps_its_exports_and_serves_again_once_reconnected() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), &["--stale-after", "2s"]);
    let (api, reviews) = load(&s);
    api.until_ok_after(Instant::now(), 50);
    let before = view(&s.mesh);

    // Central's WAN link goes down: its gateway and its control plane's hub stream with it.
    let cut = Instant::now();
    s.mesh.set_wan_link(&s.central, false);
    wait_until("central marked stale", Duration::from_secs(60), || {
        cluster_state(&s.mesh, "central")["stale"] == true
    });
    eprintln!(
        "RELIABILITY | partition | central marked stale {:?} after the cut (--stale-after 2s)",
        cut.elapsed()
    );
    assert_eq!(
        view(&s.mesh),
        before,
        "a stale cluster's exports are not withdrawn"
    );
    // Everything keeps answering from west meanwhile.
    api.until_ok_after(cut, 200);
    reviews.until_ok_after(cut, 200);
    s.mesh.set_wan_link(&s.central, true);
    let healed = Instant::now();
    wait_until("central fresh again", Duration::from_secs(60), || {
        cluster_state(&s.mesh, "central")["stale"] == false
    });
    // Traffic into central resumes.
    wait_until(
        "an answer from central after the partition",
        Duration::from_secs(60),
        || {
            reviews
                .outcomes
                .lock()
                .unwrap()
                .iter()
                .any(|o| o.started > healed && o.cluster.as_deref() == Some("central"))
        },
    );
    let (api, reviews) = (api.finish(), reviews.finish());
    let during = |o: &Outcome| o.started > cut && o.started < healed;
    let central_during = reviews
        .iter()
        .filter(|o| during(o) && o.cluster.as_deref() == Some("central"))
        .count();
    eprintln!(
        "RELIABILITY | partition | central cut off for {:?}; {central_during} answers from central meanwhile",
        healed - cut
    );
    assert_none_failed("partition", "api (west)", &api);
    assert_none_failed("partition", "reviews (west/central split)", &reviews);
    drop(s.pods);
}

#[test]
fn a_remote_cluster_dying_mid_split_moves_its_share_with_no_failed_request() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(dir.path(), &[]);
    let (api, reviews) = load(&s);
    reviews.until_ok_after(Instant::now(), 100);

    // Central dies whole: its gateway, its pod's app and sidecar, its control plane.
    let died = Instant::now();
    let central_pod = s.pods.pop().unwrap();
    for i in [
        s.central.gateway,
        central_pod.sidecar,
        central_pod.app.unwrap(),
        s.central.control_plane,
    ] {
        s.mesh.net.procs[i].kill();
    }
    reviews.until_ok_after(died, 300);
    let (api, reviews) = (api.finish(), reviews.finish());
    only_west_after("cluster death", "central died", &reviews, died);
    assert_none_failed("cluster death", "api (west)", &api);
    assert_none_failed("cluster death", "reviews (split, central dead)", &reviews);
    drop(s.pods);
}

#[test]
fn a_gateway_killed_costs_no_request_with_a_second_replica_and_fails_over_to_another_cluster_without()
 {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup_with(dir.path(), &[], 2);
    assert_eq!(s.west.gateways.len(), 2);
    let (api, reviews) = load(&s);
    api.until_ok_after(Instant::now(), 100);
    reviews.until_ok_after(Instant::now(), 100);

    // West has two gateway replicas, and east's sidecar uses both; one is SIGKILLed.
    // Connections through it die with it; the requests on them are retried through the other.
    let used: Vec<u64> = (0..2).map(|k| s.west.gateway_connections(k)).collect();
    eprintln!(
        "RELIABILITY | gateway killed | connections through west's replicas before: {used:?}"
    );
    assert!(
        used.iter().all(|&n| n > 0),
        "both replicas carry traffic: {used:?}"
    );
    let killed = Instant::now();
    s.mesh.net.procs[s.west.gateways[0]].kill();
    // Reaped: its sockets are closed by now.
    let dead = Instant::now();
    api.until_ok_after(killed, 300);
    reviews.until_ok_after(killed, 300);

    // Central has one gateway, and it dies (central's control plane and pods live on): its
    // share of `reviews` fails over to west.
    let central_killed = Instant::now();
    s.mesh.net.procs[s.central.gateway].kill();
    reviews.until_ok_after(central_killed, 300);
    let (api, reviews) = (api.finish(), reviews.finish());
    only_west_after(
        "gateway killed",
        "central's gateway died",
        &reviews,
        central_killed,
    );
    // A gRPC call is a POST, not safe to send twice: one sent on a connection through the replica
    // as it died (up to a second after, before the sidecar has seen the reset) may fail, as gRPC
    // UNAVAILABLE `upstream-reset` from the sidecar, where the HTTP GETs beside it are retried.
    // Nothing else may.
    let (lost, api): (Vec<Outcome>, Vec<Outcome>) = api.into_iter().partition(|o| {
        o.method == "gRPC Echo/Unary"
            && o.started < dead + Duration::from_secs(1)
            && o.ended > killed
            && matches!(&o.answer, Err(e) if e.starts_with("gRPC Unavailable (upstream-reset)"))
    });
    eprintln!(
        "RELIABILITY | gateway killed | gRPC calls in flight through the killed replica, failed UNAVAILABLE: {}",
        lost.len()
    );
    assert!(
        lost.len() <= 1,
        "one gRPC client, one call in flight: {lost:?}"
    );
    assert_none_failed(
        "gateway killed",
        "api (west, one of two replicas killed)",
        &api,
    );
    assert_none_failed(
        "gateway killed",
        "reviews (split; then central's only gateway killed)",
        &reviews,
    );
    drop(s.pods);
}

/// A small tmpfs mounted for the hub's data directory, unmounted when dropped (a failed test
/// too).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700")])
            .arg("fedmesh-test")
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", path.display());
        SmallDisk(path.to_path_buf())
    }

    /// Fills what is left with one file; its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        for chunk in [1 << 20, 64 << 10, 4 << 10] {
            let block = vec![0u8; chunk];
            loop {
                match f.write(&block) {
                    Ok(n) if n == chunk => continue,
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filling {}: {e}", filler.display()),
                }
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The clusters join tokens were created for, as the hub lists them.
fn token_clusters(mesh: &Mesh) -> Vec<String> {
    let (code, body) = mesh.hub_admin_get("/api/v1/tokens");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["cluster"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn a_full_disk_under_the_hub_fails_writes_clearly_loses_nothing_and_recovers_when_space_returns() {
    if support::netns::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("hub"), 32);
    let mut s = setup(dir.path(), &[]);
    let (api, reviews) = load(&s);
    api.until_ok_after(Instant::now(), 50);

    // The disk fills up. Writes through the admin API go on until one fails (the store may still
    // have room in pages it holds); every one that succeeded must survive.
    let filled = Instant::now();
    let filler = disk.fill();
    let mut created = Vec::new();
    let mut refusal = None;
    for i in 0..2000 {
        let name = format!("full-{i:04}");
        let td = format!("{name}.example");
        let out = s.mesh.fedmesh_admin_unchecked(&[
            "hub",
            "token",
            "create",
            "--cluster",
            &name,
            "--trust-domain",
            &td,
        ]);
        if !out.status.success() {
            refusal = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
        created.push(name);
    }
    let refusal = refusal.expect("a write to a full disk fails");
    eprintln!(
        "RELIABILITY | disk full | {} writes stored before the first refusal: {}",
        created.len(),
        refusal.trim()
    );
    assert!(
        refusal.contains("no space left") && refusal.contains("free space"),
        "the refusal says what is wrong and what to do: {refusal}"
    );
    assert!(
        s.mesh.net.procs[s.mesh.hub].log().contains("no space left"),
        "the hub logs why it cannot write"
    );
    // While the disk is full: the hub still answers, and what it stored is all there; west
    // exports another service, which the hub cannot store yet.
    let before = view(&s.mesh);
    assert_eq!(
        before.1,
        vec![
            "shop/api@west".to_string(),
            "shop/reviews@central".into(),
            "shop/reviews@west".into()
        ]
    );
    let stored: Vec<String> = token_clusters(&s.mesh)
        .into_iter()
        .filter(|c| c.starts_with("full-"))
        .collect();
    assert_eq!(
        stored, created,
        "every write acknowledged before the disk filled is kept"
    );
    let ratings = s.mesh.add_pod(&mut s.west, "api", "us-west-1a", true);
    export(&s.west, "ratings", &[(&ratings, "us-west-1a")]);
    api.until_ok_after(filled, 200);
    reviews.until_ok_after(filled, 200);

    // Space returns: the export arrives and writes succeed again, with no restart.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    wait_until(
        "the export written while the disk was full, at the hub",
        Duration::from_secs(60),
        || view(&s.mesh).1.contains(&"shop/ratings@west".to_string()),
    );
    s.mesh.fedmesh_admin(&[
        "hub",
        "token",
        "create",
        "--cluster",
        "after",
        "--trust-domain",
        "after.example",
    ]);
    let recovered = freed.elapsed();
    let after = view(&s.mesh);

    // And all of it is on disk: a hub restarted on the store sees the same.
    s.mesh.net.procs[s.mesh.hub].kill();
    s.mesh.start_hub();
    let mut restarted = view(&s.mesh);
    wait_until(
        "the hub's view after a restart",
        Duration::from_secs(30),
        || {
            restarted = view(&s.mesh);
            restarted == after
        },
    );
    let mut expected = created.clone();
    expected.push("after".into());
    expected.sort();
    let tokens: Vec<String> = token_clusters(&s.mesh)
        .into_iter()
        .filter(|c| c.starts_with("full-") || c == "after")
        .collect();
    assert_eq!(tokens, expected);
    let (api, reviews) = (api.finish(), reviews.finish());
    eprintln!("RELIABILITY | disk full | writes resumed {recovered:?} after space returned");
    assert_none_failed("disk full", "api (west)", &api);
    assert_none_failed("disk full", "reviews (west/central split)", &reviews);
    drop((ratings, s.pods));
    drop(disk);
}
