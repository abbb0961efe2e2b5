//! `least-mem`: the open worker with the smallest resident memory (sampled RSS); ties broken by
//! fewest active connections, then round-robin.

use super::{Policy, ROTATION_BITS, WorkerStat, min_open_from};

/// Largest active count least-mem distinguishes (21 bits between RSS and the rotation bits).
const ACTIVE_MAX: u32 = (1 << (32 - ROTATION_BITS)) - 1;

/// Smallest RSS, then fewest active connections; O(workers).
#[derive(Debug, Default)]
pub struct LeastMem {
    next: usize,
}

impl Policy for LeastMem {
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize> {
        let i = min_open_from(workers, listener, self.next, |w| {
            // One u64 key: RSS (KiB) in the high half, then active connections (saturating at
            // 2^21, far beyond a tie-breaker's use), then the rotation bits.
            (u64::from(w.rss_kib) << 32) | (u64::from(w.active.min(ACTIVE_MAX)) << ROTATION_BITS)
        })?;
        self.next = i + 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::open_with_active;

    #[test]
    fn picks_smallest_then_least_conn() {
        let mut w = open_with_active(&[0, 5, 1]);
        w[0].rss_kib = 90_000;
        w[1].rss_kib = 10_000;
        w[2].rss_kib = 10_000;
        let mut lm = LeastMem::default();
        assert_eq!(lm.pick(&w, 0), Some(2));
        w[2].active = 9;
        assert_eq!(lm.pick(&w, 0), Some(1));
    }
}
