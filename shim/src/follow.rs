//! What an `exec` or `posix_spawn` by the server passes on.
//!
//! The worker itself keeps the contract in its environment (env.rs removes only our
//! `LD_PRELOAD` entry), so the server can read `RCLUSTER_WORKER_ID` and the rest. Two cases
//! when it runs another program:
//!
//! - **The worker replaces its own image** (same pid): a wrapper handing over to the real
//!   server — `sh -c 'exec server'`, `/usr/bin/env`, pyenv's `python3` shim script. The new
//!   image gets the contract back: our `LD_PRELOAD` entry, the `RCLUSTER_*` variables as the
//!   master set them, and fds 3+i without close-on-exec ([`Follow::exec_env`]).
//! - **A child** (another pid: the child of a `fork` or `vfork` calling exec, or any
//!   `posix_spawn`, which always creates one and execs where no hook can see it): the child's
//!   environment loses every `RCLUSTER_*` variable and our `LD_PRELOAD` entry
//!   ([`ChildEnv::filter`]), and fds 3+i stay close-on-exec. A child is not a worker.
//!
//! The child case runs in a `fork` child of a possibly threaded process or in a `vfork` child
//! sharing the parent's memory, so it must be async-signal-safe: no heap, no locks. It filters
//! the pointer array into a fixed buffer on the stack, reusing the original strings.

use std::ffi::{CStr, CString, c_char};
use std::marker::PhantomData;
use std::sync::OnceLock;

use crate::env::{Scrubbed, is_ours, preload_entries, preload_without};
use crate::listener::Listener;

/// What exec and spawn hooks need, for the process the master started.
pub struct Follow {
    /// The worker's pid (`LISTEN_PID`): exec keeps it, fork and vfork children do not.
    pid: libc::pid_t,
    scrubbed: Scrubbed,
}

static FOLLOW: OnceLock<Follow> = OnceLock::new();

/// Set by the constructor whenever the master's contract is present (even if inconsistent),
/// so that the server's children never see it.
pub fn install(scrubbed: Scrubbed) {
    let _ = FOLLOW.set(Follow::new(scrubbed));
}

/// The installed [`Follow`] (an atomic load: safe in a `vfork` child), or `None` when the
/// process was not started as a worker.
#[inline]
pub fn get() -> Option<&'static Follow> {
    FOLLOW.get()
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
    /// Remembers what the constructor recorded, for the calling (worker) process.
    pub fn new(scrubbed: Scrubbed) -> Follow {
        Follow {
            // SAFETY: getpid cannot fail.
            pid: unsafe { libc::getpid() },
            scrubbed,
        }
    }

    /// This library's `LD_PRELOAD` entry.
    pub fn shim_path(&self) -> &[u8] {
        &self.scrubbed.shim_path
    }

    /// Whether an exec by the calling process replaces the worker itself (a real system call:
    /// a vfork child shares this memory but has its own pid).
    pub fn applies(&self) -> bool {
        // SAFETY: getpid cannot fail.
        unsafe { libc::getpid() == self.pid }
    }

    /// `envp` with any `LD_PRELOAD`/`RCLUSTER_*` replaced by the contract's: `LD_PRELOAD`
    /// becomes our path followed by whatever other entries `envp` had. Allocates: only for the
    /// worker's own exec, never in a child.
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

/// At most this many variables in a filtered child environment. A larger environment is
/// passed through unchanged: filtering it would need memory the child cannot safely allocate,
/// and what leaks is harmless — the constructor already took our entry out of the server's own
/// `LD_PRELOAD`, so the child does not load the shim, and a shim loaded anyway stays inert in
/// a process whose pid is not `LISTEN_PID`.
pub const MAX_CHILD_ENV: usize = 2048;

/// Room for rewritten `LD_PRELOAD=…` entries (other libraries kept, ours removed). An entry
/// that does not fit is passed as it is: the shim it loads finds no `RCLUSTER_MODE` (removed
/// from the same environment) and passes every call through.
pub const PRELOAD_ROOM: usize = 4096;

/// Stack storage for a child's environment: [`MAX_CHILD_ENV`] + 1 pointers and
/// [`PRELOAD_ROOM`] bytes, about 20 KiB.
pub struct ChildEnv {
    ptrs: [*const c_char; MAX_CHILD_ENV + 1],
    preload: [u8; PRELOAD_ROOM],
}

/// An `envp` for the child: the caller's own array, or one in the [`ChildEnv`] it borrows.
pub struct ChildEnvp<'a> {
    ptr: *const *const c_char,
    _buf: PhantomData<&'a mut ChildEnv>,
}

impl ChildEnvp<'_> {
    /// The NULL-terminated `envp` array (null if the caller's was).
    pub fn as_ptr(&self) -> *const *const c_char {
        self.ptr
    }
}

