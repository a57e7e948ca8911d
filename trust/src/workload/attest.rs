//! Workload attestation from Unix peer credentials (SO_PEERCRED), as SPIRE's unix attestor does.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::entries::Selector;

/// Who is on the other end of a Workload API connection, per the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Caller {
    /// The selectors this caller has. `unix:path` is read from `/proc/<pid>/exe`; a process that
    /// exited (or PID we may not inspect) simply has no path selector.
    pub fn selectors(&self) -> BTreeSet<Selector> {
        let mut s = BTreeSet::from([Selector::UnixUid(self.uid), Selector::UnixGid(self.gid)]);
        if let Some(exe) = self.exe() {
            s.insert(Selector::UnixPath(exe));
        }
        s
    }

    pub fn exe(&self) -> Option<PathBuf> {
        let pid = self.pid.filter(|p| *p > 0)?;
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_uid_gid_and_path() {
        let me = Caller {
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            pid: Some(std::process::id() as i32),
        };
        let s = me.selectors();
        assert!(s.contains(&Selector::UnixUid(me.uid)));
        assert!(s.iter().any(|x| matches!(x, Selector::UnixPath(_))));
    }
}
