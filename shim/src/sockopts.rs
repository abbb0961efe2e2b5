//! Socket options a server sets on its listening socket when that socket is a dispatch channel.
//!
//! A server configures its listener (`TCP_NODELAY`, `SO_KEEPALIVE`, `TCP_KEEPIDLE`, buffer
//! sizes, …) expecting every accepted connection to inherit the settings, as the kernel does for
//! a TCP listener. On a dispatch channel (an `AF_UNIX` socket) those calls would fail
//! (`EOPNOTSUPP`, `ENOPROTOOPT`) or, at `SOL_SOCKET`, change the channel itself. Instead the
//! shim:
//!
//! - **validates** the option on a throwaway TCP socket of the listener's family (so a value the
//!   kernel rejects gets the kernel's error), then **records** it for the listener;
//! - **applies** the recorded connection options to each connection `accept` hands out (one
//!   `setsockopt` per recorded option); listener-only options (`SO_REUSEADDR`, `SO_REUSEPORT`,
//!   `TCP_DEFER_ACCEPT`, `TCP_FASTOPEN`, `IPV6_V6ONLY`, `TCP_MAXSEG`) are recorded only: the
//!   master's listening socket decides them;
//! - **answers `getsockopt`** for these levels from a throwaway TCP socket with the recorded
//!   options applied, so a server reads back what a TCP listener would report (kernel defaults,
//!   `SO_RCVBUF` doubled, `TCP_INFO` of an idle socket).
//!
//! Storage is a fixed array of seqlock-protected slots: `setsockopt` (rare, at startup) writes,
//! `accept` (every connection) reads without a lock, and a `fork` in the middle of a write
//! leaves nothing held.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use libc::{c_int, c_void, socklen_t};

use crate::real;

/// Distinct options one listener can record.
const SLOTS: usize = 24;
/// Longest option value recorded (a `struct timeval`, a `struct linger`, a congestion
/// algorithm's name).
const MAX_LEN: usize = 16;

/// Where a socket option belongs when the listener is a dispatch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A TCP/IP option: recorded, answered from a probe socket, applied to connections.
    Conn,
    /// A TCP/IP option that only means something on a listening socket: recorded and
    /// answered, not applied to connections.
    ListenerOnly,
    /// Not a TCP option (`SO_RCVTIMEO`, `SO_PEERCRED`, …): the channel's own.
    Channel,
}

/// Which of the three a `(level, name)` is.
pub fn route(level: c_int, name: c_int) -> Route {
    match level {
        libc::SOL_SOCKET => match name {
            libc::SO_REUSEADDR | libc::SO_REUSEPORT => Route::ListenerOnly,
            libc::SO_KEEPALIVE
            | libc::SO_RCVBUF
            | libc::SO_SNDBUF
            | libc::SO_RCVBUFFORCE
            | libc::SO_SNDBUFFORCE
            | libc::SO_LINGER
            | libc::SO_PRIORITY
            | libc::SO_RCVLOWAT
            | libc::SO_OOBINLINE
            | libc::SO_MARK => Route::Conn,
            _ => Route::Channel,
        },
        libc::IPPROTO_TCP => match name {
            libc::TCP_DEFER_ACCEPT | libc::TCP_FASTOPEN | libc::TCP_MAXSEG => Route::ListenerOnly,
            _ => Route::Conn,
        },
        libc::IPPROTO_IPV6 if name == libc::IPV6_V6ONLY => Route::ListenerOnly,
        libc::IPPROTO_IP | libc::IPPROTO_IPV6 => Route::Conn,
        _ => Route::Channel,
    }
}

/// One recorded option. `seq` is odd while a writer is filling it (seqlock); `name_key` 0 =
/// empty.
struct Slot {
    seq: AtomicU32,
    level: AtomicI32,
    name: AtomicI32,
    len: AtomicU32,
    data: [AtomicU64; MAX_LEN / 8],
}

/// A consistent copy of a slot.
#[derive(Clone, Copy)]
struct Opt {
    level: c_int,
    name: c_int,
    len: usize,
    data: [u64; MAX_LEN / 8],
}

impl Opt {
    fn ptr(&self) -> *const c_void {
        self.data.as_ptr().cast()
    }
}

/// The options recorded for one listener.
pub struct SockOpts {
    slots: [Slot; SLOTS],
    /// Writers take this (a spin flag: `setsockopt` on a listener is rare and short).
    writer: AtomicU32,
    /// Number of recorded options that apply to connections: `accept` skips everything when 0.
    conn_opts: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    seq: AtomicU32::new(0),
    level: AtomicI32::new(0),
    name: AtomicI32::new(0),
    len: AtomicU32::new(0),
    data: [AtomicU64::new(0), AtomicU64::new(0)],
};

