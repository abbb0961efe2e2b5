//! For tests only: running one `#[ignore]`d test of the current test binary in a child
//! process, for tests that change process-wide state (the fd limit, the fd table) that would
//! break tests running beside them in the same process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Command;

use crate::Pid;

/// Runs test `name` (its full path, e.g. `tests::child`) of the running test binary alone in
/// a child process, with `env` set to `1` (the test returns at once without it) and the
/// command prefixed by `wrapper` (e.g. `["/usr/bin/prlimit", "--nofile=64:64"]`, or none).
/// Panics with the child's output unless the child ran that test and it passed.
pub fn run_ignored_test_in_child(name: &str, env: &str, wrapper: &[&str]) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let out = cmd
        .args([
            "--exact",
            name,
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(env, "1")
        .output()
        .expect("the child test process starts");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran nothing: {text}");
}

/// [`run_ignored_test_in_child`] under `prlimit --nofile=NOFILE:NOFILE`, for a test that fills
/// its fd table (which would break tests running beside it). Skipped, with a note, where
/// `/usr/bin/prlimit` is missing.
pub fn run_ignored_test_under_fd_limit(name: &str, env: &str, nofile: u32) {
    let prlimit = "/usr/bin/prlimit";
    if !std::path::Path::new(prlimit).exists() {
        eprintln!("skipped: needs {prlimit}");
        return;
    }
    run_ignored_test_in_child(
        name,
        env,
        &[prlimit, &format!("--nofile={nofile}:{nofile}")],
    );
}

/// Opens fds (copies of stdin's) until none is free, for a test running under a low
/// `RLIMIT_NOFILE` (see [`run_ignored_test_in_child`]); they close when dropped.
pub fn fill_fd_table() -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    while let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() {
        fds.push(fd);
    }
    fds
}

/// With exactly `free` fds left (the rest of the table filled), runs `read` on `threads` threads
/// started together and returns the sum of what they return; the table is freed again before
/// it returns. For races at the fd limit (run under [`run_ignored_test_under_fd_limit`]).
pub fn at_fd_limit_on_threads(
    free: usize,
    threads: usize,
    read: impl Fn() -> usize + Sync,
) -> usize {
    let mut fillers = fill_fd_table();
    fillers.truncate(fillers.len().saturating_sub(free));
    let start = std::sync::Barrier::new(threads);
    let sum = std::thread::scope(|s| {
        let running: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    read()
                })
            })
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).sum()
    });
    drop(fillers);
    sum
}

/// Rounds of a worker's two-step read near its fd limit against a forked process reclaiming
/// the same queue under the channel lock, as the master does. Each round sends two CONN
/// messages (`conn(seq)`, each carrying the same connection, so that sending takes no fd) on
/// `master`, calls `read` once with one free fd (it returns the connections it got), then waits
/// for the reclaimer to take the rest (fds in flight count against the sender's fd limit).
/// Returns the connections `read` got and those reclaimed: nothing lost, they add up to twice
/// `rounds`. Panics if the reclaimer leaves a round's messages queued for 10 s. Run alone in
/// its process ([`run_ignored_test_under_fd_limit`]), on a non-blocking `chan`.
pub fn tight_reads_against_a_reclaimer(
    chan: BorrowedFd<'_>,
    master: OwnedFd,
    rounds: u64,
    conn: impl Fn(u64) -> Vec<u8> + Sync,
    read: impl Fn() -> usize + Sync,
) -> (u64, u64) {
    let reclaimer = fork_reclaimer(chan, &[master.as_fd()]).expect("fork the reclaimer");
    let (sent, _peer) = std::os::unix::net::UnixStream::pair().expect("a socketpair");
    let got = at_fd_limit_on_threads(1, 1, || {
        let mut got = 0;
        for round in 0..rounds {
            for seq in [2 * round, 2 * round + 1] {
                crate::scm::sendmsg_fd(master.as_fd(), &conn(seq), sent.as_fd())
                    .expect("send a CONN");
            }
            got += read();
            // A reclaimer that stopped taking fails the test instead of hanging it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while crate::siocoutq(master.as_fd()).expect("SIOCOUTQ") > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the reclaimer took nothing for 10 s"
                );
                std::thread::yield_now();
            }
        }
        got
    }) as u64;
    drop(master);
    let reclaimed = reclaimer.finish().expect("the reclaimer's count");
    println!("{rounds} rounds: {got} read by the worker, {reclaimed} reclaimed");
    (got, reclaimed)
}

/// A child process that reads a worker's end of a dispatch channel the way the master takes
/// back what is queued: under the channel lock ([`crate::lock_channel`]), one message at a
/// time without waiting, closing the fds it takes, until end of file. For races between a
/// worker's two-step read near its fd limit and the master.
struct Reclaimer {
    pid: Pid,
    /// Read end of a pipe on which the child writes how many fds it took (8 bytes, LE).
    taken: Option<OwnedFd>,
}

/// Forks the [`Reclaimer`] of `chan`. The child first closes `close` (the master's end of the
/// channel: closing it in the parent is then the child's end of file, so no other child may
/// hold a copy: run it alone in its process, [`run_ignored_test_in_child`]). The child makes
/// only async-signal-safe system calls, so forking a threaded test process is sound.
fn fork_reclaimer(chan: BorrowedFd<'_>, close: &[BorrowedFd<'_>]) -> io::Result<Reclaimer> {
    let (read, write) = crate::pipe()?;
    // SAFETY: fork has no preconditions; the child below only makes system calls on fds it
    // holds and stack buffers, then _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        for fd in close.iter().chain([&read.as_fd()]) {
            // SAFETY: closing the child's copies; the OwnedFds are never dropped here (_exit).
            unsafe { libc::close(fd.as_raw_fd()) };
        }
        let taken = reclaim_until_eof(chan);
        let bytes = taken.to_le_bytes();
        // SAFETY: write of a stack buffer to our pipe end; _exit ends the child without
        // running the parent's destructors or atexit handlers.
        unsafe {
            libc::write(write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0)
        }
    }
    Ok(Reclaimer {
        pid,
        taken: Some(read),
    })
}

