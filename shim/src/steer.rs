//! Counting on the kernel-steering table (`RCLUSTER_STEER_FD`, docs/PROTOCOL.md): in reuseport
//! mode under `--steer kernel`, the master passes the fd of a `BPF_F_MMAPABLE` array whose line
//! for this worker's slot the steering program reads. The shim maps it once (constructor) and
//! adds one to `accepted` per connection the server accepts from a listener and to `closed` per
//! such connection it closes — before the real close, so a client that sees the FIN and
//! reconnects finds the slot's load already lower. Atomic adds on shared memory: no system call.
//!
//! It also stamps the two clocks the program's stuck rule reads (`CLOCK_MONOTONIC`, the vDSO's
//! `clock_gettime`, no system call): `progress_ns` per accept, and `busy_ns` around the waits
//! (`epoll_wait`, `poll`, `select` and their variants) of the one thread that accepts from the
//! listeners — 0 on the way in, the time on the way out — and again at each of that thread's
//! accepts and closes of a counted connection, so a single-threaded server inside a long
//! request is passed over 1 ms into it, before a connection queues behind it, while one that
//! works through a burst of connections (accepting or closing one after another, its loop out
//! of its wait for longer than 1 ms in all) is not taken for stuck. Only that thread stamps:
//! once a second thread accepts, or in a forked child (`pthread_atfork`), the shim stops
//! stamping `busy_ns` (and leaves it 0), because the waits of one thread among several say
//! nothing about whether the others can accept.
//!
//! The layout is `rcluster_proto::steer`, the one the master and the Rust worker API use.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use libc::c_int;
use rcluster_proto::steer::{
    ACCEPTED, ASSIGNED, BUSY_NS, CLOSED, FORGIVEN, OVERFLOW, PROGRESS_NS, REPORTING,
    REPORTING_SHIM, REPORTING_WHO, SLOT_SIZE, STUCK_NS, TABLE_SIZE, WATCHER, WATCHERS,
    WORKER_SLOTS,
};

/// Who stamps `busy_ns`: nobody yet, the one thread that accepted ([`LOOP_THREAD`]), or nobody
/// ever again in this process (a second accepting thread, or a forked child).
static LOOP: AtomicU8 = AtomicU8::new(LOOP_UNCLAIMED);
const LOOP_UNCLAIMED: u8 = 0;
const LOOP_CLAIMED: u8 = 1;
const LOOP_OFF: u8 = 2;
/// The last non-zero `busy_ns` this process stamped, so that [`SteerSlot::retire`] clears the
/// stamp only if it is still this process's (a replacement shares the slot's line).
static STAMPED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread accepted first: its waits are the loop's waits.
    static LOOP_THREAD: Cell<bool> = const { Cell::new(false) };
    /// This thread has waited for events (`epoll_wait`, `poll`, `select`…) at least once.
    static WAITED: Cell<bool> = const { Cell::new(false) };
}

/// `pthread_atfork` child handler: a forked copy of the worker is not the worker's loop.
extern "C" fn forked_child() {
    LOOP.store(LOOP_OFF, Ordering::SeqCst);
}

/// Whether a line's placements exceed what was accepted and written off (three loads).
fn untaken_on(assigned: &AtomicU64, accepted: &AtomicU64, forgiven: &AtomicU64) -> bool {
    rcluster_proto::steer::untaken(
        assigned.load(Ordering::SeqCst),
        accepted.load(Ordering::SeqCst),
        forgiven.load(Ordering::SeqCst) as i64,
    ) > 0
}

/// This worker's line of the table.
pub struct SteerSlot {
    assigned: &'static AtomicU64,
    accepted: &'static AtomicU64,
    closed: &'static AtomicU64,
    forgiven: &'static AtomicU64,
    progress: &'static AtomicU64,
    busy: &'static AtomicU64,
    /// The slot's `reporting` word: the shim counts only while it holds `REPORTING_SHIM`, so a
    /// server that counts itself (the Rust worker API stores `REPORTING_SELF`) is not counted
    /// twice.
    reporting: &'static AtomicU32,
    /// The overflow queue's `assigned`, `accepted` and `forgiven` (overflow.rs).
    overflow_assigned: &'static AtomicU64,
    overflow_accepted: &'static AtomicU64,
    overflow_forgiven: &'static AtomicU64,
    /// The inherited fd number and the identity of the map behind it, so a same-process exec
    /// can hand the table on (follow.rs) only while the number is still ours.
    fd: c_int,
    ident: Option<(u64, u64)>,
    /// The table's address (TABLE_SIZE bytes, never unmapped) and this line's slot, to read
    /// the other workers' lines ([`SteerSlot::peer_may_come_free`]).
    base: usize,
    slot: usize,
}

