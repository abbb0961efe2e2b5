//! `least-mem`: a worker that is not stuck (see [`crate::policy`]) before one that is; then the
//! open worker with the smallest resident memory (sampled RSS). Workers within
//! [`rss_tolerance_kib`] of the smallest count as tied, and ties go by fewest active
//! connections, then by the rest of [`load_key`] (busy, progress), then round-robin: without the
//! tolerance the worker a few hundred KiB smaller than its peers would take every connection
//! until its next sample.

use super::{Policy, STUCK_BIT, WorkerStat, load_key, min_open_from};

/// Workers whose RSS is within this much of the smallest open worker's are treated as equal:
/// 1/8 of the smallest, and at least 16 MiB, so equal servers share by least-conn while one that
/// grew by tens of MiB is avoided.
pub fn rss_tolerance_kib(smallest_kib: u32) -> u32 {
    (smallest_kib / 8).max(16 * 1024)
}

/// Smallest RSS (within a tolerance), then the least-conn key; O(workers).
#[derive(Debug, Default)]
pub struct LeastMem {
    next: usize,
}

impl Policy for LeastMem {
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize> {
        // Two passes over a dense table, both branch-light: the smallest RSS, then the
        // least-conn minimum among the workers near it.
        let bit = 1u64 << listener;
        let smallest = workers
            .iter()
            .filter(|w| w.open & bit != 0)
            .map(|w| w.rss_kib)
            .min()?;
        let near = smallest.saturating_add(rss_tolerance_kib(smallest));
        // One u64 key: the load key's `stuck` bit moved to the top, then a bit set when the
        // RSS is beyond the tolerance (the smallest is always within it, so a worker beyond
        // never beats one within), then the rest of the least-conn load key, whose low bits
        // the scan fills with the rotation.
        let i = min_open_from(workers, listener, self.next, |w| {
            let key = load_key(w);
            ((key & STUCK_BIT) << 1) | (u64::from(w.rss_kib > near) << 62) | (key & !STUCK_BIT)
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
    fn nearly_equal_workers_share_by_least_conn() {
        let mut w = open_with_active(&[5, 0, 2]);
        w[0].rss_kib = 40_000;
        w[1].rss_kib = 44_900;
        w[2].rss_kib = 39_800;
        let mut lm = LeastMem::default();
        assert_eq!(
            lm.pick(&w, 0),
            Some(1),
            "within tolerance: fewest active wins"
        );
        // One that grew well past the tolerance is avoided even when idle.
        w[1].rss_kib = 39_800 + rss_tolerance_kib(39_800) + 1;
        assert_eq!(lm.pick(&w, 0), Some(2));
    }

    #[test]
    fn picks_smallest_then_least_conn() {
        let mut w = open_with_active(&[0, 5, 1]);
        w[0].rss_kib = 90_000;
        w[1].rss_kib = 10_000;
        w[2].rss_kib = 10_000;
        // 90 MB is more than 16 MiB above 10 MB: worker 0 is out despite being idle.
        let mut lm = LeastMem::default();
        assert_eq!(lm.pick(&w, 0), Some(2));
        w[2].active = 9;
        assert_eq!(lm.pick(&w, 0), Some(1));
    }
}
