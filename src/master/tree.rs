//! A worker's process tree (supervisor thread). Every worker leads its own process group
//! (`setpgid(0, 0)` in the child before `execve`, rcluster-sys's spawn), and the processes it
//! forks stay in that group unless they move themselves (`setsid`, `setpgid`). So the master
//! signals the group, not the pid: the drain signal, SIGTERM at shutdown and every SIGKILL
//! reach a worker's helpers too, and once a worker has exited, whatever it left in its group is
//! SIGKILLed before the worker is reaped (while the exited worker, a zombie, still holds its
//! pid and so its group id: the id cannot have been reused by anyone else). After the master
//! stops cleanly no process of any worker's group is left, so none keeps a listening socket.
//!
//! Not covered: a descendant that left the group (`setsid`, as daemons do) and, when the master
//! itself is SIGKILLed, the workers' descendants (the kernel's `PR_SET_PDEATHSIG` kills only
//! the direct children). A cgroup per master would cover both; it is not used.

use crate::sys::{self, Pid};

/// Sends `sig` to the worker's process group; to the worker alone if it moved to another group.
pub fn signal(pid: Pid, sig: libc::c_int) {
    let leads_own_group = sys::getpgid(pid).is_ok_and(|g| g == pid);
    if !leads_own_group || sys::killpg(pid, sig).is_err() {
        let _ = sys::kill(pid, sig);
    }
}

/// The worker `pid` has exited and is not yet reaped: SIGKILLs what is left in its group.
pub fn kill_leftovers(pid: Pid) {
    if sys::has_exited(pid).unwrap_or(false) {
        // ESRCH when the group is empty: nothing was left.
        let _ = sys::killpg(pid, libc::SIGKILL);
    }
}
