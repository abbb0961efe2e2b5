//! Where the master's private directories go (the message bus's, the notify sockets'), and
//! removing those that masters killed before they could clean up left behind.
//!
//! A master removes its directories when it stops; one killed with `SIGKILL` (the OOM killer,
//! a service manager's last resort, a container torn down) cannot, and each such death leaves
//! two `rcluster-lb.<pid>.<hex>` directories with a socket in each. At start the master
//! removes such leftovers of its own user ([`sweep_stale`]), but only a directory that is
//! certainly dead: its pid is no live process here (or is this master's own: a previous
//! master's, as pid 1 of a restarted container leaves it), it is older than a minute, it holds
//! sockets and nothing else, and every one of them refuses a connection (nobody listens: its
//! master is gone, whatever pid namespace it ran in, since a live master's sockets accept).
//! Anything else — another user's directory, a symlink, a file that is not a socket, a socket
//! something listens on — is left alone.

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::sys::{self, Pid};

/// The prefix of every private directory the master makes.
pub const PREFIX: &str = "rcluster-lb.";

/// How old a leftover must be before it is removed: a master that has just made its
/// directory may not yet have its socket listening.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// `$XDG_RUNTIME_DIR` when it is an absolute path to a directory, else the temporary directory.
pub fn base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// The pid in a name `rcluster-lb.<pid>.<hex>`, or `None` for any other name.
fn pid_of(name: &OsStr) -> Option<Pid> {
    let rest = name.to_str()?.strip_prefix(PREFIX)?;
    let (pid, tag) = rest.split_once('.')?;
    let ok = !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| pid.parse().ok()).flatten()
}

/// Whether nothing listens on the socket at `path`: a connection of its type is refused. The
/// connect does not block (a live listener with a full backlog answers `EAGAIN`: alive).
fn refuses(path: &Path) -> bool {
    let Ok(addr) = SockAddr::unix(path) else {
        return false;
    };
    let refused = |ty: Type| -> Option<bool> {
        let socket = Socket::new(Domain::UNIX, ty.nonblocking(), None).ok()?;
        match socket.connect(&addr) {
            Ok(()) => Some(false),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Some(true),
            // A datagram socket (a notify socket) answers a stream connect with EPROTOTYPE.
            Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => None,
            Err(_) => Some(false),
        }
    };
    refused(Type::STREAM)
        .or_else(|| refused(Type::DGRAM))
        .unwrap_or(false)
}

/// Whether `dir` (already known to be ours and old enough) holds at least one socket, nothing
/// but sockets, and no socket that accepts a connection.
fn dead_sockets_only(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut sockets = 0;
    for entry in entries {
        let Ok(entry) = entry else { return false };
        match entry.file_type() {
            Ok(t) if t.is_socket() && refuses(&entry.path()) => sockets += 1,
            _ => return false,
        }
    }
    sockets > 0
}

/// Removes from `base` the private directories of this user's masters that died without
/// removing them (module docs): those not modified for `min_age`. Returns how many went.
pub fn sweep_stale(base: &Path, min_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let me = sys::geteuid();
    let me_pid = sys::getpid();
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let Some(pid) = pid_of(&entry.file_name()) else {
            continue;
        };
        // Only where no process has that pid here (`kill(pid, 0)`: ESRCH; it signals
        // nothing): a live one may be the master. This master's own pid is no such guard: it
        // sweeps before making its directories, so one with its pid is a previous master's
        // that had the same pid (pid 1 of a container restarted on a kept /tmp, a new pid
        // namespace); the checks below still decide.
        let alive = pid != me_pid
            && !sys::kill(pid, 0).is_err_and(|e| e.raw_os_error() == Some(libc::ESRCH));
        if pid <= 0 || alive {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= min_age);
        if meta.is_dir() && meta.uid() == me && old && dead_sockets_only(&path) {
            // Sockets only, all dead: nothing anyone needs.
            if std::fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::net::{UnixDatagram, UnixListener};

    #[test]
    fn names_are_read_strictly() {
        assert_eq!(pid_of(OsStr::new("rcluster-lb.42.1f2e")), Some(42));
        assert_eq!(
            pid_of(OsStr::new("rcluster-lb.42.00000000000000ff")),
            Some(42)
        );
        for other in [
            "rcluster-lb.42",
            "rcluster-lb..1f",
            "rcluster-lb.42.",
            "rcluster-lb.x42.1f",
            "rcluster-lb.42.xyz",
            "rcluster-lb.99999999999999999999.1f",
            "other.42.1f",
        ] {
            assert_eq!(pid_of(OsStr::new(other)), None, "{other}");
        }
    }

    /// A directory as a killed master leaves it: a socket bound and no longer listened on.
    fn leftover(base: &Path, name: &str) -> PathBuf {
        let dir = base.join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        drop(UnixListener::bind(dir.join("bus.sock")).unwrap());
        dir
    }

    #[test]
    fn only_dead_leftovers_of_ours_are_removed() {
        let base = std::env::temp_dir().join(format!(
            "rcluster-sweep-test.{}.{:x}",
            sys::getpid(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir(&base).unwrap();
        // A pid above the kernel's largest pid_max (2^22): no process has it.
        let dead = 4_194_399;
        let gone = leftover(&base, &format!("rcluster-lb.{dead}.1f"));
        let datagram = base.join(format!("rcluster-lb.{dead}.2e"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&datagram)
            .unwrap();
        drop(UnixDatagram::bind(datagram.join("worker-0.sock")).unwrap());
        // Removed too: one named with the sweeping process's own pid (a previous master's
        // that had this pid: pid 1 of a restarted container).
        let own_pid = leftover(&base, &format!("rcluster-lb.{}.80", sys::getpid()));
        // Kept: a live pid; a socket something listens on; a file besides the socket; no
        // socket at all; a name not ours.
        let live_pid = leftover(
            &base,
            &format!("rcluster-lb.{}.3d", std::os::unix::process::parent_id()),
        );
        let listening = base.join(format!("rcluster-lb.{dead}.4c"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&listening)
            .unwrap();
        let _listener = UnixListener::bind(listening.join("bus.sock")).unwrap();
        let with_file = leftover(&base, &format!("rcluster-lb.{dead}.5b"));
        std::fs::write(with_file.join("notes"), b"keep").unwrap();
        let empty = base.join(format!("rcluster-lb.{dead}.6a"));
        std::fs::create_dir(&empty).unwrap();
        let foreign = leftover(&base, &format!("someone-else.{dead}.7f"));

        // Too young: nothing goes.
        assert_eq!(sweep_stale(&base, Duration::from_secs(3600)), 0);
        assert!(gone.exists() && datagram.exists() && own_pid.exists());

        assert_eq!(sweep_stale(&base, Duration::ZERO), 3);
        assert!(!gone.exists());
        assert!(!datagram.exists());
        assert!(!own_pid.exists());
        for kept in [&live_pid, &listening, &with_file, &empty, &foreign] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