/// The child of [`fork_reclaimer`]: no allocation, system calls only.
fn reclaim_until_eof(chan: BorrowedFd<'_>) -> u64 {
    let mut taken = 0u64;
    loop {
        let mut data = [0u8; 64];
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is an empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = {
            let Ok(Some(_lock)) = crate::lock_channel(chan, true) else {
                return taken;
            };
            // SAFETY: msg points at iov and cbuf, which outlive the call.
            unsafe {
                libc::recvmsg(
                    chan.as_raw_fd(),
                    &mut msg,
                    libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                )
            }
        };
        if n == 0 {
            return taken;
        }
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                // SAFETY: no arguments.
                unsafe { libc::sched_yield() };
                continue;
            }
            return taken;
        }
        // SAFETY: msg was filled by recvmsg; the CMSG_* macros walk its control buffer within
        // msg_controllen, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 ints.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let fds = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    for k in 0..payload / std::mem::size_of::<libc::c_int>() {
                        libc::close(std::ptr::read_unaligned(fds.add(k)));
                        taken += 1;
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
    }
}

impl Reclaimer {
    /// Waits for the child's end of file (the caller has closed the master's end) and returns
    /// how many fds it took.
    fn finish(mut self) -> io::Result<u64> {
        let read = self.taken.take().expect("finish runs once");
        let mut bytes = [0u8; 8];
        io::Read::read_exact(&mut std::fs::File::from(read), &mut bytes)?;
        crate::waitpid_blocking(self.pid)?;
        Ok(u64::from_le_bytes(bytes))
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        if self.taken.is_some() {
            let _ = crate::kill(self.pid, libc::SIGKILL);
            let _ = crate::waitpid_blocking(self.pid);
        }
    }
}

/// A child process holding the channel lock ([`crate::lock_channel`]) of a channel end until
/// dropped (killed: a pipe's end of file would not come while other tests' children hold
/// copies of its write end), as a worker in the middle of its two-step read does.
pub struct LockHolder {
    pid: Pid,
}

/// Forks a [`LockHolder`] for `chan` and returns once it holds the lock. The child makes only
/// async-signal-safe system calls.
pub fn hold_channel_lock(chan: BorrowedFd<'_>) -> io::Result<LockHolder> {
    let (locked_r, locked_w) = crate::pipe()?;
    // SAFETY: fork has no preconditions; the child below only makes system calls on fds it
    // holds and stack buffers, then _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: the child takes the lock, says so on the pipe, and waits to be killed; it
        // never returns into the parent's code (_exit), so no OwnedFd is dropped twice.
        unsafe {
            // Not locked: no byte, and the parent's read fails once the child is gone.
            if let Ok(Some(_lock)) = crate::lock_channel(chan, true) {
                libc::write(locked_w.as_raw_fd(), b"L".as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
            libc::_exit(1)
        }
    }
    let holder = LockHolder { pid };
    drop(locked_w);
    let mut byte = [0u8; 1];
    io::Read::read_exact(&mut std::fs::File::from(locked_r), &mut byte)?;
    Ok(holder)
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = crate::kill(self.pid, libc::SIGKILL);
        let _ = crate::waitpid_blocking(self.pid);
    }
}

/// Whether another process could take the channel lock ([`crate::lock_channel`]) of `chan`
/// now, without waiting: a forked child tries, and says so in its exit status.
pub fn channel_lock_is_free_elsewhere(chan: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: fork has no preconditions; the child below only makes system calls, then _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = match crate::lock_channel(chan, false) {
            Ok(Some(_lock)) => 0,
            Ok(None) => 1,
            Err(_) => 2,
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) }
    }
    match crate::waitpid_blocking(pid)? {
        crate::ExitStatus::Exited(0) => Ok(true),
        crate::ExitStatus::Exited(1) => Ok(false),
        other => Err(io::Error::other(format!(
            "the lock probe ended with {other:?}"
        ))),
    }
}

/// Runs `read` on a thread until it is blocked in a system call (proc(5): its `syscall` file
/// shows a number, not `running`), asks [`channel_lock_is_free_elsewhere`] about `chan`, then
/// calls `unblock` (which must let `read` return) and joins. Returns whether the lock was free
/// while `read` waited, and what `read` returned. Panics if `read` never blocks within 10 s.
pub fn channel_lock_free_while_blocked<T: Send>(
    chan: BorrowedFd<'_>,
    read: impl FnOnce() -> T + Send,
    unblock: impl FnOnce(),
) -> (bool, T) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            tx.send(std::fs::read_link("/proc/thread-self").expect("/proc/thread-self"))
                .expect("the test thread waits");
            read()
        });
        let task = std::path::Path::new("/proc")
            .join(rx.recv().expect("the reader's task"))
            .join("syscall");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let free = loop {
            let now = std::fs::read_to_string(&task).unwrap_or_default();
            if now
                .split(' ')
                .next()
                .is_some_and(|n| n.parse::<i64>().is_ok())
            {
                break channel_lock_is_free_elsewhere(chan);
            }
            if std::time::Instant::now() >= deadline {
                break Err(io::Error::other("the reader never blocked"));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        unblock();
        let got = reader.join().expect("the reader");
        (free.expect("the lock probe"), got)
    })
}
