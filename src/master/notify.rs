//! Authenticated `NOTIFY_SOCKET`s (supervisor thread). Each worker gets its own `AF_UNIX`
//! datagram socket, a file in a private runtime directory the master creates for itself
//! ([`RuntimeDir`]: mode 0700, a fresh unpredictable name, created with `mkdir` so a name
//! someone else made first is never used), so no other user can send to it or bind its name
//! first (an abstract-namespace name has no permissions and can be squatted: DESIGN.md §7).
//!
//! Who may speak for a worker: the socket has `SO_PASSCRED`, so each datagram carries the
//! sender's pid as the kernel saw it; it is accepted only from the worker's own process or a
//! process in the worker's process group (every worker leads its own group, so that is the
//! worker and the children it did not move elsewhere): like systemd's `NotifyAccess=all`
//! restricted to the service's own processes. Anything else is counted, dropped and logged
//! rate-limited; `STATUS=` lines are rate-limited and cut to [`STATUS_MAX`] bytes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Instant;

use log::{info, warn};

use super::ratelimit::{LogLimiter, Verdict, truncate};
use crate::sys::{self, Pid};

/// Longest `STATUS=` text logged (the rest is cut).
pub const STATUS_MAX: usize = 200;
/// Datagrams read per call; if more wait, [`NotifySocket::read`] says so and the supervisor
/// comes back after its other work, so a flood cannot hold it.
const READ_BURST: usize = 64;
/// Longest `sun_path` (unix(7)), including the terminating NUL.
const SUN_PATH_MAX: usize = 108;

/// The master's private directory for its workers' notify sockets: created 0700 under
/// `$XDG_RUNTIME_DIR` (if set) or the temporary directory, removed with everything in it when
/// dropped. When the workers run as another user (`--user`), the directory is 0711 instead
/// (others may pass through it to a socket whose name they know, but not list it or create
/// anything in it) and each socket belongs to the workers' user, mode 0600: no third user can
/// connect to it.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    /// The workers' user and group, when they are not the master's.
    workers: Option<(u32, u32)>,
}

