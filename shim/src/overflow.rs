//! The overflow queue under kernel steering (`RCLUSTER_STEER_OVERFLOW_FD`, the layout in
//! `rcluster_proto::steer`): one more listener per address in the reuseport group, held by the
//! master and inherited by every worker. The steering program puts a connection there when no
//! worker is free for it (every eligible slot stuck, or, under least-conn and p2c, the pick's
//! loop serving something for over 50 µs) and some worker watches the queue; the first worker
//! to come free takes it, instead of the connection waiting behind one request of unknown
//! length.
//!
//! The server never learns of the queue. When it registers its listener in an epoll set
//! (`epoll_ctl` ADD/MOD), the shim registers the queue in the same set with the same `data`,
//! level-triggered and never `EPOLLEXCLUSIVE` (an exclusive wake-up can leave the queue's
//! readiness with a loop that is busy while another sleeps): a connection waiting there wakes
//! the server as if its own listener were readable. When the server's `accept` on its listener
//! finds nothing (`EAGAIN`) and the table's line for the queue says a connection waits there
//! (`SteerSlot::overflow_waiting`: no system call), the shim takes one from the queue instead —
//! one per wait of the calling thread, so a loop that comes free takes one connection and goes
//! back to its events rather than draining the queue in front of its peers. The registration is
//! removed with the server's (`EPOLL_CTL_DEL`, closing its listener or the epoll fd).
//!
//! While this process has a registration, its slot's `reporting` word carries one
//! `WATCHER`: the program spills only while an eligible slot has one. Registrations belong to
//! the process that made them: a forked child (which shares the parent's epoll sets) neither
//! adds nor removes any. An exec of the worker itself withdraws the count (the new image
//! registers again); a failed exec restores it.
//!
//! Only while the shim counts for the slot (`REPORTING_SHIM`): a server that counts itself (the
//! Rust worker API) accepts without this.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

use libc::c_int;

use crate::listener::{Listener, ident_of};
use crate::real;
use crate::state::{errno, set_errno};
use crate::steer::SteerSlot;

/// Epoll registrations mirrored at once (a server registers a listener in one set per loop).
const MIRRORS: usize = 64;
/// Fd numbers a mirror entry can hold (24 bits each for the epoll fd and the listener fd).
const FD_LIMIT: c_int = (1 << 24) - 1;

thread_local! {
    /// The calling thread took a connection from the queue since it last waited.
    static TAKEN: Cell<bool> = const { Cell::new(false) };
}

/// The overflow queue's listeners and this process's registrations of them.
pub struct Overflow {
    /// Per listener index: the inherited fd of its queue, -1 when unusable.
    fds: Vec<c_int>,
    /// Per listener index: the identity of the socket behind the fd, so exec hands on only a
    /// number that is still ours.
    idents: Vec<Option<(u64, u64)>>,
    /// Mirrored registrations: `(epfd + 1) << 40 | (server fd + 1) << 16 | listener index`;
    /// 0 = free.
    mirrors: [AtomicU64; MIRRORS],
    /// Entries in use (`close` skips the scan while 0).
    count: AtomicUsize,
    /// The process the registrations belong to (0 until the first).
    owner: AtomicI32,
}

fn pack(epfd: c_int, fd: c_int, index: usize) -> u64 {
    ((epfd as u64 + 1) << 40) | ((fd as u64 + 1) << 16) | index as u64
}

fn unpack(v: u64) -> (c_int, c_int, usize) {
    (
        ((v >> 40) as c_int) - 1,
        (((v >> 16) & 0xff_ffff) as c_int) - 1,
        (v & 0xffff) as usize,
    )
}

fn getpid() -> c_int {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Whether `fd` is a listening TCP socket on `port`.
fn is_listener_on(fd: c_int, port: u16) -> bool {
    let mut on: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the given length.
    let ok = unsafe {
        real::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut on).cast(),
            &mut len,
        )
    } == 0;
    if !ok || on != 1 {
        return false;
    }
    // SAFETY: sockaddr_storage is plain data; getsockname fills at most `len` bytes.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    if unsafe { real::getsockname(fd, (&raw mut ss).cast(), &mut len) } != 0 {
        return false;
    }
    // SAFETY: the kernel wrote a socket address of `len` bytes.
    unsafe { crate::sockaddr::read((&raw const ss).cast(), len) }.is_some_and(|a| a.port() == port)
}

