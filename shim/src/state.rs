//! The process-wide shim state — the listeners adopted from fds 3+i and the connection table —
//! built once by the constructor, and what each interposed call does with it. Shared by every
//! thread; read-only after construction except for atomics, so no call takes a lock.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use libc::{c_int, c_void, sockaddr, socklen_t};

use crate::conns::ConnTable;
use crate::env::{self, Mode};
use crate::listener::Listener;
use crate::notify::NotifyTarget;
use crate::overflow::Overflow;
use crate::procs::Procs;
use crate::sockopts::{self, Route};
use crate::steer::SteerSlot;
use crate::{dispatch, follow, real, sockaddr as sa};

/// Everything the shim knows, once the constructor found the worker contract.
pub struct Shim {
    mode: Mode,
    listeners: Vec<Listener>,
    /// Connections handed out by `accept` on a dispatch channel.
    pub conns: ConnTable,
    /// Open connections per process of this worker, shared across `fork` (procs.rs).
    pub procs: Procs,
    notify: Option<NotifyTarget>,
    notified: AtomicBool,
    /// Kernel steering: this worker's line of the table, counted on per accept and close.
    steer: Option<SteerSlot>,
    /// Kernel steering: the overflow queue (overflow.rs), with `steer`.
    overflow: Option<Overflow>,
}

static SHIM: OnceLock<Shim> = OnceLock::new();

/// The shim state, or `None` when not running under rcluster-lb: every call passes through.
#[inline]
pub fn get() -> Option<&'static Shim> {
    SHIM.get()
}

thread_local! {
    /// This thread waits in `epoll_wait`/`poll`/`select` (it called one through the shim), so
    /// it will flush the CLOSED count before it blocks: its closes are only counted.
    static EVENT_LOOP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread runs an event loop (see [`Shim::before_wait`]).
pub fn in_event_loop() -> bool {
    EVENT_LOOP.with(|f| f.get())
}

/// This thread's errno.
pub fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

/// Sets this thread's errno.
pub fn set_errno(e: c_int) {
    // SAFETY: as in errno().
    unsafe { *libc::__errno_location() = e };
}

/// One diagnostic line on stderr, written with a single writev so lines of concurrent threads
/// do not interleave, without allocating.
pub fn warn(msg: &str) {
    let prefix = b"rcluster-shim: ";
    let iov = [
        libc::iovec {
            iov_base: prefix.as_ptr() as *mut c_void,
            iov_len: prefix.len(),
        },
        libc::iovec {
            iov_base: msg.as_ptr() as *mut c_void,
            iov_len: msg.len(),
        },
        libc::iovec {
            iov_base: b"\n".as_ptr() as *mut c_void,
            iov_len: 1,
        },
    ];
    let saved = errno();
    // SAFETY: the iovecs point at live buffers of the given lengths; writev only reads them.
    unsafe { libc::writev(libc::STDERR_FILENO, iov.as_ptr(), iov.len() as c_int) };
    set_errno(saved);
}

fn getsockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: v and len are valid storage of the sizes given.
    let rc = unsafe { real::getsockopt(fd, level, name, (&raw mut v).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// Takes over fd `fd` = 3+i: checks it is what the mode promises, and keeps a private
/// close-on-exec duplicate at or above `min_fd`. fd 3+i itself is made close-on-exec too: the
/// server's children do not get the shim (env.rs), so they must not get its listeners either.
fn adopt(
    fd: c_int,
    index: usize,
    addr: SocketAddr,
    mode: Mode,
    min_fd: c_int,
) -> Result<Listener, String> {
    let ty = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
        .ok_or_else(|| format!("fd {fd} is not a socket"))?;
    let dispatch = mode == Mode::Dispatch;
    let mut addr = addr;
    if dispatch {
        if ty != libc::SOCK_SEQPACKET {
            return Err(format!("fd {fd} is not a SOCK_SEQPACKET dispatch channel"));
        }
    } else {
        if ty != libc::SOCK_STREAM
            || getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) != Some(1)
        {
            return Err(format!("fd {fd} is not a listening TCP socket"));
        }
        // The socket knows its real address better than the environment (a port 0 resolved).
        // SAFETY: plain data; zero is valid.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&st) as socklen_t;
        // SAFETY: st/len are valid storage of the sizes given.
        if unsafe { real::getsockname(fd, (&raw mut st).cast(), &mut len) } == 0 {
            // SAFETY: getsockname wrote `len` bytes into st.
            if let Some(real_addr) = unsafe { sa::read((&raw const st).cast(), len) } {
                addr = real_addr;
            }
        }
    }
    // SAFETY: fcntl on an inherited fd; the result is a new fd nobody else owns.
    let private = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min_fd) };
    if private < 0 {
        return Err(format!("cannot duplicate fd {fd}"));
    }
    // SAFETY: `private` was just created and is owned by nobody else.
    let chan = unsafe { OwnedFd::from_raw_fd(private) };
    // SAFETY: fcntl on an inherited fd.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Listener::new(index, fd, addr, chan, dispatch).ok_or_else(|| format!("cannot fstat fd {fd}"))
}

