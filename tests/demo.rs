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
            "17s",
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
    // Locality keeps shop/api in east at first; the failover sends it to west; when east's api
    // is back, traffic returns to east.
    let api = lines("api");
    let first_west = api
        .iter()
        .position(|l| l.contains("west"))
        .unwrap_or_else(|| panic!("shop/api never failed over to west: {stdout}"));
    assert!(
        api[..first_west].iter().all(|l| l.contains("east 100%")),
        "{stdout}"
    );
    assert!(
        api[first_west..].iter().any(|l| l.contains("west 100%")),
        "{stdout}"
    );
    let first_west = first_west
        + api[first_west..]
            .iter()
            .position(|l| l.contains("west 100%"))
            .unwrap();
    assert!(
        api[first_west..].iter().any(|l| l.contains("east 100%")),
        "shop/api never returned to east: {stdout}"
    );
    // shop/reviews is split between west and central; premium users get v2, in either; a fault
    // injected for a while answers a share of the others (and counts as no failure).
    let reviews: Vec<&str> = lines("reviews")
        .into_iter()
        .filter(|l| !l.contains("premium"))
        .collect();
    assert!(
        reviews.iter().all(|l| !l.contains("reviews-v2")),
        "{stdout}"
    );
    assert!(
        reviews.iter().any(|l| l.contains("injected 503")),
        "{stdout}"
    );
    // The weights: 70/30 until the route changes live to 20/80. West's share of the answers
    // west and central gave, averaged over the tables on each side of the change (the first
    // table after it mixes both).
    let all: Vec<&str> = stdout.lines().collect();
    let change = all
        .iter()
        .position(|l| l.contains(">> HTTPRoute shop/reviews changed live: west 20 / central 80"))
        .unwrap_or_else(|| panic!("the split never changed: {stdout}"));
    let percent = |l: &str, cluster: &str| -> f64 {
        let after = l.split(&format!("{cluster} ")).nth(1).unwrap_or("0%");
        after
            .trim_start()
            .split('%')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let west_share = |ls: &[&str]| -> f64 {
        let shares: Vec<f64> = ls
            .iter()
            .filter(|l| l.contains("shop/reviews ") && !l.contains("premium"))
            .map(|l| {
                let (w, c) = (percent(l, "west"), percent(l, "central"));
                w / (w + c).max(1.0)
            })
            .collect();
        assert!(!shares.is_empty(), "no reviews table: {stdout}");
        shares.iter().sum::<f64>() / shares.len() as f64
    };
    let before = west_share(&all[..change]);
    let after_tables: Vec<&str> = all[change..]
        .iter()
        .filter(|l| l.contains("shop/reviews ") && !l.contains("premium"))
        .skip(1)
        .copied()
        .collect();
    let after = west_share(&after_tables);
    // About 20 requests a table: 4 standard deviations of the averaged share either way.
    assert!(
        (0.55..=0.85).contains(&before),
        "70/30 measured as {before:.2}: {stdout}"
    );
    assert!(
        (0.0..=0.4).contains(&after),
        "20/80 measured as {after:.2}: {stdout}"
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
    // The automated canary: east's wave starts, shop/ratings v2 answers a share in east, and west's
    // wave never starts before east has promoted.
    let decision = |what: &str| stdout.lines().position(|l| l.contains(what));
    assert!(
        decision(">> Rollout shop/ratings in east: Started").is_some(),
        "{stdout}"
    );
    assert!(
        lines("ratings")
            .iter()
            .any(|l| l.contains("ratings-v2@east")),
        "{stdout}"
    );
    if let Some(west) = decision(">> Rollout shop/ratings in west: Started") {
        let east = decision(">> Rollout shop/ratings in east: Promoted");
        assert!(east.is_some_and(|e| e < west), "{stdout}");
    }
    // No request failed: every table's FAILED column is 0 (and the summary agrees).
    let failed: u64 = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains("shop/"))
        .map(|l| {
            // "  12s  shop/api  east 100%  0  0.6ms 1.2ms[  last failure: ...]": the failed
            // count is the column before the first latency.
            let cols: Vec<&str> = l.split_whitespace().collect();
            let p50 = cols
                .iter()
                .position(|c| c.ends_with("ms"))
                .unwrap_or_else(|| panic!("{l}"));
            cols[p50 - 1]
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{l}"))
        })
        .sum();
    assert_eq!(failed, 0, "{stdout}\n{stderr}");
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