/// Whether `fd` is a BPF map (`anon_inode:bpf-map`): a number from the environment is checked
/// before it is mapped writable, so a stale or reused number never maps someone's file.
fn is_bpf_map(fd: c_int) -> bool {
    let mut path = [0u8; 40];
    let mut link = [0u8; 32];
    let text = format!("/proc/self/fd/{fd}\0");
    if text.len() > path.len() {
        return false;
    }
    path[..text.len()].copy_from_slice(text.as_bytes());
    let Ok(path) = CStr::from_bytes_until_nul(&path) else {
        return false;
    };
    // SAFETY: path is NUL-terminated; link is writable storage of the length given.
    let n = unsafe { libc::readlink(path.as_ptr(), link.as_mut_ptr().cast(), link.len()) };
    n > 0 && &link[..n as usize] == b"anon_inode:bpf-map"
}

impl SteerSlot {
    /// Maps the table behind `fd` and takes `slot`'s line, marking it `reporting`. The fd is
    /// made close-on-exec (the server's children are not workers). `None` when the fd is not a
    /// BPF map or cannot be mapped: the program then keeps its own counts alone.
    pub fn map(fd: c_int, slot: usize) -> Option<SteerSlot> {
        if slot >= WORKER_SLOTS || !is_bpf_map(fd) {
            return None;
        }
        // SAFETY: fcntl on an fd just shown to be open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: a fresh shared mapping of a BPF array fd, placed by the kernel; checked for
        // MAP_FAILED. It is never unmapped: the process counts on it until it exits.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                TABLE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: the mapping is TABLE_SIZE bytes at a page boundary and is never unmapped; the
        // table is only accessed atomically, by everyone.
        let mut line = unsafe { SteerSlot::on(base.cast(), slot) };
        // SAFETY: registers a handler that only stores to an atomic (async-signal-safe, as a
        // child handler must be). Failure (ENOMEM) only leaves a forked child stamping.
        unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
        // Only on a fresh slot: one whose worker said it counts itself (an earlier generation
        // of the same server) stays so, or the old worker's shim would count again beside it.
        let _ =
            line.reporting
                .compare_exchange(0, REPORTING_SHIM, Ordering::SeqCst, Ordering::SeqCst);
        line.fd = fd;
        line.ident = crate::listener::ident_of(fd);
        Some(line)
    }

    /// `slot`'s line of the table at `base` (with the overflow queue's), fd unknown.
    ///
    /// # Safety
    /// `base` is 8-byte aligned, `TABLE_SIZE` bytes, valid for the rest of the process, and
    /// only ever accessed atomically; `slot < WORKER_SLOTS`.
    unsafe fn on(base: *mut u8, slot: usize) -> SteerSlot {
        let line = base.wrapping_add(slot * SLOT_SIZE);
        let queue = base.wrapping_add(OVERFLOW * SLOT_SIZE);
        // SAFETY: the offsets are inside the TABLE_SIZE table and aligned (the caller's base is,
        // SLOT_SIZE and the offsets are multiples of 8); the table lives for the rest of the
        // process and is only accessed atomically, by everyone (the caller's contract).
        let (overflow_assigned, overflow_accepted, overflow_forgiven) = unsafe {
            (
                AtomicU64::from_ptr(queue.add(ASSIGNED).cast()),
                AtomicU64::from_ptr(queue.add(ACCEPTED).cast()),
                AtomicU64::from_ptr(queue.add(FORGIVEN).cast()),
            )
        };
        // SAFETY: as for the overflow queue's line, on this slot's.
        let (assigned, accepted, closed, forgiven, progress, busy, reporting) = unsafe {
            (
                AtomicU64::from_ptr(line.add(ASSIGNED).cast()),
                AtomicU64::from_ptr(line.add(ACCEPTED).cast()),
                AtomicU64::from_ptr(line.add(CLOSED).cast()),
                AtomicU64::from_ptr(line.add(FORGIVEN).cast()),
                AtomicU64::from_ptr(line.add(PROGRESS_NS).cast()),
                AtomicU64::from_ptr(line.add(BUSY_NS).cast()),
                AtomicU32::from_ptr(line.add(REPORTING).cast()),
            )
        };
        SteerSlot {
            assigned,
            accepted,
            closed,
            forgiven,
            progress,
            busy,
            reporting,
            overflow_assigned,
            overflow_accepted,
            overflow_forgiven,
            fd: -1,
            ident: None,
            base: base as usize,
            slot,
        }
    }

