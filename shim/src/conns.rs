//! Which fds are connections the shim handed out, and from which listener: a lock-free table
//! indexed by fd number, so `close` of any other fd costs one atomic load and no lock.
//!
//! One `u32` per fd: 0 = not ours, else `pid << 8 | (listener + 1)`. The pid is the process
//! that accepted the connection, so that after `fork` a child closing inherited connections,
//! or a `vfork` child (which shares this memory) closing them before `exec`, neither clears the
//! parent's entries nor reports a CLOSED for connections the parent still holds.
//!
//! Races between threads: `accept` marks the fd before returning it (nobody else knows the
//! number yet); `close` clears the entry with a compare-exchange *before* the real close, so a
//! concurrent `accept` that is handed the same number right after the real close marks its own
//! entry and is not wiped; of two threads closing the same fd only one wins the exchange.
//!
//! The table is an anonymous private mapping sized from `RLIMIT_NOFILE` (hard limit, capped),
//! touched only where fds are: a few pages in practice.

use std::sync::atomic::{AtomicU32, Ordering};

/// Upper bound on table entries (16 MiB of address space, untouched pages cost nothing).
const MAX_FDS: usize = 1 << 22;
/// Table size when `RLIMIT_NOFILE` cannot be read.
const FALLBACK_FDS: usize = 1 << 16;

/// The fd → listener table.
pub struct ConnTable {
    slots: &'static [AtomicU32],
}

/// What `mark` found in the slot it overwrote.
#[derive(Debug, PartialEq, Eq)]
pub enum Marked {
    /// The slot was free: the normal case.
    Fresh,
    /// The slot still named a connection of ours: it was closed by a path the shim does not see
    /// (`close_range`, `fclose` of an `fdopen` stream, a raw system call), since the kernel only
    /// reuses free numbers. The caller reports it closed now, late but exactly once.
    Stale(usize),
    /// The fd is beyond the table: the connection cannot be tracked.
    Untracked,
}

fn encode(pid: u32, listener: usize) -> u32 {
    (pid << 8) | (listener as u32 + 1)
}

/// (pid, listener) of a non-zero entry.
fn owner(entry: u32) -> (u32, usize) {
    (entry >> 8, ((entry & 0xff) as usize).saturating_sub(1))
}

impl ConnTable {
    /// Maps a table for this process's fd limit. Never fails: without memory the table is empty
    /// and every connection is reported closed as soon as it is handed out (see [`Marked`]).
    pub fn new() -> ConnTable {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: lim is valid storage for getrlimit's result.
        let want = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            usize::try_from(lim.rlim_max.max(lim.rlim_cur)).unwrap_or(MAX_FDS)
        } else {
            FALLBACK_FDS
        }
        .clamp(1024, MAX_FDS);
        let bytes = want * std::mem::size_of::<AtomicU32>();
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return ConnTable { slots: &[] };
        }
        // SAFETY: the mapping is `bytes` long, zero-filled (a valid AtomicU32 is any u32),
        // page-aligned, and never unmapped, so it lives for 'static.
        let slots = unsafe { std::slice::from_raw_parts(p.cast::<AtomicU32>(), want) };
        ConnTable { slots }
    }

    #[cfg(test)]
    fn with_len(len: usize) -> ConnTable {
        let v: Vec<AtomicU32> = (0..len).map(|_| AtomicU32::new(0)).collect();
        ConnTable {
            slots: Vec::leak(v),
        }
    }

    fn slot(&self, fd: libc::c_int) -> Option<&AtomicU32> {
        usize::try_from(fd).ok().and_then(|i| self.slots.get(i))
    }

    /// Records that `fd` is a connection from `listener`, accepted by process `pid`.
    pub fn mark(&self, fd: libc::c_int, listener: usize, pid: u32) -> Marked {
        let Some(slot) = self.slot(fd) else {
            return Marked::Untracked;
        };
        let old = slot.swap(encode(pid, listener), Ordering::AcqRel);
        match owner(old) {
            (p, l) if old != 0 && p == pid => Marked::Stale(l),
            _ => Marked::Fresh,
        }
    }

    /// Whether `fd` is tracked at all (any process): the cheap test every `close` makes.
    pub fn is_marked(&self, fd: libc::c_int) -> bool {
        self.slot(fd)
            .is_some_and(|s| s.load(Ordering::Acquire) != 0)
    }

    /// If `fd` is a connection accepted by `pid`, forgets it and returns its listener. Call
    /// before the real close.
    pub fn take(&self, fd: libc::c_int, pid: u32) -> Option<usize> {
        let slot = self.slot(fd)?;
        let entry = slot.load(Ordering::Acquire);
        if entry == 0 || owner(entry).0 != pid {
            return None;
        }
        slot.compare_exchange(entry, 0, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|e| owner(e).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_take_and_ownership() {
        let t = ConnTable::with_len(64);
        assert_eq!(t.mark(5, 2, 1000), Marked::Fresh);
        assert!(t.is_marked(5));
        assert_eq!(t.take(5, 1001), None, "a forked child does not own it");
        assert_eq!(t.take(5, 1000), Some(2));
        assert_eq!(t.take(5, 1000), None, "taken exactly once");
        assert!(!t.is_marked(5));
    }

    #[test]
    fn stale_entries_and_bounds() {
        let t = ConnTable::with_len(64);
        assert_eq!(t.mark(7, 0, 1000), Marked::Fresh);
        assert_eq!(t.mark(7, 1, 1000), Marked::Stale(0));
        assert_eq!(
            t.mark(7, 1, 2000),
            Marked::Fresh,
            "inherited entry of the parent"
        );
        assert_eq!(t.mark(64, 0, 1000), Marked::Untracked);
        assert_eq!(t.mark(-1, 0, 1000), Marked::Untracked);
        assert_eq!(t.take(64, 1000), None);
    }

    #[test]
    fn mapped_table_is_usable() {
        let t = ConnTable::new();
        assert!(t.slots.len() >= 1024);
        assert_eq!(t.mark(1023, 0, 1), Marked::Fresh);
        assert_eq!(t.take(1023, 1), Some(0));
    }
}
