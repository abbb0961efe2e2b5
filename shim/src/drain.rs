//! A server's SIGTERM (or SIGINT) that would end it at once: a runtime's own exit handler (what
//! a node app without a SIGTERM handler of its own runs) and, in the kernel modes, the default
//! action. What follows says SIGTERM; SIGINT (the signal PM2 sends, `--drain-signal INT`) is
//! held in the same way, and the one that arrives first is raised again at the end.
//!
//! Node installs a handler for SIGTERM before any of the app's code runs: it restores the
//! terminal and ends the process (one-shot, `SA_RESETHAND`, then the signal again). So to the
//! master (`SigCgt` in `/proc/PID/status`) every node process catches SIGTERM, and the master
//! cannot hold the drain signal back until a plain node app has answered what it holds, as it
//! does in dispatch mode for a server that does not catch it (the supervisor's `defer_drain`).
//! The shim can tell: a one-shot handler installed for SIGTERM is such an exit path, not a
//! graceful stop. In the kernel modes the master signals at once whatever the server catches,
//! so there the shim also holds the default action of a server that leaves SIGTERM alone
//! (python's `http.server`, waitress, most C servers): at start-up if it is the default then,
//! and whenever the server sets `SIG_DFL`.
//!
//! So when the server installs such an action for SIGTERM, the shim installs its own handler in
//! its place and keeps the server's aside (for the default action with `SA_RESTART`, so the
//! server's system calls go on as if no handler had run); asking for the current action still
//! answers the server's. On SIGTERM the shim's handler notes that the worker is draining and
//! stops it taking connections:
//!
//! - dispatch mode: the master already sends it none;
//! - the kernel modes (`reuseport`, `shared`, kernel steering), where a drained worker shares
//!   its listener with its replacement (or, in `shared` mode, with every worker) until it
//!   exits, as `server.close()` would: each epoll registration of a listener the server made
//!   is modified to report nothing (kept, so the server's own later `EPOLL_CTL_MOD`/`DEL`
//!   still finds it), its `poll` and `select` calls no longer ask about its listeners,
//!   `accept` on a non-blocking listener fails with `EAGAIN` without a system call (a blocking
//!   one waits until the process ends), and under kernel steering the process stops watching
//!   the overflow queue and stops stamping its slot's loop clock. What waits on the listener
//!   is the other workers'.
//!
//! It serves the connections it holds, and once its last one is closed (or at once if it
//! holds none) the shim puts the server's action back and raises SIGTERM, which ends the
//! process as before, with nothing cut. The hold lasts at most `RCLUSTER_DRAIN_HOLD_MS` (half
//! of the master's `--grace`, the bound the master keeps on its own hold in dispatch mode): a
//! kernel timer made when the drain begins (`timer_create`, `SIGEV_SIGNAL`) sends the same
//! signal again then, and the handler, past the deadline, ends the hold the same way, cutting
//! what is still open (a keep-alive client that never closes, a request longer than that).
//! The worker so ends of its own action rather than of the master's SIGKILL at `--grace`,
//! which still bounds it. Any other action the server sets for SIGTERM (its own handler through
//! `process.on('SIGTERM')`, `SIG_DFL`, `SIG_IGN`) replaces the shim's, as it would have replaced
//! the runtime's, and deletes the timer.
//!
//! Signal context: the handler only reads and writes atomics, counts the worker's open
//! connections (`procs`, atomics) and calls `epoll_ctl`, `getpid`, `clock_gettime`
//! (`rcluster_sys::monotonic_ns`), `sigaction` and `raise`, all async-signal-safe, and makes
//! the `timer_create`,
//! `timer_settime` and `timer_delete` system calls directly: the timer is made only once a drain
//! begins, in the handler, and neither `timer_create` nor `timer_delete` is on the
//! async-signal-safe list (signal-safety(7)), so the C library's wrappers are not used.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

use libc::c_int;

use crate::real;
use crate::state::{errno, set_errno};