/// The constructor's work: read the contract, take our entry out of `LD_PRELOAD`, set up the
/// exec hooks (follow.rs), adopt the fds.
///
/// # Safety
/// Must run before any other thread exists (it modifies the environment).
pub unsafe fn init() {
    let contract = env::read();
    if matches!(contract, Ok(None)) {
        return;
    }
    // Before any fork: the exec hooks of a child must not need dlsym.
    real::resolve_all();
    // Even with an inconsistent contract the server's children must not see it.
    // SAFETY: caller contract (single-threaded).
    follow::install(unsafe { env::scrub() });
    let contract = match contract {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            warn(&format!("{e}; passing every call through"));
            return;
        }
    };
    let first_free = 3 + contract.listen.len() as c_int;
    let mut listeners = Vec::with_capacity(contract.listen.len());
    for (i, addr) in contract.listen.iter().enumerate() {
        match adopt(
            3 + i as c_int,
            listeners.len(),
            *addr,
            contract.mode,
            first_free,
        ) {
            Ok(l) => listeners.push(l),
            Err(e) => warn(&format!("listener {i} ({addr}) unusable: {e}")),
        }
    }
    let notify = contract
        .notify_socket
        .as_deref()
        .and_then(NotifyTarget::parse);
    let steer = match contract.steer {
        Some((fd, slot)) if contract.mode == Mode::Reuseport => {
            let mapped = SteerSlot::map(fd, slot);
            if mapped.is_none() {
                warn("RCLUSTER_STEER_FD is not a mappable steering table; not counting");
            }
            mapped
        }
        _ => None,
    };
    let overflow = match (&steer, contract.overflow) {
        (Some(_), Some(first)) => {
            let adopted = Overflow::adopt(first, &listeners);
            if adopted.is_none() {
                warn("RCLUSTER_STEER_OVERFLOW_FD names no listening socket; not watching it");
            }
            adopted
        }
        _ => None,
    };
    let _ = SHIM.set(Shim {
        steer,
        overflow,
        mode: contract.mode,
        listeners,
        conns: ConnTable::new(),
        procs: Procs::new(),
        notify,
        notified: AtomicBool::new(false),
    });
    if let Some(hold) = contract.drain_hold {
        crate::drain::bound_hold(hold);
    }
    if contract.mode != Mode::Dispatch {
        crate::drain::hold_default();
    }
}

impl Shim {
    /// The calling process's pid (a real system call: a `vfork` child must see its own).
    pub fn pid(&self) -> u32 {
        // SAFETY: getpid cannot fail.
        unsafe { libc::getpid() as u32 }
    }

    /// Whether the worker takes its connections from dispatch channels (drain.rs).
    pub fn dispatching(&self) -> bool {
        self.mode == Mode::Dispatch
    }

    /// The connections this process holds that it was handed by the shim (drain.rs; atomics
    /// only, callable from a signal handler).
    pub fn open_here(&self) -> u64 {
        self.procs.open_of(self.pid())
    }

    /// Kernel steering: this worker's line of the table, if mapped.
    pub fn steer(&self) -> Option<&SteerSlot> {
        self.steer.as_ref()
    }

    /// Kernel steering: the overflow queue with the table, while the shim counts for the slot.
    pub fn overflow(&self) -> Option<(&Overflow, &SteerSlot)> {
        let steer = self.steer.as_ref().filter(|s| s.counting())?;
        Some((self.overflow.as_ref()?, steer))
    }

