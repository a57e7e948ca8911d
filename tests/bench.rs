//! `fedmesh bench` as a user runs it: it finishes, reports, and leaves nothing running.

use std::process::Command;

mod support;

/// The processes whose parent is this one (with `PR_SET_CHILD_SUBREAPER`, orphans of our
/// children's children land here), zombies aside.
fn live_children() -> Vec<(i32, String)> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid == Some(me) && state != Some("Z") {
            let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ");
            out.push((pid as i32, format!("{pid} {head}) {cmdline}")));
        }
    }
    out
}

/// Orphaned grandchildren (a server's workers whose master died) are reparented to this process
/// instead of init, so [`nothing_left`] sees them.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// No process the benchmark started outlived it (those that did are killed, then named).
fn nothing_left() {
    let left = live_children();
    for (pid, _) in &left {
        // SAFETY: kill(2) of a process that is our child (reparented); nothing outlives the test.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let left: Vec<String> = left.into_iter().map(|(_, d)| d).collect();
    assert!(
        left.is_empty(),
        "processes of the benchmark outlived it: {left:#?}"
    );
    // Reap what exited after its parent (zombies reparented to us).
    // SAFETY: waitpid on any child, without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

#[test]
fn bench_rollout_measures_decisions_and_rollbacks() {
    let out = Command::new(support::fedmesh_bin())
        .args([
            "bench",
            "rollout",
            "--steps",
            "3",
            "--rollbacks",
            "1",
            "--min-requests",
            "5",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fedmesh bench rollout: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "rollout decision latency (3 steps, 5 canary requests each",
        "sample reached -> next weights in the caller's sidecar: p50",
        "rollback latency (1 rollbacks",
        "requests the canary still answered after its first failure",
    ] {
        assert!(stdout.contains(want), "{want:?} missing:\n{stdout}");
    }
}

#[test]
fn bench_federation_runs_the_hub_on_a_real_etcd_and_stops_it() {
    become_subreaper();
    let out = Command::new(support::fedmesh_bin())
        .args([
            "bench",
            "federation",
            "--clusters",
            "3",
            "--services",
            "30",
            "--changes",
            "5",
            "--store",
            "etcd",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fedmesh bench federation --store etcd: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "real hub process (etcd), 3 simulated clusters, 30 services, 5 changes",
        "propagation of one export change to every cluster:",
        "hub RSS:",
        "etcd RSS after the changes:",
    ] {
        assert!(stdout.contains(want), "{want:?} missing:\n{stdout}");
    }
    nothing_left();
}

#[test]
fn bench_dataplane_compares_with_haproxy_and_nginx_holds_slow_loris_and_leaves_no_process_behind() {
    for (bin, package) in [
        ("haproxy", "haproxy"),
        ("nginx", "nginx libnginx-mod-stream"),
    ] {
        assert!(
            ["/usr/sbin", "/usr/bin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(bin).exists()),
            "{bin} is missing (apt-get install {package}; scripts/test installs it)"
        );
    }
    become_subreaper();
    let out = Command::new(support::fedmesh_bin())
        .args([
            "bench",
            "dataplane",
            "--only",
            "sni",
            "--only",
            "pairs",
            "--only",
            "slowloris",
            "--sni-duration",
            "1s",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--concurrency",
            "4",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fedmesh bench dataplane: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each server really ran and passed connections: a row with its figures, not "skipped".
    for name in ["fedmesh gateway", "HAProxy (mode tcp", "nginx (stream"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"));
        assert!(
            row.contains("conn/s") && row.contains("MiB/s") && !row.contains("failed"),
            "{row}"
        );
    }
    assert!(stdout.contains("gateway ≥ HAProxy:"), "{stdout}");
    // The mTLS sidecar pairs answered every request, beside ours.
    for name in ["sidecar→sidecar", "nginx mTLS pair", "HAProxy mTLS pair"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with("HTTP/1.1") && l.contains(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"));
        assert!(
            row.contains("CPU s/1k req") && !row.contains("ERRORS"),
            "{row}"
        );
    }
    for goal in ["≤ 0.8× the nginx mTLS pair", "≤ 0.8× the HAProxy mTLS pair"] {
        assert!(stdout.contains(goal), "{stdout}");
    }
    // Slow-loris connections held against the client's sidecar, the gateway and the server's
    // inbound while the good client's requests all succeed (its p99 is printed, not asserted).
    let slow = stdout
        .lines()
        .find(|l| l.contains("slow-loris:"))
        .unwrap_or_else(|| panic!("no slow-loris row:\n{stdout}"));
    assert!(!slow.contains("ERRORS"), "{slow}");
    for name in ["client sidecar", "gateway", "server sidecar inbound"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name) && l.contains("open at the end"))
            .unwrap_or_else(|| panic!("no slow-loris count for {name}:\n{stdout}"));
        let open: usize = row
            .split_whitespace()
            .nth(name.split(' ').count())
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            open > 0,
            "no slow connection was held against the {name}: {row}"
        );
    }
    assert!(
        stdout.contains("slow-loris connections per proxy:"),
        "{stdout}"
    );
    nothing_left();
}

#[test]
fn bench_instructions_fails_naming_each_proxy_that_grew_past_its_committed_figure() {
    let dir = tempfile::tempdir().unwrap();
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    // Two figures far below what any proxy costs, the others far above.
    let figures = dir.path().join("instructions.txt");
    std::fs::write(
        &figures,
        format!(
            "# test\nbuild {build}\nHTTP/1.1 client-sidecar 1000\nHTTP/2 gateway 100\n\
             HTTP/1.1 gateway 1e12\nHTTP/1.1 server-sidecar 1e12\nHTTP/2 client-sidecar 1e12\n\
             HTTP/2 server-sidecar 1e12\n"
        ),
    )
    .unwrap();
    let dumps = dir.path().join("dumps");
    let out = Command::new(support::fedmesh_bin())
        .args(["bench", "instructions", "--requests", "10", "--check"])
        .arg(&figures)
        .arg("--keep")
        .arg(&dumps)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("grew by more than 10%"),
        "{stdout}\n{stderr}"
    );
    let failed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("instructions per request,"))
        .collect();
    assert_eq!(failed.len(), 2, "{stderr}");
    assert!(failed[0].contains("HTTP/1.1 client-sidecar"), "{stderr}");
    assert!(failed[1].contains("HTTP/2 gateway"), "{stderr}");
    // Every proxy was counted: six rows with a figure of their own.
    let rows = stdout.lines().filter(|l| l.contains("committed")).count();
    assert_eq!(rows, 6, "{stdout}");
    // The dumps to find the cause with are kept: one per proxy and protocol.
    let kept: Vec<String> = std::fs::read_dir(&dumps)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for proxy in ["client-sidecar", "gateway", "server-sidecar"] {
        let n = kept
            .iter()
            .filter(|f| f.starts_with(&format!("callgrind-{proxy}.out.")))
            .count();
        assert!(n >= 2, "{proxy}: {kept:?}");
    }

    // Figures of another build are refused before anything runs.
    let other = if build == "debug" { "release" } else { "debug" };
    std::fs::write(&figures, format!("build {other}\nHTTP/1.1 gateway 1\n")).unwrap();
    let out = Command::new(support::fedmesh_bin())
        .args(["bench", "instructions", "--check"])
        .arg(&figures)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("figures of a {other} build")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
