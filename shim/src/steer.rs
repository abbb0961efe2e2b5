//! Counting on the kernel-steering table (`RCLUSTER_STEER_FD`, docs/PROTOCOL.md): in reuseport
//! mode under `--steer kernel`, the master passes the fd of a `BPF_F_MMAPABLE` array whose line
//! for this worker's slot the steering program reads. The shim maps it once (constructor) and
//! adds one to `accepted` per connection the server accepts from a listener and to `closed` per
//! such connection it closes — before the real close, so a client that sees the FIN and
//! reconnects finds the slot's load already lower. Atomic adds on shared memory: no system call.
//!
//! The layout is `rcluster_proto::steer`, the one the master and the Rust worker API use.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use libc::c_int;
use rcluster_proto::steer::{
    ACCEPTED, CLOSED, MAX_SLOTS, REPORTING, REPORTING_SHIM, SLOT_SIZE, TABLE_SIZE,
};

/// This worker's line of the table.
pub struct SteerSlot {
    accepted: &'static AtomicU64,
    closed: &'static AtomicU64,
    /// The slot's `reporting` word: the shim counts only while it holds `REPORTING_SHIM`, so a
    /// server that counts itself (the Rust worker API stores `REPORTING_SELF`) is not counted
    /// twice.
    reporting: &'static AtomicU32,
    /// The inherited fd number and the identity of the map behind it, so a same-process exec
    /// can hand the table on (follow.rs) only while the number is still ours.
    fd: c_int,
    ident: Option<(u64, u64)>,
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
        if slot >= MAX_SLOTS || !is_bpf_map(fd) {
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
        let line = base.cast::<u8>().wrapping_add(slot * SLOT_SIZE);
        // SAFETY: the offsets are inside the TABLE_SIZE mapping and aligned (mmap returns a page
        // boundary, SLOT_SIZE and the offsets are multiples of 8); the mapping lives for the
        // rest of the process and is only accessed atomically, by everyone.
        let (accepted, closed, reporting) = unsafe {
            (
                AtomicU64::from_ptr(line.add(ACCEPTED).cast()),
                AtomicU64::from_ptr(line.add(CLOSED).cast()),
                AtomicU32::from_ptr(line.add(REPORTING).cast()),
            )
        };
        // Only on a fresh slot: one whose worker said it counts itself (an earlier generation
        // of the same server) stays so, or the old worker's shim would count again beside it.
        let _ = reporting.compare_exchange(0, REPORTING_SHIM, Ordering::SeqCst, Ordering::SeqCst);
        Some(SteerSlot {
            accepted,
            closed,
            reporting,
            fd,
            ident: crate::listener::ident_of(fd),
        })
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

    fn counting(&self) -> bool {
        self.reporting.load(Ordering::Relaxed) == REPORTING_SHIM
    }

    /// The server accepted a connection from a listener.
    pub fn accepted(&self) {
        if self.counting() {
            self.accepted.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The server is closing one (call before the real close).
    pub fn closed(&self) {
        if self.counting() {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }
}