    /// A line of a table of its own (leaked), for tests.
    #[cfg(test)]
    pub fn for_test(slot: usize) -> SteerSlot {
        let table: &'static mut [u64] = Box::leak(vec![0u64; TABLE_SIZE / 8].into_boxed_slice());
        // SAFETY: a leaked, 8-byte aligned table of TABLE_SIZE bytes, accessed only through the
        // line's atomics from here on.
        unsafe { SteerSlot::on(table.as_mut_ptr().cast(), slot) }
    }

    /// Makes the table's fd survive an exec of this same process (`inherit = true`: the next
    /// image's shim maps it again) or not (after a failed exec), if the number is still ours.
    pub fn set_inheritable(&self, inherit: bool) {
        if self.ident.is_some() && crate::listener::ident_of(self.fd) == self.ident {
            let flags = if inherit { 0 } else { libc::FD_CLOEXEC };
            // SAFETY: fcntl on an fd verified to be the table we mapped.
            unsafe { libc::fcntl(self.fd, libc::F_SETFD, flags) };
        }
    }

    /// Whether the shim counts for this slot (not a server that counts itself).
    pub fn counting(&self) -> bool {
        self.reporting.load(Ordering::Relaxed) & REPORTING_WHO == REPORTING_SHIM
    }

    /// This process starts (`true`) or stops watching the overflow queue (overflow.rs).
    pub fn watch(&self, on: bool) {
        if on {
            self.reporting.fetch_add(WATCHER, Ordering::SeqCst);
        } else {
            self.reporting.fetch_sub(WATCHER, Ordering::SeqCst);
        }
    }

    /// The server accepted a connection from a listener: counted, the queue's clock restarted,
    /// and the calling thread claims the loop (module docs).
    pub fn accepted(&self) {
        if !self.counting() {
            return;
        }
        self.accepted.fetch_add(1, Ordering::SeqCst);
        self.took();
    }

    /// The shim took a connection from the overflow queue for the server: it becomes this
    /// slot's (placed and accepted here, so the load counts it until it closes) and is counted
    /// as taken from the queue.
    pub fn took_overflow(&self) {
        if !self.counting() {
            return;
        }
        self.assigned.fetch_add(1, Ordering::SeqCst);
        self.accepted.fetch_add(1, Ordering::SeqCst);
        self.overflow_accepted.fetch_add(1, Ordering::SeqCst);
        self.took();
    }

    /// Whether the overflow queue may hold a connection nobody has taken: placed there (the
    /// program counts before the handshake completes) more often than taken or written off.
    /// Three loads, so a loop that drains its own listener does not pay an `accept` on the
    /// queue each time it finds nothing. A count a lying worker skews is set right by the
    /// master's reconciliation with the queue's real length within two of its periods.
    pub fn overflow_waiting(&self) -> bool {
        untaken_on(
            self.overflow_assigned,
            self.overflow_accepted,
            self.overflow_forgiven,
        )
    }

    /// Whether this slot's own listener may hold a connection nobody has taken: the program
    /// placed one there more often than the slot accepted or the master wrote off. When it
    /// says no and [`SteerSlot::overflow_waiting`] says yes, an `accept` tries the overflow
    /// queue first instead of paying a failed `accept` on the listener before it (state.rs).
    pub fn own_waiting(&self) -> bool {
        untaken_on(self.assigned, self.accepted, self.forgiven)
    }

