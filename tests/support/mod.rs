//! Helpers shared by the end-to-end tests: run the real `fedmesh` binary, always clean up.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn fedmesh_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fedmesh")
}

/// `fedmesh-proxy`: the binary meshed pods and gateways run (`sidecar`, `gateway`).
pub fn proxy_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fedmesh-proxy")
}

/// A CA's authorities as `fedmesh ca status -o json` (or `control-plane ca status`) lists them:
/// (id, state, when a retired one leaves the bundle).
pub fn ca_authorities(doc: &serde_json::Value) -> Vec<(String, String, Option<String>)> {
    doc["authorities"]
        .as_array()
        .expect("a list of authorities")
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["state"].as_str().unwrap().to_string(),
                a["retire_at"].as_str().map(String::from),
            )
        })
        .collect()
}

/// Keeps a secret as a user does: in a file only its owner can read (0600).
pub fn write_secret(path: &Path, secret: &str) {
    fedmesh_test_support::write_private(path, secret.as_bytes());
}

/// Runs `fedmesh ARGS` to completion.
pub fn fedmesh(args: &[&str]) -> Output {
    Command::new(fedmesh_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fedmesh")
}

/// Runs `fedmesh ARGS` to completion and panics with its stderr if it failed.
pub fn fedmesh_ok(args: &[&str]) -> Output {
    let out = fedmesh(args);
    assert!(
        out.status.success(),
        "fedmesh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process that is killed (and reaped) when dropped, even if the test fails.
pub struct Proc {
    pub child: Child,
    pub name: String,
    stderr_path: PathBuf,
}

impl Proc {
    /// Starts `fedmesh ARGS` with stderr captured to `log_dir/<name>.log`.
    pub fn start(name: &str, args: &[&str], log_dir: &Path) -> Self {
        Self::start_with_env(name, args, &[], log_dir)
    }

    /// [`Proc::start`] with extra environment variables.
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Self {
        // FEDMESH_TEST_LOG raises the level for a test that reads every line (set it at the
        // test's start: nextest runs each test in its own process).
        let level = std::env::var("FEDMESH_TEST_LOG").unwrap_or_else(|_| "info".into());
        let mut cmd = Command::new(fedmesh_bin());
        cmd.args(args)
            .env("RUST_LOG", level)
            .envs(env.iter().copied());
        Self::spawn_logged(name, cmd, log_dir, false)
    }

    /// Starts any program, with its stdout and stderr captured to `log_dir/<name>.log`.
    pub fn spawn(name: &str, cmd: Command, log_dir: &Path) -> Self {
        Self::spawn_logged(name, cmd, log_dir, true)
    }

    fn spawn_logged(name: &str, mut cmd: Command, log_dir: &Path, stdout: bool) -> Self {
        let stderr_path = log_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&stderr_path).unwrap();
        let out = if stdout {
            Stdio::from(log.try_clone().unwrap())
        } else {
            Stdio::null()
        };
        let child = cmd
            .stdout(out)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
            stderr_path,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The file its stdout/stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.stderr_path.clone()
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `cond` comes to hold within `timeout` (polling), for a test that reports rather than
/// panics.
#[allow(dead_code)] // not every test binary that includes this module waits this way
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[allow(unused_imports)] // not every test binary that includes this module needs a port
pub use fedmesh_test_support::free_port;

/// `fedmesh ca init --trust-domain TD --dir DIR EXTRA...`; panics with its stderr on failure.
pub fn ca_init(dir: &Path, td: &str, extra: &[&str]) {
    let mut args = vec![
        "ca",
        "init",
        "--trust-domain",
        td,
        "--dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = fedmesh(&args);
    assert!(
        out.status.success(),
        "fedmesh ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn uid() -> u32 {
    unsafe { libc::getuid() }
}

/// The Python that has the test clients (`$FEDMESH_PYTHON`, set by scripts/test, else `python3`),
/// or a failure telling the developer how to get it.
pub fn python_with(module: &str) -> Command {
    let python = std::env::var("FEDMESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{python} with the `{module}` package is required; run scripts/test, which installs it"
    );
    Command::new(python)
}
pub mod faults;
pub mod federation;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod peers;
pub mod pods;
