//! The overflow queue under kernel steering (`RCLUSTER_STEER_OVERFLOW_FD`, the layout in
//! `rcluster_proto::steer`): one more listener per address in the reuseport group, held by the
//! master and inherited by every worker. The steering program puts a connection there when no
//! worker is free for it (every eligible slot stuck, or, under least-conn and p2c, the pick's
//! loop serving something for over 50 µs or the pick's worker not yet having taken a connection
//! placed on its own listener) and some worker watches the queue; the first worker to come free
//! takes it, instead of the connection waiting behind one request of unknown length.
//!
//! The server never learns of the queue. When it registers its listener in an epoll set
//! (`epoll_ctl` ADD/MOD), the shim registers the queue in the same set, level-triggered and
//! never `EPOLLEXCLUSIVE` (an exclusive wake-up can leave the queue's readiness with a loop that
//! is busy while another sleeps), under a `data` of its own: a wait that reports the queue
//! reports the server's listener instead, once however many of the two are ready (as epoll
//! reports one fd once), so a connection waiting there wakes the server as if its own listener
//! were readable, and a server that calls `accept` once per report takes one connection per
//! wait. When the server calls `accept` on its
//! listener and the table says a connection waits in the queue (`SteerSlot::overflow_waiting`)
//! and none on this slot's listener (`SteerSlot::own_waiting`: loads, no system call), the shim
//! takes one from the queue; when only the queue's line says so, it does after `accept` on the
//! listener finds nothing (`EAGAIN`). Either way one per wait of the calling thread, so a loop
//! that comes free takes one connection and goes back to its events rather than draining the
//! queue in front of its peers. Nor does a loop take one when its last `epoll_wait` reported
//! other events after the listener's: a server handles a batch in order, so it would serve
//! those first and the connection would wait behind them, however long they take, while a
//! peer may come free sooner. The connection stays in the queue for whoever waits next (this
//! loop included, its level-triggered registration reports the queue again at once), and its
//! `accept` fails with `EAGAIN` without a system call when the table says nothing waits on its
//! own listener. Only while a peer may come free sooner (`SteerSlot::peer_may_come_free`:
//! another worker that watches the queue waits, or has served what it is on for under
//! `STUCK_NS`): when every other one is inside a long request, leaving the connection only
//! costs this loop a pass of its own later (a wait and an `accept` with nothing else to do),
//! and the loop takes it now, as a worker takes from the kernel's shared queue. Never two
//! waits in a row, so a loop that always has more work still takes its turn; only for
//! non-blocking listeners, whose `accept` may fail. Taking nothing (another worker was first)
//! leaves the call to the listener. Trying the queue first saves the failed
//! `accept` a taken connection would otherwise cost (node calls `accept` once per readiness
//! report). The registration is removed with the server's (`EPOLL_CTL_DEL`, closing its
//! listener or the epoll fd); one that cannot be recorded (every entry of the table of
//! registrations taken) is taken back at once, and one reported that this process has no
//! record of (a set inherited across exec) is removed at that report, so the queue never wakes
//! a loop it cannot report to.
//!
//! A server that waits in `poll` or `select` (gunicorn's sync worker, C servers) has no
//! registration to mirror: when one of its waits asks for a non-blocking listener's input, the
//! shim waits on the queue too — an entry appended to a copy of the `pollfd` array (at most
//! [`POLL_MAX`] entries, on the stack), or the queue's bit added to the read set — and reports
//! the queue's readiness as the listener's, with the return count the server would get for its
//! own fds. A blocking listener is left alone: the server's `accept` would block on its own
//! empty queue while the connection waits in the overflow queue, and a loop blocked there
//! looks stuck to the program, which then places nothing on it.
//!
//! While this process has a registration, or its last wait on a listener watched the queue
//! through `poll`/`select`, its slot's `reporting` word carries one `WATCHER`: the program
//! spills only while an eligible slot has one. A wait that cannot watch (too many entries, a
//! blocking listener) withdraws it, and so do closing the listener and exiting normally.
//! Registrations belong to the process that made them: a forked child (which shares the
//! parent's epoll sets) neither adds nor removes any. An exec of the worker itself withdraws the
//! count (the new image registers again); a failed exec restores it.
//!
//! Only while the shim counts for the slot (`REPORTING_SHIM`): a server that counts itself (the
//! Rust worker API) accepts without this.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

use libc::c_int;

use crate::listener::{Listener, ident_of};
use crate::real;
use crate::state::{errno, set_errno};
use crate::steer::SteerSlot;

/// Epoll registrations mirrored at once (a server registers a listener in one set per loop).
const MIRRORS: usize = 64;
/// Fd numbers a mirror entry can hold (24 bits each for the epoll fd and the listener fd).
const FD_LIMIT: c_int = (1 << 24) - 1;
/// The largest `poll` set (the server's entries and the queues') watched through a copy on the
/// stack (2 KiB); a larger set is passed through unwatched.
pub const POLL_MAX: usize = 256;
/// Listeners one `poll` or `select` call can watch the queue for (or, drained, skip: state.rs).
pub const WAIT_LISTENERS: usize = 8;