/// The signals whose action the shim may hold: the drain and stop signals a server is
/// usually sent (SIGTERM, the default `--drain-signal` and `--stop-signal`; SIGINT, PM2's).
pub const SIGNALS: [c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Per signal of [`SIGNALS`]: an action of the server's is held aside while the shim's handler
/// is installed.
static HOLDING: [AtomicBool; 2] = [const { AtomicBool::new(false) }; 2];
/// That action's `sa_sigaction`: a one-shot handler, or `SIG_DFL` (kernel modes).
static HELD: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];
/// Its `sa_flags`.
static HELD_FLAGS: [AtomicI32; 2] = [const { AtomicI32::new(0) }; 2];
/// A held signal arrived: the worker drains.
static DRAINING: AtomicBool = AtomicBool::new(false);
/// The first held signal that arrived (0: none): the one raised again at the end.
static DRAIN_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// `RCLUSTER_DRAIN_HOLD_MS`, in nanoseconds: how long a drain may hold the signal
/// (`u64::MAX`: no bound but the master's SIGKILL).
static HOLD_NS: AtomicU64 = AtomicU64::new(u64::MAX);
/// When the hold ends, on `CLOCK_MONOTONIC` in nanoseconds (0: no deadline).
static DEADLINE_NS: AtomicU64 = AtomicU64::new(0);
/// The kernel timer that sends the drain signal again at the deadline: `ARMED | pid << 32 |
/// timer id` (0: none). Timers belong to a process; a forked child has none of its parent's.
static TIMER: AtomicU64 = AtomicU64::new(0);
const ARMED: u64 = 1 << 63;

/// Bounds the hold of a drain (`RCLUSTER_DRAIN_HOLD_MS`): from the constructor.
pub fn bound_hold(hold: std::time::Duration) {
    HOLD_NS.store(
        u64::try_from(hold.as_nanos()).unwrap_or(u64::MAX - 1),
        Ordering::Release,
    );
}

/// Starts the hold's deadline: `sig` is sent to this process again in `hold_ns`. Without a
/// timer (the system call failed) the hold lasts until the last connection closes, as before.
fn arm(sig: c_int, hold_ns: u64) {
    let saved = errno();
    // SAFETY: a zeroed sigevent is valid; the fields set make it SIGEV_SIGNAL with `sig`.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_SIGNAL;
    sev.sigev_signo = sig;
    let mut id: c_int = -1;
    // SAFETY: the kernel reads sev and writes the new timer's id (an int) to id; both live
    // across the call. A system call is async-signal-safe.
    let made = unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            libc::CLOCK_MONOTONIC,
            &mut sev as *mut libc::sigevent,
            &mut id as *mut c_int,
        )
    } == 0;
    if made {
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u32;
        TIMER.store(
            ARMED | (u64::from(pid) << 32) | u64::from(id as u32),
            Ordering::Release,
        );
        // Before the timer runs, so that its signal finds the deadline passed.
        DEADLINE_NS.store(
            rcluster_sys::monotonic_ns().saturating_add(hold_ns).max(1),
            Ordering::Release,
        );
        let its = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (hold_ns / 1_000_000_000) as libc::time_t,
                // At least 1 ns: a zero value would disarm it.
                tv_nsec: ((hold_ns % 1_000_000_000).max(1)) as libc::c_long,
            },
        };
        // SAFETY: id is the timer just made; its is a valid itimerspec; no old value asked.
        unsafe {
            libc::syscall(
                libc::SYS_timer_settime,
                id,
                0,
                &its as *const libc::itimerspec,
                std::ptr::null_mut::<libc::itimerspec>(),
            )
        };
    }
    set_errno(saved);
}

/// Deletes the deadline's timer (if this process made it) and forgets the deadline.
fn disarm() {
    let t = TIMER.swap(0, Ordering::AcqRel);
    DEADLINE_NS.store(0, Ordering::Release);
    if t & ARMED == 0 {
        return;
    }
    let saved = errno();
    // SAFETY: getpid cannot fail.
    if (t >> 32) as u32 & 0x7fff_ffff == unsafe { libc::getpid() } as u32 {
        // SAFETY: a timer this process made; a system call is async-signal-safe.
        unsafe { libc::syscall(libc::SYS_timer_delete, t as u32 as c_int) };
    }
    set_errno(saved);
}

/// Whether a drain's deadline has come.
fn past_deadline() -> bool {
    let deadline = DEADLINE_NS.load(Ordering::Acquire);
    deadline != 0 && rcluster_sys::monotonic_ns() >= deadline
}