impl Overflow {
    /// Adopts the queue's fds: listener `i`'s at `first + i`, each checked to be a listening
    /// socket on that listener's port and made close-on-exec. `None` when none is usable.
    pub fn adopt(first: c_int, listeners: &[Listener]) -> Option<Overflow> {
        let mut fds = Vec::with_capacity(listeners.len());
        let mut idents = Vec::with_capacity(listeners.len());
        for l in listeners {
            let fd = first.checked_add(l.index as c_int).unwrap_or(-1);
            let ok = (0..FD_LIMIT).contains(&fd) && is_listener_on(fd, l.addr.port());
            if ok {
                // SAFETY: fcntl on an fd just shown to be an open socket.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            fds.push(if ok { fd } else { -1 });
            idents.push(if ok { ident_of(fd) } else { None });
        }
        fds.iter().any(|&fd| fd >= 0).then(|| Overflow {
            fds,
            idents,
            mirrors: [const { AtomicU64::new(0) }; MIRRORS],
            count: AtomicUsize::new(0),
            owner: AtomicI32::new(0),
        })
    }

    fn fd(&self, index: usize) -> Option<c_int> {
        self.fds.get(index).copied().filter(|&fd| fd >= 0)
    }

    /// Whether the calling process owns the registrations (claiming them if nobody does).
    fn owned(&self) -> bool {
        let me = getpid();
        match self
            .owner
            .compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(owner) => owner == me,
        }
    }

    fn remember(&self, steer: &SteerSlot, v: u64) {
        if self.mirrors.iter().any(|m| m.load(Ordering::SeqCst) == v) {
            return;
        }
        for m in &self.mirrors {
            if m.compare_exchange(0, v, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                if self.count.fetch_add(1, Ordering::SeqCst) == 0 {
                    steer.watch(true);
                }
                return;
            }
        }
    }

    fn drop_entry(&self, steer: &SteerSlot, m: &AtomicU64, v: u64) {
        if m.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && self.count.fetch_sub(1, Ordering::SeqCst) == 1
        {
            steer.watch(false);
        }
    }

