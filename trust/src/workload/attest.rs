//! Workload attestation from Unix peer credentials (SO_PEERCRED), as SPIRE's unix attestor does.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

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

/// `SO_PEERPIDFD` (Linux 6.5; asm-generic value, as on x86-64 and arm64).
const SO_PEERPIDFD: libc::c_int = 77;

/// A handle on the very process at the other end of a Unix socket (a pidfd), taken when the
/// connection is accepted. A pid can be reused once its process exits; a pidfd cannot. Reading
/// `/proc/<pid>/...` and then finding this process still alive proves that what was read was
/// the caller's, and not a later process that got the same pid (a caller that passed its
/// connection on to a child and exited).
#[derive(Debug, Clone)]
pub struct PeerProcess(Arc<OwnedFd>);

impl PeerProcess {
    /// The peer's pidfd: `SO_PEERPIDFD` (the process that connected, race-free), else
    /// `pidfd_open` of the pid the kernel reported (Linux 5.3).
    pub fn of(fd: BorrowedFd<'_>, pid: Option<i32>) -> Option<Self> {
        let mut pidfd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `pidfd`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut pidfd as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 && pidfd >= 0 {
            // SAFETY: the kernel gave us this new descriptor; we own it.
            return Some(Self(Arc::new(unsafe { OwnedFd::from_raw_fd(pidfd) })));
        }
        let pid = pid.filter(|p| *p > 0)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        (r >= 0).then(|| Self(Arc::new(unsafe { OwnedFd::from_raw_fd(r as RawFd) })))
    }

    /// The process has not exited (a zombie counts as not exited: its pid is still its own).
    pub fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks; a null siginfo is allowed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}

/// What the server knows of a Workload API connection's peer, from when it was accepted.
#[derive(Debug, Clone)]
pub struct UdsPeer {
    pub uds: tonic::transport::server::UdsConnectInfo,
    pub process: Option<PeerProcess>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

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

    #[test]
    fn the_peer_process_handle_sees_the_peer_exit() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = PeerProcess::of(a.as_fd(), Some(std::process::id() as i32)).unwrap();
        assert!(me.alive());
        // The pidfd_open fallback (not a socket: no SO_PEERPIDFD), for a child that then exits.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let h = PeerProcess::of(devnull.as_fd(), Some(child.id() as i32)).unwrap();
        child.wait().unwrap();
        assert!(!h.alive(), "the child exited and was reaped");
    }
}