/// The position of `sig` in [`SIGNALS`].
fn held_index(sig: c_int) -> Option<usize> {
    SIGNALS.iter().position(|&s| s == sig)
}

/// Listener registrations in epoll sets recorded at once (a server registers a listener in one
/// set per loop).
const REGISTRATIONS: usize = 16;
/// Kernel modes: the server's epoll registrations of its listeners, `IN_USE | epfd << 32 | fd`
/// (0: a free entry), with the server's `data` for each.
static REGISTERED: [AtomicU64; REGISTRATIONS] = [const { AtomicU64::new(0) }; REGISTRATIONS];
static REGISTERED_DATA: [AtomicU64; REGISTRATIONS] = [const { AtomicU64::new(0) }; REGISTRATIONS];
/// Entries of [`REGISTERED`] in use, so that a `close` pays one load while there are none.
static REGISTERED_COUNT: AtomicUsize = AtomicUsize::new(0);
const IN_USE: u64 = 1 << 63;

fn registration(epfd: c_int, fd: c_int) -> u64 {
    IN_USE | (u64::from(epfd as u32) << 32) | u64::from(fd as u32)
}

fn unpack(v: u64) -> (c_int, c_int) {
    (((v >> 32) as u32 & 0x7fff_ffff) as c_int, v as u32 as c_int)
}

/// Whether the worker drains with its exit held (kernel modes: it takes no connection now).
pub fn draining() -> bool {
    DRAINING.load(Ordering::Acquire)
}

