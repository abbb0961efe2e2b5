//! fork/execve of a worker with the worker contract's fds in place. Between `fork` and `execve`
//! the child runs only async-signal-safe calls on memory prepared before the fork: no
//! allocation, no locks, no logging (fork(2), signal-safety(7)).
//!
//! Owned by the supervisor (main thread). Because `PR_SET_PDEATHSIG` fires when the *thread*
//! that forked the child exits (prctl(2)), workers must be spawned from a thread that lives as
//! long as the master: the main thread.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{CpuSet, Pid, syscall};

/// At most this many fds are placed at 3, 4, …: the child keeps its scratch table on the stack.
pub const MAX_PASSED_FDS: usize = 64;

/// Room reserved after `LISTEN_PID=` for the child's pid, written in the child after `fork`.
const PID_DIGITS: usize = 20;

/// Which step of the child's setup failed, reported back through the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    Setpgid = 1,
    Pdeathsig = 2,
    Affinity = 3,
    Dup = 4,
    Exec = 5,
    SetIds = 6,
}

impl Stage {
    fn from_u8(v: u8) -> &'static str {
        match v {
            1 => "setpgid",
            2 => "prctl(PR_SET_PDEATHSIG)",
            3 => "sched_setaffinity",
            4 => "dup2 of the listener or output fds",
            5 => "execve",
            6 => "setgroups/setgid/setuid (--user/--group)",
            _ => "child setup",
        }
    }
}

/// A step of the child's setup (or its `execve`) failed, with the child's errno. Carried inside
/// the `io::Error` [`spawn`] returns, so a caller can tell "this program cannot be executed"
/// (`execve` failing with `ENOEXEC`, `EACCES`, `ENOENT`) from a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnError {
    /// The step that failed (`"execve"`, `"setpgid"`, ...).
    pub step: &'static str,
    /// Its errno.
    pub errno: i32,
}

impl SpawnError {
    /// `execve` itself failed: the program is missing, not executable or not a format the
    /// kernel runs, which no retry fixes.
    pub fn is_exec(&self) -> bool {
        self.step == Stage::from_u8(Stage::Exec as u8)
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed: {}",
            self.step,
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for SpawnError {}

/// Everything needed to start one worker. Built (and allocated) in the parent before `fork`.
pub struct SpawnSpec<'a> {
    /// Resolved path of the program to execute.
    pub program: &'a Path,
    /// argv, including `argv[0]`.
    pub args: &'a [&'a OsStr],
    /// The complete environment, `KEY=VALUE` entries, without `LISTEN_PID` (added here).
    pub env: &'a [Vec<u8>],
    /// Whether to add `LISTEN_PID=<child pid>`.
    pub listen_pid: bool,
    /// fds to place at 3, 4, … in the child (close-on-exec cleared there only).
    pub fds: &'a [BorrowedFd<'a>],
    /// CPUs to pin the child to.
    pub cpus: Option<CpuSet>,
    /// Deliver SIGKILL to the child when the spawning thread dies.
    pub die_with_parent: bool,
    /// Placed on the child's fd 1 (stdout) if given; otherwise it inherits the parent's.
    pub stdout: Option<BorrowedFd<'a>>,
    /// Placed on the child's fd 2 (stderr) if given; otherwise it inherits the parent's.
    pub stderr: Option<BorrowedFd<'a>>,
    /// Run the child as this user/group (set before `PR_SET_PDEATHSIG`, which set*id clears).
    pub credentials: Option<&'a super::Credentials>,
}