impl Default for SockOpts {
    fn default() -> Self {
        SockOpts {
            slots: [EMPTY; SLOTS],
            writer: AtomicU32::new(0),
            conn_opts: AtomicU32::new(0),
        }
    }
}

/// A TCP socket of `addr`'s family, closed on drop: where options are validated and answered.
struct Probe(c_int);

impl Probe {
    /// `level` picks IPv6 for an IPv6 option on an IPv4 listener (a server that bound `[::]`,
    /// which the shim matched to an IPv4 listener), so the option is not refused for the family.
    fn new(addr: &SocketAddr, level: c_int) -> Option<Probe> {
        let family = match addr {
            SocketAddr::V4(_) if level != libc::IPPROTO_IPV6 => libc::AF_INET,
            _ => libc::AF_INET6,
        };
        // SAFETY: plain socket creation; the fd is owned by the Probe.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        (fd >= 0).then_some(Probe(fd))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: the probe's own fd, never handed out.
        unsafe { real::close(self.0) };
    }
}

impl SockOpts {
    /// The recorded options, each a consistent copy (a slot being rewritten is read again).
    fn each(&self, mut f: impl FnMut(&Opt)) {
        for s in &self.slots {
            loop {
                let before = s.seq.load(Ordering::Acquire);
                if before == 0 {
                    break;
                }
                if before % 2 == 1 {
                    std::hint::spin_loop();
                    continue;
                }
                let opt = Opt {
                    level: s.level.load(Ordering::Relaxed),
                    name: s.name.load(Ordering::Relaxed),
                    len: s.len.load(Ordering::Relaxed) as usize,
                    data: [
                        s.data[0].load(Ordering::Relaxed),
                        s.data[1].load(Ordering::Relaxed),
                    ],
                };
                std::sync::atomic::fence(Ordering::Acquire);
                if s.seq.load(Ordering::Relaxed) == before {
                    f(&opt);
                    break;
                }
            }
        }
    }

