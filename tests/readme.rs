//! The README's "Federation by hand" walkthrough, run exactly as written: its `sh` blocks,
//! in order, in one bash — in a network namespace of its own (the walkthrough's fixed ports
//! cannot meet another test's) with a private `/tmp` (its `/tmp/fm` cannot meet a person's). The
//! one thing not run is its `cargo build --release`: this test's build already made the
//! binaries, which stand in `target/release` of the walkthrough's working directory.
//!
//! It must get a request from east's sidecar through west's gateway to west's app, with east's
//! identity seen by the app, and `fedmesh check` and `fedmesh explain` must pass.

mod support;

use std::path::Path;
use std::time::Duration;

use support::netns::{self, Net};
use support::{fedmesh_bin, proxy_bin};

/// The `sh` blocks of the README's section `heading`, in order.
fn section_script(readme: &str, heading: &str) -> String {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the README has no section {heading:?}"));
    let rest = &readme[start + heading.len() + 2..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let blocks: Vec<&str> = section
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty(), "no sh blocks in {heading:?}");
    blocks.join("\n")
}

#[test]
fn the_federation_by_hand_walkthrough_works_as_pasted() {
    if netns::skip() {
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let script = section_script(&readme, "## Federation by hand");
    assert!(
        script.starts_with("cargo build --release && export PATH=$PWD/target/release:$PATH\n"),
        "the walkthrough starts by building; this test provides the build: {script}"
    );
    // Outside /tmp, which the walkthrough's shell gets a private one of.
    let work =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let release = work.join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(fedmesh_bin(), release.join("fedmesh")).unwrap();
    std::os::unix::fs::symlink(proxy_bin(), release.join("fedmesh-proxy")).unwrap();
    std::fs::write(work.join("walkthrough.sh"), &script).unwrap();

    let mut net = Net::new(&work);
    let ns = net.add_ns("readme");
    // `set -e`: the first command that fails stops the walkthrough, and the test says which.
    let shell = format!(
        "mount -t tmpfs tmpfs /tmp && cd {} && cargo() {{ :; }} && set -e && source walkthrough.sh",
        work.display()
    );
    // Its output to a file, not a pipe: what it leaves running in the background keeps its
    // stdout open.
    let args: Vec<String> = [
        "180",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "bash",
        "-c",
        &shell,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let idx = net.spawn_program(&ns, "walkthrough", "timeout", &args);
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = net.procs[idx].exit_status() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(200) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = net.procs[idx].log();
    eprintln!("--- walkthrough output ---\n{stdout}");
    // Whatever it started in the background is still running in the namespace: stop it.
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &ns])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    assert!(
        status.is_some_and(|s| s.success()),
        "the walkthrough failed ({status:?})"
    );
    let answer = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no answer from west's app: {stdout}"));
    let answer: serde_json::Value = serde_json::from_str(answer).unwrap();
    assert_eq!(answer["cluster"], "west", "{answer}");
    assert_eq!(answer["workload"], "api", "{answer}");
    assert_eq!(
        answer["caller"], "spiffe://east.example/ns/shop/sa/web",
        "west's app saw east's identity, proven by mTLS: {answer}"
    );
    for want in [
        "east → west gateway 127.0.0.1:25443: mTLS in",
        "all 3 proxies in 2 cluster(s) hold their latest configuration",
        "0 failed",
        "west's gateway 127.0.0.1:25443 answered east's mTLS probe",
        "shop/api is routable from east",
    ] {
        assert!(stdout.contains(want), "{want:?} missing: {stdout}");
    }
    let _ = std::fs::remove_dir_all(&work);
}