/// What happens to one `LD_PRELOAD=…` entry of a child's environment.
enum Preload {
    /// Not ours (or no room to rewrite it): pass the original string.
    Keep,
    /// Only ours: leave the variable out.
    Drop,
    /// Ours and others: the others, rewritten into the buffer (string, bytes used).
    Rewritten(*const c_char, usize),
}

impl ChildEnv {
    /// Empty storage, meant to live on the stack of the exec or spawn hook.
    pub const fn new() -> ChildEnv {
        ChildEnv {
            ptrs: [std::ptr::null(); MAX_CHILD_ENV + 1],
            preload: [0; PRELOAD_ROOM],
        }
    }

    /// `envp` without `RCLUSTER_*` variables and without our entry in `LD_PRELOAD` (`ours`, as
    /// [`is_ours`] matches it). Returns `envp` itself when it is null, holds nothing to remove
    /// or has more than [`MAX_CHILD_ENV`] variables to keep; otherwise an array in `self`
    /// whose strings are `envp`'s own (valid as long as they are) or rewritten `LD_PRELOAD`
    /// entries in `self`. Async-signal-safe: no allocation, no locks, no panicking path.
    ///
    /// # Safety
    /// `envp` is null or a NULL-terminated array of NUL-terminated strings.
    pub unsafe fn filter<'a>(
        &'a mut self,
        envp: *const *const c_char,
        ours: &[u8],
    ) -> ChildEnvp<'a> {
        let unchanged = ChildEnvp {
            ptr: envp,
            _buf: PhantomData,
        };
        if envp.is_null() {
            return unchanged;
        }
        // Split borrows, taken once: each rewritten entry then borrows only bytes of
        // `preload` no earlier entry uses, so pointers to earlier entries stay valid.
        let ChildEnv { ptrs, preload } = self;
        let mut kept = 0;
        let mut used = 0;
        let mut changed = false;
        let mut p = envp;
        // SAFETY: caller contract: every element up to the NULL terminator is a C string.
        unsafe {
            while !(*p).is_null() {
                let entry = CStr::from_ptr(*p).to_bytes();
                let keep = if entry.starts_with(b"RCLUSTER_") {
                    None
                } else if let Some(list) = entry.strip_prefix(b"LD_PRELOAD=") {
                    let room = preload.get_mut(used..).unwrap_or_default();
                    match rewrite_preload(room, list, ours) {
                        Preload::Keep => Some(*p),
                        Preload::Drop => None,
                        Preload::Rewritten(s, len) => {
                            changed = true;
                            used += len;
                            Some(s)
                        }
                    }
                } else {
                    Some(*p)
                };
                match keep {
                    Some(s) => match ptrs.get_mut(kept) {
                        // The last slot is reserved for the terminator.
                        Some(slot) if kept < MAX_CHILD_ENV => {
                            *slot = s;
                            kept += 1;
                        }
                        _ => return unchanged,
                    },
                    None => changed = true,
                }
                p = p.add(1);
            }
        }
        if !changed {
            return unchanged;
        }
        match ptrs.get_mut(kept) {
            Some(end) => *end = std::ptr::null(),
            None => return unchanged,
        }
        ChildEnvp {
            ptr: ptrs.as_ptr(),
            _buf: PhantomData,
        }
    }
}

/// Decides about one `LD_PRELOAD` value, writing the rewritten `LD_PRELOAD=…` string at the
/// start of `room` if needed.
fn rewrite_preload(room: &mut [u8], list: &[u8], ours: &[u8]) -> Preload {
    let mentions_us = preload_entries(list).any(|e| !e.is_empty() && is_ours(e, ours));
    if !mentions_us {
        return Preload::Keep;
    }
    let mut w = Writer { buf: room, len: 0 };
    let mut others = 0;
    let mut fits = w.put(b"LD_PRELOAD=");
    for e in preload_entries(list) {
        if e.is_empty() || is_ours(e, ours) {
            continue;
        }
        if others > 0 {
            fits &= w.put(b":");
        }
        fits &= w.put(e);
        others += 1;
    }
    fits &= w.put(b"\0");
    if others == 0 {
        Preload::Drop
    } else if fits {
        Preload::Rewritten(w.buf.as_ptr().cast(), w.len)
    } else {
        Preload::Keep
    }
}