/// A spawned child: its pid and a pidfd that becomes readable when it exits.
#[derive(Debug)]
pub struct Spawned {
    /// Process id.
    pub pid: Pid,
    /// `pidfd_open(pid)`, close-on-exec.
    pub pidfd: OwnedFd,
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Starts a worker. Fails with the child's own errno if any setup step or `execve` failed, so
/// "no such file" or "permission denied" is reported by the caller, not as an exit code.
#[allow(unsafe_code)]
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    if spec.fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_PASSED_FDS} listener fds can be passed"),
        ));
    }
    // --- Everything the child touches is allocated here, before fork. ---
    let program = cstring(spec.program.as_os_str().as_bytes(), "program path")?;
    let args: Vec<CString> = spec
        .args
        .iter()
        .map(|a| cstring(a.as_bytes(), "argument"))
        .collect::<io::Result<_>>()?;
    let mut env: Vec<CString> = spec
        .env
        .iter()
        .map(|e| cstring(e, "environment entry"))
        .collect::<io::Result<_>>()?;
    // LISTEN_PID is the child's own pid (sd_listen_fds(3)); reserve room for it and fill it in
    // after fork, when the pid is known, by writing into the child's private copy.
    let mut pid_entry: Vec<u8> = Vec::new();
    if spec.listen_pid {
        pid_entry.extend_from_slice(b"LISTEN_PID=");
        pid_entry.extend(std::iter::repeat_n(b'0', PID_DIGITS));
        pid_entry.push(0);
    }
    let pid_digits: *mut u8 = if spec.listen_pid {
        // SAFETY: the offset is inside pid_entry, which outlives the fork.
        unsafe { pid_entry.as_mut_ptr().add(b"LISTEN_PID=".len()) }
    } else {
        std::ptr::null_mut()
    };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter_mut().map(|e| e.as_ptr()).collect();
    if spec.listen_pid {
        envp.push(pid_entry.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    let mut src_fds = [-1 as libc::c_int; MAX_PASSED_FDS];
    for (slot, fd) in src_fds.iter_mut().zip(spec.fds) {
        *slot = fd.as_raw_fd();
    }
    let nfds = spec.fds.len();
    let cpus = spec.cpus;
    let die_with_parent = spec.die_with_parent;
    let stdout = spec.stdout.map_or(-1, |fd| fd.as_raw_fd());
    let stderr = spec.stderr.map_or(-1, |fd| fd.as_raw_fd());
    let ids = spec.credentials.map(|c| ChildIds {
        uid: c.uid,
        gid: c.gid,
        groups: c.groups.as_ptr(),
        ngroups: c.groups.len(),
    });
    // SAFETY: getpid cannot fail.
    let parent = unsafe { libc::getpid() };

    // The child reports a failed step as [stage, errno(4 bytes)] on a close-on-exec pipe: an
    // exec that succeeds closes it, so EOF with nothing read means success.
    let mut pipe_fds = [-1; 2];
    // SAFETY: pipe_fds is valid storage for two ints.
    syscall!(pipe2(pipe_fds.as_mut_ptr(), libc::O_CLOEXEC))?;
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    let (err_r, err_w) = unsafe {
        (
            OwnedFd::from_raw_fd(pipe_fds[0]),
            OwnedFd::from_raw_fd(pipe_fds[1]),
        )
    };

    // SAFETY: fork is safe to call; the child below only makes async-signal-safe calls on
    // memory prepared above and ends in execve or _exit.
    let pid = syscall!(fork())?;
    if pid == 0 {
        // SAFETY: child after fork; see child_after_fork's contract.
        unsafe {
            child_after_fork(ChildArgs {
                program: program.as_ptr(),
                argv: argv.as_ptr(),
                envp: envp.as_ptr(),
                pid_digits,
                src_fds: &src_fds[..nfds],
                cpus: cpus.as_ref(),
                die_with_parent,
                stdout,
                stderr,
                ids,
                parent,
                err_fd: err_w.as_raw_fd(),
            })
        }
    }
    drop(err_w);
    let mut report = [0u8; 5];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reading into the unread tail of report.
        let n = unsafe {
            libc::read(
                err_r.as_raw_fd(),
                report[got..].as_mut_ptr().cast(),
                report.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    // Whether the exec worked is unknown: a child nobody can account for must
                    // not run on.
                    kill_and_reap(pid);
                    return Err(e);
                }
            }
        }
    }
    if got == report.len() {
        // The child failed before exec and exits; reap it so it is not left a zombie.
        let _ = super::waitpid_blocking(pid);
        let errno = i32::from_ne_bytes(report[1..5].try_into().expect("4 bytes"));
        let e = io::Error::from_raw_os_error(errno);
        return Err(io::Error::new(
            e.kind(),
            SpawnError {
                step: Stage::from_u8(report[0]),
                errno,
            },
        ));
    }
    match super::pidfd_open(pid) {
        Ok(pidfd) => Ok(Spawned { pid, pidfd }),
        Err(e) => {
            // A worker the caller cannot watch must not run: the exec succeeded, so the child
            // is ours to kill and reap here (until reaped, `pid` cannot be reused).
            kill_and_reap(pid);
            Err(e)
        }
    }
}

