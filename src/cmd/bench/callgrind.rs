//! A proxy run under callgrind, for instruction counts that the machine's load does not move:
//! started from fedmesh-proxy, waited for, its counts zeroed before and dumped after the requests
//! that are counted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::load::{http_status, which};

/// `fedmesh-proxy ARGS` under callgrind; killed when dropped.
pub(super) struct UnderCallgrind {
    pub(super) name: String,
    dir: PathBuf,
    out: PathBuf,
    child: Child,
}

impl UnderCallgrind {
    /// Starts it, counting into `dir/callgrind-<name>.out`, its stderr in `dir/<name>.log`, with
    /// `env` set. Spans go only where `args` or `env` say (the OTLP endpoint variables of this
    /// process are not passed on).
    pub(super) fn start(
        dir: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let valgrind =
            which("valgrind").context("valgrind is not installed (apt-get install valgrind)")?;
        let out = dir.join(format!("callgrind-{name}.out"));
        let child = Command::new(valgrind)
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(super::proxy_exe()?)
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
            .spawn()
            .with_context(|| format!("starting the {name} under callgrind"))?;
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            out,
            child,
        })
    }

    /// Waits until its admin port at `admin` says ready: at most 3 minutes, since under callgrind
    /// it starts some fifty times slower.
    pub(super) async fn ready(&self, admin: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        while http_status(admin, "/readyz").await != Some(200) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the {} under callgrind was not ready within 3 minutes (see {}.log in {})",
                self.name,
                self.name,
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(())
    }

    /// Zeroes its counts: what comes next is what is counted.
    pub(super) fn reset(&self) -> anyhow::Result<()> {
        reset_counts(self.child.id())
    }

    /// The instructions it executed since the last [`reset`](Self::reset).
    pub(super) async fn dump(&self) -> anyhow::Result<f64> {
        callgrind_dump(&self.out, self.child.id()).await
    }
}

impl Drop for UnderCallgrind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Zeroes the counts of the process `pid` running under callgrind.
fn reset_counts(pid: u32) -> anyhow::Result<()> {
    callgrind_control(&["-z", &pid.to_string()])
}

/// Has the process `pid` under callgrind (writing to `out`) dump its counts; the instructions
/// counted since the last reset.
async fn callgrind_dump(out: &Path, pid: u32) -> anyhow::Result<f64> {
    let before = dumps(out);
    callgrind_control(&["-d", &pid.to_string()])?;
    total_ir(&newest_dump(out, &before).await?)
}

fn callgrind_control(args: &[&str]) -> anyhow::Result<()> {
    let control = which("callgrind_control")
        .context("callgrind_control is not installed (apt-get install valgrind)")?;
    let out = Command::new(control).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "callgrind_control {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The dump files callgrind has written next to `out` (`out.1`, `out.2`, ...).
fn dumps(out: &Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name()) else {
        return Default::default();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect()
}

async fn newest_dump(
    out: &Path,
    before: &std::collections::BTreeSet<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    for _ in 0..100 {
        if let Some(p) = dumps(out).into_iter().find(|p| !before.contains(p)) {
            return Ok(p);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("callgrind wrote no dump")
}

/// The instructions a callgrind dump counted (its `totals:` or `summary:` line).
fn total_ir(path: &Path) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no totals in {}", path.display()))
}
