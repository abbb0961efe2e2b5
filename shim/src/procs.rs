//! Connections held per process, for servers that fork their own workers from the process the
//! master started (gunicorn's arbiter, nginx's master process, any pre-fork server).
//!
//! The shim's state survives `fork` (it is the process's memory), so a forked child accepts
//! from the dispatch channel and reports its closes like the worker itself. What a child cannot
//! do is report the connections it held when it *dies*: the kernel closes them, no `close` hook
//! runs, and the master would count them active forever. So every process of a worker keeps
//! its count of open connections in one table shared by all of them (an anonymous
//! `MAP_SHARED` mapping made before any fork), and whoever learns that a process died reports
//! its remaining count as CLOSED:
//!
//! - the parent reaping it (`wait`, `waitpid`, `wait3`, `wait4`, `waitid` are hooked: a server
//!   that forks its workers reaps them);
//! - failing that (the parent ignores `SIGCHLD`, or reaps by a raw system call), any process of
//!   the worker that needs a free entry: entries of processes that no longer exist are reported
//!   and reused.
//!
//! An entry is `(pid << 8 | listener + 1, open)`; [`CAPACITY`] entries in all, so a worker can
//! have that many (process, listener) pairs with connections at once. A process that finds the
//! table full counts its connections as closed as soon as they are handed out (the master's
//! least-conn count then misses them; nothing else changes).

use std::sync::atomic::{AtomicU64, Ordering};

/// Entries in the shared table: (process, listener) pairs holding connections at once.
pub const CAPACITY: usize = 512;

struct Entry {
    key: AtomicU64,
    open: AtomicU64,
}

/// The shared table.
pub struct Procs {
    entries: &'static [Entry],
}

fn key(pid: u32, listener: usize) -> u64 {
    (u64::from(pid) << 8) | (listener as u64 + 1)
}

fn pid_of(key: u64) -> u32 {
    (key >> 8) as u32
}

fn listener_of(key: u64) -> usize {
    ((key & 0xff) as usize).saturating_sub(1)
}

/// Whether process `pid` is gone (not even a zombie).
fn gone(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) != 0 && *libc::__errno_location() == libc::ESRCH }
}

impl Procs {
    /// Maps the table, shared with every process forked from this one. Never fails: without
    /// memory the table is empty and [`Procs::opened`] reports `false`.
    pub fn new() -> Procs {
        let bytes = CAPACITY * std::mem::size_of::<Entry>();
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Procs { entries: &[] };
        }
        // SAFETY: the mapping is `bytes` long, zero-filled (zero is a valid AtomicU64), aligned
        // to a page, and never unmapped, so it lives for 'static.
        let entries = unsafe { std::slice::from_raw_parts(p.cast::<Entry>(), CAPACITY) };
        Procs { entries }
    }

    #[cfg(test)]
    fn leaked() -> Procs {
        let v: Vec<Entry> = (0..CAPACITY)
            .map(|_| Entry {
                key: AtomicU64::new(0),
                open: AtomicU64::new(0),
            })
            .collect();
        Procs {
            entries: Vec::leak(v),
        }
    }

    fn find(&self, k: u64) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.key.load(Ordering::Acquire) == k)
    }

    /// Process `pid` was handed a connection from `listener`. `false`: the table is full and the
    /// connection cannot be accounted (the caller reports it closed now). `report(listener, n)`
    /// receives what entries of dead processes still held, when one is reused.
    pub fn opened(&self, pid: u32, listener: usize, report: impl FnMut(usize, u64)) -> bool {
        let k = key(pid, listener);
        if let Some(e) = self.find(k) {
            e.open.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        let claim = |e: &Entry| {
            e.key
                .compare_exchange(0, k, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        if let Some(e) = self.entries.iter().find(|e| claim(e)) {
            e.open.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        // Full: reclaim the entries of processes that are gone, then try once more.
        self.sweep(report);
        if let Some(e) = self.entries.iter().find(|e| claim(e)) {
            e.open.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        false
    }

    /// The connections process `pid` holds, over every listener (atomics only: callable from
    /// a signal handler).
    pub fn open_of(&self, pid: u32) -> u64 {
        self.entries
            .iter()
            .filter(|e| {
                let k = e.key.load(Ordering::Acquire);
                k != 0 && pid_of(k) == pid
            })
            .map(|e| e.open.load(Ordering::Acquire))
            .sum()
    }

    /// A connection process `pid` was handed from `listener` is closed.
    pub fn closed(&self, pid: u32, listener: usize) {
        if let Some(e) = self.find(key(pid, listener)) {
            // Never below zero: a close the table did not see open (table was full) is ignored.
            let _ = e
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    /// Process `pid` has exited (its parent reaped it): `report(listener, n)` for each listener
    /// it still held `n` connections of, and its entries are freed.
    pub fn exited(&self, pid: u32, mut report: impl FnMut(usize, u64)) {
        for e in self.entries {
            let k = e.key.load(Ordering::Acquire);
            if k != 0 && pid_of(k) == pid {
                Self::release(e, k, &mut report);
            }
        }
    }

    /// Frees the entries of processes that no longer exist, reporting what they held.
    fn sweep(&self, mut report: impl FnMut(usize, u64)) {
        for e in self.entries {
            let k = e.key.load(Ordering::Acquire);
            if k != 0 && gone(pid_of(k)) {
                Self::release(e, k, &mut report);
            }
        }
    }

    fn release(e: &Entry, k: u64, report: &mut impl FnMut(usize, u64)) {
        // Take the count first, then free the key only if nobody replaced it meanwhile: of two
        // processes releasing the same entry, one gets the count, the other 0.
        let n = e.open.swap(0, Ordering::AcqRel);
        if e.key
            .compare_exchange(k, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && n > 0
        {
            report(listener_of(k), n);
        } else if n > 0 {
            e.open.fetch_add(n, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_process_and_reports_the_dead() {
        let t = Procs::leaked();
        let none = |_: usize, _: u64| panic!("nothing to report");
        assert!(t.opened(100, 0, none));
        assert!(t.opened(100, 0, none));
        assert!(t.opened(100, 1, none));
        assert!(t.opened(200, 0, none));
        t.closed(100, 0);
        t.closed(300, 0); // unknown: ignored
        let mut got = Vec::new();
        t.exited(100, |l, n| got.push((l, n)));
        got.sort();
        assert_eq!(got, [(0, 1), (1, 1)]);
        got.clear();
        t.exited(100, |l, n| got.push((l, n)));
        assert!(got.is_empty(), "reported once");
        t.closed(200, 0);
        t.exited(200, |l, n| got.push((l, n)));
        assert!(
            got.is_empty(),
            "a process that closed everything owes nothing"
        );
    }

    #[test]
    fn a_full_table_reclaims_dead_processes() {
        let t = Procs::leaked();
        // pid_max is at most 2^22: these pids cannot exist.
        let dead = 1 << 23;
        for i in 0..CAPACITY as u32 {
            assert!(t.opened(dead + i, 0, |_, _| {}));
        }
        let mut reported = 0;
        // SAFETY: getpid cannot fail.
        let me = unsafe { libc::getpid() } as u32;
        assert!(t.opened(me, 0, |_, n| reported += n));
        assert_eq!(reported, CAPACITY as u64);
        assert!(t.find(key(me, 0)).is_some());
    }

    #[test]
    fn shared_mapping_is_usable() {
        let t = Procs::new();
        assert_eq!(t.entries.len(), CAPACITY);
        assert!(t.opened(7, 0, |_, _| {}));
        t.closed(7, 0);
    }
}
