//! The exported C symbols that shadow libc's when the library is in `LD_PRELOAD`, and the
//! constructor. Each is a thin switch: with no worker contract (`state::get()` is `None`) it is
//! a straight call to the real function; otherwise state.rs decides. Compiled out of unit-test
//! builds, where these symbols would shadow libc inside the test binary itself.
//!
//! None of these may unwind: a panic in an `extern "C"` function aborts the process (Rust ≥
//! 1.81), and the code below avoids panicking paths (no indexing, no unwrap).

use libc::{c_char, c_int, c_long, c_void, sockaddr, socklen_t};

use crate::state::{errno, set_errno};
use crate::{drain, env, follow, overflow, real, state};

/// Runs [`state::init`] before `main` (ELF `.init_array`, executed by the dynamic loader when
/// the library is loaded).
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = constructor;

extern "C" fn constructor() {
    // SAFETY: .init_array functions of an LD_PRELOAD library run before main, on the only
    // thread.
    unsafe { state::init() }
}

/// bind(2): binding a listener's port takes over fd 3+i instead.
///
/// # Safety
/// As bind(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    if let Some(shim) = state::get() {
        // SAFETY: caller contract.
        if let Some(rc) = unsafe { shim.bind(fd, addr, len) } {
            return rc;
        }
    }
    // SAFETY: caller contract.
    unsafe { real::bind(fd, addr, len) }
}

/// listen(2).
///
/// # Safety
/// As listen(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: caller contract.
    let real = || unsafe { real::listen(fd, backlog) };
    match state::get() {
        Some(shim) => shim.listen(fd, real),
        None => real(),
    }
}

/// accept(2).
///
/// # Safety
/// As accept(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: caller contract.
    let real = || unsafe { real::accept(fd, addr, len) };
    match state::get() {
        // SAFETY: caller contract.
        Some(shim) => unsafe { shim.accept(fd, addr, len, 0, real) },
        None => real(),
    }
}

/// accept4(2).
///
/// # Safety
/// As accept4(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: caller contract.
    let real = || unsafe { real::accept4(fd, addr, len, flags) };
    match state::get() {
        // SAFETY: caller contract.
        Some(shim) => unsafe { shim.accept(fd, addr, len, flags, real) },
        None => real(),
    }
}

/// getsockname(2).
///
/// # Safety
/// As getsockname(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match state::get() {
        // SAFETY: caller contract.
        Some(shim) => unsafe { shim.getsockname(fd, addr, len) },
        // SAFETY: caller contract.
        None => unsafe { real::getsockname(fd, addr, len) },
    }
}

/// getsockopt(2).
///
/// # Safety
/// As getsockopt(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    match state::get() {
        // SAFETY: caller contract.
        Some(shim) => unsafe { shim.getsockopt(fd, level, name, val, len) },
        // SAFETY: caller contract.
        None => unsafe { real::getsockopt(fd, level, name, val, len) },
    }
}

/// setsockopt(2).
///
/// # Safety
/// As setsockopt(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    if let Some(shim) = state::get() {
        // SAFETY: caller contract.
        if let Some(rc) = unsafe { shim.setsockopt(fd, level, name, val, len) } {
            return rc;
        }
    }
    // SAFETY: caller contract.
    unsafe { real::setsockopt(fd, level, name, val, len) }
}

/// close(2).
///
/// # Safety
/// As close(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // SAFETY: caller contract.
    let real = || unsafe { real::close(fd) };
    match state::get() {
        Some(shim) => shim.closing(fd, real),
        None => real(),
    }
}

/// sigaction(2): for SIGTERM and SIGINT, a one-shot handler (a runtime's exit path), and in the
/// kernel modes the default action, waits for the worker's connections to close (drain.rs).
///
/// # Safety
/// As sigaction(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if drain::SIGNALS.contains(&sig)
        && let Some(shim) = state::get()
    {
        // SAFETY: caller contract.
        return unsafe { drain::sigaction(sig, act, old, !shim.dispatching()) };
    }
    // SAFETY: caller contract.
    unsafe { real::sigaction(sig, act, old) }
}

/// dup2(2): replacing a tracked fd closes it.
///
/// # Safety
/// As dup2(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: caller contract.
    let real = || unsafe { real::dup2(old, new) };
    match state::get() {
        Some(shim) if old != new => shim.closing(new, real),
        _ => real(),
    }
}

/// dup3(2): replacing a tracked fd closes it.
///
/// # Safety
/// As dup3(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: caller contract.
    let real = || unsafe { real::dup3(old, new, flags) };
    match state::get() {
        Some(shim) if old != new => shim.closing(new, real),
        _ => real(),
    }
}