/// SIGKILLs our own, not yet reaped child `pid` and reaps it.
fn kill_and_reap(pid: Pid) {
    let _ = super::kill(pid, libc::SIGKILL);
    let _ = super::waitpid_blocking(pid);
}

/// `--user`/`--group` as plain ids and a pointer to the groups the parent allocated.
#[derive(Clone, Copy)]
struct ChildIds {
    uid: Option<libc::uid_t>,
    gid: libc::gid_t,
    groups: *const libc::gid_t,
    ngroups: usize,
}

struct ChildArgs<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    pid_digits: *mut u8,
    src_fds: &'a [libc::c_int],
    cpus: Option<&'a CpuSet>,
    die_with_parent: bool,
    stdout: libc::c_int,
    stderr: libc::c_int,
    ids: Option<ChildIds>,
    parent: Pid,
    err_fd: libc::c_int,
}

/// Runs in the child between fork and exec. Never returns.
///
/// # Safety
/// Must be called only in a freshly forked child. Uses only async-signal-safe syscalls and
/// writes only to the child's private copy of memory prepared before the fork.
#[allow(unsafe_code)]
unsafe fn child_after_fork(a: ChildArgs<'_>) -> ! {
    // SAFETY: raw syscalls on ints and on pointers the parent prepared before fork, all
    // async-signal-safe; on any failure the child reports and _exits without unwinding.
    unsafe {
        let fail = |stage: Stage| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 5];
            msg[0] = stage as u8;
            msg[1..5].copy_from_slice(&errno.to_ne_bytes());
            libc::write(a.err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        };

        // Signals: Rust ignores SIGPIPE in the master; the worker gets the default back. The
        // mask is inherited across exec, so clear it.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        // Own process group: a terminal's Ctrl-C reaches the master only, which then drains the
        // workers in order instead of racing their deaths against its own shutdown.
        if libc::setpgid(0, 0) == -1 {
            fail(Stage::Setpgid);
        }
        // Drop privileges first: set*id clears PR_SET_PDEATHSIG (prctl(2)), so it is set after.
        // Groups, then gid, then uid: once the uid is dropped the others cannot be changed.
        if let Some(ids) = a.ids {
            if libc::setgroups(ids.ngroups, ids.groups) == -1 || libc::setgid(ids.gid) == -1 {
                fail(Stage::SetIds);
            }
            if let Some(uid) = ids.uid
                && libc::setuid(uid) == -1
            {
                fail(Stage::SetIds);
            }
        }
        if a.die_with_parent {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                fail(Stage::Pdeathsig);
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != a.parent {
                libc::_exit(0);
            }
        }
        if let Some(set) = a.cpus
            && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set.raw()) == -1
        {
            fail(Stage::Affinity);
        }

        // Output pipes onto 1 and 2 first: the pipes are above 2, so this moves nothing the
        // listener placement below needs, and dup2 clears close-on-exec on the copies.
        if a.stdout >= 0 && libc::dup2(a.stdout, 1) == -1 {
            fail(Stage::Dup);
        }
        if a.stderr >= 0 && libc::dup2(a.stderr, 2) == -1 {
            fail(Stage::Dup);
        }

        // Place fds at 3, 4, …: first move every source above the target range (a source may
        // already sit on another's target number), then dup2 down; dup2 clears close-on-exec.
        let n = a.src_fds.len() as libc::c_int;
        let mut tmp = [-1 as libc::c_int; MAX_PASSED_FDS];
        for (i, &fd) in a.src_fds.iter().enumerate() {
            let moved = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3 + n);
            if moved == -1 {
                fail(Stage::Dup);
            }
            tmp[i] = moved;
        }
        for (i, &fd) in tmp[..a.src_fds.len()].iter().enumerate() {
            if libc::dup2(fd, 3 + i as libc::c_int) == -1 {
                fail(Stage::Dup);
            }
        }
        // Any fd the master itself inherited without close-on-exec must not reach the worker
        // either: mark everything above the passed range close-on-exec (close_range(2), 5.11+).
        // The error pipe is already close-on-exec, so it survives until exec.
        libc::syscall(
            libc::SYS_close_range,
            (3 + n) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );

        if !a.pid_digits.is_null() {
            let mut pid = libc::getpid() as u64;
            let mut digits = [0u8; PID_DIGITS];
            let mut len = 0;
            loop {
                digits[len] = b'0' + (pid % 10) as u8;
                len += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for i in 0..len {
                *a.pid_digits.add(i) = digits[len - 1 - i];
            }
            *a.pid_digits.add(len) = 0;
        }

        libc::execve(a.program, a.argv, a.envp);
        fail(Stage::Exec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn env_of_self() -> Vec<Vec<u8>> {
        std::env::vars_os()
            .map(|(k, v)| {
                let mut e = k.as_bytes().to_vec();
                e.push(b'=');
                e.extend_from_slice(v.as_bytes());
                e
            })
            .collect()
    }

    #[test]
    fn child_sees_fds_at_3_and_its_own_listen_pid() {
        let (master, worker_end) = crate::socketpair_seqpacket().unwrap();
        // The shell reports LISTEN_PID and its own pid, and whether fd 3 is open, on fd 3.
        let script = "echo \"$LISTEN_PID $$ $(test -e /proc/self/fd/3 && echo open)\" >&3";
        let args: Vec<&OsStr> = vec![OsStr::new("sh"), OsStr::new("-c"), OsStr::new(script)];
        let env = env_of_self();
        let fds = [worker_end.as_fd()];
        let child = spawn(&SpawnSpec {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            listen_pid: true,
            fds: &fds,
            cpus: None,
            die_with_parent: true,
            stdout: None,
            stderr: None,
            credentials: None,
        })
        .unwrap();
        let status = crate::waitpid_blocking(child.pid).unwrap();
        assert_eq!(status, crate::ExitStatus::Exited(0));
        let mut buf = [0u8; 128];
        let got = crate::scm::recvmsg_fd(master.as_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap();
        let text = std::str::from_utf8(&buf[..got.len]).unwrap();
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            fields[0], fields[1],
            "LISTEN_PID equals the child's pid: {text}"
        );
        assert_eq!(fields[0], child.pid.to_string());
        assert_eq!(fields.get(2), Some(&"open"));
    }

    #[test]
    fn exec_failure_is_reported_not_exit_127() {
        let args: Vec<&OsStr> = vec![OsStr::new("nope")];
        let err = spawn(&SpawnSpec {
            program: Path::new("/nonexistent/program"),
            args: &args,
            env: &[],
            listen_pid: false,
            fds: &[],
            cpus: None,
            die_with_parent: true,
            stdout: None,
            stderr: None,
            credentials: None,
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("execve"), "{err}");
    }

    #[test]
    fn stdout_and_stderr_go_to_the_given_pipes() {
        let (out_r, out_w) = crate::pipe().unwrap();
        let (err_r, err_w) = crate::pipe().unwrap();
        let args: Vec<&OsStr> = vec![
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new("echo to-out; echo to-err >&2"),
        ];
        let child = spawn(&SpawnSpec {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &[],
            listen_pid: false,
            fds: &[],
            cpus: None,
            die_with_parent: true,
            stdout: Some(out_w.as_fd()),
            stderr: Some(err_w.as_fd()),
            credentials: None,
        })
        .unwrap();
        drop((out_w, err_w));
        assert_eq!(
            crate::waitpid_blocking(child.pid).unwrap(),
            crate::ExitStatus::Exited(0)
        );
        let read_all = |fd: OwnedFd| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).unwrap();
            s
        };
        assert_eq!(read_all(out_r), "to-out\n");
        assert_eq!(read_all(err_r), "to-err\n");
    }
}
