//! The libc functions the shim shadows, looked up once with `dlsym(RTLD_NEXT, …)` (dlsym(3)) so
//! the shim can call the implementation it interposes. Inside this library every call to an
//! interposed name (`close`, `dup3`, …) must go through here: a plain `libc::close` would bind
//! to the shim's own export and recurse.
//!
//! Resolution is lazy and lock-free (an `AtomicPtr` per symbol; two threads racing to resolve
//! store the same pointer), so an interposed function called before the constructor — by
//! another library's constructor — still works. A worker's constructor also resolves them all
//! up front ([`resolve_all`]), so the exec hooks never call `dlsym` in a fork or vfork child.

use std::ffi::{CStr, c_void};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use libc::{c_char, c_int, c_long, sockaddr, socklen_t};

fn resolve(slot: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    let p = slot.load(Ordering::Acquire);
    if !p.is_null() {
        return p;
    }
    // SAFETY: name is NUL-terminated; RTLD_NEXT is a valid pseudo-handle for dlsym from a
    // shared object.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    slot.store(p, Ordering::Release);
    p
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

macro_rules! real_fn {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        /// The lookup slot of the function of the same name (modules and functions live in
        /// different namespaces), so [`resolve_all`] can fill it ahead of time.
        pub mod $name {
            /// The resolved address, null until looked up.
            pub static SLOT: std::sync::atomic::AtomicPtr<std::ffi::c_void> =
                std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
            /// The symbol name.
            pub const NAME: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
                concat!(stringify!($name), "\0").as_bytes(),
            ) {
                Ok(s) => s,
                Err(_) => panic!("symbol name"),
            };
        }

        $(#[$doc])*
        ///
        /// # Safety
        /// Same contract as the libc function of that name.
        pub unsafe fn $name($($arg: $ty),*) -> $ret {
            let p = resolve(&$name::SLOT, $name::NAME);
            if p.is_null() {
                set_errno(libc::ENOSYS);
                return -1;
            }
            // SAFETY: dlsym returned libc's definition of this symbol, whose C prototype is
            // the one spelled here.
            let f: unsafe extern "C" fn($($ty),*) -> $ret = unsafe { std::mem::transmute(p) };
            // SAFETY: forwarded under the caller's contract.
            unsafe { f($($arg),*) }
        }
    };
}

real_fn!(
    /// libc `close(2)`.
    close(fd: c_int) -> c_int
);
real_fn!(
    /// libc `bind(2)`.
    bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int
);
real_fn!(
    /// libc `listen(2)`.
    listen(fd: c_int, backlog: c_int) -> c_int
);
real_fn!(
    /// libc `accept(2)`.
    accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int
);
real_fn!(
    /// libc `accept4(2)`.
    accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int
);
real_fn!(
    /// libc `getsockname(2)`.
    getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int
);
real_fn!(
    /// libc `getsockopt(2)`.
    getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int
);
real_fn!(
    /// libc `setsockopt(2)`.
    setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int
);
real_fn!(
    /// libc `sigaction(2)`.
    sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int
);
real_fn!(
    /// libc `dup2(2)`.
    dup2(old: c_int, new: c_int) -> c_int
);
real_fn!(
    /// libc `dup3(2)`.
    dup3(old: c_int, new: c_int, flags: c_int) -> c_int
);

real_fn!(
    /// libc `execve(2)`.
    execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int
);
real_fn!(
    /// libc `execv(3)`.
    execv(path: *const c_char, argv: *const *const c_char) -> c_int
);
real_fn!(
    /// libc `execvp(3)`.
    execvp(file: *const c_char, argv: *const *const c_char) -> c_int
);
real_fn!(
    /// libc `execvpe(3)`.
    execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int
);
real_fn!(
    /// libc `fexecve(3)`.
    fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int
);
real_fn!(
    /// libc `posix_spawn(3)`.
    posix_spawn(
        pid: *mut libc::pid_t,
        path: *const c_char,
        actions: *const libc::posix_spawn_file_actions_t,
        attr: *const libc::posix_spawnattr_t,
        argv: *const *mut c_char,
        envp: *const *mut c_char
    ) -> c_int
);
real_fn!(
    /// libc `posix_spawnp(3)`.
    posix_spawnp(
        pid: *mut libc::pid_t,
        file: *const c_char,
        actions: *const libc::posix_spawn_file_actions_t,
        attr: *const libc::posix_spawnattr_t,
        argv: *const *mut c_char,
        envp: *const *mut c_char
    ) -> c_int
);
real_fn!(
    /// libc `epoll_ctl(2)`.
    epoll_ctl(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) -> c_int
);
real_fn!(
    /// libc `epoll_wait(2)`.
    epoll_wait(epfd: c_int, events: *mut libc::epoll_event, max: c_int, timeout: c_int) -> c_int
);
real_fn!(
    /// libc `epoll_pwait(2)`.
    epoll_pwait(
        epfd: c_int,
        events: *mut libc::epoll_event,
        max: c_int,
        timeout: c_int,
        sigmask: *const libc::sigset_t
    ) -> c_int
);
real_fn!(
    /// libc `epoll_pwait2(2)` (glibc 2.35+; ENOSYS through here where libc lacks it).
    epoll_pwait2(
        epfd: c_int,
        events: *mut libc::epoll_event,
        max: c_int,
        timeout: *const libc::timespec,
        sigmask: *const libc::sigset_t
    ) -> c_int
);
real_fn!(
    /// libc `poll(2)`.
    poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int
);
real_fn!(
    /// glibc's `_FORTIFY_SOURCE` `poll`.
    __poll_chk(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int, fdslen: libc::size_t) -> c_int
);
real_fn!(
    /// libc `ppoll(2)`.
    ppoll(
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        timeout: *const libc::timespec,
        sigmask: *const libc::sigset_t
    ) -> c_int
);
real_fn!(
    /// glibc's `_FORTIFY_SOURCE` `ppoll`.
    __ppoll_chk(
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        timeout: *const libc::timespec,
        sigmask: *const libc::sigset_t,
        fdslen: libc::size_t
    ) -> c_int
);
real_fn!(
    /// libc `select(2)`.
    select(
        nfds: c_int,
        readfds: *mut libc::fd_set,
        writefds: *mut libc::fd_set,
        exceptfds: *mut libc::fd_set,
        timeout: *mut libc::timeval
    ) -> c_int
);
real_fn!(
    /// libc `pselect(2)`.
    pselect(
        nfds: c_int,
        readfds: *mut libc::fd_set,
        writefds: *mut libc::fd_set,
        exceptfds: *mut libc::fd_set,
        timeout: *const libc::timespec,
        sigmask: *const libc::sigset_t
    ) -> c_int
);

