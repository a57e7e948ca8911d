//! The hub's web UI in headless Chromium, on the demo a user starts (README command 1): the
//! clusterset, a trace that crosses clusters with its gateway hop, the service graph in cluster
//! boxes with the rollouts beside it, and the rollout timeline. The browser is driven by `tests/ui/check.mjs` (playwright-core, Debian's chromium);
//! `scripts/test` installs both and requires this test (`FEDMESH_REQUIRE_UI=1`).
//!
//! Screenshots go to a temporary directory, or to `FEDMESH_UI_SCREENSHOTS` (the README's come
//! from `FEDMESH_UI_SCREENSHOTS=$PWD/docs`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

/// Why the UI cannot be tested here, if it cannot.
fn missing() -> Option<String> {
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is not installed".into());
    }
    if !Path::new(CHROMIUM).exists() {
        return Some(format!("{CHROMIUM} is missing (Debian's chromium)"));
    }
    if !ui_dir().join("node_modules/playwright-core").exists() {
        return Some(
            "tests/ui/node_modules has no playwright-core (npm ci --prefix tests/ui)".into(),
        );
    }
    None
}

/// Stops the demo however the test ends.
struct Demo(Child);
impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_demos_ui_shows_a_trace_across_clusters_with_its_gateway_hop_and_the_service_graph() {
    if let Some(why) = missing() {
        assert!(
            std::env::var("FEDMESH_REQUIRE_UI").as_deref() != Ok("1"),
            "FEDMESH_REQUIRE_UI=1 but {why}: run scripts/test, which installs it"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A higher sampling than the demo's default, so cross-cluster traces arrive within seconds.
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_fedmesh"))
            .args([
                "demo",
                "--duration",
                "150s",
                "--every",
                "5s",
                "--trace-sampling",
                "0.2",
                "--dir",
            ])
            .arg(dir.path().join("demo"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("fedmesh demo starts"),
    );
    // The demo prints the UI's address with the admin token in the fragment.
    let (tx, rx) = mpsc::channel();
    let stdout = demo.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the demo never printed its UI address:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if let Some(at) = line.find("http://")
            && line.contains("/ui#token=")
        {
            break line[at..].split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining the demo's output so it never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    let (base, token) = url.split_once("/ui#token=").unwrap();
    let shots = std::env::var_os("FEDMESH_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("shots"));
    std::fs::create_dir_all(&shots).unwrap();
    // The token goes to the script in its environment, not on its command line.
    let out = Command::new("node")
        .arg(ui_dir().join("check.mjs"))
        .arg(base)
        .arg(&shots)
        .env("FEDMESH_ADMIN_TOKEN", token)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the UI check failed:\n{stdout}\n{stderr}"
    );
    for shot in [
        "ui-clusterset.png",
        "ui-trace.png",
        "ui-graph.png",
        "ui-rollouts.png",
    ] {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot} is missing or empty ({len} bytes)");
    }
}