    /// setsockopt(2) on the listener `addr`: validated on a probe socket, then recorded.
    /// Returns what setsockopt returns (errno set on failure).
    ///
    /// # Safety
    /// `val`/`len` as for setsockopt(2).
    pub unsafe fn set(
        &self,
        addr: &SocketAddr,
        level: c_int,
        name: c_int,
        val: *const c_void,
        len: socklen_t,
    ) -> c_int {
        let Some(probe) = Probe::new(addr, level) else {
            return -1;
        };
        // SAFETY: caller contract for val/len.
        let rc = unsafe { real::setsockopt(probe.0, level, name, val, len) };
        if rc != 0 {
            return rc;
        }
        if len as usize > MAX_LEN || val.is_null() {
            // Valid but too large to record (none of the options servers set on a listener
            // is): accepted, not applied.
            return 0;
        }
        let mut data = [0u64; MAX_LEN / 8];
        // SAFETY: val has len ≤ MAX_LEN readable bytes (caller contract); data has MAX_LEN.
        unsafe {
            std::ptr::copy_nonoverlapping(
                val.cast::<u8>(),
                data.as_mut_ptr().cast::<u8>(),
                len as usize,
            )
        };
        while self
            .writer
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        let existing = self.slots.iter().find(|s| {
            s.seq.load(Ordering::Relaxed) != 0
                && s.level.load(Ordering::Relaxed) == level
                && s.name.load(Ordering::Relaxed) == name
        });
        let fresh = existing.is_none();
        let slot = existing.or_else(|| {
            self.slots
                .iter()
                .find(|s| s.seq.load(Ordering::Relaxed) == 0)
        });
        if let Some(s) = slot {
            let seq = s.seq.load(Ordering::Relaxed);
            s.seq.store(seq | 1, Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Release);
            s.level.store(level, Ordering::Relaxed);
            s.name.store(name, Ordering::Relaxed);
            s.len.store(len, Ordering::Relaxed);
            s.data[0].store(data[0], Ordering::Relaxed);
            s.data[1].store(data[1], Ordering::Relaxed);
            s.seq.store((seq | 1) + 1, Ordering::Release);
            if fresh && route(level, name) == Route::Conn {
                self.conn_opts.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.writer.store(0, Ordering::Release);
        0
    }

    /// getsockopt(2) on the listener `addr`: what a TCP socket with the recorded options
    /// answers.
    ///
    /// # Safety
    /// `val`/`len` as for getsockopt(2).
    pub unsafe fn get(
        &self,
        addr: &SocketAddr,
        level: c_int,
        name: c_int,
        val: *mut c_void,
        len: *mut socklen_t,
    ) -> c_int {
        let Some(probe) = Probe::new(addr, level) else {
            return -1;
        };
        self.each(|o| {
            // SAFETY: o.data holds o.len valid bytes.
            unsafe { real::setsockopt(probe.0, o.level, o.name, o.ptr(), o.len as socklen_t) };
        });
        // SAFETY: caller contract.
        unsafe { real::getsockopt(probe.0, level, name, val, len) }
    }

    /// Applies the recorded connection options to a connection just handed out. Errors are
    /// ignored: the connection is served either way, as with an option the kernel would not
    /// have inherited.
    pub fn apply(&self, conn: c_int) {
        if self.conn_opts.load(Ordering::Acquire) == 0 {
            return;
        }
        self.each(|o| {
            if route(o.level, o.name) == Route::Conn {
                // SAFETY: o.data holds o.len valid bytes; conn is an open socket.
                unsafe { real::setsockopt(conn, o.level, o.name, o.ptr(), o.len as socklen_t) };
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_opt(fd: c_int, level: c_int, name: c_int) -> c_int {
        let mut v: c_int = -1;
        let mut len = 4 as socklen_t;
        // SAFETY: v/len valid.
        let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut v).cast(), &mut len) };
        assert_eq!(rc, 0);
        v
    }

    #[test]
    fn routes() {
        assert_eq!(route(libc::IPPROTO_TCP, libc::TCP_NODELAY), Route::Conn);
        assert_eq!(route(libc::SOL_SOCKET, libc::SO_KEEPALIVE), Route::Conn);
        assert_eq!(
            route(libc::SOL_SOCKET, libc::SO_REUSEADDR),
            Route::ListenerOnly
        );
        assert_eq!(
            route(libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
            Route::ListenerOnly
        );
        assert_eq!(
            route(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            Route::ListenerOnly
        );
        assert_eq!(route(libc::SOL_SOCKET, libc::SO_RCVTIMEO), Route::Channel);
        assert_eq!(route(libc::SOL_SOCKET, libc::SO_TYPE), Route::Channel);
    }

    #[test]
    fn records_answers_and_applies() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let opts = SockOpts::default();
        let one: c_int = 1;
        let idle: c_int = 42;
        // SAFETY: pointers to live ints of the given size.
        unsafe {
            let p = (&raw const one).cast();
            assert_eq!(
                opts.set(&addr, libc::IPPROTO_TCP, libc::TCP_NODELAY, p, 4),
                0
            );
            assert_eq!(
                opts.set(&addr, libc::SOL_SOCKET, libc::SO_KEEPALIVE, p, 4),
                0
            );
            assert_eq!(
                opts.set(&addr, libc::SOL_SOCKET, libc::SO_REUSEADDR, p, 4),
                0
            );
            let p = (&raw const idle).cast();
            assert_eq!(
                opts.set(&addr, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, p, 4),
                0
            );
            // Rewriting keeps one slot.
            assert_eq!(
                opts.set(&addr, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, p, 4),
                0
            );
            // The kernel's own validation: a negative keepalive time is EINVAL.
            let bad: c_int = -5;
            let p = (&raw const bad).cast();
            assert_eq!(
                opts.set(&addr, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, p, 4),
                -1
            );
        }
        assert_eq!(opts.conn_opts.load(Ordering::Relaxed), 3);
        let mut v: c_int = 0;
        let mut len = 4 as socklen_t;
        // SAFETY: v/len valid.
        let rc = unsafe {
            opts.get(
                &addr,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, v), (0, 42));
        // SAFETY: v/len valid.
        unsafe {
            opts.get(
                &addr,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPCNT,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        assert!(v > 0, "a kernel default, not an error");
        // SAFETY: a fresh socket owned by this test.
        let conn = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        opts.apply(conn);
        assert_eq!(int_opt(conn, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
        assert_eq!(int_opt(conn, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(int_opt(conn, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 42);
        assert_eq!(
            int_opt(conn, libc::SOL_SOCKET, libc::SO_REUSEADDR),
            0,
            "listener-only options are not applied"
        );
        // SAFETY: the test's own fd.
        unsafe { libc::close(conn) };
    }
}