    /// epoll_ctl(2) succeeded: a listener's registration is mirrored for the overflow queue
    /// (overflow.rs).
    ///
    /// # Safety
    /// `event` as for epoll_ctl(2).
    pub unsafe fn epoll_ctl(
        &self,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        event: *const libc::epoll_event,
    ) {
        if self.mode == Mode::Dispatch {
            return;
        }
        let Some(l) = self.claimed(fd).or_else(|| self.inherited_listener(fd)) else {
            return;
        };
        // SAFETY: caller contract.
        unsafe { crate::drain::registered(epfd, op, fd, event) };
        if let Some((overflow, steer)) = self.overflow() {
            // SAFETY: caller contract.
            unsafe { overflow.mirror(steer, epfd, op, fd, l.index, event) };
        }
    }

    /// Kernel modes, from the SIGTERM handler of a worker whose exit the shim holds (drain.rs):
    /// under kernel steering the process stops watching the overflow queue and stops stamping
    /// its slot's loop clock. Atomics and `epoll_ctl` only.
    pub fn stop_taking(&self) {
        if let Some(steer) = &self.steer {
            if let Some(overflow) = &self.overflow {
                overflow.withdraw(steer);
            }
            steer.retire();
        }
    }

    /// The server's `poll` or a variant (`call` performs it on the array and count it is
    /// given): under kernel steering, the overflow queue is watched beside a listener it asks
    /// for (overflow.rs).
    ///
    /// # Safety
    /// `fds` and `nfds` as for poll(2).
    pub unsafe fn poll(
        &self,
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        call: impl FnOnce(*mut libc::pollfd, libc::nfds_t) -> c_int,
    ) -> c_int {
        if self.drained() && !fds.is_null() && nfds > 0 {
            // SAFETY: caller contract.
            return unsafe { self.poll_drained(fds, nfds, call) };
        }
        match self.overflow() {
            // SAFETY: caller contract.
            Some((overflow, steer)) => unsafe {
                overflow.poll(steer, |fd| self.listener_index(fd), fds, nfds, call)
            },
            None => call(fds, nfds),
        }
    }

    /// Whether this is a kernel-mode worker draining with its exit held (drain.rs): it takes
    /// no more connections, so its waits no longer ask for its listeners.
    fn drained(&self) -> bool {
        crate::drain::draining() && self.mode != Mode::Dispatch
    }

    /// [`Shim::poll`] of a drained worker: its listeners' entries are skipped (a negative fd,
    /// which poll(2) ignores and answers with no events) for the call and put back after it.
    ///
    /// # Safety
    /// As [`Shim::poll`], with `fds` non-null and `nfds` > 0.
    unsafe fn poll_drained(
        &self,
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        call: impl FnOnce(*mut libc::pollfd, libc::nfds_t) -> c_int,
    ) -> c_int {
        let Ok(n) = usize::try_from(nfds) else {
            return call(fds, nfds);
        };
        // SAFETY: the caller's array of `nfds` entries (poll(2) reads and writes them all).
        let theirs = unsafe { std::slice::from_raw_parts_mut(fds, n) };
        let mut hidden = [0usize; crate::overflow::WAIT_LISTENERS];
        let mut k = 0;
        for (pos, p) in theirs.iter_mut().enumerate() {
            if k < hidden.len() && p.fd >= 0 && self.listener_index(p.fd).is_some() {
                p.fd = !p.fd;
                hidden[k] = pos;
                k += 1;
            }
        }
        let rc = call(fds, nfds);
        for &pos in &hidden[..k] {
            theirs[pos].fd = !theirs[pos].fd;
            theirs[pos].revents = 0;
        }
        rc
    }

    /// The server's `select` or `pselect` (`call` performs it with the `nfds` it is given, on
    /// the caller's sets): as [`Shim::poll`].
    ///
    /// # Safety
    /// `nfds` and the sets as for select(2).
    pub unsafe fn select(
        &self,
        nfds: c_int,
        sets: [*mut libc::fd_set; 3],
        call: impl FnOnce(c_int) -> c_int,
    ) -> c_int {
        let readfds = sets[0];
        if self.drained() && !readfds.is_null() {
            // A drained worker's listeners are not asked about: never ready.
            for fd in 0..nfds.clamp(0, libc::FD_SETSIZE as c_int) {
                // SAFETY: readfds is a valid set (caller contract) and fd < FD_SETSIZE.
                unsafe {
                    if libc::FD_ISSET(fd, readfds) && self.listener_index(fd).is_some() {
                        libc::FD_CLR(fd, readfds);
                    }
                }
            }
            return call(nfds);
        }
        match self.overflow() {
            // SAFETY: caller contract.
            Some((overflow, steer)) => unsafe {
                overflow.select(steer, |fd| self.listener_index(fd), nfds, sets, call)
            },
            None => call(nfds),
        }
    }

