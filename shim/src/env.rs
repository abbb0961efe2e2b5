//! The worker contract's environment (docs/PROTOCOL.md): read once by the constructor, before
//! `main`. The constructor then removes only our own `LD_PRELOAD` entry, so that nothing the
//! server starts loads the shim; the contract's variables (`RCLUSTER_*`, `LISTEN_*`, `PORT`,
//! `NOTIFY_SOCKET`) stay for the server to read. Keeping `RCLUSTER_*` out of the server's
//! children is the exec and spawn hooks' job (follow.rs). Runs single-threaded (before `main`),
//! which is what makes `unsetenv`/`setenv` safe here.

use std::ffi::{CStr, CString};
use std::net::SocketAddr;

pub use rcluster_proto::Mode;

/// What the master told this worker.
#[derive(Debug)]
pub struct Contract {
    /// `RCLUSTER_MODE`.
    pub mode: Mode,
    /// `RCLUSTER_LISTEN`: listener i's address; fd 3+i belongs to it.
    pub listen: Vec<SocketAddr>,
    /// `NOTIFY_SOCKET`, if set.
    pub notify_socket: Option<Vec<u8>>,
    /// `RCLUSTER_STEER_FD` and `RCLUSTER_WORKER_ID`: the steering table's fd and this
    /// worker's slot in it (kernel steering only).
    pub steer: Option<(libc::c_int, usize)>,
    /// `RCLUSTER_STEER_OVERFLOW_FD`: listener 0's overflow queue (listener i's at this + i).
    pub overflow: Option<libc::c_int>,
    /// `RCLUSTER_DRAIN_HOLD_MS`: how long a drain or stop signal the server would die of may
    /// be held (drain.rs).
    pub drain_hold: Option<std::time::Duration>,
}

fn getenv(name: &CStr) -> Option<Vec<u8>> {
    // SAFETY: name is NUL-terminated; the result, if not null, is a NUL-terminated string that
    // stays valid until the environment is modified, and it is copied at once.
    unsafe {
        let p = libc::getenv(name.as_ptr());
        (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes().to_vec())
    }
}

/// Reads the contract (rcluster-proto's definition, the same the master writes). `Ok(None)`:
/// not started by rcluster-lb (no `RCLUSTER_MODE`), or started for another process
/// (`LISTEN_PID` is not ours), so the shim stays out of the way. `Err`: started by it, but the
/// environment is inconsistent.
pub fn read() -> Result<Option<Contract>, String> {
    if getenv(c"RCLUSTER_MODE").is_none() {
        return Ok(None);
    }
    let contract = rcluster_proto::Contract::from_vars(|name| {
        let name = CString::new(name).ok()?;
        getenv(&name).map(|v| String::from_utf8_lossy(&v).into_owned())
    })
    .map_err(|e| e.to_string())?;
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    // sd_listen_fds(3): the fds are for the process whose pid this is, not for a child that
    // inherited the environment (a wrapper script's helpers, say): such a process is simply not
    // a worker, so stay out of the way without a word.
    if contract.check_pid(me).is_err() {
        return Ok(None);
    }
    let listen = contract.listen_addrs().map_err(|e| e.to_string())?;
    if listen.is_empty() {
        return Err(format!(
            "{} names no address",
            rcluster_proto::env::RCLUSTER_LISTEN
        ));
    }
    Ok(Some(Contract {
        mode: contract.mode,
        listen,
        notify_socket: getenv(c"NOTIFY_SOCKET").filter(|v| !v.is_empty()),
        steer: contract.steer_fd.map(|fd| (fd, contract.id as usize)),
        overflow: contract.overflow_fd,
        drain_hold: contract.drain_hold,
    }))
}

fn base_name(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

/// The entries of an `LD_PRELOAD` value (ld.so(8): separated by spaces or colons), empty ones
/// included. Allocation-free.
pub fn preload_entries(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|&b| b == b':' || b == b' ')
}

/// Whether an `LD_PRELOAD` entry is this library: our path, or our file name. Allocation-free.
pub fn is_ours(entry: &[u8], ours: &[u8]) -> bool {
    entry == ours || base_name(entry) == base_name(ours)
}

/// `LD_PRELOAD` without the shim's own entry, the others joined with `:`.
pub fn preload_without(list: &[u8], ours: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len());
    for entry in preload_entries(list) {
        if entry.is_empty() || is_ours(entry, ours) {
            continue;
        }
        if !out.is_empty() {
            out.push(b':');
        }
        out.extend_from_slice(entry);
    }
    out
}

/// The path this library was loaded from (dladdr(3)), e.g. the `LD_PRELOAD` entry.
fn own_path() -> Vec<u8> {
    // SAFETY: Dl_info is plain data; zeroed is a valid value for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let here = own_path as fn() -> Vec<u8> as *const libc::c_void;
    // SAFETY: `here` is an address inside this library; info is valid storage.
    let ok = unsafe { libc::dladdr(here, &mut info) } != 0;
    if ok && !info.dli_fname.is_null() {
        // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic loader.
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_bytes()
            .to_vec()
    } else {
        b"librcluster_shim.so".to_vec()
    }
}

unsafe extern "C" {
    /// The process environment (environ(7)).
    pub static mut environ: *const *const libc::c_char;
}

/// What a same-process exec must carry over (follow.rs), recorded by [`scrub`].
#[derive(Debug, Default)]
pub struct Scrubbed {
    /// This library's path as it appeared in `LD_PRELOAD`: removed from the environment.
    pub shim_path: Vec<u8>,
    /// The `RCLUSTER_*=…` entries as the master set them. They stay in the environment; the
    /// copies let the next image of the worker get the contract exactly even if a wrapper
    /// changed or unset them.
    pub rcluster: Vec<CString>,
}

/// Removes our `LD_PRELOAD` entry (keeping any others), leaving every other variable —
/// `RCLUSTER_*`, `LISTEN_*`, `PORT`, `NOTIFY_SOCKET` — for the server, and records what
/// [`Scrubbed`] holds.
///
/// # Safety
/// Must run while no other thread can read or write the environment (the constructor).
pub unsafe fn scrub() -> Scrubbed {
    let shim_path = own_path();
    if let Some(list) = getenv(c"LD_PRELOAD") {
        let rest = preload_without(&list, &shim_path);
        // SAFETY: single-threaded (caller contract); the strings are NUL-terminated.
        unsafe {
            match CString::new(rest) {
                Ok(rest) if !rest.as_bytes().is_empty() => {
                    libc::setenv(c"LD_PRELOAD".as_ptr(), rest.as_ptr(), 1);
                }
                _ => {
                    libc::unsetenv(c"LD_PRELOAD".as_ptr());
                }
            }
        }
    }
    let mut rcluster = Vec::new();
    // SAFETY: environ is the NULL-terminated array of NUL-terminated strings libc maintains;
    // nobody modifies it concurrently (caller contract).
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let entry = CStr::from_ptr(*p);
            if entry.to_bytes().starts_with(b"RCLUSTER_") {
                rcluster.push(entry.to_owned());
            }
            p = p.add(1);
        }
    }
    Scrubbed {
        shim_path,
        rcluster,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_our_preload_entry() {
        let ours = b"/work/target/debug/librcluster_shim.so";
        assert_eq!(preload_without(ours, ours), b"");
        assert_eq!(
            preload_without(b"/a/libx.so:/other/librcluster_shim.so /b/liby.so", ours),
            b"/a/libx.so:/b/liby.so"
        );
        assert_eq!(preload_without(b"libx.so", ours), b"libx.so");
    }
}