real_fn!(
    /// libc `wait(2)`.
    wait(status: *mut c_int) -> libc::pid_t
);
real_fn!(
    /// libc `waitpid(2)`.
    waitpid(pid: libc::pid_t, status: *mut c_int, options: c_int) -> libc::pid_t
);
real_fn!(
    /// libc `wait3(2)`.
    wait3(status: *mut c_int, options: c_int, usage: *mut libc::rusage) -> libc::pid_t
);
real_fn!(
    /// libc `wait4(2)`.
    wait4(pid: libc::pid_t, status: *mut c_int, options: c_int, usage: *mut libc::rusage) -> libc::pid_t
);
real_fn!(
    /// libc `waitid(2)`.
    waitid(idtype: libc::idtype_t, id: libc::id_t, info: *mut libc::siginfo_t, options: c_int) -> c_int
);

static SYSCALL_SLOT: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());

/// Looks up every function above now. The constructor calls it so that an interposed call made
/// where `dlsym` must not run — an `exec` in a `fork`/`vfork` child of a threaded server, where
/// the loader's lock may be held by a thread that no longer exists — finds its slot filled.
pub fn resolve_all() {
    let slots = [
        (&close::SLOT, close::NAME),
        (&bind::SLOT, bind::NAME),
        (&listen::SLOT, listen::NAME),
        (&accept::SLOT, accept::NAME),
        (&accept4::SLOT, accept4::NAME),
        (&getsockname::SLOT, getsockname::NAME),
        (&getsockopt::SLOT, getsockopt::NAME),
        (&setsockopt::SLOT, setsockopt::NAME),
        (&sigaction::SLOT, sigaction::NAME),
        (&dup2::SLOT, dup2::NAME),
        (&dup3::SLOT, dup3::NAME),
        (&execve::SLOT, execve::NAME),
        (&execv::SLOT, execv::NAME),
        (&execvp::SLOT, execvp::NAME),
        (&execvpe::SLOT, execvpe::NAME),
        (&fexecve::SLOT, fexecve::NAME),
        (&posix_spawn::SLOT, posix_spawn::NAME),
        (&posix_spawnp::SLOT, posix_spawnp::NAME),
        (&epoll_ctl::SLOT, epoll_ctl::NAME),
        (&epoll_wait::SLOT, epoll_wait::NAME),
        (&epoll_pwait::SLOT, epoll_pwait::NAME),
        (&epoll_pwait2::SLOT, epoll_pwait2::NAME),
        (&poll::SLOT, poll::NAME),
        (&__poll_chk::SLOT, __poll_chk::NAME),
        (&ppoll::SLOT, ppoll::NAME),
        (&__ppoll_chk::SLOT, __ppoll_chk::NAME),
        (&select::SLOT, select::NAME),
        (&pselect::SLOT, pselect::NAME),
        (&wait::SLOT, wait::NAME),
        (&waitpid::SLOT, waitpid::NAME),
        (&wait3::SLOT, wait3::NAME),
        (&wait4::SLOT, wait4::NAME),
        (&waitid::SLOT, waitid::NAME),
        (&SYSCALL_SLOT, c"syscall"),
    ];
    for (slot, name) in slots {
        resolve(slot, name);
    }
}

/// libc `syscall(2)`, forwarded with all six argument registers (the kernel ignores the ones a
/// given call does not use, and so does glibc's `syscall`).
///
/// # Safety
/// Same contract as the system call `num`.
pub unsafe fn syscall(num: c_long, args: [c_long; 6]) -> c_long {
    let p = resolve(&SYSCALL_SLOT, c"syscall");
    if p.is_null() {
        set_errno(libc::ENOSYS);
        return -1;
    }
    // SAFETY: dlsym returned glibc's variadic `long syscall(long, ...)`.
    let f: unsafe extern "C" fn(c_long, ...) -> c_long = unsafe { std::mem::transmute(p) };
    let [a, b, c, d, e, g] = args;
    // SAFETY: forwarded under the caller's contract.
    unsafe { f(num, a, b, c, d, e, g) }
}