/// Kernel modes: the server's `epoll_ctl(epfd, op, fd, event)` on one of its listeners
/// succeeded. The registration is recorded (or forgotten, on `EPOLL_CTL_DEL`); one made while
/// draining is turned off at once. errno is left as it was.
///
/// # Safety
/// `event` as for epoll_ctl(2) (read only for ADD and MOD, where it is non-null).
pub unsafe fn registered(epfd: c_int, op: c_int, fd: c_int, event: *const libc::epoll_event) {
    if epfd < 0 || fd < 0 {
        return;
    }
    let v = registration(epfd, fd);
    match op {
        libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD if !event.is_null() => {
            // SAFETY: caller contract: a valid event for ADD/MOD.
            let data = unsafe { (*event).u64 };
            let found = REGISTERED
                .iter()
                .position(|r| r.load(Ordering::SeqCst) == v)
                .or_else(|| {
                    let k = REGISTERED.iter().position(|r| {
                        r.compare_exchange(0, v, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                    })?;
                    REGISTERED_COUNT.fetch_add(1, Ordering::SeqCst);
                    Some(k)
                });
            if let Some(k) = found {
                REGISTERED_DATA[k].store(data, Ordering::SeqCst);
            }
            if draining() {
                silence(epfd, fd, data);
            }
        }
        libc::EPOLL_CTL_DEL => forget(|r| r == v),
        _ => {}
    }
}

/// Kernel modes: the server closes `fd` (or replaces it): the registrations it named, as a
/// listener or as an epoll set, are forgotten, so that a later drain never touches a number
/// reused for something else.
pub fn closing(fd: c_int) {
    if REGISTERED_COUNT.load(Ordering::Acquire) == 0 || fd < 0 {
        return;
    }
    forget(|r| {
        let (epfd, listener) = unpack(r);
        epfd == fd || listener == fd
    });
}

fn forget(which: impl Fn(u64) -> bool) {
    for r in &REGISTERED {
        let v = r.load(Ordering::SeqCst);
        if v != 0
            && which(v)
            && r.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            REGISTERED_COUNT.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Modifies a listener's registration to report nothing, keeping the server's `data`.
fn silence(epfd: c_int, fd: c_int, data: u64) {
    let saved = errno();
    let mut off = libc::epoll_event {
        events: 0,
        u64: data,
    };
    // SAFETY: a valid event; the set and fd are the server's, registered together.
    unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut off) };
    set_errno(saved);
}

/// Kernel modes: the worker takes no more connections (module docs).
fn stop_taking() {
    for (r, d) in REGISTERED.iter().zip(&REGISTERED_DATA) {
        let v = r.load(Ordering::SeqCst);
        if v != 0 {
            let (epfd, fd) = unpack(v);
            silence(epfd, fd, d.load(Ordering::SeqCst));
        }
    }
    if let Some(shim) = crate::state::get() {
        shim.stop_taking();
    }
}

/// Whether an action for a held signal ends the process at once, so that the shim holds it: a
/// runtime's exit path (a one-shot handler), and in the kernel modes (`default`) the default
/// action too.
fn is_held(act: &libc::sigaction, default: bool) -> bool {
    match act.sa_sigaction {
        libc::SIG_DFL => default,
        libc::SIG_IGN => false,
        f => f != mine_addr() && act.sa_flags & libc::SA_RESETHAND != 0,
    }
}

/// Installs the shim's handler for `SIGNALS[k]` in place of `theirs`, which is held aside.
/// `old` as for sigaction(2).
fn hold(k: usize, theirs: &libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let mut mine = *theirs;
    mine.sa_sigaction = mine_addr();
    mine.sa_flags = (theirs.sa_flags | libc::SA_SIGINFO) & !libc::SA_RESETHAND;
    if theirs.sa_sigaction == libc::SIG_DFL {
        // The server expects no handler: its system calls go on as if none had run.
        mine.sa_flags |= libc::SA_RESTART;
    }
    // SAFETY: mine is a valid action; old as the caller's.
    let rc = unsafe { real::sigaction(SIGNALS[k], &mine, old) };
    if rc == 0 {
        HELD_FLAGS[k].store(theirs.sa_flags, Ordering::Release);
        HELD[k].store(theirs.sa_sigaction, Ordering::Release);
        HOLDING[k].store(true, Ordering::Release);
    }
    rc
}

/// The kernel modes, from the constructor: a server that leaves SIGTERM or SIGINT at its
/// default (python's `http.server` for SIGTERM, waitress, most C servers) would die of the
/// signal at once, cutting what it serves, so the shim holds the default action as it holds a
/// runtime's exit path.
pub fn hold_default() {
    for (k, &sig) in SIGNALS.iter().enumerate() {
        // SAFETY: a zeroed sigaction is valid storage; a null act only reads.
        let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { real::sigaction(sig, std::ptr::null(), &mut now) } == 0
            && now.sa_sigaction == libc::SIG_DFL
        {
            hold(k, &now, std::ptr::null_mut());
        }
    }
}

/// sigaction(2) for `sig`, one of [`SIGNALS`], under the shim; `default`: the kernel modes,
/// where the default action is held too. Other signals pass through.
///
/// # Safety
/// As sigaction(2).
pub unsafe fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
    default: bool,
) -> c_int {
    let Some(k) = held_index(sig) else {
        // SAFETY: caller contract.
        return unsafe { real::sigaction(sig, act, old) };
    };
    let was_holding = HOLDING[k].load(Ordering::Acquire);
    let was_held = HELD[k].load(Ordering::Acquire);
    let was_flags = HELD_FLAGS[k].load(Ordering::Acquire);
    let rc = if act.is_null() {
        // SAFETY: caller contract.
        unsafe { real::sigaction(sig, act, old) }
    } else {
        // SAFETY: caller contract: act points to a valid action.
        let wanted = unsafe { &*act };
        if is_held(wanted, default) {
            hold(k, wanted, old)
        } else {
            // SAFETY: caller contract.
            let rc = unsafe { real::sigaction(sig, act, old) };
            if rc == 0 {
                HOLDING[k].store(false, Ordering::Release);
                if DRAIN_SIGNAL.load(Ordering::Acquire) == sig {
                    // The server's own action now: the deadline would send it a second
                    // signal it never asked for.
                    disarm();
                }
            }
            rc
        }
    };
    // The server asked what was installed: its own action, not the shim's.
    if rc == 0 && !old.is_null() && was_holding {
        // SAFETY: old is valid for writes (caller contract) and was just filled in.
        let old = unsafe { &mut *old };
        if old.sa_sigaction == mine_addr() {
            old.sa_sigaction = was_held;
            old.sa_flags = was_flags;
        }
    }
    rc
}