    /// The index of the listener `fd` is (claimed, or the inherited fd used directly).
    fn listener_index(&self, fd: c_int) -> Option<usize> {
        self.claimed(fd)
            .or_else(|| self.inherited_listener(fd))
            .map(|l| l.index)
    }

    /// All adopted listeners.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Listener at position `i` (what the connection table stores).
    pub fn listener(&self, i: usize) -> Option<&Listener> {
        self.listeners.get(i)
    }

    /// The listener the server's `fd` was claimed as, if any: a few atomic loads.
    fn claimed(&self, fd: c_int) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.is_claimed_as(fd))
    }

    /// The listener whose inherited fd 3+i `fd` still is (a socket-activated server accepting
    /// from it directly): the number matches and so does the file (an fstat, paid only then).
    fn inherited_listener(&self, fd: c_int) -> Option<&Listener> {
        self.listeners
            .iter()
            .find(|l| l.inherited_fd == fd && l.is_same_file(fd))
    }

    /// The dispatch listener whose channel `fd` refers to without having been claimed (fd 3+i
    /// used directly by a socket-activated server, or a `dup` of the claimed fd). An fstat.
    fn same_channel(&self, fd: c_int) -> Option<&Listener> {
        if self.mode != Mode::Dispatch {
            return None;
        }
        self.listeners.iter().find(|l| l.is_same_file(fd))
    }

    /// The calling thread is about to wait for events (`epoll_wait`, `poll`, `select` and
    /// their variants): from now on its closes are coalesced, and what it counted so far goes
    /// out now, one CLOSED per listener at most. An atomic load per listener when nothing is
    /// owed.
    pub fn before_wait(&self) {
        EVENT_LOOP.with(|f| f.set(true));
        self.flush_closed();
        if let Some(overflow) = &self.overflow {
            overflow.waiting();
        }
        if let Some(steer) = &self.steer {
            steer.waiting();
        }
    }

    /// The calling thread's wait returned (kernel steering: steer.rs stamps the loop busy).
    pub fn after_wait(&self) {
        if let Some(steer) = &self.steer {
            steer.woke();
        }
    }

    /// Sends every CLOSED count owed (all listeners).
    pub fn flush_closed(&self) {
        for l in &self.listeners {
            l.flush_closed();
        }
    }

    /// Sends `READY=1` on NOTIFY_SOCKET once every listener is listening.
    pub fn maybe_notify_ready(&self) {
        let Some(target) = &self.notify else { return };
        if self.notified.load(Ordering::Acquire)
            || !self.listeners.iter().all(Listener::is_listening)
            || self.notified.swap(true, Ordering::AcqRel)
        {
            return;
        }
        target.send_ready();
    }

    /// bind(2): `None` = not a listener's address, pass through.
    ///
    /// # Safety
    /// `addr`/`len` as for bind(2).
    pub unsafe fn bind(&self, fd: c_int, addr: *const sockaddr, len: socklen_t) -> Option<c_int> {
        // SAFETY: caller contract.
        let bound = unsafe { sa::read(addr, len) }?;
        // Prefer the listener with exactly this address, then any other it stands for that is
        // still free (RCLUSTER_LISTEN may name 0.0.0.0:80 and [::]:80 as two listeners).
        let matching = || {
            self.listeners
                .iter()
                .filter(|l| sa::claims(&l.addr, &bound))
        };
        let first = matching().next()?;
        let l = matching()
            .filter(|l| l.is_unclaimed())
            .min_by_key(|l| l.addr != bound)
            .unwrap_or(first);
        // A UDP socket on the same port (QUIC, DNS) is not ours to replace.
        if getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
            return None;
        }
        let pid = self.pid() as c_int;
        if !l.try_claim(fd, pid) {
            // Like the kernel for a second socket bound to a taken address.
            set_errno(libc::EADDRINUSE);
            return Some(-1);
        }
        // SAFETY: fcntl queries on the caller's fd.
        let (fd_flags, fl_flags) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        };
        let cloexec = if fd_flags >= 0 && fd_flags & libc::FD_CLOEXEC != 0 {
            libc::O_CLOEXEC
        } else {
            0
        };
        // dup3(2) atomically closes the server's own socket and puts the listener in its place,
        // keeping the server's close-on-exec choice for that fd number.
        // SAFETY: both fds are open; fd is the caller's to replace.
        if fl_flags < 0 || unsafe { real::dup3(l.chan_fd(), fd, cloexec) } < 0 {
            let e = errno();
            l.release(fd, pid);
            set_errno(e);
            return Some(-1);
        }
        // The server decided blocking vs non-blocking on its own socket (libuv and asyncio
        // create it O_NONBLOCK). File status flags live in the open file description, which
        // the new fd shares with fd 3+i and the private copy, so apply the server's choice to
        // it; later fcntl/ioctl(FIONBIO) calls by the server act on it directly.
        // SAFETY: fcntl on the fd just installed.
        unsafe {
            let now = libc::fcntl(fd, libc::F_GETFL);
            if now >= 0 {
                let want = (now & !libc::O_NONBLOCK) | (fl_flags & libc::O_NONBLOCK);
                if want != now {
                    libc::fcntl(fd, libc::F_SETFL, want);
                }
            }
        }
        Some(0)
    }

    /// listen(2) on a claimed fd: already listening (dispatch: the channel; TCP modes: the
    /// master's socket, whose backlog the worker must not shrink). Dispatch sends READY. A
    /// server that adopted fd 3+i from `LISTEN_FDS` (no `bind`) and calls `listen` on it gets
    /// the same, once the real call has failed on the channel. `real_listen` is libc's call.
    pub fn listen(&self, fd: c_int, real_listen: impl FnOnce() -> c_int) -> c_int {
        let l = match self.claimed(fd) {
            Some(l) => l,
            None => {
                let rc = real_listen();
                if rc == 0 || !matches!(errno(), libc::EINVAL | libc::EOPNOTSUPP) {
                    return rc;
                }
                let e = errno();
                let Some(l) = self.same_channel(fd) else {
                    set_errno(e);
                    return rc;
                };
                l
            }
        };
        l.mark_listening();
        l.flush();
        self.maybe_notify_ready();
        0
    }

    /// accept(2)/accept4(2). `real_accept` is the libc call to use when `fd` is not a dispatch
    /// channel.
    ///
    /// # Safety
    /// `addr`/`len` as for accept4(2).
    pub unsafe fn accept(
        &self,
        fd: c_int,
        addr: *mut sockaddr,
        len: *mut socklen_t,
        flags: c_int,
        real_accept: impl FnOnce() -> c_int,
    ) -> c_int {
        if let Some(l) = self.claimed(fd).filter(|l| l.dispatch) {
            // SAFETY: caller contract.
            return unsafe { dispatch::accept(self, l, fd, addr, len, flags) };
        }
        // A kernel-mode worker draining with its exit held takes nothing more (drain.rs): what
        // waits on the listener is the other workers'. A non-blocking `accept` finds nothing;
        // a blocking one waits until the worker ends (its last connection closed by another
        // thread, or SIGKILL at --grace), as it would on a listener nobody connects to.
        if self.drained() && self.listener_index(fd).is_some() {
            if crate::overflow::nonblocking(fd) {
                set_errno(libc::EAGAIN);
                return -1;
            }
            loop {
                // SAFETY: pause only waits for a signal.
                unsafe { libc::pause() };
            }
        }
        // Kernel steering: when the table says a connection waits in the overflow queue and
        // none on this worker's own listener, the queue is tried first: one `accept`, where
        // trying the listener first would add a failed one to every connection taken from the
        // queue. Taking nothing (another worker was first, or this thread took one since it
        // last waited) falls through to the listener.
        if let Some((overflow, steer)) = self.overflow()
            && steer.overflow_waiting()
            && !steer.own_waiting()
            && let Some(l) = self.claimed(fd).or_else(|| self.inherited_listener(fd))
        {
            // SAFETY: caller contract.
            if let Some(conn) = unsafe { self.take_overflow(overflow, steer, l, addr, len, flags) }
            {
                return conn;
            }
            // Leaving the queue to others until this thread next waits (overflow.rs), with
            // nothing on its own non-blocking listener: no `accept` to fail.
            if overflow.deferring(fd) {
                set_errno(libc::EAGAIN);
                return -1;
            }
        }
        let rc = real_accept();
        if rc >= 0
            && self.mode != Mode::Dispatch
            && let Some(l) = self.claimed(fd).or_else(|| self.inherited_listener(fd))
        {
            // The kernel modes: tracked to its close (conns.rs), counted per process (what a
            // drained worker holds, drain.rs) and under kernel steering on the table.
            if let Some(steer) = &self.steer {
                steer.accepted();
            }
            self.track(rc, l.index);
            return rc;
        }
        // Kernel steering: nothing on the worker's own listener; one from the overflow queue,
        // if the table says one may wait there.
        if rc < 0
            && matches!(errno(), libc::EAGAIN)
            && let Some((overflow, steer)) = self.overflow()
            && steer.overflow_waiting()
            && let Some(l) = self.claimed(fd).or_else(|| self.inherited_listener(fd))
        {
            // SAFETY: caller contract.
            if let Some(conn) = unsafe { self.take_overflow(overflow, steer, l, addr, len, flags) }
            {
                return conn;
            }
            set_errno(libc::EAGAIN);
            return rc;
        }
        // accept on a socketpair end fails with EINVAL (not listening) or EOPNOTSUPP: only then
        // pay an fstat to see whether it is one of our channels under another number.
        if rc < 0 && matches!(errno(), libc::EINVAL | libc::EOPNOTSUPP) {
            let e = errno();
            if let Some(l) = self.same_channel(fd) {
                // SAFETY: caller contract.
                return unsafe { dispatch::accept(self, l, fd, addr, len, flags) };
            }
            set_errno(e);
        }
        rc
    }

    /// One connection from the overflow queue for listener `l`, counted as this slot's and
    /// tracked to its close, or `None` (nothing taken; errno is the caller's to set).
    ///
    /// # Safety
    /// `addr`/`len`/`flags` as for accept4(2).
    unsafe fn take_overflow(
        &self,
        overflow: &Overflow,
        steer: &SteerSlot,
        l: &Listener,
        addr: *mut sockaddr,
        len: *mut socklen_t,
        flags: c_int,
    ) -> Option<c_int> {
        // SAFETY: caller contract.
        let conn = unsafe { overflow.accept(l.index, addr, len, flags) }?;
        steer.took_overflow();
        self.track(conn, l.index);
        Some(conn)
    }

    /// Kernel modes: connection `conn`, accepted from listener `index`, is tracked to its close
    /// and counted as this process's. One whose close cannot be seen (beyond the table) counts
    /// as closed at once; a stale entry of this process is a connection closed unseen.
    fn track(&self, conn: c_int, index: usize) {
        let pid = self.pid();
        match self.conns.mark(conn, index, pid) {
            crate::conns::Marked::Fresh => {}
            crate::conns::Marked::Stale(i) => {
                self.procs.closed(pid, i);
                if let Some(steer) = &self.steer {
                    steer.closed();
                }
            }
            crate::conns::Marked::Untracked => {
                if let Some(steer) = &self.steer {
                    steer.closed();
                }
                return;
            }
        }
        // A full table leaves it uncounted (procs.rs); the master is told nothing either way.
        let _counted = self.procs.opened(pid, index, |_, _| {});
    }

    /// getsockname(2): a dispatch channel answers with its listener's address.
    ///
    /// # Safety
    /// `addr`/`len` as for getsockname(2).
    pub unsafe fn getsockname(&self, fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
        if addr.is_null() || len.is_null() {
            // SAFETY: forwarded; the kernel reports EFAULT.
            return unsafe { real::getsockname(fd, addr, len) };
        }
        if let Some(l) = self.claimed(fd).filter(|l| l.dispatch) {
            // SAFETY: caller contract, pointers checked non-null.
            unsafe { sa::write(&l.addr, addr, len) };
            return 0;
        }
        // SAFETY: len is valid (caller contract).
        let room = unsafe { *len } as usize;
        // SAFETY: forwarded under the caller's contract.
        let rc = unsafe { real::getsockname(fd, addr, len) };
        if rc == 0 && self.mode == Mode::Dispatch && room >= 2 {
            // SAFETY: the kernel wrote at least the family (room ≥ 2).
            let family = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) };
            if c_int::from(family) == libc::AF_UNIX
                && let Some(l) = self.same_channel(fd)
            {
                // SAFETY: len holds what the kernel wrote; restore the caller's room.
                unsafe {
                    *len = room as socklen_t;
                    sa::write(&l.addr, addr, len);
                }
            }
        }
        rc
    }

    /// getsockopt(2): a dispatch channel answers the questions that tell a listening TCP socket
    /// apart (what `sd_is_socket` and servers checking inherited fds ask).
    ///
    /// # Safety
    /// `val`/`len` as for getsockopt(2).
    pub unsafe fn getsockopt(
        &self,
        fd: c_int,
        level: c_int,
        name: c_int,
        val: *mut c_void,
        len: *mut socklen_t,
    ) -> c_int {
        let route = sockopts::route(level, name);
        if let Some(l) = self.claimed(fd).filter(|l| l.dispatch) {
            if let Some(v) = synthesized_opt(l, l.is_listening(), level, name) {
                // SAFETY: caller contract.
                return unsafe { write_int_opt(v, val, len) };
            }
            if route != Route::Channel {
                // SAFETY: caller contract.
                return unsafe { l.opts.get(&l.addr, level, name, val, len) };
            }
        }
        // SAFETY: forwarded under the caller's contract.
        let rc = unsafe { real::getsockopt(fd, level, name, val, len) };
        if self.mode != Mode::Dispatch || self.conns.is_marked(fd) {
            return rc;
        }
        let identity_question = level == libc::SOL_SOCKET
            && matches!(
                name,
                libc::SO_TYPE | libc::SO_DOMAIN | libc::SO_ACCEPTCONN | libc::SO_PROTOCOL
            );
        // A TCP option asked of an AF_UNIX socket fails; a SOL_SOCKET one answers for the
        // channel. Either way, if `fd` is a channel (fd 3+i adopted from LISTEN_FDS, or a
        // dup), answer as its listener would.
        let tcp_question = route != Route::Channel
            && (level == libc::SOL_SOCKET
                || rc != 0 && matches!(errno(), libc::EOPNOTSUPP | libc::ENOPROTOOPT));
        if (rc == 0 && identity_question) || tcp_question {
            let e = errno();
            if let Some(l) = self.same_channel(fd) {
                if let Some(v) = synthesized_opt(l, true, level, name) {
                    // SAFETY: caller contract; the pointers are the caller's.
                    return unsafe { write_int_opt(v, val, len) };
                }
                if route != Route::Channel {
                    // SAFETY: caller contract.
                    return unsafe { l.opts.get(&l.addr, level, name, val, len) };
                }
            }
            set_errno(e);
        }
        rc
    }

    /// setsockopt(2) on a dispatch channel, claimed or adopted (fd 3+i from `LISTEN_FDS`, a
    /// dup): TCP/IP options are validated, recorded and applied to each connection handed out
    /// (sockopts.rs); `None` = not a channel or not such an option, pass through (`SO_RCVTIMEO`
    /// gives `accept` a timeout on the channel as on a TCP listener).
    ///
    /// # Safety
    /// `val`/`len` as for setsockopt(2).
    pub unsafe fn setsockopt(
        &self,
        fd: c_int,
        level: c_int,
        name: c_int,
        val: *const c_void,
        len: socklen_t,
    ) -> Option<c_int> {
        if self.mode != Mode::Dispatch {
            return None;
        }
        if sockopts::route(level, name) == Route::Channel {
            return None;
        }
        let l = match self.claimed(fd) {
            Some(l) => l,
            // Most setsockopt calls are on connections: rule those out without a syscall.
            None if self.conns.is_marked(fd) => return None,
            None if level == libc::SOL_SOCKET => self.same_channel(fd)?,
            None => {
                // A TCP/IP-level option on an AF_UNIX socket fails without effect: only then
                // pay an fstat to see whether it is a channel.
                // SAFETY: caller contract.
                let rc = unsafe { real::setsockopt(fd, level, name, val, len) };
                if rc == 0 || !matches!(errno(), libc::EOPNOTSUPP | libc::ENOPROTOOPT) {
                    return Some(rc);
                }
                let e = errno();
                match self.same_channel(fd) {
                    Some(l) => l,
                    None => {
                        set_errno(e);
                        return Some(rc);
                    }
                }
            }
        };
        // SAFETY: caller contract.
        Some(unsafe { l.opts.set(&l.addr, level, name, val, len) })
    }

    /// A process of this worker was reaped (wait/waitpid/wait4/waitid returned its pid): the
    /// connections it still held were closed by its exit; tell the master.
    pub fn reaped(&self, pid: libc::pid_t) {
        let Ok(pid) = u32::try_from(pid) else { return };
        if pid == 0 || self.mode != Mode::Dispatch {
            return;
        }
        let me = self.pid();
        self.procs.exited(pid, |i, n| {
            if let Some(l) = self.listener(i) {
                l.conn_closed(n, me, false);
            }
        });
    }

    /// Records a connection handed out from listener `l` to this process, `pid` (procs.rs);
    /// when it cannot be accounted, it is reported closed at once.
    pub fn opened(&self, l: &Listener, pid: u32) {
        let counted = self.procs.opened(pid, l.index, |i, n| {
            if let Some(dead) = self.listener(i) {
                dead.conn_closed(n, pid, false);
            }
        });
        if !counted {
            l.conn_closed(1, pid, false);
        }
    }

    /// A connection from listener `i` that process `pid` (this one) held is closed: report it,
    /// or with `defer` count it for the next flush (listener.rs).
    pub fn conn_closed(&self, i: usize, pid: u32, defer: bool) {
        self.procs.closed(pid, i);
        if let Some(l) = self.listener(i) {
            l.conn_closed(1, pid, defer);
        }
    }

    /// close(2), and the implicit close of `dup2`/`dup3`'s target: `close_fd` performs the
    /// real operation. A connection of ours is forgotten before it (conns.rs) and reported
    /// after it; a claimed listener is released and the master told the worker is stopping.
    pub fn closing(&self, fd: c_int, close_fd: impl FnOnce() -> c_int) -> c_int {
        if self.mode != Mode::Dispatch {
            crate::drain::closing(fd);
        }
        if let Some((overflow, steer)) = self.overflow() {
            overflow.closing(steer, fd);
            overflow.listener_closing(steer, || self.listener_index(fd).is_some());
        }
        if self.conns.is_marked(fd) {
            let pid = self.pid();
            if let Some(i) = self.conns.take(fd, pid) {
                // Kernel steering: counted before the FIN leaves, so a client that reconnects
                // at once finds the load already lower.
                if let Some(steer) = &self.steer
                    && self.listener(i).is_some_and(|l| !l.dispatch)
                {
                    steer.closed();
                }
                let rc = close_fd();
                let e = errno();
                // close(2): the fd is released even when an error is reported, so the
                // connection is finished either way.
                self.conn_closed(i, pid, in_event_loop());
                crate::drain::closed();
                set_errno(e);
                return rc;
            }
        }
        if let Some(l) = self.claimed(fd) {
            let pid = self.pid() as c_int;
            if l.release(fd, pid) {
                let rc = close_fd();
                let e = errno();
                l.stopping();
                if !l.dispatch
                    && let Some(target) = &self.notify
                {
                    // Reuseport/shared (kernel steering too): no channel to say STOPPING on,
                    // so NOTIFY_SOCKET carries it, and the next listen sends READY=1 again.
                    target.send_stopping();
                    self.notified.store(false, Ordering::Release);
                }
                set_errno(e);
                return rc;
            }
        }
        close_fd()
    }
}

impl Listener {
    fn chan_fd(&self) -> c_int {
        use std::os::fd::AsRawFd;
        self.chan.as_raw_fd()
    }
}

/// The answer a listening TCP socket at `l.addr` would give, for the options that identify one.
fn synthesized_opt(l: &Listener, listening: bool, level: c_int, name: c_int) -> Option<c_int> {
    let family = match l.addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => Some(c_int::from(listening)),
        (libc::SOL_SOCKET, libc::SO_TYPE) => Some(libc::SOCK_STREAM),
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => Some(family),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => Some(libc::IPPROTO_TCP),
        (libc::SOL_SOCKET, libc::SO_ERROR) => Some(0),
        _ => None,
    }
}

/// Stores an int option like the kernel: at most `*len` bytes, `*len` set to what was written.
///
/// # Safety
/// `val`/`len` as for getsockopt(2).
unsafe fn write_int_opt(v: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int {
    if val.is_null() || len.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    // SAFETY: len valid (caller contract); val has room for *len bytes.
    unsafe {
        let n = (*len as usize).min(std::mem::size_of::<c_int>());
        std::ptr::copy_nonoverlapping((&raw const v).cast::<u8>(), val.cast::<u8>(), n);
        *len = n as socklen_t;
    }
    0
}
