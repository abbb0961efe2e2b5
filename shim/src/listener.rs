//! One rcluster listener as the shim sees it: the private copy of fd 3+i, which server fd stands
//! for it after `bind`, and the notifications (READY, CLOSED, STOPPING) owed to the master on its
//! dispatch channel. Shared by all threads of the process; every field is an atomic, no locks.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use libc::c_int;

use rcluster_proto::ToMaster;

use crate::sockopts::SockOpts;

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
    /// Closed connections not yet reported (a send that found the channel full).
    closed_pending: AtomicU64,
    /// The master closed its end: no connection will ever arrive again.
    orphaned: AtomicBool,
    /// Dispatch: the TCP options the server set on its listener (sockopts.rs).
    pub opts: SockOpts,
}

/// (st_dev, st_ino) of what `fd` refers to.
pub fn ident_of(fd: c_int) -> Option<(u64, u64)> {
    // SAFETY: stat is plain data; zeroed is valid storage for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is valid storage; an invalid fd is reported as EBADF.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
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
        if self.closed_pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let n = self.closed_pending.swap(0, Ordering::AcqRel);
        if n != 0
            && self
                .send(ToMaster::Closed { count: n })
                .is_err_and(transient)
        {
            // Keep the count for the next flush (next close or accept): never lost, and the
            // swap above means never sent twice. A hard error means the master is gone.
            self.closed_pending.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// `n` connections handed out from this listener are closed: tell the master.
    pub fn conn_closed(&self, n: u64) {
        if self.dispatch {
            self.closed_pending.fetch_add(n, Ordering::AcqRel);
            self.flush();
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