/// epoll_ctl(2): under kernel steering, a listener's registration is mirrored for the overflow
/// queue (overflow.rs).
///
/// # Safety
/// As epoll_ctl(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    // SAFETY: caller contract.
    let rc = unsafe { real::epoll_ctl(epfd, op, fd, event) };
    if rc == 0
        && let Some(shim) = state::get()
    {
        // SAFETY: caller contract; the call succeeded, so `event` is valid where it is read.
        unsafe { shim.epoll_ctl(epfd, op, fd, event) };
    }
    rc
}

/// An `epoll_wait` variant on `epfd` returned `n` events in `events`: the count the server is
/// told. Under kernel steering the overflow queue's events become its listener's and the shim
/// notes what the batch holds (overflow.rs). Touches no errno.
///
/// # Safety
/// `events` holds `n` events written by the kernel when `n > 0`.
#[inline]
unsafe fn epoll_returned(epfd: c_int, events: *mut libc::epoll_event, n: c_int) -> c_int {
    if n > 0
        && let Some(shim) = state::get()
        && let Some((overflow, steer)) = shim.overflow()
    {
        // SAFETY: caller contract.
        return unsafe { overflow.returned(epfd, events, n, Some(steer)) };
    }
    n
}

/// Around a call that may block waiting for events: before it, flush the coalesced CLOSED
/// counts (and, under kernel steering, say the loop waits); after it, say the loop is busy
/// again. errno is the wait's own.
#[inline]
fn around_wait(wait: impl FnOnce() -> c_int) -> c_int {
    let Some(shim) = state::get() else {
        return wait();
    };
    let e = errno();
    shim.before_wait();
    set_errno(e);
    let rc = wait();
    let e = errno();
    shim.after_wait();
    set_errno(e);
    rc
}

/// One epoll wait as the server sees it: `wait` (the real call) inside [`around_wait`], its
/// batch rewritten by [`epoll_returned`]. A wait without a time limit (`forever`) whose every
/// event was dropped (the overflow queue reported under a registration this process no longer
/// knows, which that report removes) waits again rather than return 0, which such a caller
/// never expects (libuv asserts it cannot happen); a limited wait returns 0, as on a timeout,
/// and its caller looks at the clock.
///
/// # Safety
/// `events` as for epoll_wait(2); `wait` fills it.
#[inline]
unsafe fn epoll_call(
    epfd: c_int,
    events: *mut libc::epoll_event,
    forever: bool,
    wait: impl Fn() -> c_int,
) -> c_int {
    // SAFETY: the kernel wrote `rc` events (caller contract for the array).
    overflow::until_told(
        forever,
        || around_wait(&wait),
        |rc| unsafe { epoll_returned(epfd, events, rc) },
    )
}

/// epoll_wait(2): flushes coalesced CLOSED counts first (state.rs `before_wait`), stamps the loop's
/// waits under kernel steering (steer.rs) and notes what the batch holds (overflow.rs).
///
/// # Safety
/// As epoll_wait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    // SAFETY: caller contract.
    unsafe {
        epoll_call(epfd, events, timeout < 0, || {
            real::epoll_wait(epfd, events, max, timeout)
        })
    }
}

/// epoll_pwait(2): as [`epoll_wait`].
///
/// # Safety
/// As epoll_pwait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: caller contract.
    unsafe {
        epoll_call(epfd, events, timeout < 0, || {
            real::epoll_pwait(epfd, events, max, timeout, sigmask)
        })
    }
}

/// epoll_pwait2(2): as [`epoll_wait`].
///
/// # Safety
/// As epoll_pwait2(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: caller contract.
    unsafe {
        epoll_call(epfd, events, timeout.is_null(), || {
            real::epoll_pwait2(epfd, events, max, timeout, sigmask)
        })
    }
}

/// Under kernel steering, a `poll` that asks for a listener's input watches the overflow queue
/// too (overflow.rs); `call` performs the wait on the array and count it is given.
///
/// # Safety
/// `fds` and `nfds` as for poll(2).
unsafe fn watch_poll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    call: impl FnOnce(*mut libc::pollfd, libc::nfds_t) -> c_int,
) -> c_int {
    match state::get() {
        // SAFETY: caller contract.
        Some(shim) => unsafe { shim.poll(fds, nfds, call) },
        None => call(fds, nfds),
    }
}

