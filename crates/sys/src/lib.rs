//! rcluster-sys: the one place rcluster-lb calls libc. Every `unsafe` of the master and the
//! Rust worker API lives in this crate; each wrapper keeps its syscall's name and returns
//! `io::Result`, and every fd is an `OwnedFd` from the line it is created on.

pub mod bpf;
pub mod scm;
pub mod spawn;
#[doc(hidden)]
pub mod testing;
mod user;

pub use user::Credentials;

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Calls a libc function and maps its `-1` return to `io::Error::last_os_error()`.
/// The caller writes the `// SAFETY:` comment for the call it makes.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        #[allow(clippy::macro_metavars_in_unsafe)]
        // SAFETY: each use of the macro states, in a comment at the call, why its arguments
        // satisfy the libc function's contract.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Process id of a worker.
pub type Pid = libc::pid_t;

/// `accept4(2)` with `SOCK_CLOEXEC`, so the accepted fd never leaks into a process spawned
/// concurrently, and `SOCK_NONBLOCK` when asked. The master asks for a blocking socket: it never
/// reads a connection, and file status flags travel with the fd through `SCM_RIGHTS`, so the
/// worker gets what a plain `accept()` would have given it.
pub fn accept4(listener: BorrowedFd<'_>, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = if nonblocking {
        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK
    } else {
        libc::SOCK_CLOEXEC
    };
    // SAFETY: null addr/addrlen is allowed by accept4(2); the fd is borrowed for the call.
    let fd = syscall!(accept4(
        listener.as_raw_fd(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        flags
    ))?;
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers `fd` in the epoll set `epfd` (a mio registry's, say) for level-triggered readability with `data` as the
/// event's user data (`op` is `EPOLL_CTL_ADD` or `EPOLL_CTL_MOD`), or removes it
/// (`EPOLL_CTL_DEL`, `data` ignored). mio registers edge-triggered; a socket that must keep
/// waking the loop while anything waits on it (the steering overflow queue, which a loop takes
/// one connection from per pass) needs this.
pub fn epoll_ctl_level(
    epfd: std::os::fd::RawFd,
    op: libc::c_int,
    fd: BorrowedFd<'_>,
    data: u64,
) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: data,
    };
    // SAFETY: fd is borrowed for the call and epfd is a plain number (a stale one is EBADF or
    // another epoll set's EINVAL/ENOENT, never memory unsafety); ev is a valid event (read for
    // ADD/MOD, ignored for DEL).
    syscall!(epoll_ctl(epfd, op, fd.as_raw_fd(), &mut ev))?;
    Ok(())
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`: a message-preserving, connected,
/// reliable channel (unix(7)); both ends close-on-exec, the spawner `dup2`s the worker's end.
pub fn socketpair_seqpacket() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: fds is a valid array of two ints for socketpair(2) to fill.
    syscall!(socketpair(
        libc::AF_UNIX,
        libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
        0,
        fds.as_mut_ptr()
    ))?;
    // SAFETY: socketpair returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets `O_NONBLOCK` on an fd (the master's end of a channel; the worker's end stays blocking
/// because the worker, not the master, decides how it reads).
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a borrowed, open fd.
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL with flags derived from F_GETFL on the same fd.
    syscall!(fcntl(fd.as_raw_fd(), libc::F_SETFL, flags))?;
    Ok(())
}

/// Whether `O_NONBLOCK` is set on an fd (a file status flag: shared by every copy of it).
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFL on a borrowed, open fd.
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    Ok(flags & libc::O_NONBLOCK != 0)
}

/// `getsockopt(SOL_SOCKET, opt)` for an int-valued option, as the raw system call: the answer
/// comes from the kernel even when a preloaded library (such as this project's own shim, which
/// presents a dispatch channel as a TCP listener to unmodified servers) interposes libc's
/// `getsockopt`.
pub fn getsockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: val and len point to valid storage of the advertised size; the arguments are
    // getsockopt(2)'s.
    let res = unsafe {
        libc::syscall(
            libc::SYS_getsockopt,
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast::<libc::c_void>(),
            &mut len as *mut libc::socklen_t,
        )
    };
    if res == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}

/// `setsockopt(SOL_SOCKET, opt)` for an int-valued option.
pub fn setsockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: val lives for the call and its size is passed.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        opt,
        (&val as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t
    ))?;
    Ok(())
}

/// The parent of process `pid`, from `/proc/PID/stat` (proc(5): the field after the
/// parenthesised command name, which may itself contain spaces and parentheses).
pub fn parent_pid(pid: Pid) -> io::Result<Pid> {
    let stat = std::fs::read(format!("/proc/{pid}/stat"))?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected /proc/PID/stat format",
        )
    };
    let close = stat.iter().rposition(|&b| b == b')').ok_or_else(bad)?;
    let rest = std::str::from_utf8(&stat[close + 1..]).map_err(|_| bad())?;
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next().ok_or_else(bad)?;
    fields.next().and_then(|p| p.parse().ok()).ok_or_else(bad)
}

/// Bytes queued in a unix socket's send direction and not yet read by the peer: `SIOCOUTQ`
/// (unix(7)). For a dispatch channel this is the backlog the worker has not accepted yet.
pub fn siocoutq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut val: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to the pointer given.
    syscall!(ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut val))?;
    Ok(val.max(0) as usize)
}

/// `pidfd_open(2)`: an fd that becomes readable when the process exits, so the supervisor reaps
/// through its poll loop instead of a process-wide SIGCHLD handler. Always close-on-exec.
pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// How a child ended, from `waitpid(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled(sig) => write!(f, "signal {} ({})", sig, signal_name(*sig)),
        }
    }
}