/// Appends to a fixed buffer; a `put` that does not fit writes nothing and returns false.
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> bool {
        let end = self.len.saturating_add(bytes.len());
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len = end;
                true
            }
            None => false,
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

    /// The strings of a NULL-terminated array.
    fn collect(mut p: *const *const c_char) -> Vec<String> {
        let mut out = Vec::new();
        // SAFETY: the tests pass NULL-terminated arrays of C strings.
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
            collect(env.as_ptr()),
            [
                "PATH=/bin",
                "RCLUSTER_MODE=dispatch",
                "LD_PRELOAD=/x/librcluster_shim.so:/y/libother.so"
            ]
        );
        assert!(follow.applies());
    }

    const OURS: &[u8] = b"/x/librcluster_shim.so";

    #[test]
    fn child_env_drops_the_contract_and_our_preload_entry() {
        let input = [
            c"PATH=/bin".as_ptr(),
            c"RCLUSTER_WORKER_ID=3".as_ptr(),
            c"LD_PRELOAD=/y/libother.so:/x/librcluster_shim.so /z/libz.so".as_ptr(),
            c"RCLUSTER_MODE=dispatch".as_ptr(),
            c"LISTEN_FDS=1".as_ptr(),
            c"XRCLUSTER_MODE=kept".as_ptr(),
            std::ptr::null(),
        ];
        let mut buf = ChildEnv::new();
        // SAFETY: input is a NULL-terminated array of C strings.
        let env = unsafe { buf.filter(input.as_ptr(), OURS) };
        assert_eq!(
            collect(env.as_ptr()),
            [
                "PATH=/bin",
                "LD_PRELOAD=/y/libother.so:/z/libz.so",
                "LISTEN_FDS=1",
                "XRCLUSTER_MODE=kept"
            ]
        );
        // Kept strings are the caller's own, not copies.
        // SAFETY: the filtered array has at least one element.
        assert_eq!(unsafe { *env.as_ptr() }, input[0]);
    }

    #[test]
    fn child_env_removes_a_preload_of_only_us_and_keeps_foreign_ones() {
        let input = [
            c"LD_PRELOAD=librcluster_shim.so".as_ptr(),
            c"A=1".as_ptr(),
            std::ptr::null(),
        ];
        let mut buf = ChildEnv::new();
        // SAFETY: input is a NULL-terminated array of C strings.
        let env = unsafe { buf.filter(input.as_ptr(), OURS) };
        assert_eq!(collect(env.as_ptr()), ["A=1"]);

        // Nothing to remove: the caller's array itself.
        let input = [
            c"LD_PRELOAD=/y/libother.so".as_ptr(),
            c"A=1".as_ptr(),
            std::ptr::null(),
        ];
        let mut buf = ChildEnv::new();
        // SAFETY: as above.
        let env = unsafe { buf.filter(input.as_ptr(), OURS) };
        assert_eq!(env.as_ptr(), input.as_ptr());

        let mut buf = ChildEnv::new();
        // SAFETY: null is allowed.
        let env = unsafe { buf.filter(std::ptr::null(), OURS) };
        assert!(env.as_ptr().is_null());
    }

    #[test]
    fn child_env_rewrites_several_preload_entries_into_its_buffer() {
        let input = [
            c"LD_PRELOAD=/a/liba.so:/x/librcluster_shim.so".as_ptr(),
            c"LD_PRELOAD=/x/librcluster_shim.so:/b/libb.so".as_ptr(),
            std::ptr::null(),
        ];
        let mut buf = ChildEnv::new();
        // SAFETY: input is a NULL-terminated array of C strings.
        let env = unsafe { buf.filter(input.as_ptr(), OURS) };
        assert_eq!(
            collect(env.as_ptr()),
            ["LD_PRELOAD=/a/liba.so", "LD_PRELOAD=/b/libb.so"]
        );
    }

    #[test]
    fn child_env_passes_a_preload_too_long_to_rewrite_as_is() {
        let long = format!(
            "LD_PRELOAD=/x/librcluster_shim.so:/{}/libother.so",
            "d".repeat(PRELOAD_ROOM)
        );
        let long = CString::new(long).unwrap();
        let input = [
            long.as_ptr(),
            c"RCLUSTER_MODE=dispatch".as_ptr(),
            std::ptr::null(),
        ];
        let mut buf = ChildEnv::new();
        // SAFETY: input is a NULL-terminated array of C strings.
        let env = unsafe { buf.filter(input.as_ptr(), OURS) };
        assert_eq!(collect(env.as_ptr()), [long.to_str().unwrap()]);
    }

    #[test]
    fn child_env_larger_than_the_buffer_passes_through() {
        let vars: Vec<CString> = (0..MAX_CHILD_ENV)
            .map(|i| CString::new(format!("V{i}=x")).unwrap())
            .collect();
        let mut input: Vec<*const c_char> = vars.iter().map(|v| v.as_ptr()).collect();
        input.push(c"RCLUSTER_MODE=dispatch".as_ptr());
        input.push(std::ptr::null());
        // Exactly MAX_CHILD_ENV to keep: filtered.
        let mut buf = ChildEnv::new();
        // SAFETY: input is a NULL-terminated array of C strings.
        let env = unsafe { buf.filter(input.as_ptr(), OURS) };
        assert_eq!(collect(env.as_ptr()).len(), MAX_CHILD_ENV);
        // One more: the caller's array, unchanged.
        let extra = c"W=y";
        input.insert(0, extra.as_ptr());
        let mut buf = ChildEnv::new();
        // SAFETY: as above.
        let env = unsafe { buf.filter(input.as_ptr(), OURS) };
        assert_eq!(env.as_ptr(), input.as_ptr());
    }
}