/// As [`watch_poll`], for `select`: `call` performs the wait with the `nfds` it is given.
///
/// # Safety
/// `nfds` and the sets as for select(2).
unsafe fn watch_select(
    nfds: c_int,
    sets: [*mut libc::fd_set; 3],
    call: impl FnOnce(c_int) -> c_int,
) -> c_int {
    match state::get() {
        // SAFETY: caller contract.
        Some(shim) => unsafe { shim.select(nfds, sets, call) },
        None => call(nfds),
    }
}

/// glibc's fortified `poll`/`ppoll` check `fdslen` against `nfds`: the length to pass with the
/// array `call` was given, ours (a copy with the overflow queue added) or the caller's.
fn fortified_len(
    given: *const libc::pollfd,
    theirs: *const libc::pollfd,
    nfds: libc::nfds_t,
    fdslen: libc::size_t,
) -> libc::size_t {
    if given == theirs {
        fdslen
    } else {
        nfds as usize * std::mem::size_of::<libc::pollfd>()
    }
}

/// poll(2): as [`epoll_wait`], and the overflow queue watched beside a listener
/// ([`watch_poll`]).
///
/// # Safety
/// As poll(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    // SAFETY: caller contract.
    around_wait(|| unsafe { watch_poll(fds, nfds, |f, n| real::poll(f, n, timeout)) })
}

/// glibc's fortified poll: as [`poll`].
///
/// # Safety
/// As poll(2), with `fdslen` the size of `fds` in bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: c_int,
    fdslen: libc::size_t,
) -> c_int {
    if (nfds as usize).saturating_mul(std::mem::size_of::<libc::pollfd>()) > fdslen {
        // SAFETY: forwarded: glibc reports the overflow (and aborts).
        return unsafe { real::__poll_chk(fds, nfds, timeout, fdslen) };
    }
    // SAFETY: caller contract; `fdslen` covers `nfds` entries.
    around_wait(|| unsafe {
        watch_poll(fds, nfds, |f, n| {
            real::__poll_chk(f, n, timeout, fortified_len(f, fds, n, fdslen))
        })
    })
}

/// ppoll(2): as [`poll`].
///
/// # Safety
/// As ppoll(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: caller contract.
    around_wait(|| unsafe { watch_poll(fds, nfds, |f, n| real::ppoll(f, n, timeout, sigmask)) })
}

/// glibc's fortified ppoll: as [`poll`].
///
/// # Safety
/// As ppoll(2), with `fdslen` the size of `fds` in bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
    fdslen: libc::size_t,
) -> c_int {
    if (nfds as usize).saturating_mul(std::mem::size_of::<libc::pollfd>()) > fdslen {
        // SAFETY: forwarded: glibc reports the overflow (and aborts).
        return unsafe { real::__ppoll_chk(fds, nfds, timeout, sigmask, fdslen) };
    }
    // SAFETY: caller contract; `fdslen` covers `nfds` entries.
    around_wait(|| unsafe {
        watch_poll(fds, nfds, |f, n| {
            real::__ppoll_chk(f, n, timeout, sigmask, fortified_len(f, fds, n, fdslen))
        })
    })
}

/// select(2): as [`epoll_wait`], and the overflow queue watched beside a listener in the read
/// set ([`watch_select`]).
///
/// # Safety
/// As select(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn select(
    nfds: c_int,
    readfds: *mut libc::fd_set,
    writefds: *mut libc::fd_set,
    exceptfds: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    // SAFETY: caller contract.
    around_wait(|| unsafe {
        watch_select(nfds, [readfds, writefds, exceptfds], |n| {
            real::select(n, readfds, writefds, exceptfds, timeout)
        })
    })
}

/// pselect(2): as [`select`].
///
/// # Safety
/// As pselect(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    readfds: *mut libc::fd_set,
    writefds: *mut libc::fd_set,
    exceptfds: *mut libc::fd_set,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: caller contract.
    around_wait(|| unsafe {
        watch_select(nfds, [readfds, writefds, exceptfds], |n| {
            real::pselect(n, readfds, writefds, exceptfds, timeout, sigmask)
        })
    })
}

/// Flushes what is still counted, and withdraws a watch of the overflow queue, when the process
/// exits normally (ELF `.fini_array`).
#[used]
#[unsafe(link_section = ".fini_array")]
static DESTRUCTOR: extern "C" fn() = destructor;

extern "C" fn destructor() {
    if let Some(shim) = state::get() {
        shim.flush_closed();
        if let Some((overflow, steer)) = shim.overflow() {
            overflow.exiting(steer);
        }
    }
}