    /// The server's `epoll_ctl(epfd, op, fd, event)` succeeded on listener `index`'s fd:
    /// the same on the queue (module docs). errno is left as it was.
    ///
    /// # Safety
    /// `event` as for epoll_ctl(2) (read only for ADD and MOD, where it is non-null).
    pub unsafe fn mirror(
        &self,
        steer: &SteerSlot,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        index: usize,
        event: *const libc::epoll_event,
    ) {
        let Some(queue) = self.fd(index) else { return };
        if !(0..FD_LIMIT).contains(&epfd) || !(0..FD_LIMIT).contains(&fd) || !self.owned() {
            return;
        }
        let saved = errno();
        let v = pack(epfd, fd, index);
        match op {
            libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD if !event.is_null() => {
                // SAFETY: caller contract: a valid event for ADD/MOD.
                let theirs = unsafe { *event };
                let mut ours = libc::epoll_event {
                    events: theirs.events & (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
                    u64: theirs.u64,
                };
                // SAFETY: a valid event; the queue's fd is ours.
                let mut rc = unsafe { real::epoll_ctl(epfd, op, queue, &mut ours) };
                if rc < 0 {
                    let retry = match errno() {
                        libc::EEXIST => libc::EPOLL_CTL_MOD,
                        libc::ENOENT => libc::EPOLL_CTL_ADD,
                        _ => op,
                    };
                    if retry != op {
                        // SAFETY: as above.
                        rc = unsafe { real::epoll_ctl(epfd, retry, queue, &mut ours) };
                    }
                }
                if rc == 0 {
                    self.remember(steer, v);
                }
            }
            libc::EPOLL_CTL_DEL => {
                let mut dummy = libc::epoll_event { events: 0, u64: 0 };
                // SAFETY: DEL ignores the event pointer (non-null for old kernels).
                unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, queue, &mut dummy) };
                for m in &self.mirrors {
                    if m.load(Ordering::SeqCst) == v {
                        self.drop_entry(steer, m, v);
                    }
                }
            }
            _ => {}
        }
        set_errno(saved);
    }

    /// The server is closing `fd` (or replacing it with dup2/dup3): a listener's mirrors are
    /// removed from their epoll sets, an epoll fd's are forgotten (closing the set removes
    /// them). errno is left as it was.
    pub fn closing(&self, steer: &SteerSlot, fd: c_int) {
        if self.count.load(Ordering::SeqCst) == 0 || !(0..FD_LIMIT).contains(&fd) || !self.owned() {
            return;
        }
        let saved = errno();
        for m in &self.mirrors {
            let v = m.load(Ordering::SeqCst);
            if v == 0 {
                continue;
            }
            let (epfd, server_fd, index) = unpack(v);
            if server_fd == fd
                && let Some(queue) = self.fd(index)
            {
                let mut dummy = libc::epoll_event { events: 0, u64: 0 };
                // SAFETY: the epoll fd is still open (its close would have dropped the entry).
                unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, queue, &mut dummy) };
                self.drop_entry(steer, m, v);
            } else if epfd == fd {
                self.drop_entry(steer, m, v);
            }
        }
        set_errno(saved);
    }

    /// The server's `accept` on listener `index` found nothing: one connection from the queue,
    /// if this thread has not taken one since it last waited. `None`: nothing taken (errno
    /// is the caller's to set).
    ///
    /// # Safety
    /// `addr`/`len`/`flags` as for accept4(2).
    pub unsafe fn accept(
        &self,
        index: usize,
        addr: *mut libc::sockaddr,
        len: *mut libc::socklen_t,
        flags: c_int,
    ) -> Option<c_int> {
        let queue = self.fd(index)?;
        if TAKEN.with(Cell::get) {
            return None;
        }
        // SAFETY: caller contract; the queue is non-blocking (the master made it so).
        let rc = unsafe { real::accept4(queue, addr, len, flags) };
        if rc < 0 {
            return None;
        }
        TAKEN.with(|t| t.set(true));
        Some(rc)
    }

    /// The calling thread is about to wait: it may take from the queue again.
    pub fn waiting(&self) {
        TAKEN.with(|t| t.set(false));
    }

    /// The worker execs itself (`on = true`: the fds stay open for the next image, which
    /// registers again, so this image's watch is withdrawn) or that exec failed (`false`:
    /// undone).
    pub fn exec(&self, steer: &SteerSlot, on: bool) {
        for (&fd, &ident) in self.fds.iter().zip(&self.idents) {
            if fd >= 0 && ident.is_some() && ident_of(fd) == ident {
                let flags = if on { 0 } else { libc::FD_CLOEXEC };
                // SAFETY: fcntl on an fd verified to be the queue we adopted.
                unsafe { libc::fcntl(fd, libc::F_SETFD, flags) };
            }
        }
        if self.count.load(Ordering::SeqCst) > 0 && self.owner.load(Ordering::SeqCst) == getpid() {
            steer.watch(!on);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_pack_and_unpack() {
        for (epfd, fd, index) in [(0, 0, 0), (5, 7, 1), (FD_LIMIT - 1, FD_LIMIT - 1, 0xffff)] {
            let v = pack(epfd, fd, index);
            assert_ne!(v, 0);
            assert_eq!(unpack(v), (epfd, fd, index));
        }
    }

    #[test]
    fn watcher_is_outside_who_counts() {
        use rcluster_proto::steer::{REPORTING_WHO, WATCHER, WATCHERS};
        assert_eq!(WATCHER & REPORTING_WHO, 0);
        assert_eq!(WATCHER & WATCHERS, WATCHER);
    }
}
