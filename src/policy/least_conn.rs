//! `least-conn`: the open worker with the smallest [`load_key`]: one that is not stuck; then
//! fewest active connections (dispatched minus closed, which includes those still queued in its
//! channel); among equals, one with nothing untaken in its channel; then the one that most
//! recently proved progress (a CLOSED arrived, or it took what it was sent); remaining ties
//! rotate. The module docs of
//! [`crate::policy`] say why.

use super::{Policy, WorkerStat, load_key, min_open_from};

/// Smallest load key; O(workers) scan of a dense table.
#[derive(Debug, Default)]
pub struct LeastConn {
    next: usize,
}

impl Policy for LeastConn {
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize> {
        let i = min_open_from(workers, listener, self.next, load_key)?;
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

    /// The busy-worker tie: worker 0 serves a long request (1 active, nothing since),
    /// worker 1 is idle but its last CLOSED has not arrived (1 active). The tie never rotates
    /// onto worker 0, however often it is asked.
    #[test]
    fn a_tie_never_goes_to_the_worker_without_progress() {
        let mut w = open_with_active(&[1, 1]);
        w[0].progress = 10;
        w[1].progress = 11;
        let mut lc = LeastConn::default();
        for _ in 0..20 {
            assert_eq!(lc.pick(&w, 0), Some(1));
        }
        // Something untaken in worker 1's channel outweighs its progress...
        w[1].queued = 1;
        assert_eq!(lc.pick(&w, 0), Some(0));
        // ...but not an active count: fewer connections win among workers that pull.
        w[0].active = 2;
        assert_eq!(lc.pick(&w, 0), Some(1));
    }

    /// A worker inside a long request holds one connection; its peer serves three short ones.
    /// Once the first is stuck (it left a connection untaken), the peer gets everything.
    #[test]
    fn a_stuck_worker_loses_whatever_the_counts() {
        let mut w = open_with_active(&[2, 3]);
        w[0].queued = 1;
        w[0].stuck = true;
        let mut lc = LeastConn::default();
        for _ in 0..5 {
            assert_eq!(lc.pick(&w, 0), Some(1));
        }
        // Among stuck workers the counts decide again.
        w[1].stuck = true;
        assert_eq!(lc.pick(&w, 0), Some(0));
    }
}
