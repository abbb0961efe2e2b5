//! `least-conn`: the open worker with the smallest [`load_key`]: one that is not stuck; then
//! fewest active connections (dispatched minus closed, which includes those still queued in its
//! channel); among equals, one with nothing untaken in its channel; then the one that most
//! recently proved progress (a CLOSED arrived, or it took what it was sent); remaining ties
//! rotate. The module docs of
//! [`crate::policy`] say why. A stuck worker is passed over only while the pick holds at most
//! [`STUCK_GAP`] more connections than it: beyond that the least active open worker takes the
//! connection, stuck or not, so a worker that only looked stuck while a client opened a burst
//! of long-lived connections (a node worker still warming up, off its CPU for a millisecond)
//! ends at most about that many behind.

use super::{Policy, WorkerStat, active_key, load_key, min_open_from};

/// Smallest load key; O(workers) scan of a dense table.
#[derive(Debug, Default)]
pub struct LeastConn {
    next: usize,
}

/// How many more active connections than the least active open worker a pick may hold while
/// that worker is passed over for being stuck (module docs). Under a new connection per request
/// the counts stay far closer than this, and only the stuck rule decides.
pub const STUCK_GAP: u32 = 8;

impl Policy for LeastConn {
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize> {
        let mut i = min_open_from(workers, listener, self.next, load_key)?;
        // Only a pick that holds more than the gap can be more than the gap above another
        // worker: the second scan is paid only then.
        if workers[i].active > STUCK_GAP
            && let Some(j) = min_open_from(workers, listener, self.next, active_key)
            && workers[j].active.saturating_add(STUCK_GAP) < workers[i].active
        {
            i = j;
        }
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
    /// Once the first is stuck (it left a connection untaken), the peer gets everything, within
    /// the gap.
    #[test]
    fn a_stuck_worker_loses_within_the_gap() {
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

    /// A worker that looks stuck while a burst of long-lived connections is opened falls at
    /// most the gap behind: beyond it, the least active worker takes connections again, stuck
    /// or not, and among several the counts (then rotation) decide.
    #[test]
    fn a_stuck_worker_takes_connections_once_the_pick_holds_more_than_the_gap() {
        let mut w = open_with_active(&[0, STUCK_GAP, STUCK_GAP + 1]);
        w[0].queued = 1;
        w[0].stuck = true;
        let mut lc = LeastConn::default();
        // Worker 1 holds exactly the gap more: the stuck worker is still passed over.
        assert_eq!(lc.pick(&w, 0), Some(1));
        w[1].active += 1;
        // Now every worker that is not stuck holds more than the gap above it.
        assert_eq!(lc.pick(&w, 0), Some(0));
        w[0].active += 1;
        assert_eq!(lc.pick(&w, 0), Some(1));
        // A worker not open on the listener is never chosen for it, however few it holds.
        w[0].open = 0;
        w[1].active = 40;
        assert_eq!(lc.pick(&w, 0), Some(2));
        // Nothing stuck: the fewest active, as always.
        w[0].open = 1;
        w[0].stuck = false;
        assert_eq!(lc.pick(&w, 0), Some(0));
    }
}
