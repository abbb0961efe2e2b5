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

/// Whether `sig` would end the process `pid` at once: it neither catches nor ignores it
/// (`SigCgt`, `SigIgn` of `/proc/PID/status`) and the signal's default action is to
/// terminate. `None` when the status cannot be read (the process is gone).
pub fn dies_of(pid: Pid, sig: libc::c_int) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    dies_of_status(&status, sig)
}

/// [`dies_of`] for the text of a `/proc/PID/status`.
fn dies_of_status(status: &str, sig: libc::c_int) -> Option<bool> {
    let terminates = matches!(
        sig,
        libc::SIGHUP
            | libc::SIGINT
            | libc::SIGQUIT
            | libc::SIGTERM
            | libc::SIGUSR1
            | libc::SIGUSR2
            | libc::SIGALRM
    );
    let has = |field: &str| -> Option<bool> {
        let hex = status.lines().find_map(|l| l.strip_prefix(field))?.trim();
        let mask = u64::from_str_radix(hex, 16).ok()?;
        Some((1..=64).contains(&sig) && (mask >> (sig - 1)) & 1 == 1)
    };
    Some(terminates && !has("SigCgt:")? && !has("SigIgn:")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_neither_caught_nor_ignored_ends_the_process() {
        // SIGTERM is 15: bit 14 (0x4000); SIGINT 2: bit 1 (0x2); SIGPIPE 13: bit 12 (0x1000).
        let status = |cgt: &str, ign: &str| {
            format!("Name:\tnode\nSigBlk:\t0000000000000000\nSigIgn:\t{ign}\nSigCgt:\t{cgt}\n")
        };
        let plain = status("0000000000000002", "0000000000001000");
        assert_eq!(dies_of_status(&plain, libc::SIGTERM), Some(true));
        assert_eq!(dies_of_status(&plain, libc::SIGINT), Some(false), "caught");
        let handles_term = status("0000000000004002", "0000000000001000");
        assert_eq!(dies_of_status(&handles_term, libc::SIGTERM), Some(false));
        let ignores_term = status("0000000000000000", "0000000000004000");
        assert_eq!(dies_of_status(&ignores_term, libc::SIGTERM), Some(false));
        // A signal whose default action is not to end the process.
        assert_eq!(dies_of_status(&plain, libc::SIGWINCH), Some(false));
        assert_eq!(dies_of_status("Name:\tx\n", libc::SIGTERM), None);
    }

    #[test]
    fn a_process_is_read_from_proc() {
        // `sleep` catches nothing.
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id() as Pid;
        let got = dies_of(pid, libc::SIGTERM);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(got, Some(true));
        assert_eq!(dies_of(pid, libc::SIGTERM), None, "reaped: no status");
    }
}