/// `waitpid(pid, WNOHANG)`: `Ok(None)` while the child still runs.
pub fn waitpid_nohang(pid: Pid) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    // SAFETY: status is a valid int for waitpid to fill.
    let res = syscall!(waitpid(pid, &mut status, libc::WNOHANG))?;
    if res == 0 {
        return Ok(None);
    }
    Ok(Some(decode_wait_status(status)))
}

/// `waitpid(pid, 0)`: blocks until the child has exited.
pub fn waitpid_blocking(pid: Pid) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid int for waitpid to fill.
        match syscall!(waitpid(pid, &mut status, 0)) {
            Ok(_) => return Ok(decode_wait_status(status)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The pid of some exited, not yet reaped child, left unreaped (`waitid(P_ALL, WEXITED |
/// WNOHANG | WNOWAIT)`): the caller decides who reaps it, so a worker's exit is never taken
/// from the code that reaps workers. `Ok(None)` when no child has exited (or there is none).
pub fn waitid_peek_exited() -> io::Result<Option<Pid>> {
    // SAFETY: siginfo_t is plain data for waitid to fill; zeroed, si_pid reads 0 if nothing
    // has exited (waitid(2): WNOHANG).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is valid storage.
    match syscall!(waitid(
        libc::P_ALL,
        0,
        &mut info,
        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT
    )) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(None),
        Err(e) => return Err(e),
    }
    // SAFETY: waitid filled info for a child state change (or left it zeroed).
    let pid = unsafe { info.si_pid() };
    Ok((pid != 0).then_some(pid))
}

/// `prctl(PR_SET_CHILD_SUBREAPER)`: orphaned descendants are re-parented to this process
/// instead of to init, so it can reap them (what PID 1 in a container must do anyway).
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    syscall!(prctl(
        libc::PR_SET_CHILD_SUBREAPER,
        1 as libc::c_ulong,
        0,
        0,
        0
    ))?;
    Ok(())
}

fn decode_wait_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    }
}

/// `kill(2)`. `ESRCH` (already gone) is reported to the caller, who usually ignores it.
pub fn kill(pid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    syscall!(kill(pid, sig))?;
    Ok(())
}

/// `getpid(2)`.
pub fn getpid() -> Pid {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// `CLOCK_MONOTONIC` in microseconds (`clock_gettime(2)`): the clock sd_notify's
/// `MONOTONIC_USEC=` is read against.
pub fn monotonic_usec() -> u64 {
    monotonic_ns() / 1_000
}

/// `CLOCK_MONOTONIC` in nanoseconds (`clock_gettime(2)`, served by the vDSO): the clock BPF
/// programs read with `bpf_ktime_get_ns`, so the steering table's timestamps use it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid storage; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// `geteuid(2)`.
pub fn geteuid() -> libc::uid_t {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Short name of a signal number (`SIGTERM`), for logs.
pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGWINCH => "SIGWINCH",
        _ => "unknown signal",
    }
}