impl RuntimeDir {
    /// Creates a new, empty directory only this user can enter, or (`workers` = the workers'
    /// other uid and gid) only pass through.
    pub fn create(workers: Option<(u32, u32)>) -> io::Result<RuntimeDir> {
        let base = super::rundir::base();
        let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
        for attempt in 0u32..16 {
            let path = base.join(format!(
                "{}{}.{:016x}",
                super::rundir::PREFIX,
                sys::getpid(),
                unpredictable(attempt)
            ));
            // mkdir (not create_dir_all): fails if anything, a symlink included, has the name.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = RuntimeDir { path, workers };
                    dir.check()?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot create a directory in {}: {e}", base.display()),
                    ));
                }
            }
        }
        Err(last)
    }

    /// Ours, a real directory, mode exactly 0700 or 0711 (the umask can only have narrowed it).
    fn check(&self) -> io::Result<()> {
        let mode = if self.workers.is_some() { 0o711 } else { 0o700 };
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode))?;
        let meta = std::fs::symlink_metadata(&self.path)?;
        if !meta.is_dir() || meta.uid() != sys::geteuid() || meta.mode() & 0o777 != mode {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is not a private directory of ours", self.path.display()),
            ));
        }
        Ok(())
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// 64 bits no other local user can predict: the kernel's per-boot random `AT_RANDOM`-seeded
/// hasher state (std's `RandomState` keys come from getrandom(2)), mixed with the time.
fn unpredictable(attempt: u32) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What a worker said on its notify socket (sd_notify(3) lines the master acts on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`.
    Ready,
    /// `STOPPING=1`.
    Stopping,
}

/// One worker's notify socket.
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    rejected: u64,
    reject_log: LogLimiter,
    status_log: LogLimiter,
}

impl NotifySocket {
    /// Binds `<dir>/w<id>.sock`, non-blocking, with `SO_PASSCRED`.
    pub fn bind(dir: &RuntimeDir, id: u64) -> io::Result<NotifySocket> {
        let path = dir.path().join(format!("w{id}.sock"));
        if path.as_os_str().len() >= SUN_PATH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is longer than a unix socket path may be (set XDG_RUNTIME_DIR or \
                     TMPDIR to a shorter directory)",
                    path.display()
                ),
            ));
        }
        let sock = UnixDatagram::bind(&path)?;
        if let Some((uid, gid)) = dir.workers {
            // Sending needs write permission on the socket file (unix(7)): the workers' user
            // only.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        sock.set_nonblocking(true)?;
        sys::setsockopt_int(sock.as_fd(), libc::SO_PASSCRED, 1)?;
        Ok(NotifySocket {
            sock,
            path,
            rejected: 0,
            reject_log: LogLimiter::default(),
            status_log: LogLimiter::default(),
        })
    }

    /// The value of the worker's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For registering with the supervisor's poll.
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Datagrams dropped because they did not come from the worker's process group.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Reads what is queued (at most a burst), keeping only what the worker `pid` or its
    /// process group sent; logs `STATUS=` lines rate-limited. `slot` is for the log lines.
    /// Returns the notices and whether more datagrams may be waiting (read again soon: the
    /// poll is edge-triggered).
    pub fn read(&mut self, pid: Pid, slot: usize) -> (Vec<Notice>, bool) {
        let mut notices = Vec::new();
        let mut buf = [0u8; 4096];
        let mut more = true;
        for _ in 0..READ_BURST {
            let (n, creds) = match sys::recv_with_credentials(self.sock.as_fd(), &mut buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    more = false;
                    break;
                }
            };
            let sender = creds.map_or(0, |c| c.pid);
            if !from_worker(sender, pid) {
                self.rejected += 1;
                if let Verdict::Log { suppressed } = self.reject_log.check(Instant::now()) {
                    warn!(
                        "worker {slot}: dropped a notification from pid {sender}, which is not \
                         in the worker's process group ({} dropped so far{})",
                        self.rejected,
                        if suppressed > 0 {
                            format!(", {suppressed} lines suppressed")
                        } else {
                            String::new()
                        }
                    );
                }
                continue;
            }
            let text = String::from_utf8_lossy(&buf[..n]);
            for line in text.lines() {
                match line {
                    "READY=1" => notices.push(Notice::Ready),
                    "STOPPING=1" => notices.push(Notice::Stopping),
                    _ => {
                        if let Some(status) = line.strip_prefix("STATUS=")
                            && let Verdict::Log { suppressed } =
                                self.status_log.check(Instant::now())
                        {
                            let more = if suppressed > 0 {
                                format!(" ({suppressed} status lines suppressed)")
                            } else {
                                String::new()
                            };
                            info!(
                                "worker {slot} (pid {pid}) status: {}{more}",
                                truncate(status, STATUS_MAX).escape_debug()
                            );
                        }
                    }
                }
            }
        }
        (notices, more)
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The sender is the worker or in its process group (the worker leads its own group).
fn from_worker(sender: Pid, worker: Pid) -> bool {
    sender > 0 && (sender == worker || sys::getpgid(sender).is_ok_and(|g| g == worker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_dir_is_private_and_removed() {
        let dir = RuntimeDir::create(None).unwrap();
        let meta = std::fs::symlink_metadata(dir.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        let path = dir.path().to_path_buf();
        let other = RuntimeDir::create(None).unwrap();
        assert_ne!(other.path(), dir.path());
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn only_the_workers_group_is_heard() {
        let dir = RuntimeDir::create(None).unwrap();
        let mut n = NotifySocket::bind(&dir, 7).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1\nSTATUS=x", n.path()).unwrap();
        // This process is the "worker": heard.
        let me = sys::getpid();
        assert_eq!(n.read(me, 0), (vec![Notice::Ready], false));
        // The same datagram for a worker that is not us (pid 1's group is not ours): dropped.
        client.send_to(b"STOPPING=1", n.path()).unwrap();
        assert_eq!(n.read(1, 0), (vec![], false));
        assert_eq!(n.rejected(), 1);
    }
}
