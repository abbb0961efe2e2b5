//! `least-mem`: the open worker with the smallest resident memory (sampled RSS); workers whose
//! RSS is about the same (within one of the 6–12 % wide buckets of [`rss_bucket`]) count as
//! tied, and ties go by fewest active connections, then round-robin. Without the buckets the
//! worker a few KiB smaller than the rest would take every connection until its next sample.

use super::{Policy, ROTATION_BITS, WorkerStat, min_open_from};

/// RSS on a log scale with four significant bits: values below 16 KiB as they are, larger ones
/// as (exponent, top four bits), so each bucket is 1/16 to 1/8 of its value wide. Monotonic.
pub fn rss_bucket(rss_kib: u32) -> u32 {
    if rss_kib < 16 {
        return rss_kib;
    }
    let exponent = 31 - rss_kib.leading_zeros(); // ≥ 4
    let mantissa = (rss_kib >> (exponent - 3)) & 0b111; // the three bits after the top one
    16 + ((exponent - 4) << 3) + mantissa
}

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
            (u64::from(rss_bucket(w.rss_kib)) << 32)
                | (u64::from(w.active.min(ACTIVE_MAX)) << ROTATION_BITS)
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
    fn buckets_are_monotonic_and_about_six_percent_wide() {
        let mut last = 0;
        for kib in 0..1_000_000u32 {
            let b = rss_bucket(kib);
            assert!(b >= last, "not monotonic at {kib}");
            last = b;
        }
        // 40 MiB and 41 MiB share a bucket; 40 MiB and 48 MiB do not.
        assert_eq!(rss_bucket(40 * 1024), rss_bucket(41 * 1024));
        assert!(rss_bucket(48 * 1024) > rss_bucket(40 * 1024));
        assert!(rss_bucket(u32::MAX) > rss_bucket(u32::MAX / 2));
    }

    #[test]
    fn nearly_equal_workers_share_by_least_conn() {
        let mut w = open_with_active(&[5, 0, 2]);
        w[0].rss_kib = 40_000;
        w[1].rss_kib = 40_900;
        w[2].rss_kib = 39_800;
        let mut lm = LeastMem::default();
        assert_eq!(lm.pick(&w, 0), Some(1), "same bucket: fewest active wins");
    }

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
