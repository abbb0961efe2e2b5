//! Following the worker across `exec`. When the process started as the worker replaces its own
//! image — a wrapper handing over to the real server: `sh -c 'exec server'`, `/usr/bin/env`,
//! pyenv's `python3` shim script — the new image gets the contract back: our `LD_PRELOAD`
//! entry, the `RCLUSTER_*` variables and fds 3+i without close-on-exec. A child (fork, vfork,
//! posix_spawn: another pid) never does; keeping the shim out of children is why the
//! constructor scrubs the environment and marks fds 3+i close-on-exec in the first place.

use std::ffi::{CStr, CString, c_char};

use crate::env::{Scrubbed, preload_without};
use crate::listener::Listener;

/// What a same-process exec carries over.
pub struct Follow {
    /// The worker's pid (`LISTEN_PID`): exec keeps it, fork does not.
    pid: libc::pid_t,
    scrubbed: Scrubbed,
}

/// An environment block for the new image, and the strings it points into.
pub struct ExecEnv {
    _owned: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl ExecEnv {
    /// The NULL-terminated `envp` array.
    pub fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }
}

impl Follow {
    /// Remembers what the constructor removed, for the calling (worker) process.
    pub fn new(scrubbed: Scrubbed) -> Follow {
        Follow {
            // SAFETY: getpid cannot fail.
            pid: unsafe { libc::getpid() },
            scrubbed,
        }
    }

    /// Whether an exec by the calling process replaces the worker itself (a real system call:
    /// a vfork child shares this memory but has its own pid).
    pub fn applies(&self) -> bool {
        // SAFETY: getpid cannot fail.
        unsafe { libc::getpid() == self.pid }
    }

    /// `envp` with any `LD_PRELOAD`/`RCLUSTER_*` replaced by the contract's: `LD_PRELOAD`
    /// becomes our path followed by whatever other entries `envp` had.
    ///
    /// # Safety
    /// `envp` is null or a NULL-terminated array of NUL-terminated strings.
    pub unsafe fn exec_env(&self, envp: *const *const c_char) -> ExecEnv {
        let ours = &self.scrubbed.shim_path;
        let mut preload = b"LD_PRELOAD=".to_vec();
        preload.extend_from_slice(ours);
        let mut ptrs = Vec::new();
        let mut p = envp;
        // SAFETY: caller contract: walk until the NULL terminator.
        unsafe {
            while !p.is_null() && !(*p).is_null() {
                let entry = CStr::from_ptr(*p).to_bytes();
                if let Some(others) = entry.strip_prefix(b"LD_PRELOAD=") {
                    let others = preload_without(others, ours);
                    if !others.is_empty() {
                        preload.push(b':');
                        preload.extend_from_slice(&others);
                    }
                } else if !entry.starts_with(b"RCLUSTER_") {
                    ptrs.push(*p);
                }
                p = p.add(1);
            }
        }
        let mut owned: Vec<CString> = self.scrubbed.rcluster.clone();
        owned.extend(CString::new(preload).ok());
        ptrs.extend(owned.iter().map(|s| s.as_ptr()));
        ptrs.push(std::ptr::null());
        ExecEnv {
            _owned: owned,
            ptrs,
        }
    }
}

/// Makes fds 3+i survive the exec (`inherit = true`) or not (after a failed exec), for those
/// that still are our listeners.
pub fn set_inheritable(listeners: &[Listener], inherit: bool) {
    for l in listeners {
        if l.is_same_file(l.inherited_fd) {
            let flags = if inherit { 0 } else { libc::FD_CLOEXEC };
            // SAFETY: fcntl on an fd verified to be our listener.
            unsafe { libc::fcntl(l.inherited_fd, libc::F_SETFD, flags) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(env: &ExecEnv) -> Vec<String> {
        let mut out = Vec::new();
        let mut p = env.as_ptr();
        // SAFETY: ExecEnv is a NULL-terminated array of C strings.
        unsafe {
            while !(*p).is_null() {
                out.push(CStr::from_ptr(*p).to_str().unwrap().to_string());
                p = p.add(1);
            }
        }
        out
    }

    #[test]
    fn exec_env_restores_the_contract() {
        let follow = Follow::new(Scrubbed {
            shim_path: b"/x/librcluster_shim.so".to_vec(),
            rcluster: vec![c"RCLUSTER_MODE=dispatch".to_owned()],
        });
        let input = [
            c"PATH=/bin".as_ptr(),
            c"LD_PRELOAD=/y/libother.so".as_ptr(),
            c"RCLUSTER_MODE=stale".as_ptr(),
            std::ptr::null(),
        ];
        // SAFETY: input is a NULL-terminated array of C strings.
        let env = unsafe { follow.exec_env(input.as_ptr()) };
        assert_eq!(
            collect(&env),
            [
                "PATH=/bin",
                "RCLUSTER_MODE=dispatch",
                "LD_PRELOAD=/x/librcluster_shim.so:/y/libother.so"
            ]
        );
        assert!(follow.applies());
    }
}