/// syscall(2). libuv (node) closes fds with `syscall(SYS_close, fd)`, bypassing `close`, so
/// the shim must see that path to report closed connections; `accept`/`accept4` made the same
/// way are routed too. glibc's `syscall` is variadic; on x86-64 and AArch64 Linux variadic
/// integer arguments travel in the same registers as fixed ones, so a function taking the
/// number and six `long`s receives exactly what the caller passed (unused registers hold junk,
/// which the kernel ignores and which is forwarded unchanged).
///
/// # Safety
/// As syscall(2).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    num: c_long,
    a: c_long,
    b: c_long,
    c: c_long,
    d: c_long,
    e: c_long,
    f: c_long,
) -> c_long {
    let args = [a, b, c, d, e, f];
    if let Some(shim) = state::get() {
        match num {
            libc::SYS_close => {
                // SAFETY: caller contract.
                let real = || unsafe { real::syscall(num, args) } as c_int;
                return c_long::from(shim.closing(a as c_int, real));
            }
            libc::SYS_accept4 => {
                // SAFETY: caller contract: the arguments are accept4's.
                return c_long::from(unsafe {
                    accept4(
                        a as c_int,
                        b as *mut sockaddr,
                        c as *mut socklen_t,
                        d as c_int,
                    )
                });
            }
            #[cfg(target_arch = "x86_64")]
            libc::SYS_accept => {
                // SAFETY: caller contract: the arguments are accept's.
                return c_long::from(unsafe {
                    accept(a as c_int, b as *mut sockaddr, c as *mut socklen_t)
                });
            }
            _ => {}
        }
    }
    // SAFETY: caller contract.
    unsafe { real::syscall(num, args) }
}

/// Runs `exec` with the environment follow.rs decides on; `None` when the call should pass
/// through unchanged (not started as a worker, or the worker's own exec with an unusable
/// contract). The worker's own exec (same pid) gets the contract back and fds 3+i inheritable;
/// anyone else's (a fork or vfork child) gets `envp` without `RCLUSTER_*` and our `LD_PRELOAD`
/// entry. That second path is async-signal-safe: atomic loads, getpid, and a filter into stack
/// storage.
///
/// # Safety
/// `envp` as for execve(2).
unsafe fn exec_hooked(
    envp: *const *const c_char,
    exec: impl FnOnce(*const *const c_char) -> c_int,
) -> Option<c_int> {
    let carry = follow::get()?;
    if !carry.applies() {
        let mut buf = follow::ChildEnv::new();
        // SAFETY: caller contract.
        let env = unsafe { buf.filter(envp, carry.shim_path()) };
        return Some(exec(env.as_ptr()));
    }
    let shim = state::get()?;
    // SAFETY: caller contract.
    let env = unsafe { carry.exec_env(envp) };
    follow::set_inheritable(shim.listeners(), true);
    if let Some(steer) = shim.steer() {
        steer.set_inheritable(true);
    }
    if let Some((overflow, steer)) = shim.overflow() {
        overflow.exec(steer, true);
    }
    let rc = exec(env.as_ptr());
    // Only reached when exec failed: undo.
    let e = errno();
    follow::set_inheritable(shim.listeners(), false);
    if let Some(steer) = shim.steer() {
        steer.set_inheritable(false);
    }
    if let Some((overflow, steer)) = shim.overflow() {
        overflow.exec(steer, false);
    }
    set_errno(e);
    Some(rc)
}

/// The current environment (execv/execvp use it).
fn current_environ() -> *const *const c_char {
    // SAFETY: a plain read of the pointer libc maintains (no reference to the static mut).
    unsafe { env::environ }
}

/// execve(2).
///
/// # Safety
/// As execve(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: caller contract.
    unsafe { exec_hooked(envp, |e| real::execve(path, argv, e)) }
        // SAFETY: caller contract.
        .unwrap_or_else(|| unsafe { real::execve(path, argv, envp) })
}

/// execv(3).
///
/// # Safety
/// As execv(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: caller contract; environ is libc's valid environment array.
    unsafe { exec_hooked(current_environ(), |e| real::execve(path, argv, e)) }
        // SAFETY: caller contract.
        .unwrap_or_else(|| unsafe { real::execv(path, argv) })
}

/// execvp(3).
///
/// # Safety
/// As execvp(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: caller contract; environ is libc's valid environment array.
    unsafe { exec_hooked(current_environ(), |e| real::execvpe(file, argv, e)) }
        // SAFETY: caller contract.
        .unwrap_or_else(|| unsafe { real::execvp(file, argv) })
}

