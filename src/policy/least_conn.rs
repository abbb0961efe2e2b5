//! `least-conn`: the open worker with the fewest active connections (dispatched minus closed,
//! which includes those still queued in its channel). Ties go round-robin.

use super::{Policy, WorkerStat, active_key, min_open_from};

/// Fewest active connections; O(workers) scan of a dense table.
#[derive(Debug, Default)]
pub struct LeastConn {
    next: usize,
}

impl Policy for LeastConn {
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize> {
        let i = min_open_from(workers, listener, self.next, active_key)?;
        self.next = i + 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::open_with_active;

    #[test]
    fn picks_fewest_active() {
        let w = open_with_active(&[3, 1, 2, 1]);
        let mut lc = LeastConn::default();
        assert_eq!(lc.pick(&w, 0), Some(1));
        // The tie between 1 and 3 rotates.
        assert_eq!(lc.pick(&w, 0), Some(3));
        assert_eq!(lc.pick(&w, 0), Some(1));
    }

    #[test]
    fn equal_load_spreads_like_round_robin() {
        let w = open_with_active(&[0; 3]);
        let mut lc = LeastConn::default();
        let picks: Vec<_> = (0..6).map(|_| lc.pick(&w, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