/// Parses a signal name (`TERM`, `SIGTERM`, `15`).
pub fn parse_signal(name: &str) -> Option<libc::c_int> {
    if let Ok(n) = name.parse::<libc::c_int>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    (1..32).find(|&sig| signal_name(sig).strip_prefix("SIG") == Some(bare))
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the new soft limit. A master
/// holding thousands of in-flight connections needs the room, and `SCM_RIGHTS` counts fds in
/// flight against the sender's limit (`ETOOMANYREFS`, unix(7)).
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: getrlimit fills the rlimit it is given.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()))?;
    // SAFETY: getrlimit succeeded, so lim is initialised.
    let mut lim = unsafe { lim.assume_init() };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid rlimit.
        syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    }
    Ok(lim.rlim_cur)
}

/// A CPU set as `sched_setaffinity(2)` takes it, limited to `CPU_SETSIZE` CPUs.
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    /// A set holding the given CPUs (ids ≥ `CPU_SETSIZE` are ignored).
    pub fn from_cpus(cpus: &[usize]) -> Self {
        // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            if cpu < libc::CPU_SETSIZE as usize {
                // SAFETY: cpu < CPU_SETSIZE, so the bit is inside the set.
                unsafe { libc::CPU_SET(cpu, &mut set) };
            }
        }
        CpuSet(set)
    }

    /// The CPUs in the set, ascending.
    pub fn cpus(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| {
                // SAFETY: c < CPU_SETSIZE, so the bit is inside the set.
                unsafe { libc::CPU_ISSET(c, &self.0) }
            })
            .collect()
    }

    pub(crate) fn raw(&self) -> &libc::cpu_set_t {
        &self.0
    }
}

/// `sched_getaffinity(0)`: the CPUs this process may run on (respects taskset and cpusets).
pub fn sched_getaffinity() -> io::Result<CpuSet> {
    // SAFETY: all-zero is a valid cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is valid storage of the size passed.
    syscall!(sched_getaffinity(
        0,
        std::mem::size_of::<libc::cpu_set_t>(),
        &mut set
    ))?;
    Ok(CpuSet(set))
}

/// `sched_setaffinity(0)` for the calling thread (on Linux, pid 0 means the calling thread).
pub fn sched_setaffinity_self(set: &CpuSet) -> io::Result<()> {
    // SAFETY: set is a valid cpu_set_t of the size passed.
    syscall!(sched_setaffinity(
        0,
        std::mem::size_of::<libc::cpu_set_t>(),
        set.raw()
    ))?;
    Ok(())
}

/// Resident set size of a process in bytes, from `/proc/PID/statm` (second field, in pages).
/// Reads into a stack buffer: the supervisor samples every worker every `--rss-interval`.
pub fn rss_bytes(pid: Pid) -> io::Result<u64> {
    use std::io::Read;
    let mut path = [0u8; 32];
    let path = {
        use std::io::Write;
        let mut cur = io::Cursor::new(&mut path[..]);
        write!(cur, "/proc/{pid}/statm")?;
        let len = cur.position() as usize;
        std::str::from_utf8(&path[..len]).expect("ascii path")
    };
    let mut file = std::fs::File::open(path)?;
    let mut buf = [0u8; 128];
    let n = file.read(&mut buf)?;
    let text = std::str::from_utf8(&buf[..n]).map_err(|_| io::ErrorKind::InvalidData)?;
    let pages: u64 = text
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    Ok(pages * page_size())
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf takes a constant name.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// Returns the socket type (`SOCK_STREAM`, `SOCK_SEQPACKET`, …) of an fd, or an error if the fd
/// is not a socket (`ENOTSOCK`).
pub fn socket_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    getsockopt_int(fd, libc::SO_TYPE)
}

/// The socket domain (`AF_UNIX`, `AF_INET`, …) of a socket.
pub fn socket_domain(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    getsockopt_int(fd, libc::SO_DOMAIN)
}

/// Takes ownership of an inherited fd number after checking it is open (`fcntl(F_GETFD)`), and
/// marks it close-on-exec so the worker's own children do not inherit it.
pub fn adopt_inherited_fd(fd: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table.
    let flags = syscall!(fcntl(fd, libc::F_GETFD))?;
    // SAFETY: F_SETFD on an fd just shown to be open.
    syscall!(fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC))?;
    // SAFETY: the fd is open and, per the worker contract, handed to this process to own; the
    // caller adopts each inherited number once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Clears close-on-exec on `fd`, so a program this process `exec`s gets it at the same number.