    /// Whether another worker that watches the overflow queue may come free before this loop
    /// has served the rest of its batch: one whose loop waits (`busy_ns` 0) or has served what
    /// it is on for less than `STUCK_NS`. One inside a long request (out of its wait for
    /// `STUCK_NS` or more) is likely to stay there for longer (BENCHMARKS.md, issue #14), and a
    /// slot nobody watches from takes nothing from the queue. Lines are read up to the first one
    /// never used (slots are numbered from 0): N + 1 lines for N workers, atomic loads only.
    pub fn peer_may_come_free(&self) -> bool {
        let now = rcluster_sys::monotonic_ns();
        for slot in (0..WORKER_SLOTS).filter(|&s| s != self.slot) {
            let line = (self.base as *mut u8).wrapping_add(slot * SLOT_SIZE);
            // SAFETY: the line is inside the TABLE_SIZE table, which lives for the rest of the
            // process (never unmapped; a leaked table in tests); the offsets are aligned and
            // the table is only accessed atomically, by everyone.
            let (assigned, reporting, busy) = unsafe {
                (
                    AtomicU64::from_ptr(line.add(ASSIGNED).cast()).load(Ordering::Relaxed),
                    AtomicU32::from_ptr(line.add(REPORTING).cast()).load(Ordering::Relaxed),
                    AtomicU64::from_ptr(line.add(BUSY_NS).cast()).load(Ordering::Relaxed),
                )
            };
            if reporting == 0 && assigned == 0 {
                break;
            }
            if reporting & WATCHERS != 0 && (busy == 0 || now.saturating_sub(busy) < STUCK_NS) {
                return true;
            }
        }
        false
    }

    fn took(&self) {
        let now = rcluster_sys::monotonic_ns();
        self.progress.store(now, Ordering::SeqCst);
        if LOOP_THREAD.with(Cell::get) {
            self.progressed(now);
            return;
        }
        match LOOP.compare_exchange(
            LOOP_UNCLAIMED,
            LOOP_CLAIMED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => {
                LOOP_THREAD.with(|t| t.set(true));
                // A thread that waits for events is out of its wait now, serving what it just
                // accepted: busy from here, or a worker whose first connection is a long
                // request would look free until its loop next waits. (A thread that has never
                // waited accepts in blocking calls: it would never clear the stamp.)
                if WAITED.with(Cell::get) {
                    self.stamp(now);
                }
            }
            Err(LOOP_CLAIMED) => {
                // A second thread accepts: one thread's waits no longer speak for the worker.
                LOOP.store(LOOP_OFF, Ordering::SeqCst);
                self.busy.store(0, Ordering::SeqCst);
            }
            Err(_) => {}
        }
    }

    /// Whether the calling thread's waits are the worker loop's.
    fn stamps(&self) -> bool {
        LOOP_THREAD.with(Cell::get)
            && LOOP.load(Ordering::Relaxed) == LOOP_CLAIMED
            && self.counting()
    }

    /// The calling thread is about to wait for events: if it is the loop, the worker is idle.
    pub fn waiting(&self) {
        WAITED.with(|w| w.set(true));
        if self.stamps() {
            self.busy.store(0, Ordering::SeqCst);
        }
    }

    /// The calling thread's wait returned: if it is the loop, the worker is busy from now.
    pub fn woke(&self) {
        if self.stamps() {
            self.stamp(rcluster_sys::monotonic_ns());
        }
    }

    /// Stamps the loop busy from `now`.
    fn stamp(&self, now: u64) {
        STAMPED.store(now, Ordering::SeqCst);
        self.busy.store(now, Ordering::SeqCst);
    }