/// execvpe(3).
///
/// # Safety
/// As execvpe(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: caller contract.
    unsafe { exec_hooked(envp, |e| real::execvpe(file, argv, e)) }
        // SAFETY: caller contract.
        .unwrap_or_else(|| unsafe { real::execvpe(file, argv, envp) })
}

/// fexecve(3).
///
/// # Safety
/// As fexecve(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fexecve(
    fd: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: caller contract.
    unsafe { exec_hooked(envp, |e| real::fexecve(fd, argv, e)) }
        // SAFETY: caller contract.
        .unwrap_or_else(|| unsafe { real::fexecve(fd, argv, envp) })
}

/// posix_spawn(3). glibc creates the child with `clone(CLONE_VM | CLONE_VFORK)` and execs in it
/// through internal calls no hook sees, so the environment is filtered here: the new process
/// is always a child, never the worker.
///
/// # Safety
/// As posix_spawn(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    let Some(carry) = follow::get() else {
        // SAFETY: caller contract.
        return unsafe { real::posix_spawn(pid, path, actions, attr, argv, envp) };
    };
    let mut buf = follow::ChildEnv::new();
    // SAFETY: caller contract (envp is null or a NULL-terminated array of C strings).
    let env = unsafe { buf.filter(envp.cast(), carry.shim_path()) };
    // SAFETY: caller contract; env is as valid as envp for the duration of the call.
    unsafe { real::posix_spawn(pid, path, actions, attr, argv, env.as_ptr().cast()) }
}

/// posix_spawnp(3): as [`posix_spawn`], searching `PATH`.
///
/// # Safety
/// As posix_spawnp(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    let Some(carry) = follow::get() else {
        // SAFETY: caller contract.
        return unsafe { real::posix_spawnp(pid, file, actions, attr, argv, envp) };
    };
    let mut buf = follow::ChildEnv::new();
    // SAFETY: caller contract (envp is null or a NULL-terminated array of C strings).
    let env = unsafe { buf.filter(envp.cast(), carry.shim_path()) };
    // SAFETY: caller contract; env is as valid as envp for the duration of the call.
    unsafe { real::posix_spawnp(pid, file, actions, attr, argv, env.as_ptr().cast()) }
}

/// Tells the shim that `pid` was reaped, when a wait call returned one (a process this worker
/// forked: its connections were closed by its exit; procs.rs). Keeps errno as the call left it.
fn reaped(pid: libc::pid_t) {
    if pid > 0
        && let Some(shim) = state::get()
    {
        let e = errno();
        shim.reaped(pid);
        set_errno(e);
    }
}

/// wait(2).
///
/// # Safety
/// As wait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait(status: *mut c_int) -> libc::pid_t {
    // SAFETY: caller contract.
    let pid = unsafe { real::wait(status) };
    reaped(pid);
    pid
}

/// waitpid(2).
///
/// # Safety
/// As waitpid(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitpid(
    pid: libc::pid_t,
    status: *mut c_int,
    options: c_int,
) -> libc::pid_t {
    // SAFETY: caller contract.
    let got = unsafe { real::waitpid(pid, status, options) };
    if options & libc::WNOWAIT == 0 {
        reaped(got);
    }
    got
}

/// wait3(2).
///
/// # Safety
/// As wait3(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait3(
    status: *mut c_int,
    options: c_int,
    usage: *mut libc::rusage,
) -> libc::pid_t {
    // SAFETY: caller contract.
    let got = unsafe { real::wait3(status, options, usage) };
    if options & libc::WNOWAIT == 0 {
        reaped(got);
    }
    got
}

/// wait4(2).
///
/// # Safety
/// As wait4(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait4(
    pid: libc::pid_t,
    status: *mut c_int,
    options: c_int,
    usage: *mut libc::rusage,
) -> libc::pid_t {
    // SAFETY: caller contract.
    let got = unsafe { real::wait4(pid, status, options, usage) };
    if options & libc::WNOWAIT == 0 {
        reaped(got);
    }
    got
}

/// waitid(2).
///
/// # Safety
/// As waitid(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitid(
    idtype: libc::idtype_t,
    id: libc::id_t,
    info: *mut libc::siginfo_t,
    options: c_int,
) -> c_int {
    // SAFETY: caller contract.
    let rc = unsafe { real::waitid(idtype, id, info, options) };
    if rc == 0 && !info.is_null() && options & libc::WNOWAIT == 0 {
        // SAFETY: waitid filled *info; si_pid is 0 when WNOHANG found no child.
        let pid = unsafe { (*info).si_pid() };
        reaped(pid);
    }
    rc
}