pub fn set_inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFD only queries the descriptor table; the fd is borrowed, hence open.
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFD))?;
    // SAFETY: F_SETFD on the same open fd.
    syscall!(fcntl(
        fd.as_raw_fd(),
        libc::F_SETFD,
        flags & !libc::FD_CLOEXEC
    ))?;
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3` (linux/capability.h): 64-bit sets, as two data words.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability of the calling thread (capabilities are per thread: call it in a
/// single-threaded process, from the thread that then `exec`s): the ambient set
/// (`PR_CAP_AMBIENT_CLEAR_ALL`), then the effective, permitted and inheritable sets (`capset(2)`
/// with all zero), which cannot be regained. The bounding set is left alone: a program executed
/// as root gets its bounding set back (capabilities(7)) and must drop privileges itself.
pub fn drop_capabilities() -> io::Result<()> {
    let zero: libc::c_ulong = 0;
    // SAFETY: prctl with integer arguments only.
    if let Err(e) = syscall!(prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        zero,
        zero,
        zero
    )) {
        // EINVAL: a kernel before 4.3, which has no ambient set.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    // struct __user_cap_header_struct { u32 version; int pid } (pid 0: this thread), and two
    // struct __user_cap_data_struct { u32 effective, permitted, inheritable } (capabilities
    // 0-31, then 32-63), all zero.
    let header: [u32; 2] = [LINUX_CAPABILITY_VERSION_3, 0];
    let data = [0u32; 6];
    // SAFETY: header and data are initialised and of the layout and sizes capset(2) reads for
    // version 3; the kernel only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` names a regular file this process may execute (`access(2)` with `X_OK`);
/// the supervisor resolves a worker command with it before forking, so a typo is a clear error
/// at start and at each reload rather than an exit code 127 from a child.
pub fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c_path is a valid NUL-terminated string for the call.
    let ok = unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } == 0;
    ok && std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// `pipe2(O_CLOEXEC)`: `(read end, write end)`. Close-on-exec on both, so a worker gets the
/// write end only where the spawn places it on its stdout or stderr.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: fds is valid storage for two ints.
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Credentials of the process at the other end of a connected unix socket, as the kernel
/// recorded them at `connect(2)`: `SO_PEERCRED` (unix(7)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's pid.
    pub pid: Pid,
    /// The peer's effective uid.
    pub uid: libc::uid_t,
    /// The peer's effective gid.
    pub gid: libc::gid_t,
}

/// `getsockopt(SO_PEERCRED)` on a connected unix socket.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len point to valid storage of the advertised size.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_PEERCRED,
        (&mut cred as *mut libc::ucred).cast(),
        &mut len
    ))?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// A listening TCP socket's accept queue from `TCP_INFO` (tcp(7)): on a socket in the LISTEN
/// state the kernel reports the current queue length in `tcpi_unacked` and the backlog limit in
/// `tcpi_sacked`. Returns `(queued, limit)`.
pub fn listen_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info and len point to valid storage of the advertised size.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        (&mut info as *mut libc::tcp_info).cast(),
        &mut len
    ))?;
    if info.tcpi_state != 10 {
        // TCP_LISTEN in the kernel's numbering: other states give these fields other meanings.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// The socket's cookie (`SO_COOKIE`, socket(7)): a number the kernel gives each socket once and
/// never reuses while it lives, what a `REUSEPORT_SOCKARRAY` lookup returns for the socket at
/// an index.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len point to valid storage of the advertised size.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_COOKIE,
        (&mut cookie as *mut u64).cast(),
        &mut len
    ))?;
    Ok(cookie)
}

