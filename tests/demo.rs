//! `fedmesh demo` as a user runs it (README command 1): a hub and three clusters in one process,
//! traffic across them, failover and a live split change, with no request failing.

use std::process::Command;

#[test]
fn the_demo_moves_traffic_across_three_clusters_without_failing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args([
            "demo",
            "--duration",
            "14s",
            "--every",
            "1s",
            "--rate",
            "20",
            "--dir",
        ])
        .arg(dir.path().join("demo"))
        .output()
        .expect("fedmesh demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines = |svc: &str| -> Vec<&str> {
        stdout
            .lines()
            .filter(|l| l.contains(&format!("shop/{svc} ")))
            .collect()
    };
    // Locality keeps shop/api in east at first; the failover sends it to west.
    let api = lines("api");
    assert!(
        api.first().is_some_and(|l| l.contains("east 100%")),
        "{stdout}"
    );
    assert!(api.iter().any(|l| l.contains("west 100%")), "{stdout}");
    // shop/reviews is split between west and central; premium users get v2, in either; a fault
    // injected for a while answers a share of the others (and counts as no failure).
    let reviews: Vec<&str> = lines("reviews")
        .into_iter()
        .filter(|l| !l.contains("premium"))
        .collect();
    assert!(
        reviews
            .iter()
            .any(|l| l.contains("central") && l.contains("west")),
        "{stdout}"
    );
    assert!(
        reviews.iter().all(|l| !l.contains("reviews-v2")),
        "{stdout}"
    );
    assert!(
        reviews.iter().any(|l| l.contains("injected 503")),
        "{stdout}"
    );
    let premium = lines("reviews premium");
    assert!(!premium.is_empty(), "{stdout}");
    assert!(
        premium
            .iter()
            .all(|l| { l.contains("reviews-v2@") && !l.contains("injected") }),
        "{stdout}"
    );
    // shop/greeter answers gRPC calls from west or central.
    let greeter = lines("greeter");
    assert!(
        greeter
            .iter()
            .any(|l| l.contains("west") || l.contains("central")),
        "{stdout}"
    );
    assert!(
        stdout.contains("stopping; 0 request(s) failed in the whole run"),
        "{stdout}\n{stderr}"
    );
    // The proxies' spans reached the hub through the control planes: the injected faults
    // (failed spans are always kept) are there whatever the 1% sampling kept of the rest.
    let held = stdout
        .lines()
        .find(|l| l.starts_with("the hub holds "))
        .unwrap_or_else(|| panic!("no trace summary: {stdout}"));
    let numbers: Vec<usize> = held
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        numbers.len() >= 2 && numbers[0] > 0 && numbers[1] > 0,
        "{held}"
    );
    assert!(stdout.contains("curl -x http://127.0.0.1:"), "{stdout}");
}

#[test]
fn the_demo_scales_to_more_clusters_and_can_come_up_without_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args([
            "demo",
            "--clusters",
            "5",
            "--no-traffic",
            "--duration",
            "2s",
            "--dir",
        ])
        .arg(&demo_dir)
        .output()
        .expect("fedmesh demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for c in ["east", "west", "central", "c4", "c5"] {
        assert!(
            stdout.contains(&format!("cluster {c} ")),
            "cluster {c} missing: {stdout}"
        );
    }
    assert!(stdout.contains("The clusterset is up"), "{stdout}");
    assert!(
        !stdout.contains("answered by"),
        "no traffic table: {stdout}"
    );

    // Out of range: a clear refusal, nothing started.
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(["demo", "--clusters", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3..=16"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