/// The address of [`handler`], as `sa_sigaction` holds it.
fn mine_addr() -> usize {
    handler as *const () as usize
}

/// The shim's handler for a signal whose action it holds.
extern "C" fn handler(sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _ = DRAIN_SIGNAL.compare_exchange(0, sig, Ordering::AcqRel, Ordering::Acquire);
    let first = !DRAINING.swap(true, Ordering::AcqRel);
    if first && crate::state::get().is_some_and(|shim| !shim.dispatching()) {
        stop_taking();
    }
    let hold_ns = HOLD_NS.load(Ordering::Acquire);
    if open_connections() == 0 || hold_ns == 0 || past_deadline() {
        finish();
    } else if first && hold_ns != u64::MAX {
        arm(DRAIN_SIGNAL.load(Ordering::Acquire), hold_ns);
    }
}

/// This process's connections not yet closed.
fn open_connections() -> u64 {
    crate::state::get().map_or(0, |shim| shim.open_here())
}

/// A connection was closed: ends a draining worker that holds no more.
pub fn closed() {
    if DRAINING.load(Ordering::Acquire) && open_connections() == 0 {
        finish();
    }
}

/// Puts the server's action for the signal that started the drain back and raises that
/// signal: the process ends as the runtime (or the default action) ends it. Delivered when the
/// shim's handler returns if called from it, at once otherwise.
fn finish() {
    let sig = DRAIN_SIGNAL.load(Ordering::Acquire);
    let Some(k) = held_index(sig) else { return };
    if !HOLDING[k].swap(false, Ordering::AcqRel) {
        return;
    }
    disarm();
    // SAFETY: a zeroed sigaction is valid; the mask is filled before use.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = HELD[k].load(Ordering::Acquire);
    act.sa_flags = HELD_FLAGS[k].load(Ordering::Acquire);
    // SAFETY: act.sa_mask is valid storage; act is a valid action; raise is async-signal-safe.
    unsafe {
        libc::sigfillset(&mut act.sa_mask);
        real::sigaction(sig, &act, std::ptr::null_mut());
        libc::raise(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn runtime_exit(_sig: c_int) {}

    fn action(handler: usize, flags: c_int) -> libc::sigaction {
        // SAFETY: a zeroed sigaction is valid.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = handler;
        act.sa_flags = flags;
        act
    }

    /// Sets `act` for SIGTERM through the shim (`default`: the kernel modes).
    ///
    /// # Safety
    /// `act` is a valid action for SIGTERM in this test process.
    unsafe fn set(act: &libc::sigaction, default: bool) {
        // SAFETY: caller contract.
        let rc = unsafe { sigaction(libc::SIGTERM, act, std::ptr::null_mut(), default) };
        assert_eq!(rc, 0);
    }

    /// What is installed for SIGTERM, and what the server is told is installed.
    fn installed() -> (usize, usize) {
        // SAFETY: zeroed actions are valid storage; a null act only reads.
        unsafe {
            let mut real_old: libc::sigaction = std::mem::zeroed();
            real::sigaction(libc::SIGTERM, std::ptr::null(), &mut real_old);
            let mut told: libc::sigaction = std::mem::zeroed();
            assert_eq!(
                sigaction(libc::SIGTERM, std::ptr::null(), &mut told, false),
                0
            );
            (real_old.sa_sigaction, told.sa_sigaction)
        }
    }

    /// Events `epfd` reports within `ms` milliseconds (returning as soon as there are any).
    fn ready(epfd: c_int, ms: c_int) -> c_int {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: evs holds 4 events.
        unsafe { libc::epoll_wait(epfd, evs.as_mut_ptr(), 4, ms) }
    }

    /// Whether this process has a timer with kernel id `id`.
    fn timer_exists(id: c_int) -> bool {
        // SAFETY: a zeroed itimerspec is valid storage for the kernel to fill.
        let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: as above; an unknown id fails with EINVAL and writes nothing.
        unsafe {
            libc::syscall(
                libc::SYS_timer_gettime,
                id,
                &mut its as *mut libc::itimerspec,
            ) == 0
        }
    }

    #[test]
    fn the_deadline_timer_is_armed_at_the_drain_and_deleted_when_the_hold_ends() {
        // SIGURG: ignored by default, so a timer that ran would do nothing here.
        arm(libc::SIGURG, 60_000_000_000);
        let t = TIMER.load(Ordering::Acquire);
        assert_ne!(t & ARMED, 0, "armed");
        let id = t as u32 as c_int;
        assert!(timer_exists(id));
        assert!(!past_deadline(), "60 s away");
        disarm();
        assert_eq!(TIMER.load(Ordering::Acquire), 0);
        assert!(!timer_exists(id), "the kernel timer is deleted");
        assert!(!past_deadline(), "no deadline once disarmed");
        // A deadline that has come.
        arm(libc::SIGURG, 1_000_000);
        let start = std::time::Instant::now();
        while !past_deadline() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "1 ms deadline"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        disarm();
    }

    #[test]
    fn drained_listener_registrations_report_nothing_and_closing_forgets_them() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let fd = listener.as_raw_fd();
        // SAFETY: a new epoll set, owned (and closed, even on a failed assertion) below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` was just created and nobody else owns it.
        let set = unsafe { OwnedFd::from_raw_fd(raw) };
        let epfd = set.as_raw_fd();
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 77,
        };
        // SAFETY: a valid set, fd and event.
        unsafe {
            assert_eq!(libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev), 0);
            registered(epfd, libc::EPOLL_CTL_ADD, fd, &ev);
        }
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(
            ready(epfd, 5_000),
            1,
            "a connection waits: the listener is reported"
        );
        stop_taking();
        assert_eq!(
            ready(epfd, 0),
            0,
            "drained: the registration reports nothing"
        );
        // Kept, so the server's own later MOD and DEL still find it.
        // SAFETY: as above.
        unsafe {
            assert_eq!(libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev), 0);
        }
        assert_eq!(ready(epfd, 0), 1, "the server's own MOD restores it");
        let recorded = |v: u64| REGISTERED.iter().any(|r| r.load(Ordering::SeqCst) == v);
        assert!(recorded(registration(epfd, fd)));
        closing(fd);
        assert!(
            !recorded(registration(epfd, fd)),
            "closing the listener forgets it"
        );
    }

    #[test]
    fn a_one_shot_sigterm_handler_or_in_the_kernel_modes_the_default_is_held_and_any_other_action_replaces_the_shims()
     {
        let exit = runtime_exit as *const () as usize;
        // SAFETY: valid actions for SIGTERM in this test process; none is raised.
        unsafe {
            // A runtime's exit path (node's): the shim's handler runs, the server is told its own.
            let one_shot = action(exit, libc::SA_RESETHAND);
            set(&one_shot, false);
            assert_eq!(installed(), (mine_addr(), exit));
            assert_eq!(HELD[0].load(Ordering::Acquire), exit);
            assert!(HOLDING[0].load(Ordering::Acquire));
            // The app's own handler (not one-shot) replaces it, as it would the runtime's.
            let own = action(exit, libc::SA_RESTART);
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(sigaction(libc::SIGTERM, &own, &mut old, false), 0);
            assert_eq!(
                old.sa_sigaction, exit,
                "told the action it replaced was its own"
            );
            assert_eq!(installed(), (exit, exit));
            assert!(!HOLDING[0].load(Ordering::Acquire));
            // Back to the default: nothing held.
            let default = action(libc::SIG_DFL, 0);
            set(&default, false);
            assert_eq!(installed(), (libc::SIG_DFL, libc::SIG_DFL));
            assert!(!HOLDING[0].load(Ordering::Acquire));
            // The kernel modes hold the default action too; the server is told the default.
            set(&default, true);
            assert_eq!(installed(), (mine_addr(), libc::SIG_DFL));
            assert!(HOLDING[0].load(Ordering::Acquire));
            assert_eq!(HELD[0].load(Ordering::Acquire), libc::SIG_DFL);
            // Ignoring it is the server's to choose: nothing held.
            let ignore = action(libc::SIG_IGN, 0);
            set(&ignore, true);
            assert_eq!(installed(), (libc::SIG_IGN, libc::SIG_IGN));
            assert!(!HOLDING[0].load(Ordering::Acquire));
            set(&default, false);
        }
    }
}