/// CPU time a process has used (user + system) in seconds, from `/proc/PID/stat` fields 14 and
/// 15 (proc(5)), in clock ticks of `sysconf(_SC_CLK_TCK)`.
pub fn cpu_seconds(pid: Pid) -> io::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted after the
    // last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or(io::ErrorKind::InvalidData)?;
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields
        .nth(11)
        .and_then(|f| f.parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    let stime: u64 = fields
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    // SAFETY: sysconf takes a constant name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Ok((utime + stime) as f64 / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_capabilities_empties_every_set_but_the_bounding_set() {
        // Capabilities are per thread: drop them in a thread of its own.
        let sets = std::thread::spawn(|| {
            drop_capabilities().unwrap();
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            status
                .lines()
                .filter(|l| {
                    ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .map(|l| u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap())
                .collect::<Vec<u64>>()
        })
        .join()
        .unwrap();
        assert_eq!(sets, vec![0, 0, 0, 0]);
    }
    use std::os::fd::AsFd;

    #[test]
    fn socketpair_is_seqpacket_and_cloexec() {
        let (a, _b) = socketpair_seqpacket().unwrap();
        assert_eq!(socket_type(a.as_fd()).unwrap(), libc::SOCK_SEQPACKET);
        assert_eq!(socket_domain(a.as_fd()).unwrap(), libc::AF_UNIX);
        // SAFETY: F_GETFD on an open fd.
        let flags = unsafe { libc::fcntl(a.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn signal_names_round_trip() {
        assert_eq!(parse_signal("TERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("sigquit"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("9"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("NOPE"), None);
        assert_eq!(parse_signal("0"), None);
    }

    #[test]
    fn rss_of_self_is_positive() {
        assert!(rss_bytes(getpid()).unwrap() > 0);
    }

    #[test]
    fn affinity_is_not_empty() {
        assert!(!sched_getaffinity().unwrap().cpus().is_empty());
    }

    #[test]
    fn siocoutq_counts_unread_messages() {
        let (a, _b) = socketpair_seqpacket().unwrap();
        assert_eq!(siocoutq(a.as_fd()).unwrap(), 0);
        // SAFETY: sending 4 bytes from a valid buffer.
        let n = unsafe { libc::send(a.as_raw_fd(), b"ping".as_ptr().cast(), 4, 0) };
        assert_eq!(n, 4);
        assert!(siocoutq(a.as_fd()).unwrap() > 0);
    }

    #[test]
    fn peer_cred_names_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = peer_cred(a.as_fd()).unwrap();
        assert_eq!(cred.pid, getpid());
        assert_eq!(cred.uid, geteuid());
    }

    #[test]
    fn listen_queue_counts_unaccepted_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(listen_queue(l.as_fd()).unwrap().0, 0);
        let _c1 = std::net::TcpStream::connect(addr).unwrap();
        let _c2 = std::net::TcpStream::connect(addr).unwrap();
        // The handshake completes in the kernel before connect returns on loopback.
        assert_eq!(listen_queue(l.as_fd()).unwrap().0, 2);
        assert!(listen_queue(_c1.as_fd()).is_err(), "not a listener");
    }

    #[test]
    fn cpu_seconds_of_self_is_readable() {
        assert!(cpu_seconds(getpid()).unwrap() >= 0.0);
        assert!(cpu_seconds(-1).is_err());
    }

    #[test]
    fn parent_pid_of_self_is_std_parent() {
        assert_eq!(
            parent_pid(getpid()).unwrap(),
            std::os::unix::process::parent_id() as Pid
        );
    }
}

/// `getpgid(2)`: the process group of `pid`.
pub fn getpgid(pid: Pid) -> io::Result<Pid> {
    // SAFETY: getpgid takes a pid and returns a pgid or -1.
    syscall!(getpgid(pid))
}

/// `kill(-pgid, sig)`: signals every process of the group `pgid` (kill(2)).
pub fn killpg(pgid: Pid, sig: libc::c_int) -> io::Result<()> {
    if pgid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill takes plain integers; a negative pid names a process group.
    syscall!(kill(-pgid, sig))?;
    Ok(())
}

/// A datagram and the sender's credentials (`SCM_CREDENTIALS`, unix(7)), for a socket with
/// `SO_PASSCRED` set: the kernel fills in the sender's real pid, uid and gid, which an
/// unprivileged sender cannot forge.
#[derive(Debug, Clone, Copy)]
pub struct PeerCredentials {
    /// Sender's process id (0 if the kernel attached none).
    pub pid: Pid,
    /// Sender's user id.
    pub uid: u32,
    /// Sender's group id.
    pub gid: u32,
}

/// `recvmsg(2)` of one datagram, non-blocking, with the sender's credentials; fds sent along
/// (`SCM_RIGHTS`) are closed. Returns the payload length (truncated to `buf`) and the
/// credentials (`None` if the kernel attached none: `SO_PASSCRED` not set).
pub fn recv_with_credentials(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<PeerCredentials>)> {
    #[repr(C, align(8))]
    struct Cmsg([u8; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = Cmsg([0; 128]);
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    // SAFETY: msg points at buffers that live until the call returns.
    let n = syscall!(recvmsg(
        sock.as_raw_fd(),
        &mut msg,
        libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC
    ))?;
    let mut creds = None;
    // SAFETY: after recvmsg, msg_control/msg_controllen describe the control data the kernel
    // wrote; CMSG_FIRSTHDR/NXTHDR walk it within those bounds. An SCM_CREDENTIALS area holds
    // one ucred; an SCM_RIGHTS area holds fds that are now ours and are closed here.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                if (*c).cmsg_type == libc::SCM_CREDENTIALS
                    && len >= std::mem::size_of::<libc::ucred>()
                {
                    let u = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                    creds = Some(PeerCredentials {
                        pid: u.pid,
                        uid: u.uid,
                        gid: u.gid,
                    });
                } else if (*c).cmsg_type == libc::SCM_RIGHTS {
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                        drop(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, creds))
}

/// Whether our child `pid` has exited, without reaping it (`waitid(P_PID, WEXITED | WNOHANG |
/// WNOWAIT)`, waitid(2)): until it is reaped its pid, and the process group it leads, cannot be
/// reused, so the group can still be signalled safely.
pub fn has_exited(pid: Pid) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain data; zeroed is valid and si_pid reads 0 when nothing exited.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is valid storage for waitid to fill.
    syscall!(waitid(
        libc::P_PID,
        pid as libc::id_t,
        &mut info,
        libc::WEXITED | libc::WNOHANG | libc::WNOWAIT
    ))?;
    // SAFETY: waitid filled info (or left it zeroed); si_pid is valid for SIGCHLD infos.
    Ok(unsafe { info.si_pid() } != 0)
}

/// The soft `RLIMIT_NOFILE`: fd numbers at or above it cannot be allocated (getrlimit(2)).
pub fn nofile_soft_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is valid storage for getrlimit to fill.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
    Ok(lim.rlim_cur)
}

/// Whether this process can open `n` more fds now: duplicates `fd` `n` times
/// (`F_DUPFD_CLOEXEC`) and closes the copies. Used before receiving fds near the fd limit,
/// where the kernel would close the ones that do not fit (`MSG_CTRUNC`, unix(7)).
pub fn fd_room(fd: BorrowedFd<'_>, n: usize) -> bool {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own, or -1.
        match syscall!(fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0)) {
            // SAFETY: the fd was just created and nothing else owns it.
            Ok(dup) => held.push(unsafe { OwnedFd::from_raw_fd(dup) }),
            Err(_) => return false,
        }
    }
    true
}

/// Waits until `fd` has input (or end of file, or an error to report): poll(2) with `POLLIN`
/// and no timeout. `Interrupted` after a signal.
pub fn wait_readable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, which outlives the call.
    syscall!(poll(&mut pfd, 1, -1)).map(|_| ())
}

/// The channel lock (docs/PROTOCOL.md §2, FULL): a POSIX record lock (`F_SETLK`, fcntl(2)) on
/// the whole of a worker's end of a dispatch channel, held by whoever reads it in two steps
/// (the worker's peek-then-consume near its fd limit) or takes back what is queued (the
/// master), so that neither consumes a message between the other's two reads. Record locks
/// belong to a process, not to an open file description: the master and the worker hold the
/// same description (fork, `SCM_RIGHTS`, dup) yet exclude each other, which `flock` and OFD
/// locks would not; threads of one process do not exclude each other (they take turns by other
/// means); so it must be a classic record lock, never an OFD one. The lock is released when the
/// guard drops, when its process closes any fd of the channel, and when its process exits.
#[must_use = "the lock is released when the guard drops"]
pub struct ChannelLock<'a>(BorrowedFd<'a>);

/// Takes the channel lock on `fd`: waiting for it (retried after a signal) when `wait`, else
/// `Ok(None)` when another process holds it.
pub fn lock_channel(fd: BorrowedFd<'_>, wait: bool) -> io::Result<Option<ChannelLock<'_>>> {
    let cmd = if wait { libc::F_SETLKW } else { libc::F_SETLK };
    loop {
        let lock = whole_file_lock(libc::F_WRLCK);
        // SAFETY: F_SETLK(W) reads the flock struct, which outlives the call.
        match syscall!(fcntl(fd.as_raw_fd(), cmd, &lock)) {
            Ok(_) => return Ok(Some(ChannelLock(fd))),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if !wait && matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
}

impl Drop for ChannelLock<'_> {
    fn drop(&mut self) {
        let unlock = whole_file_lock(libc::F_UNLCK);
        // SAFETY: as in `lock_channel`. Unlocking a lock this process holds cannot fail in a
        // way that leaves it held: the process's close or exit releases it anyway.
        let _ = syscall!(fcntl(self.0.as_raw_fd(), libc::F_SETLK, &unlock));
    }
}

fn whole_file_lock(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; zero is a valid value for every field.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start 0 and l_len 0: from the start to whatever the end is.
    lock
}