thread_local! {
    /// The calling thread took a connection from the queue since it last waited.
    static TAKEN: Cell<bool> = const { Cell::new(false) };
    /// The calling thread's last `epoll_wait` reported other events after a listener's: work
    /// it does before it next waits, so it leaves the queue to whoever comes free first
    /// (module docs). Set by [`Overflow::returned`], cleared by [`Overflow::waiting`].
    static DEFER: Cell<bool> = const { Cell::new(false) };
    /// The calling thread left a connection in the queue since it last waited (because of
    /// DEFER): its next wait may not leave another.
    static LEFT: Cell<bool> = const { Cell::new(false) };
    /// The wait before this one left a connection in the queue.
    static LEFT_LAST: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread may take a connection from the queue now: not if it took one
/// since it last waited, nor while its batch holds work after a listener's event (DEFER;
/// the connection left is recorded).
fn may_take() -> bool {
    if TAKEN.with(Cell::get) {
        return false;
    }
    if DEFER.with(Cell::get) {
        LEFT.with(|l| l.set(true));
        return false;
    }
    true
}

/// An epoll wait as the server sees it (interpose.rs): `wait`, then `told` (how many of its
/// `rc` events the server is told), again while a wait without a time limit (`forever`) found
/// events and the server would be told of none.
pub fn until_told(
    forever: bool,
    mut wait: impl FnMut() -> c_int,
    told: impl Fn(c_int) -> c_int,
) -> c_int {
    loop {
        let rc = wait();
        let n = told(rc);
        if n != 0 || rc <= 0 || !forever {
            return n;
        }
    }
}

/// Whether an `epoll_wait` batch (the `data` of each event, in the order reported) has an event
/// that is not a listener's after one that is (`is_listener`): a server handles a batch in
/// order, so after accepting it would serve that work before the connection it accepted.
fn work_after_listener(
    batch: impl IntoIterator<Item = u64>,
    is_listener: impl Fn(u64) -> bool,
) -> bool {
    let mut seen = false;
    for data in batch {
        if is_listener(data) {
            seen = true;
        } else if seen {
            return true;
        }
    }
    false
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
    /// The server's `data` for each registration in `mirrors` (the same index), which the
    /// queue's readiness carries too: how [`Overflow::returned`] tells a listener's events.
    datas: [AtomicU64; MIRRORS],
    /// Whether the listener of each registration in `mirrors` was non-blocking when it was
    /// registered: only those leave a connection in the queue (a blocking `accept` that gets
    /// nothing from the queue would wait on the listener).
    nonblock: [AtomicBool; MIRRORS],
    /// Entries in use (`close` skips the scan while 0).
    count: AtomicUsize,
    /// The process the registrations belong to (0 until the first).
    owner: AtomicI32,
    /// The owner's last `poll`/`select` on a listener watched the queue.
    polled: AtomicBool,
}

/// Removes queue fd `queue` from epoll set `epfd` (a set without it answers `ENOENT`).
fn del_queue(epfd: c_int, queue: c_int) {
    let mut dummy = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: DEL ignores the event pointer (non-null for old kernels); both are plain fds.
    unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, queue, &mut dummy) };
}

