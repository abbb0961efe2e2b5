//! The worker contract's environment (docs/PROTOCOL.md): read once by the constructor, before
//! `main`. The constructor then removes only our own `LD_PRELOAD` entry, so that nothing the
//! server starts loads the shim; the contract's variables (`RCLUSTER_*`, `LISTEN_*`, `PORT`,
//! `NOTIFY_SOCKET`) stay for the server to read. Keeping `RCLUSTER_*` out of the server's
//! children is the exec and spawn hooks' job (follow.rs). Runs single-threaded (before `main`),
//! which is what makes `unsetenv`/`setenv` safe here.

use std::ffi::{CStr, CString};
use std::net::SocketAddr;

/// How fd 3+i was set up by the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// fd 3+i is a SOCK_SEQPACKET channel; connections arrive as CONN messages.
    Dispatch,
    /// fd 3+i is this worker's own SO_REUSEPORT listening socket.
    Reuseport,
    /// fd 3+i is a listening socket shared by all workers.
    Shared,
}

/// At most this many listeners (the connection table stores the index in 8 bits; the master's
/// spawner passes at most 64 fds).
pub const MAX_LISTENERS: usize = 64;

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
}

fn getenv(name: &CStr) -> Option<Vec<u8>> {
    // SAFETY: name is NUL-terminated; the result, if not null, is a NUL-terminated string that
    // stays valid until the environment is modified, and it is copied at once.
    unsafe {
        let p = libc::getenv(name.as_ptr());
        (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes().to_vec())
    }
}

/// Parses `RCLUSTER_MODE`.
pub fn parse_mode(v: &[u8]) -> Option<Mode> {
    match v {
        b"dispatch" => Some(Mode::Dispatch),
        b"reuseport" => Some(Mode::Reuseport),
        b"shared" => Some(Mode::Shared),
        _ => None,
    }
}

/// Parses `RCLUSTER_LISTEN`: `addr0,addr1,…` with IPv6 in brackets (`127.0.0.1:8080,[::1]:9000`).
pub fn parse_listen(v: &[u8]) -> Result<Vec<SocketAddr>, String> {
    let s = std::str::from_utf8(v).map_err(|_| "RCLUSTER_LISTEN is not UTF-8".to_string())?;
    let addrs = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("RCLUSTER_LISTEN entry {a:?} is not ip:port"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err("RCLUSTER_LISTEN names no address".into());
    }
    if addrs.len() > MAX_LISTENERS {
        return Err(format!("more than {MAX_LISTENERS} listeners"));
    }
    Ok(addrs)
}

/// Parses a decimal number such as `LISTEN_PID` (the master writes it zero-padded).
pub fn parse_number(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Reads the contract. `Ok(None)`: not started by rcluster-lb (no `RCLUSTER_MODE`), so the shim
/// stays out of the way. `Err`: started by it, but the environment is inconsistent.
pub fn read() -> Result<Option<Contract>, String> {
    let Some(mode) = getenv(c"RCLUSTER_MODE") else {
        return Ok(None);
    };
    let mode = parse_mode(&mode).ok_or_else(|| {
        format!(
            "RCLUSTER_MODE={:?} is not dispatch|reuseport|shared",
            String::from_utf8_lossy(&mode)
        )
    })?;
    let listen = parse_listen(&getenv(c"RCLUSTER_LISTEN").unwrap_or_default())?;
    if let Some(k) = getenv(c"LISTEN_FDS") {
        let k = parse_number(&k).ok_or("LISTEN_FDS is not a number")?;
        if k != listen.len() as u64 {
            return Err(format!(
                "LISTEN_FDS={k} but RCLUSTER_LISTEN names {} addresses",
                listen.len()
            ));
        }
    }
    if let Some(pid) = getenv(c"LISTEN_PID") {
        // SAFETY: getpid cannot fail.
        let me = unsafe { libc::getpid() };
        // sd_listen_fds(3): the fds are for the process whose pid this is, not for a child
        // that inherited the environment (a wrapper script's helpers, say): such a process is
        // simply not a worker, so stay out of the way without a word.
        if parse_number(&pid) != u64::try_from(me).ok() {
            return Ok(None);
        }
    }
    Ok(Some(Contract {
        mode,
        listen,
        notify_socket: getenv(c"NOTIFY_SOCKET").filter(|v| !v.is_empty()),
        steer: steer_vars(
            getenv(c"RCLUSTER_STEER_FD").as_deref(),
            getenv(c"RCLUSTER_WORKER_ID").as_deref(),
        ),
    }))
}

/// The steering table's fd and slot, when both variables are numbers (a fd above 2).
pub fn steer_vars(fd: Option<&[u8]>, slot: Option<&[u8]>) -> Option<(libc::c_int, usize)> {
    let fd = libc::c_int::try_from(parse_number(fd?)?)
        .ok()
        .filter(|&fd| fd > 2)?;
    let slot = usize::try_from(parse_number(slot?)?).ok()?;
    Some((fd, slot))
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
    fn parses_the_contract_values() {
        assert_eq!(parse_mode(b"dispatch"), Some(Mode::Dispatch));
        assert_eq!(parse_mode(b"shared"), Some(Mode::Shared));
        assert_eq!(parse_mode(b"Dispatch"), None);
        let l = parse_listen(b"127.0.0.1:8080,[::1]:9000").unwrap();
        assert_eq!(
            l,
            [
                "127.0.0.1:8080".parse().unwrap(),
                "[::1]:9000".parse().unwrap()
            ]
        );
        assert!(parse_listen(b"").is_err());
        assert!(parse_listen(b"localhost:80").is_err());
        assert_eq!(parse_number(b"00000000000000012345"), Some(12345));
        assert_eq!(parse_number(b"x"), None);
    }

    #[test]
    fn reads_the_steering_variables() {
        assert_eq!(steer_vars(Some(b"4"), Some(b"1")), Some((4, 1)));
        assert_eq!(
            steer_vars(Some(b"1"), Some(b"1")),
            None,
            "stdio is never the table"
        );
        assert_eq!(steer_vars(Some(b"x"), Some(b"1")), None);
        assert_eq!(steer_vars(None, Some(b"1")), None);
        assert_eq!(steer_vars(Some(b"4"), None), None);
    }

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
