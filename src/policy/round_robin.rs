//! `round-robin`: each open worker in turn, skipping those that cannot take a connection.

use super::{Policy, WorkerStat};

/// Hands connections to workers in slot order. O(1) when the next worker is open, O(workers)
/// in the worst case.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize> {
        let n = workers.len();
        let start = if self.next < n { self.next } else { 0 };
        let i = (start..n)
            .chain(0..start)
            .find(|&i| workers[i].is_open(listener))?;
        self.next = i + 1;
        Some(i)
    }

    fn reads_active(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::open_with_active;

    #[test]
    fn cycles_evenly_and_skips_closed() {
        let mut w = open_with_active(&[0; 4]);
        let mut rr = RoundRobin::default();
        let picks: Vec<_> = (0..8).map(|_| rr.pick(&w, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 3, 0, 1, 2, 3]);
        w[1].open = 0;
        let picks: Vec<_> = (0..3).map(|_| rr.pick(&w, 0).unwrap()).collect();
        assert_eq!(picks, [0, 2, 3]);
        // Shrinking the table never indexes out of bounds.
        w.truncate(1);
        assert_eq!(rr.pick(&w, 0), Some(0));
    }
}
