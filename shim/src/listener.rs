//! One rcluster listener as the shim sees it: the private copy of fd 3+i, which server fd stands
//! for it after `bind`, and the notifications (READY, CLOSED, STOPPING) owed to the master on its
//! dispatch channel. Shared by all threads of the process; every field is an atomic, no locks.
//!
//! CLOSED is coalesced: a close on an event-loop thread (one that waits in `epoll_wait`, `poll`
//! or `select`, see interpose.rs) only counts, and the count goes out in one message when that
//! thread next waits, or accepts, or the listener closes: at most one CLOSED per loop iteration,
//! sent before the process can block, so never delayed while it idles. Closes on other threads
//! (a blocking accept loop with a thread per connection) are sent at once. The count is tagged
//! with the pid that owes it: a forked child inherits a copy of the parent's unsent count, and
//! must neither send it (the parent will: double-counted) nor add its own to it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use libc::c_int;

use rcluster_proto::ToMaster;

use crate::sockopts::SockOpts;

/// How long [`Listener::room`] trusts the `RLIMIT_NOFILE` it read while far from it: 10 ms.
/// Near it (the last fd within 32) the limit is read on every receive. So only a limit lowered
/// (by the server's `setrlimit`, or another process's `prlimit`) to within 32 of the fds in use,
/// with a connection received less than 10 ms later, could miss the check and lose that one
/// connection (its fd is closed on receipt; the master is told it closed).
pub const LIMIT_REREAD_NS: u64 = 10_000_000;

/// The soft `RLIMIT_NOFILE` (`u64::MAX` if it cannot be read).
fn read_nofile_limit() -> u64 {
    // SAFETY: rlimit is plain data; getrlimit fills it or fails.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: lim is valid storage.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        u64::MAX
    }
}

/// Listener i of the worker contract.
pub struct Listener {
    /// Position among the adopted listeners (what the connection table stores).
    pub index: usize,
    /// The inherited fd number, 3+i (close-on-exec while the shim runs; see follow.rs).
    pub inherited_fd: c_int,
    /// What `getsockname` reports and `bind` is matched against.
    pub addr: SocketAddr,
    /// A private close-on-exec duplicate of fd 3+i, at a number the server never learns: the
    /// source `bind` duplicates onto the server's socket, and where notifications are sent, so
    /// a server that closes fd 3+i (or reuses the number) cannot misdirect them.
    pub chan: OwnedFd,
    /// `true`: a dispatch channel (SOCK_SEQPACKET); `false`: a real listening TCP socket.
    pub dispatch: bool,
    /// (st_dev, st_ino) of the socket, to recognise other fds for the same file (fd 3+i itself,
    /// or a `dup` the server made of its listener).
    ident: (u64, u64),
    /// The server's fd number that became this listener in `bind`, -1 if none. The number is
    /// owned by the server; the shim only compares against it.
    claimed: AtomicI32,
    /// pid of the process that claimed it: a forked child closing its inherited copy does not
    /// release the parent's claim or tell the master the worker is stopping.
    claimer: AtomicI32,
    listening: AtomicBool,
    ready_sent: AtomicBool,
    /// Closed connections not yet reported: `pid << 32 | count` (see the module docs).
    closed_pending: AtomicU64,
    /// The master closed its end: no connection will ever arrive again.
    orphaned: AtomicBool,
    /// FULL was sent (out of fds) and no READY since.
    full: AtomicBool,
    /// Number of the last connection fd received: fds are allocated lowest-first, so it says
    /// how close to `RLIMIT_NOFILE` the process is.
    last_fd: AtomicI32,
    /// Who reads the channel near the fd limit (`pid << 32 | tid`, 0 = nobody): one thread of
    /// the process at a time, see [`Listener::tight_reader`].
    tight: AtomicU64,
    /// `RLIMIT_NOFILE`'s soft limit as last read, and when (`monotonic_ns`; 0 = never): read
    /// again at most every [`LIMIT_REREAD_NS`] (see [`Listener::room`]).
    limit: AtomicU64,
    limit_read_ns: AtomicU64,
    /// Dispatch: the TCP options the server set on its listener (sockopts.rs).
    pub opts: SockOpts,
}

/// Holds [`Listener::tight_reader`]; released on drop.
pub struct TightReader<'a> {
    word: &'a AtomicU64,
    me: u64,
}

