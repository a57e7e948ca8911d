//! Opt-in: the kind deployment end to end (`deploy/multicluster/up.sh`, which ends with its
//! cross-cluster smoke test, then `down.sh`). Needs docker and kind, and minutes, so it is ignored
//! (the runner reports it as skipped); run it with `cargo nextest run --test kind --run-ignored
//! only`. The offline checks of the same manifests run in CI (`scripts/check-deploy`).

use std::path::PathBuf;
use std::process::Command;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/multicluster")
        .join(name)
}

/// Runs `down.sh` when dropped, so clusters do not outlive a failed run.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        if std::env::var_os("FEDMESH_KIND_KEEP").is_none() {
            let _ = Command::new(script("down.sh")).status();
        }
    }
}

#[test]
#[ignore = "needs docker and kind: run with `cargo nextest run --test kind --run-ignored only`"]
fn up_sh_brings_three_kind_clusters_up_and_the_smoke_test_crosses_them() {
    for tool in ["docker", "kind", "kubectl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "the kind test needs `{tool}`, which is not installed"
        );
    }
    let _down = Down;
    let up = Command::new(script("up.sh")).status().expect("run up.sh");
    assert!(up.success(), "up.sh (and its smoke test) failed");
    // The smoke test again, on its own, against the running clusterset.
    let smoke = Command::new(script("smoke.sh"))
        .status()
        .expect("run smoke.sh");
    assert!(smoke.success(), "smoke.sh failed on a second run");
}
