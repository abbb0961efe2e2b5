//! A runtime's own exit handler for SIGTERM, in dispatch mode: what a node app without a
//! SIGTERM handler of its own runs.
//!
//! Node installs a handler for SIGTERM before any of the app's code runs: it restores the
//! terminal and ends the process (one-shot, `SA_RESETHAND`, then the signal again). So to the
//! master (`SigCgt` in `/proc/PID/status`) every node process catches SIGTERM, and the master
//! cannot hold the drain signal back until a plain node app has answered what it holds, as it
//! does for a server that does not catch it (the supervisor's `defer_drain`). The shim can tell:
//! a one-shot handler installed for SIGTERM is such an exit path, not a graceful stop.
//!
//! So, in dispatch mode, when the server installs a one-shot handler for SIGTERM, the shim
//! installs its own in its place and keeps the server's aside; asking for the current action
//! still answers the server's. On SIGTERM the shim's handler notes that the worker is
//! draining: the master sends it no more connections, it serves the ones it holds, and once its
//! last one is closed (or at once if it holds none) the shim puts the server's handler back and
//! raises SIGTERM, which ends the process as before, with nothing cut. The master's SIGKILL at
//! `--grace` still bounds it. Any other action the server sets for SIGTERM (its own handler
//! through `process.on('SIGTERM')`, `SIG_DFL`, `SIG_IGN`) replaces the shim's, as it would have
//! replaced the runtime's.
//!
//! The kernel modes are left alone: there a drained worker shares its slot's listener with its
//! replacement until it exits, so it would never run out of connections.
//!
//! Signal context: the handler only reads atomics, counts the worker's open connections
//! (`procs`, atomics) and calls `sigaction` and `raise`, all async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use libc::c_int;

use crate::real;

/// The server's one-shot handler for SIGTERM, held aside while the shim's is installed
/// (0: none held).
static HELD: AtomicUsize = AtomicUsize::new(0);
/// Its `sa_flags`.
static HELD_FLAGS: AtomicI32 = AtomicI32::new(0);
/// SIGTERM arrived while a handler was held: the worker drains.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Whether an action for SIGTERM is a runtime's exit path: a one-shot handler.
fn is_exit_path(act: &libc::sigaction) -> bool {
    act.sa_sigaction != libc::SIG_DFL
        && act.sa_sigaction != libc::SIG_IGN
        && act.sa_sigaction != mine_addr()
        && act.sa_flags & libc::SA_RESETHAND != 0
}

/// sigaction(2) for SIGTERM in dispatch mode (the caller checks both).
///
/// # Safety
/// As sigaction(2).
pub unsafe fn sigaction(act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let was_held = HELD.load(Ordering::Acquire);
    let was_flags = HELD_FLAGS.load(Ordering::Acquire);
    let rc = if act.is_null() {
        // SAFETY: caller contract.
        unsafe { real::sigaction(libc::SIGTERM, act, old) }
    } else {
        // SAFETY: caller contract: act points to a valid action.
        let wanted = unsafe { &*act };
        if is_exit_path(wanted) {
            let mut mine = *wanted;
            mine.sa_sigaction = mine_addr();
            mine.sa_flags = (wanted.sa_flags | libc::SA_SIGINFO) & !libc::SA_RESETHAND;
            // SAFETY: mine is a valid action; old as the caller's.
            let rc = unsafe { real::sigaction(libc::SIGTERM, &mine, old) };
            if rc == 0 {
                HELD_FLAGS.store(wanted.sa_flags, Ordering::Release);
                HELD.store(wanted.sa_sigaction, Ordering::Release);
            }
            rc
        } else {
            // SAFETY: caller contract.
            let rc = unsafe { real::sigaction(libc::SIGTERM, act, old) };
            if rc == 0 {
                HELD.store(0, Ordering::Release);
            }
            rc
        }
    };
    // The server asked what was installed: its own action, not the shim's.
    if rc == 0 && !old.is_null() && was_held != 0 {
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

/// The shim's SIGTERM handler while the server's one-shot one is held.
extern "C" fn handler(_sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    DRAINING.store(true, Ordering::Release);
    if open_connections() == 0 {
        finish();
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

/// Puts the server's handler back and raises SIGTERM: the process ends as the runtime ends
/// it. Delivered when the shim's handler returns if called from it, at once otherwise.
fn finish() {
    let held = HELD.swap(0, Ordering::AcqRel);
    if held == 0 {
        return;
    }
    // SAFETY: a zeroed sigaction is valid; the mask is filled before use.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = held;
    act.sa_flags = HELD_FLAGS.load(Ordering::Acquire);
    // SAFETY: act.sa_mask is valid storage; act is a valid action; raise is async-signal-safe.
    unsafe {
        libc::sigfillset(&mut act.sa_mask);
        real::sigaction(libc::SIGTERM, &act, std::ptr::null_mut());
        libc::raise(libc::SIGTERM);
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

    /// What is installed for SIGTERM, and what the server is told is installed.
    fn installed() -> (usize, usize) {
        // SAFETY: zeroed actions are valid storage; a null act only reads.
        unsafe {
            let mut real_old: libc::sigaction = std::mem::zeroed();
            real::sigaction(libc::SIGTERM, std::ptr::null(), &mut real_old);
            let mut told: libc::sigaction = std::mem::zeroed();
            assert_eq!(sigaction(std::ptr::null(), &mut told), 0);
            (real_old.sa_sigaction, told.sa_sigaction)
        }
    }

    #[test]
    fn a_one_shot_sigterm_handler_is_held_and_any_other_action_replaces_the_shims() {
        let exit = runtime_exit as *const () as usize;
        // SAFETY: valid actions for SIGTERM in this test process; none is raised.
        unsafe {
            // A runtime's exit path (node's): the shim's handler runs, the server is told its own.
            let one_shot = action(exit, libc::SA_RESETHAND);
            assert_eq!(sigaction(&one_shot, std::ptr::null_mut()), 0);
            assert_eq!(installed(), (mine_addr(), exit));
            assert_eq!(HELD.load(Ordering::Acquire), exit);
            // The app's own handler (not one-shot) replaces it, as it would the runtime's.
            let own = action(exit, libc::SA_RESTART);
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(sigaction(&own, &mut old), 0);
            assert_eq!(
                old.sa_sigaction, exit,
                "told the action it replaced was its own"
            );
            assert_eq!(installed(), (exit, exit));
            assert_eq!(HELD.load(Ordering::Acquire), 0);
            // Back to the default: nothing held.
            let default = action(libc::SIG_DFL, 0);
            assert_eq!(sigaction(&default, std::ptr::null_mut()), 0);
            assert_eq!(installed(), (libc::SIG_DFL, libc::SIG_DFL));
        }
    }
}