impl Drop for TightReader<'_> {
    fn drop(&mut self) {
        let _ = self
            .word
            .compare_exchange(self.me, 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// (st_dev, st_ino) of what `fd` refers to.
pub fn ident_of(fd: c_int) -> Option<(u64, u64)> {
    // SAFETY: stat is plain data; zeroed is valid storage for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is valid storage; an invalid fd is reported as EBADF.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// How much room for one more fd [`Listener::room`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Far from `RLIMIT_NOFILE`.
    Plenty,
    /// Near it, and one more fd fitted a moment ago.
    Tight,
    /// None: the master was told FULL.
    Full,
}

impl Listener {
    /// Wraps `chan`, the private duplicate of `inherited_fd`.
    pub fn new(
        index: usize,
        inherited_fd: c_int,
        addr: SocketAddr,
        chan: OwnedFd,
        dispatch: bool,
    ) -> Option<Self> {
        let ident = ident_of(chan.as_raw_fd())?;
        Some(Listener {
            index,
            inherited_fd,
            addr,
            chan,
            dispatch,
            ident,
            claimed: AtomicI32::new(-1),
            claimer: AtomicI32::new(0),
            listening: AtomicBool::new(false),
            ready_sent: AtomicBool::new(false),
            closed_pending: AtomicU64::new(0),
            orphaned: AtomicBool::new(false),
            full: AtomicBool::new(false),
            last_fd: AtomicI32::new(0),
            tight: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            limit_read_ns: AtomicU64::new(0),
            opts: SockOpts::default(),
        })
    }

    /// Whether `fd` is the server's claimed fd for this listener (one atomic load).
    pub fn is_claimed_as(&self, fd: c_int) -> bool {
        fd >= 0 && self.claimed.load(Ordering::Acquire) == fd
    }

    /// Whether no server fd stands for it yet.
    pub fn is_unclaimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire) < 0
    }

    /// Whether `fd` refers to the same socket (an `fstat`; only on rare paths).
    pub fn is_same_file(&self, fd: c_int) -> bool {
        ident_of(fd) == Some(self.ident)
    }

    /// Reserves the listener for the server's `fd`; `false` if already claimed (EADDRINUSE).
    pub fn try_claim(&self, fd: c_int, pid: c_int) -> bool {
        let ok = self
            .claimed
            .compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ok {
            self.claimer.store(pid, Ordering::Release);
        }
        ok
    }

    /// Gives up the claim of `fd` if process `pid` made it; `true` if it did.
    pub fn release(&self, fd: c_int, pid: c_int) -> bool {
        if self.claimer.load(Ordering::Acquire) != pid {
            return false;
        }
        self.claimed
            .compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The server called `listen` (or accepted without it, as socket-activated servers do).
    pub fn mark_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// Whether the server is listening on it.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// Sends one message without blocking whatever the file's O_NONBLOCK state (the server owns
    /// that flag), and without SIGPIPE if the master is gone. Returns the errno on failure.
    fn send(&self, msg: ToMaster) -> Result<(), c_int> {
        let msg = msg.encode();
        // SAFETY: msg is a valid buffer of its length; chan is open for the process's life.
        let n = unsafe {
            libc::send(
                self.chan.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            Ok(())
        }
    }

    /// Sends what is owed: READY once the server listens, then any closes not yet reported.
    /// Cheap when nothing is owed (two atomic loads).
    pub fn flush(&self) {
        if !self.dispatch {
            return;
        }
        if self.is_listening()
            && !self.ready_sent.load(Ordering::Acquire)
            && !self.ready_sent.swap(true, Ordering::AcqRel)
            && self
                .send(ToMaster::Ready { max_fds: 0 })
                .is_err_and(transient)
        {
            self.ready_sent.store(false, Ordering::Release);
        }
        self.flush_closed();
    }

    /// Sends the closes counted so far, in one CLOSED. Cheap when there are none (one atomic
    /// load); otherwise a `getpid` and a `send`.
    pub fn flush_closed(&self) {
        if self.closed_pending.load(Ordering::Acquire) == 0 {
            return;
        }
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u32;
        self.flush_closed_as(pid);
    }

    /// [`Listener::flush_closed`] for process `pid`.
    pub fn flush_closed_as(&self, pid: u32) {
        let mut cur = self.closed_pending.load(Ordering::Acquire);
        loop {
            if cur == 0 {
                return;
            }
            // Take the whole count if it is ours; drop an inherited one (the parent sends it).
            match self.closed_pending.compare_exchange_weak(
                cur,
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let (owner, n) = ((cur >> 32) as u32, cur & u64::from(u32::MAX));
        if owner != pid || n == 0 {
            return;
        }
        if self
            .send(ToMaster::Closed { count: n })
            .is_err_and(transient)
        {
            // Keep the count for the next flush: never lost, and the exchange above means
            // never sent twice. A hard error means the master is gone.
            self.add_closed(pid, n);
        }
    }

    /// Adds `n` to the count process `pid` owes, replacing a count inherited from another.
    fn add_closed(&self, pid: u32, n: u64) {
        let mut cur = self.closed_pending.load(Ordering::Acquire);
        loop {
            let count = if (cur >> 32) as u32 == pid {
                cur & u64::from(u32::MAX)
            } else {
                0
            };
            let next = (u64::from(pid) << 32) | (count + n).min(u64::from(u32::MAX));
            match self.closed_pending.compare_exchange_weak(
                cur,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// `n` connections handed out from this listener were closed by process `pid`: tell the
    /// master now, or, with `defer`, with the next flush (the caller's event loop flushes
    /// before it waits again); and, if it was told FULL, READY again once there is room.
    pub fn conn_closed(&self, n: u64, pid: u32, defer: bool) {
        if self.dispatch {
            self.add_closed(pid, n);
            if !defer {
                self.flush_closed_as(pid);
            }
            if self.full.load(Ordering::Acquire) {
                self.room();
            }
        }
    }

    /// Closes counted and not yet sent by process `pid`.
    #[cfg(test)]
    pub fn closed_pending(&self, pid: u32) -> u64 {
        let cur = self.closed_pending.load(Ordering::Acquire);
        if (cur >> 32) as u32 == pid {
            cur & u64::from(u32::MAX)
        } else {
            0
        }
    }

    /// Records the number of a connection fd just received.
    pub fn received(&self, fd: c_int) {
        self.last_fd.store(fd, Ordering::Relaxed);
    }

    /// Near the fd limit, a read of the channel is a peek and then a consuming read
    /// (dispatch.rs); two threads doing that at once can both peek the same message, and the
    /// one whose consuming read then gets the next message may find no fd free for it. This
    /// makes them take turns. The holder never blocks (both reads are `MSG_DONTWAIT`), so a
    /// waiter yields the CPU until it is free. A word left by a thread of the parent before a
    /// `fork` (another pid) counts as free.
    pub fn tight_reader(&self) -> TightReader<'_> {
        // SAFETY: getpid and gettid cannot fail.
        let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
        let me = (u64::from(pid as u32) << 32) | u64::from(tid as u32);
        loop {
            let cur = self.tight.load(Ordering::Relaxed);
            if (cur == 0 || (cur >> 32) as u32 != pid as u32)
                && self
                    .tight
                    .compare_exchange(cur, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return TightReader {
                    word: &self.tight,
                    me,
                };
            }
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// Before reading a CONN: whether its fd fits. A fd that does not fit is closed by the
    /// kernel on receipt (`MSG_CTRUNC`) and its client is lost, so near `RLIMIT_NOFILE` (the
    /// last fd received within 32 of it) this probes with one `F_DUPFD_CLOEXEC` and answers
    /// [`Room::Tight`] (the caller then reads so that nothing is lost if the last free fd goes
    /// to another thread first: dispatch.rs); out of room it tells the master FULL once (it
    /// stops dispatching here and takes back what is queued); with room again, READY resumes.
    /// Far from the limit no system call: the limit is read with `getrlimit` at most every
    /// [`LIMIT_REREAD_NS`] (the clock is the vDSO's), and always once the last fd is near it.
    pub fn room(&self) -> Room {
        let last = u64::try_from(self.last_fd.load(Ordering::Relaxed)).unwrap_or(0);
        let now = rcluster_sys::monotonic_ns();
        let read_at = self.limit_read_ns.load(Ordering::Relaxed);
        let mut limit = self.limit.load(Ordering::Relaxed);
        if read_at == 0
            || now.saturating_sub(read_at) >= LIMIT_REREAD_NS
            || last.saturating_add(32) >= limit
        {
            limit = read_nofile_limit();
            self.limit.store(limit, Ordering::Relaxed);
            self.limit_read_ns.store(now.max(1), Ordering::Relaxed);
        }
        let room = if last.saturating_add(32) < limit {
            Room::Plenty
        } else {
            // SAFETY: fcntl on our own channel fd returns a new fd we close at once, or -1.
            let probe = unsafe { libc::fcntl(self.chan.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if probe >= 0 {
                // SAFETY: probe was just created and is ours.
                unsafe { crate::real::close(probe) };
                Room::Tight
            } else {
                Room::Full
            }
        };
        if room == Room::Full {
            self.full();
        } else if self.full.load(Ordering::Acquire)
            && self.send(ToMaster::Ready { max_fds: 0 }).is_ok()
        {
            self.full.store(false, Ordering::Release);
        }
        room
    }

    /// No fd fits: FULL to the master, once until READY.
    pub fn full(&self) {
        if !self.full.load(Ordering::Acquire) && self.send(ToMaster::Full { lost: 0 }).is_ok() {
            self.full.store(true, Ordering::Release);
        }
    }

    /// The server closed its listener: it takes no more connections (it is draining or
    /// shutting down). Sends STOPPING so the master dispatches elsewhere; a later `bind` and
    /// `listen` make it READY again.
    pub fn stopping(&self) {
        self.listening.store(false, Ordering::Release);
        if self.dispatch {
            self.flush();
            // Best effort: if this fails the master is gone or will see the exit anyway.
            let _ = self.send(ToMaster::Stopping);
            self.ready_sent.store(false, Ordering::Release);
        }
    }

    /// Records that the master closed its end; `true` the first time.
    pub fn mark_orphaned(&self) -> bool {
        !self.orphaned.swap(true, Ordering::AcqRel)
    }

    /// Whether the master closed its end.
    pub fn is_orphaned(&self) -> bool {
        self.orphaned.load(Ordering::Acquire)
    }
}

/// Errors after which a later send may succeed: the channel is full (the master is slow to
/// read), or the kernel was short of memory.
fn transient(errno: c_int) -> bool {
    matches!(
        errno,
        libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM | libc::EINTR
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A dispatch listener on one end of a socketpair; the other end plays the master.
    pub(crate) fn pair() -> (Listener, OwnedFd) {
        let mut fds = [0 as c_int; 2];
        // SAFETY: fds is valid storage for two fds.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (worker, master) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let l = Listener::new(0, -1, "127.0.0.1:80".parse().unwrap(), worker, true).unwrap();
        (l, master)
    }

    /// Every message waiting at the master's end.
    fn received(master: &OwnedFd) -> Vec<ToMaster> {
        let mut out = Vec::new();
        loop {
            let mut buf = [0u8; 32];
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    master.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return out;
            }
            out.push(ToMaster::decode(&buf[..n as usize]).unwrap());
        }
    }

    #[test]
    fn deferred_closes_go_out_as_one_message_once() {
        let (l, master) = pair();
        for _ in 0..5 {
            l.conn_closed(1, 100, true);
        }
        assert!(received(&master).is_empty(), "only counted");
        assert_eq!(l.closed_pending(100), 5);
        l.flush_closed_as(100);
        assert_eq!(received(&master), [ToMaster::Closed { count: 5 }]);
        l.flush_closed_as(100);
        assert!(received(&master).is_empty(), "never sent twice");
        // Not deferred: sent at once, one message per close.
        l.conn_closed(1, 100, false);
        l.conn_closed(2, 100, false);
        assert_eq!(
            received(&master),
            [ToMaster::Closed { count: 1 }, ToMaster::Closed { count: 2 }]
        );
    }

    #[test]
    fn an_inherited_count_is_never_sent_by_the_child() {
        let (l, master) = pair();
        l.conn_closed(3, 100, true);
        // A forked child (pid 200) sees the parent's unsent count: it does not send it...
        l.flush_closed_as(200);
        assert!(received(&master).is_empty());
        // ...and its own closes replace it rather than add to it.
        l.conn_closed(3, 100, true);
        l.conn_closed(1, 200, true);
        assert_eq!(l.closed_pending(200), 1);
        l.flush_closed_as(200);
        assert_eq!(received(&master), [ToMaster::Closed { count: 1 }]);
    }

    #[test]
    fn a_full_channel_keeps_the_count_until_it_drains() {
        let (l, master) = pair();
        // Fill the channel until a send would block.
        let filler = ToMaster::Heartbeat.encode();
        let mut queued = 0;
        // SAFETY: filler is valid for its length.
        while unsafe {
            libc::send(
                l.chan.as_raw_fd(),
                filler.as_ptr().cast(),
                filler.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {
            queued += 1;
        }
        assert!(queued > 0);
        l.conn_closed(4, 100, false);
        assert_eq!(l.closed_pending(100), 4, "kept when the send failed");
        let got = received(&master);
        assert_eq!(got.len(), queued);
        l.conn_closed(1, 100, true);
        l.flush_closed_as(100);
        assert_eq!(
            received(&master),
            [ToMaster::Closed { count: 5 }],
            "sent once, nothing lost"
        );
    }
}
