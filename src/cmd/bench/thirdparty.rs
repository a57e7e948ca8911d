//! HAProxy and nginx as the benchmarks run them: started in a process group of their own and
//! stopped so that nothing outlives the benchmark.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Context;

/// A server the benchmark started (HAProxy, nginx) in a process group of its own. Dropped, it is
/// stopped the way it expects (`stop`: nginx finishes gracefully on SIGQUIT, HAProxy stops on
/// SIGTERM), given five seconds, and then its whole group is killed: no worker process outlives
/// the benchmark, even when the master dies first or the benchmark returns early with an error.
pub(super) struct Server {
    child: Child,
    stop: libc::c_int,
}

impl Server {
    pub(super) fn spawn(mut cmd: Command, stop: libc::c_int, what: &str) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self { child, stop })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) with the pid of our own child and then its process group (which
        // process_group(0) made equal to the pid); no memory is involved.
        unsafe { libc::kill(pid, self.stop) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process and its children (HAProxy and nginx run worker processes).
pub(super) fn all_pids(roots: &[u32]) -> Vec<u32> {
    let mut out = roots.to_vec();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid.is_some_and(|pp| roots.contains(&pp)) {
            out.push(pid);
        }
    }
    out
}
