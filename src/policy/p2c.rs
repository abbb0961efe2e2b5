//! `p2c`: power of two choices: two distinct open workers at random, the one with the smaller
//! [`load_key`] wins (not stuck; then fewer active connections; among equals, nothing untaken
//! in its channel, then the more recent progress). O(1) when both draws hit open workers.

use super::{Policy, WorkerStat, load_key, min_open_from};

/// Two random choices by load key, from a xorshift generator (no syscalls, no locks).
#[derive(Debug)]
pub struct P2c {
    state: u64,
}

impl Default for P2c {
    fn default() -> Self {
        P2c {
            state: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl P2c {
    fn next_below(&mut self, n: usize) -> usize {
        // xorshift64*: good enough spread for choosing among workers.
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((u128::from(r) * n as u128) >> 64) as usize
    }
}

impl Policy for P2c {
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize> {
        let n = workers.len();
        if n == 0 {
            return None;
        }
        let a = self.next_below(n);
        let b = if n > 1 {
            (a + 1 + self.next_below(n - 1)) % n
        } else {
            a
        };
        match (workers[a].is_open(listener), workers[b].is_open(listener)) {
            (true, true) => Some(if load_key(&workers[b]) < load_key(&workers[a]) {
                b
            } else {
                a
            }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            // Both draws closed: fall back to least-conn among the open ones.
            (false, false) => min_open_from(workers, listener, a, load_key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::open_with_active;

    #[test]
    fn never_picks_the_busiest_of_two() {
        let w = open_with_active(&[100, 0]);
        let mut p = P2c::default();
        for _ in 0..100 {
            assert_eq!(p.pick(&w, 0), Some(1));
        }
    }

    #[test]
    fn ties_go_to_the_worker_with_progress() {
        let mut w = open_with_active(&[1, 1]);
        w[0].progress = 7;
        w[1].progress = 3;
        let mut p = P2c::default();
        for _ in 0..100 {
            assert_eq!(p.pick(&w, 0), Some(0));
        }
    }

    #[test]
    fn spreads_over_all_workers() {
        let w = open_with_active(&[0; 8]);
        let mut p = P2c::default();
        let mut seen = [0u32; 8];
        for _ in 0..8000 {
            seen[p.pick(&w, 0).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 500), "{seen:?}");
    }
}