    /// The worker drains with its exit held (drain.rs): its waits no longer speak for the slot,
    /// whose line its replacement may share, so it stamps nothing more and clears its own
    /// stamp if that is still there (atomics only: called from a signal handler).
    pub fn retire(&self) {
        if LOOP.swap(LOOP_OFF, Ordering::SeqCst) == LOOP_CLAIMED {
            let mine = STAMPED.load(Ordering::SeqCst);
            if mine != 0 {
                let _ = self
                    .busy
                    .compare_exchange(mine, 0, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
    }

    /// The server is closing one (call before the real close).
    pub fn closed(&self) {
        if self.counting() {
            self.closed.fetch_add(1, Ordering::SeqCst);
            if self.stamps() {
                self.progressed(rcluster_sys::monotonic_ns());
            }
        }
    }

    /// The loop thread, out of its wait, moved on to another connection at `now`: `busy_ns`
    /// restarts, so only time spent on one thing (a long request) makes it look stuck. A thread
    /// that has never waited accepts in blocking calls and leaves the stamp alone (0).
    fn progressed(&self, now: u64) {
        if WAITED.with(Cell::get) && LOOP.load(Ordering::Relaxed) == LOOP_CLAIMED {
            self.stamp(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_peer_may_come_free_unless_every_watching_peer_is_inside_a_long_request() {
        let table: &'static mut [u64] = Box::leak(vec![0u64; TABLE_SIZE / 8].into_boxed_slice());
        let base: *mut u8 = table.as_mut_ptr().cast();
        // SAFETY: a leaked, 8-byte aligned table of TABLE_SIZE bytes, only accessed atomically
        // from here on.
        let me = unsafe { SteerSlot::on(base, 0) };
        // SAFETY: offsets inside the leaked table, aligned, accessed atomically.
        let field = |slot: usize, at: usize| unsafe {
            AtomicU64::from_ptr(base.add(slot * SLOT_SIZE + at).cast())
        };
        // SAFETY: as above.
        let reporting = |slot: usize| unsafe {
            AtomicU32::from_ptr(base.add(slot * SLOT_SIZE + REPORTING).cast())
        };
        assert!(!me.peer_may_come_free(), "no other worker");
        // Slot 1 watches the queue and is inside a long request; slot 2 was never used.
        let now = rcluster_sys::monotonic_ns();
        reporting(1).store(REPORTING_SHIM | WATCHER, Ordering::SeqCst);
        field(1, ASSIGNED).store(5, Ordering::SeqCst);
        field(1, BUSY_NS).store(now - 3 * STUCK_NS, Ordering::SeqCst);
        assert!(
            !me.peer_may_come_free(),
            "the only peer is inside a long request"
        );
        // Serving something short, or waiting: it may come free first.
        field(1, BUSY_NS).store(now, Ordering::SeqCst);
        assert!(me.peer_may_come_free());
        field(1, BUSY_NS).store(0, Ordering::SeqCst);
        assert!(me.peer_may_come_free());
        // A peer that does not watch the queue takes nothing from it.
        reporting(1).store(REPORTING_SHIM, Ordering::SeqCst);
        assert!(!me.peer_may_come_free());
        // A vacant slot (used before) does not end the scan: slot 2 beyond it waits.
        reporting(1).store(0, Ordering::SeqCst);
        reporting(2).store(REPORTING_SHIM | WATCHER, Ordering::SeqCst);
        field(2, ASSIGNED).store(1, Ordering::SeqCst);
        assert!(me.peer_may_come_free());
        // A slot's own line is never its peer (slot 0 counts, without watching).
        reporting(0).store(REPORTING_SHIM, Ordering::SeqCst);
        // SAFETY: as for `me`.
        let two = unsafe { SteerSlot::on(base, 2) };
        assert!(!two.peer_may_come_free());
        reporting(0).store(REPORTING_SHIM | WATCHER, Ordering::SeqCst);
        assert!(two.peer_may_come_free(), "slot 0 waits");
    }

    /// The only test that claims the process's loop (`LOOP` is process-wide).
    #[test]
    fn the_loop_thread_restamps_busy_at_each_accept_and_close() {
        let slot = SteerSlot::for_test(3);
        slot.reporting.store(REPORTING_SHIM, Ordering::SeqCst);
        let busy = || slot.busy.load(Ordering::SeqCst);
        let pause = || std::thread::sleep(Duration::from_millis(2));
        // The thread waits, wakes, and its first accept makes it the loop: busy from then.
        slot.waiting();
        slot.woke();
        assert_eq!(busy(), 0, "not the loop yet");
        slot.accepted();
        let first = busy();
        assert_ne!(first, 0);
        // A second accept, 2 ms later in the same pass of the loop: the stamp restarts there,
        // so the pass is not one 2 ms request.
        pause();
        slot.accepted();
        let second = busy();
        assert!(second >= first + 2_000_000, "{first} then {second}");
        // So does a close.
        pause();
        slot.closed();
        assert!(busy() >= second + 2_000_000);
        assert_eq!(slot.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(slot.closed.load(Ordering::SeqCst), 1);
        // Waiting clears it; waking stamps it.
        slot.waiting();
        assert_eq!(busy(), 0);
        slot.woke();
        assert_ne!(busy(), 0);
        // A second thread accepts: nobody stamps any more, accepts and closes included.
        std::thread::scope(|s| {
            s.spawn(|| slot.accepted());
        });
        assert_eq!(busy(), 0);
        slot.accepted();
        slot.closed();
        assert_eq!(busy(), 0);
    }
}