/// Whether `fd`'s open file is non-blocking.
pub fn nonblocking(fd: c_int) -> bool {
    // SAFETY: F_GETFL reads the status flags; an invalid fd returns -1.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// The top 16 bits of the `data` the queue is registered with: above every user-space
/// address and far above any fd, so no server registers a value with them.
const TAG_MARK: u64 = 0xff5c << 48;
const TAG_MASK: u64 = 0xffff << 48;

/// The `data` the queue is registered with in set `epfd` beside listener fd `fd`: how a wait's
/// batch tells the queue's readiness from the listener's ([`Overflow::returned`]).
fn tag(epfd: c_int, fd: c_int) -> u64 {
    TAG_MARK | ((epfd as u64) << 24) | fd as u64
}

/// The `(epfd, listener fd)` of a queue registration's `data`, or `None` for any other value.
fn untag(data: u64) -> Option<(c_int, c_int)> {
    (data & TAG_MASK == TAG_MARK).then_some((
        ((data >> 24) & 0xff_ffff) as c_int,
        (data & 0xff_ffff) as c_int,
    ))
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
            datas: [const { AtomicU64::new(0) }; MIRRORS],
            nonblock: [const { AtomicBool::new(false) }; MIRRORS],
            count: AtomicUsize::new(0),
            owner: AtomicI32::new(0),
            polled: AtomicBool::new(false),
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

    /// Records registration `v` (or updates it); `false` when every entry is taken.
    fn remember(&self, steer: &SteerSlot, v: u64, data: u64, nonblock: bool) -> bool {
        if let Some(k) = self
            .mirrors
            .iter()
            .position(|m| m.load(Ordering::SeqCst) == v)
        {
            self.datas[k].store(data, Ordering::SeqCst);
            self.nonblock[k].store(nonblock, Ordering::SeqCst);
            return true;
        }
        for (k, m) in self.mirrors.iter().enumerate() {
            if m.compare_exchange(0, v, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.datas[k].store(data, Ordering::SeqCst);
                self.nonblock[k].store(nonblock, Ordering::SeqCst);
                if self.count.fetch_add(1, Ordering::SeqCst) == 0
                    && !self.polled.load(Ordering::SeqCst)
                {
                    steer.watch(true);
                }
                return true;
            }
        }
        false
    }

    fn drop_entry(&self, steer: &SteerSlot, m: &AtomicU64, v: u64) {
        if m.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && self.count.fetch_sub(1, Ordering::SeqCst) == 1
            && !self.polled.load(Ordering::SeqCst)
        {
            steer.watch(false);
        }
    }

    /// The owner's waits on a listener watch the queue through `poll`/`select` (`on`), or no
    /// longer do: its `WATCHER` follows, unless an epoll registration holds it anyway.
    fn poll_watch(&self, steer: &SteerSlot, on: bool) {
        if self.polled.swap(on, Ordering::SeqCst) != on && self.count.load(Ordering::SeqCst) == 0 {
            steer.watch(on);
        }
    }

    /// The queue fds a wait should add for its listeners: `(position, queue fd)` pairs for the
    /// `candidates` (each a position in the server's set, the listener's fd and its index), or
    /// none when this process is not the owner or a listener cannot be watched (the watch is
    /// withdrawn then): blocking, or its queue's fd not below `fd_limit`. `room`: whether the
    /// set with this many queues added still fits.
    fn for_wait(
        &self,
        steer: &SteerSlot,
        candidates: &[(usize, c_int, usize)],
        fd_limit: c_int,
        room: impl Fn(usize) -> bool,
        out: &mut [(usize, c_int); WAIT_LISTENERS],
    ) -> usize {
        if candidates.is_empty() || !self.owned() {
            return 0;
        }
        let mut k = 0;
        let mut ok = true;
        for &(pos, fd, index) in candidates {
            match self.fd(index) {
                Some(queue) if queue < fd_limit && nonblocking(fd) => {
                    out[k] = (pos, queue);
                    k += 1;
                }
                _ => ok = false,
            }
        }
        let ok = ok && k > 0 && room(k);
        self.poll_watch(steer, ok);
        if ok { k } else { 0 }
    }

    /// The server's `poll` (or a variant, performed by `call` on the array and count it is
    /// given) under the shim: when it asks for a listener's input (`listener_of` maps an fd to
    /// its listener index), the queue is watched too (module docs). errno is the wait's own.
    ///
    /// # Safety
    /// `fds` and `nfds` as for poll(2).
    pub unsafe fn poll(
        &self,
        steer: &SteerSlot,
        listener_of: impl Fn(c_int) -> Option<usize>,
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        call: impl FnOnce(*mut libc::pollfd, libc::nfds_t) -> c_int,
    ) -> c_int {
        let n = nfds as usize;
        if fds.is_null() || n == 0 || n > libc::c_int::MAX as usize {
            return call(fds, nfds);
        }
        // SAFETY: the caller's array of `nfds` entries (poll(2) reads them all).
        let theirs = unsafe { std::slice::from_raw_parts_mut(fds, n) };
        let mut candidates = [(0usize, 0 as c_int, 0usize); WAIT_LISTENERS];
        let mut found = 0;
        for (pos, p) in theirs.iter().enumerate() {
            if found < WAIT_LISTENERS
                && p.fd >= 0
                && p.events & libc::POLLIN != 0
                && let Some(index) = listener_of(p.fd)
            {
                candidates[found] = (pos, p.fd, index);
                found += 1;
            }
        }
        let mut adds = [(0usize, 0 as c_int); WAIT_LISTENERS];
        let k = self.for_wait(
            steer,
            &candidates[..found],
            c_int::MAX,
            |k| n + k <= POLL_MAX,
            &mut adds,
        );
        if k == 0 {
            return call(fds, nfds);
        }
        let mut buf = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; POLL_MAX];
        buf[..n].copy_from_slice(theirs);
        for (slot, &(_, queue)) in buf[n..n + k].iter_mut().zip(&adds[..k]) {
            *slot = libc::pollfd {
                fd: queue,
                events: libc::POLLIN,
                revents: 0,
            };
        }
        let rc = call(buf.as_mut_ptr(), (n + k) as libc::nfds_t);
        if rc < 0 {
            return rc;
        }
        for (mine, got) in theirs.iter_mut().zip(&buf[..n]) {
            mine.revents = got.revents;
        }
        for (got, &(pos, _)) in buf[n..n + k].iter().zip(&adds[..k]) {
            if got.revents & libc::POLLIN != 0 {
                theirs[pos].revents |= libc::POLLIN;
            }
        }
        theirs.iter().filter(|p| p.revents != 0).count() as c_int
    }

    /// The server's `select` (or `pselect`, performed by `call` with the `nfds` it is given, on
    /// the caller's sets): when the read set holds a listener, the queue's bit is added, and
    /// its readiness reported as the listener's (module docs). errno is the wait's own.
    ///
    /// # Safety
    /// `nfds` and the sets as for select(2).
    pub unsafe fn select(
        &self,
        steer: &SteerSlot,
        listener_of: impl Fn(c_int) -> Option<usize>,
        nfds: c_int,
        sets: [*mut libc::fd_set; 3],
        call: impl FnOnce(c_int) -> c_int,
    ) -> c_int {
        let readfds = sets[0];
        let setsize = libc::FD_SETSIZE as c_int;
        if readfds.is_null() || nfds <= 0 || nfds > setsize {
            return call(nfds);
        }
        let mut candidates = [(0usize, 0 as c_int, 0usize); WAIT_LISTENERS];
        let mut found = 0;
        for fd in 0..nfds {
            // SAFETY: readfds is a valid set (caller contract) and fd < FD_SETSIZE.
            let asked = unsafe { libc::FD_ISSET(fd, readfds) };
            if found < WAIT_LISTENERS
                && asked
                && let Some(index) = listener_of(fd)
            {
                candidates[found] = (fd as usize, fd, index);
                found += 1;
            }
        }
        let mut adds = [(0usize, 0 as c_int); WAIT_LISTENERS];
        let k = self.for_wait(steer, &candidates[..found], setsize, |_| true, &mut adds);
        if k == 0 {
            return call(nfds);
        }
        let adds = &adds[..k];
        let top = adds.iter().map(|&(_, q)| q + 1).fold(nfds, c_int::max);
        // Bits from nfds up to top were outside the server's question: cleared, so the wider
        // call asks nothing it did not.
        // SAFETY: every set is a valid fd_set (caller contract) and every fd is below
        // FD_SETSIZE.
        unsafe {
            for fd in nfds..top {
                for set in sets {
                    if !set.is_null() {
                        libc::FD_CLR(fd, set);
                    }
                }
            }
            for &(_, queue) in adds {
                libc::FD_SET(queue, readfds);
            }
        }
        let mut rc = call(top);
        // SAFETY: as above.
        unsafe {
            for &(listener, queue) in adds {
                let ready = rc > 0 && libc::FD_ISSET(queue, readfds);
                libc::FD_CLR(queue, readfds);
                if ready {
                    if libc::FD_ISSET(listener as c_int, readfds) {
                        rc -= 1;
                    } else {
                        libc::FD_SET(listener as c_int, readfds);
                    }
                }
            }
        }
        rc
    }

    /// The server closes `fd`: if it is a listener (`is_listener`, asked only while this
    /// process watches through `poll`/`select`, so an epoll server's closes pay nothing), that
    /// watch ends with it (its next wait on a listener starts it again).
    pub fn listener_closing(&self, steer: &SteerSlot, is_listener: impl FnOnce() -> bool) {
        if self.polled.load(Ordering::Relaxed)
            && self.owner.load(Ordering::SeqCst) == getpid()
            && is_listener()
        {
            self.poll_watch(steer, false);
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
                    u64: tag(epfd, fd),
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
                // A registration that cannot be recorded is taken back: its reports would come
                // under a tag nobody knows, so they could only be dropped.
                if rc == 0 && !self.remember(steer, v, theirs.u64, nonblocking(fd)) {
                    del_queue(epfd, queue);
                }
            }
            libc::EPOLL_CTL_DEL => {
                del_queue(epfd, queue);
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
        if self.count.load(Ordering::SeqCst) == 0 || !(0..FD_LIMIT).contains(&fd) {
            return;
        }
        // Most closes are of connections, which no entry names: decided by loads alone, before
        // the `getpid` that ownership needs.
        let named = |v: u64| {
            let (epfd, server_fd, _) = unpack(v);
            v != 0 && (server_fd == fd || epfd == fd)
        };
        if !self.mirrors.iter().any(|m| named(m.load(Ordering::SeqCst))) || !self.owned() {
            return;
        }
        // A listener's mirrors leave their sets; a set's close removes them by itself.
        self.unmirror(steer, |epfd, server_fd| {
            (server_fd == fd || epfd == fd).then_some(server_fd == fd)
        });
    }

    /// Drops each mirror entry for which `which(epfd, server_fd)` is `Some(remove)`, first
    /// removing the queue from that set when `remove`. errno is left as it was.
    fn unmirror(&self, steer: &SteerSlot, which: impl Fn(c_int, c_int) -> Option<bool>) {
        let saved = errno();
        for m in &self.mirrors {
            let v = m.load(Ordering::SeqCst);
            let (epfd, server_fd, index) = unpack(v);
            let Some(remove) = which(epfd, server_fd).filter(|_| v != 0) else {
                continue;
            };
            if remove && let Some(queue) = self.fd(index) {
                del_queue(epfd, queue);
            }
            self.drop_entry(steer, m, v);
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
        if !may_take() {
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

    /// Whether the calling thread leaves the queue alone until it next waits (a batch with work
    /// after a listener's event) and `fd` is a non-blocking listener it registered: an `accept`
    /// there that the table says has nothing on its own queue can fail with `EAGAIN` at once.
    pub fn deferring(&self, fd: c_int) -> bool {
        DEFER.with(Cell::get)
            && self.mirrors.iter().zip(&self.nonblock).any(|(m, nb)| {
                let v = m.load(Ordering::Relaxed);
                v != 0 && unpack(v).1 == fd && nb.load(Ordering::Relaxed)
            })
    }

    /// The calling thread is about to wait: it may take from the queue again.
    pub fn waiting(&self) {
        TAKEN.with(|t| t.set(false));
        DEFER.with(|d| d.set(false));
        LEFT_LAST.with(|l| l.set(LEFT.with(|t| t.replace(false))));
    }

    /// The server's `data` for the registration of listener fd `fd` in set `epfd`.
    fn data_of(&self, epfd: c_int, fd: c_int) -> Option<u64> {
        self.mirrors.iter().zip(&self.datas).find_map(|(m, d)| {
            let v = m.load(Ordering::Relaxed);
            (v != 0 && unpack(v).0 == epfd && unpack(v).1 == fd).then(|| d.load(Ordering::Relaxed))
        })
    }

    /// The calling thread's `epoll_wait` on `epfd` returned `n` events in `events`; returns the
    /// count the server is told, after the batch is rewritten in place:
    ///
    /// - A queue's event becomes its listener's: it takes the server's `data`, unless the batch
    ///   already holds an event with that `data` (the listener's own), when it is dropped, as is
    ///   one whose registration this process has no record of, which is also removed from the
    ///   set (`remove_stale`; the caller waits again rather than tell a server
    ///   without a time limit of nothing). So a server is told of a listener
    ///   at most once per wait, as epoll tells of one fd, and calls `accept` once per wait (node
    ///   does) rather than once for its listener and again for the queue: two connections
    ///   taken in one pass, the second waiting behind the first's request while a peer may be
    ///   free.
    /// - When one of this process's listener registrations in the set is reported and other
    ///   events come after it, the thread will serve those before a connection it accepts now,
    ///   so its accepts until it next waits leave the queue alone, unless its previous wait
    ///   already left a connection there, or (`steer`, this slot's line) no other worker that
    ///   watches the queue may come free sooner, all being inside long requests (module docs).
    ///
    /// # Safety
    /// `events` holds `n` events written by the kernel (when `n > 0`), and may be written.
    pub unsafe fn returned(
        &self,
        epfd: c_int,
        events: *mut libc::epoll_event,
        n: c_int,
        steer: Option<&SteerSlot>,
    ) -> c_int {
        // No shortcut while nothing is registered: a set this process no longer knows of (one
        // an exec inherited) may still report the queue, under a `data` no server knows.
        if n < 1 || events.is_null() {
            return n;
        }
        let total = n as usize;
        // SAFETY: caller contract, `i` below `total`; epoll_event may be packed, so unaligned.
        let read = |i: usize| unsafe { events.add(i).read_unaligned() };
        // SAFETY: as for `read` (the array is the caller's to write).
        let write = |i: usize, ev: libc::epoll_event| unsafe { events.add(i).write_unaligned(ev) };
        // Compacted in place: events kept so far are at 0..kept, those not yet seen at i..total.
        let mut kept = 0;
        let mut stale = false;
        for i in 0..total {
            let mut ev = read(i);
            if let Some((set, fd)) = untag(ev.u64) {
                let Some(data) = self.data_of(epfd, fd).filter(|_| set == epfd) else {
                    stale = true;
                    continue;
                };
                if (0..kept).chain(i + 1..total).any(|j| read(j).u64 == data) {
                    continue;
                }
                ev.u64 = data;
            }
            write(kept, ev);
            kept += 1;
        }
        if stale {
            self.remove_stale(epfd);
        }
        if kept < 2 {
            return kept as c_int;
        }
        // The `data` of this set's registrations (a server registers a listener or two).
        let mut mine = [0u64; WAIT_LISTENERS];
        let mut k = 0;
        for ((m, d), nb) in self.mirrors.iter().zip(&self.datas).zip(&self.nonblock) {
            let v = m.load(Ordering::Relaxed);
            if v != 0 && unpack(v).0 == epfd && nb.load(Ordering::Relaxed) && k < WAIT_LISTENERS {
                mine[k] = d.load(Ordering::Relaxed);
                k += 1;
            }
        }
        if k > 0
            && work_after_listener((0..kept).map(|i| read(i).u64), |data| {
                mine[..k].contains(&data)
            })
            && !LEFT_LAST.with(Cell::get)
            && steer.is_none_or(SteerSlot::peer_may_come_free)
        {
            DEFER.with(|d| d.set(true));
        }
        kept as c_int
    }

    /// Removes from set `epfd` each of the queue's fds that no recorded registration of this
    /// process puts there: one reported under a tag nobody knows (a set inherited across exec,
    /// or a registration made before this process's record of it was dropped). Left there, a
    /// queue holding connections that other workers will take wakes this loop again and again
    /// with nothing to report. errno is left as it was.
    fn remove_stale(&self, epfd: c_int) {
        let saved = errno();
        for (index, &queue) in self.fds.iter().enumerate() {
            let known = self.mirrors.iter().any(|m| {
                let v = m.load(Ordering::SeqCst);
                v != 0 && unpack(v).0 == epfd && unpack(v).2 == index
            });
            if queue >= 0 && !known {
                del_queue(epfd, queue);
            }
        }
        set_errno(saved);
    }

    /// The worker drains with its exit held (drain.rs): the queue leaves every epoll set this
    /// process registered it in, and its watch is withdrawn as at exit ([`Overflow::exiting`]),
    /// so the program spills nothing more for it and the queue wakes it no more. Atomics,
    /// `getpid` and `epoll_ctl` only: called from a signal handler. errno is left as it was.
    pub fn withdraw(&self, steer: &SteerSlot) {
        if self.owner.load(Ordering::SeqCst) != getpid() {
            return;
        }
        self.unmirror(steer, |_, _| Some(true));
        self.exiting(steer);
    }

    /// The process exits normally (the shim's destructor): a watch it holds is withdrawn, as
    /// closing its listener would, and it takes part in none from now on. (A process killed
    /// cannot withdraw; the master clears a slot's watchers once none of its processes is left.)
    pub fn exiting(&self, steer: &SteerSlot) {
        // Only the owner (a vfork child calling exit shares this memory and must not disown
        // its parent).
        let me = getpid();
        if self
            .owner
            .compare_exchange(me, -1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && (self.count.load(Ordering::SeqCst) > 0 || self.polled.load(Ordering::SeqCst))
        {
            steer.watch(false);
        }
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
        let watching = self.count.load(Ordering::SeqCst) > 0 || self.polled.load(Ordering::SeqCst);
        if watching && self.owner.load(Ordering::SeqCst) == getpid() {
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
    fn work_after_a_listener_event_is_seen_in_order() {
        let listener = |d: u64| d == 7;
        assert!(work_after_listener([7, 3], listener));
        assert!(work_after_listener([3, 7, 7, 4], listener));
        assert!(!work_after_listener([3, 4, 7], listener));
        assert!(!work_after_listener([7, 7], listener));
        assert!(!work_after_listener([3, 4], listener));
        assert!(!work_after_listener([], listener));
    }

    /// An overflow queue without fds, owned by this process, counting one registration (the
    /// test stores it).
    fn one_registration() -> Overflow {
        Overflow {
            fds: vec![-1],
            idents: vec![None],
            mirrors: [const { AtomicU64::new(0) }; MIRRORS],
            datas: [const { AtomicU64::new(0) }; MIRRORS],
            nonblock: [const { AtomicBool::new(false) }; MIRRORS],
            count: AtomicUsize::new(1),
            owner: AtomicI32::new(getpid()),
            polled: AtomicBool::new(false),
        }
    }

    fn event(data: u64) -> libc::epoll_event {
        libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        }
    }

    /// A thread whose batch holds work after its listener's event leaves the queue alone until
    /// it next waits, but never two waits in a row; work before the listener's event (served
    /// already when it accepts), another set's registration, or none at all defers nothing.
    #[test]
    fn a_busy_batch_leaves_the_queue_to_others_one_wait_at_a_time() {
        let overflow = one_registration();
        let (epfd, listener_fd, data) = (9, 5, 0xabcd);
        overflow.mirrors[3].store(pack(epfd, listener_fd, 0), Ordering::SeqCst);
        overflow.datas[3].store(data, Ordering::SeqCst);
        overflow.nonblock[3].store(true, Ordering::SeqCst);
        let mut busy = [event(data), event(11)];
        let served = [event(11), event(data)];
        // (the batch, the set it came from, whether the thread may take after it)
        let steps: [(&[libc::epoll_event], c_int, bool); 8] = [
            (&busy, epfd, false),
            (&busy, epfd, true), // left one last wait: takes now
            (&busy, epfd, false),
            (&served, epfd, true),
            (&busy, epfd, false),
            (&busy, epfd + 1, true), // not this set's listener
            (&busy[..1], epfd, true),
            (&busy, epfd, false),
        ];
        for (k, (batch, set, expect)) in steps.into_iter().enumerate() {
            overflow.waiting();
            let mut batch = batch.to_vec();
            // SAFETY: `batch` holds that many events.
            unsafe { overflow.returned(set, batch.as_mut_ptr(), batch.len() as c_int, None) };
            assert_eq!(may_take(), expect, "step {k}");
        }
        // A blocking listener's registration defers nothing.
        overflow.nonblock[3].store(false, Ordering::SeqCst);
        overflow.waiting();
        overflow.waiting();
        // SAFETY: `busy` holds two events.
        unsafe { overflow.returned(epfd, busy.as_mut_ptr(), 2, None) };
        assert!(may_take());
        assert!(!overflow.deferring(listener_fd));
        overflow.nonblock[3].store(true, Ordering::SeqCst);
        overflow.waiting();
        // SAFETY: as above.
        unsafe { overflow.returned(epfd, busy.as_mut_ptr(), 2, None) };
        assert!(overflow.deferring(listener_fd));
        assert!(!overflow.deferring(listener_fd + 1));
        // One take per wait, whatever the batch.
        overflow.waiting();
        TAKEN.with(|t| t.set(true));
        assert!(!may_take());
        overflow.waiting();
    }

    #[test]
    fn tags_name_the_set_and_listener_and_nothing_a_server_registers() {
        for (epfd, fd) in [(0, 0), (5, 7), (FD_LIMIT - 1, FD_LIMIT - 1)] {
            assert_eq!(untag(tag(epfd, fd)), Some((epfd, fd)));
        }
        // fds (libuv's `data`), user-space pointers, zero, all ones.
        for data in [0, 7, 0x7fff_ffff_ffff, 0x00ff_ffff_ffff_ffff, u64::MAX] {
            assert_eq!(untag(data), None, "{data:#x}");
        }
    }

    /// The queue's event in a wait's batch becomes its listener's (the server's `data`), and
    /// is dropped where the listener's own event is in the batch too, or where the
    /// registration is not this set's or is no longer known; other events keep their order.
    #[test]
    fn a_batch_reports_each_listener_once_with_the_servers_data() {
        let overflow = one_registration();
        let (epfd, listener_fd, data) = (9, 5, 0x5_0000_0000);
        overflow.mirrors[7].store(pack(epfd, listener_fd, 0), Ordering::SeqCst);
        overflow.datas[7].store(data, Ordering::SeqCst);
        let queue = tag(epfd, listener_fd);
        let cases: [(c_int, &[u64], &[u64]); 7] = [
            (epfd, &[queue], &[data]),
            (epfd, &[11, queue, 12], &[11, data, 12]),
            (epfd, &[data, queue], &[data]),
            (epfd, &[queue, 11, data], &[11, data]),
            (epfd, &[11, 12], &[11, 12]),
            (epfd + 1, &[11, queue], &[11]), // another set's tag: not ours to report
            (epfd, &[tag(epfd, listener_fd + 1), 11], &[11]), // a listener not registered
        ];
        for (set, batch, expect) in cases {
            overflow.waiting();
            let mut events: Vec<libc::epoll_event> = batch.iter().map(|&d| event(d)).collect();
            // SAFETY: `events` holds that many events.
            let n =
                unsafe { overflow.returned(set, events.as_mut_ptr(), events.len() as c_int, None) };
            let got: Vec<u64> = events[..n as usize].iter().map(|e| e.u64).collect();
            assert_eq!(got, expect, "batch {batch:x?} from set {set}");
        }
        // With no registration left, a report of the queue is still never passed on.
        overflow.mirrors[7].store(0, Ordering::SeqCst);
        overflow.count.store(0, Ordering::SeqCst);
        let mut events = [event(queue), event(11)];
        // SAFETY: `events` holds two events.
        let n = unsafe { overflow.returned(epfd, events.as_mut_ptr(), 2, None) };
        assert_eq!((n, events[0].u64), (1, 11));
    }

    /// A wait without a time limit whose events were all dropped waits again, until the server
    /// is told of one; a limited wait, and a wait that failed or found nothing, return what
    /// they got at once.
    #[test]
    fn a_wait_without_a_time_limit_never_tells_of_nothing() {
        // (forever, each wait's count, how many of them the server is told, expected, waits)
        type Case = (bool, &'static [c_int], &'static [c_int], c_int, usize);
        let cases: [Case; 5] = [
            (true, &[2, 1], &[0, 1], 1, 2),
            (true, &[1, 1, 3], &[0, 0, 2], 2, 3),
            (false, &[2], &[0], 0, 1),
            (true, &[-1], &[-1], -1, 1),
            (true, &[0], &[0], 0, 1),
        ];
        for (forever, rcs, told, expect, waits) in cases {
            let k = Cell::new(0);
            let n = until_told(
                forever,
                || {
                    k.set(k.get() + 1);
                    rcs[k.get() - 1]
                },
                |rc| {
                    assert_eq!(rc, rcs[k.get() - 1]);
                    told[k.get() - 1]
                },
            );
            assert_eq!((n, k.get()), (expect, waits), "{forever} {rcs:?} {told:?}");
        }
    }

    /// A listening socket on 127.0.0.1 with a connection waiting in its queue (so an epoll
    /// set reports it readable until someone accepts), and that connection.
    fn queue_with_a_connection() -> (std::net::TcpListener, std::net::TcpStream) {
        let queue = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        queue.set_nonblocking(true).expect("nonblocking");
        let client =
            std::net::TcpStream::connect(queue.local_addr().expect("addr")).expect("connect");
        (queue, client)
    }

    fn epoll_set() -> std::os::fd::OwnedFd {
        // SAFETY: epoll_create1 returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(fd >= 0, "epoll_create1");
        // SAFETY: a new fd that nothing else owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    /// `epoll_ctl(epfd, op, fd)` with `data`, and the result (0 or the errno).
    fn ctl(epfd: c_int, op: c_int, fd: c_int, data: u64) -> c_int {
        let mut ev = event(data);
        // SAFETY: a valid event; the fds are the test's.
        let rc = unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
        if rc == 0 { 0 } else { errno() }
    }

    /// One wait on `epfd` (at most 1 s) and the `data` of what it reports.
    fn wait(epfd: c_int, timeout: c_int) -> Vec<u64> {
        let mut events = [event(0); 4];
        // SAFETY: `events` holds 4 events.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), 4, timeout) };
        assert!(n >= 0, "epoll_wait: {}", errno());
        events[..n as usize].iter().map(|e| e.u64).collect()
    }

    /// The queue reported under a tag this process has no record of (a set an exec inherited,
    /// say) is never passed on and is removed from that set at that report, so a queue that
    /// holds a connection for other workers stops waking this loop; a recorded registration
    /// in the same set is left alone.
    #[test]
    fn a_report_under_a_tag_nobody_knows_removes_that_registration() {
        use std::os::fd::AsRawFd;
        let (queue, _client) = queue_with_a_connection();
        let set = epoll_set();
        let epfd = set.as_raw_fd();
        let mut overflow = one_registration();
        overflow.fds = vec![queue.as_raw_fd()];
        overflow.count.store(0, Ordering::SeqCst);
        let stale = tag(epfd, 42);
        assert_eq!(ctl(epfd, libc::EPOLL_CTL_ADD, queue.as_raw_fd(), stale), 0);
        let mut events: Vec<libc::epoll_event> = wait(epfd, 1000).into_iter().map(event).collect();
        assert_eq!(events.iter().map(|e| e.u64).collect::<Vec<_>>(), [stale]);
        // SAFETY: `events` holds that many events.
        let n =
            unsafe { overflow.returned(epfd, events.as_mut_ptr(), events.len() as c_int, None) };
        assert_eq!(n, 0, "nothing to tell the server");
        assert_eq!(
            wait(epfd, 0),
            [] as [u64; 0],
            "the set no longer reports the queue"
        );
        assert_eq!(
            ctl(epfd, libc::EPOLL_CTL_DEL, queue.as_raw_fd(), 0),
            libc::ENOENT
        );

        // Recorded: reported as the listener's, and still registered after.
        let (listener_fd, data) = (7, 0x77);
        overflow.mirrors[0].store(pack(epfd, listener_fd, 0), Ordering::SeqCst);
        overflow.datas[0].store(data, Ordering::SeqCst);
        overflow.count.store(1, Ordering::SeqCst);
        let known = tag(epfd, listener_fd);
        assert_eq!(ctl(epfd, libc::EPOLL_CTL_ADD, queue.as_raw_fd(), known), 0);
        let mut events: Vec<libc::epoll_event> = wait(epfd, 1000).into_iter().map(event).collect();
        // SAFETY: as above.
        let n =
            unsafe { overflow.returned(epfd, events.as_mut_ptr(), events.len() as c_int, None) };
        assert_eq!((n, events[0].u64), (1, data));
        assert_eq!(wait(epfd, 1000), [known], "still registered");
    }

    /// A registration the shim cannot record (every entry taken) is taken back from the set
    /// at once instead of left to report under a tag nobody knows.
    #[test]
    fn a_registration_that_cannot_be_recorded_is_taken_back() {
        use std::os::fd::AsRawFd;
        let (queue, _client) = queue_with_a_connection();
        let (server, _) = queue_with_a_connection();
        let set = epoll_set();
        let epfd = set.as_raw_fd();
        let steer = SteerSlot::for_test(0);
        let mut overflow = one_registration();
        overflow.fds = vec![queue.as_raw_fd()];
        let theirs = event(0x55);
        let add = |overflow: &Overflow| {
            // SAFETY: a valid event.
            unsafe {
                overflow.mirror(
                    &steer,
                    epfd,
                    libc::EPOLL_CTL_ADD,
                    server.as_raw_fd(),
                    0,
                    &theirs,
                )
            }
        };
        // With room: the queue joins the set beside the server's listener.
        add(&overflow);
        assert_eq!(wait(epfd, 1000), [tag(epfd, server.as_raw_fd())]);
        assert_eq!(ctl(epfd, libc::EPOLL_CTL_DEL, queue.as_raw_fd(), 0), 0);
        // Without: it does not stay there.
        for (k, m) in overflow.mirrors.iter().enumerate() {
            m.store(pack(1000, 1000 + k as c_int, 0), Ordering::SeqCst);
        }
        add(&overflow);
        assert_eq!(wait(epfd, 0), [] as [u64; 0]);
        assert_eq!(
            ctl(epfd, libc::EPOLL_CTL_DEL, queue.as_raw_fd(), 0),
            libc::ENOENT
        );
    }

    #[test]
    fn watcher_is_outside_who_counts() {
        use rcluster_proto::steer::{REPORTING_WHO, WATCHER, WATCHERS};
        assert_eq!(WATCHER & REPORTING_WHO, 0);
        assert_eq!(WATCHER & WATCHERS, WATCHER);
    }
}
