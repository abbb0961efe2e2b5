//! Load-balancing policies: which worker gets the next connection. Run by the acceptor thread on
//! every connection, so `pick` allocates nothing and costs O(1) or O(workers) over a dense,
//! `Copy` table the acceptor owns (no atomics or pointers to chase on the hot path).

mod least_conn;
mod least_mem;
mod p2c;
mod round_robin;

pub use least_conn::LeastConn;
pub use least_mem::LeastMem;
pub use p2c::P2c;
pub use round_robin::RoundRobin;

/// What a policy knows of one worker slot. The acceptor keeps one per worker, in a dense slice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStat {
    /// Connections dispatched to the worker and not yet reported closed (queued in its channel
    /// or being served).
    pub active: u32,
    /// Resident memory in KiB, sampled by the supervisor every `--rss-interval`.
    pub rss_kib: u32,
    /// Bit `i` is set when listener `i`'s channel to this worker can take a connection now
    /// (worker ready, not draining, channel not full).
    pub open: u64,
}

impl WorkerStat {
    /// Whether a connection from listener `listener` may go to this worker now.
    #[inline]
    pub fn is_open(&self, listener: usize) -> bool {
        self.open & (1u64 << listener) != 0
    }
}

/// A dispatch policy. `pick` returns the index of an open worker for `listener`, or `None` if
/// no worker is open for it.
pub trait Policy: Send {
    /// Chooses a worker; must return an index whose [`WorkerStat::is_open`] is true.
    fn pick(&mut self, workers: &[WorkerStat], listener: usize) -> Option<usize>;
}

/// How connections reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The master accepts and passes each connection over a channel (fd 3+i is a channel).
    Dispatch,
    /// Each worker gets its own `SO_REUSEPORT` listening socket; the kernel hashes connections.
    Reuseport,
    /// Every worker inherits the same listening socket; the kernel's one accept queue.
    Shared,
}

impl Mode {
    /// The value of `RCLUSTER_MODE` for workers.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Dispatch => "dispatch",
            Mode::Reuseport => "reuseport",
            Mode::Shared => "shared",
        }
    }
}

/// The policies selectable with `--policy`. The CLI name, the module and the type agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyKind {
    /// Each worker in turn.
    #[value(alias = "rr")]
    RoundRobin,
    /// Fewest active connections (dispatched, not yet closed); ties rotate.
    #[value(alias = "lc", alias = "leastconn")]
    LeastConn,
    /// Smallest resident memory; ties broken by fewest active connections.
    #[value(alias = "lm")]
    LeastMem,
    /// The less loaded of two workers chosen at random.
    #[value(alias = "power-of-two")]
    P2c,
    /// The kernel picks: one SO_REUSEPORT listening socket per worker.
    #[value(alias = "rp", alias = "so-reuseport")]
    Reuseport,
    /// The kernel picks: all workers accept from one shared listening socket.
    Shared,
}

impl PolicyKind {
    /// Every policy, in the order benchmarks report them.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::RoundRobin,
        PolicyKind::LeastConn,
        PolicyKind::LeastMem,
        PolicyKind::P2c,
        PolicyKind::Reuseport,
        PolicyKind::Shared,
    ];

    /// The CLI name (`least-conn`).
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::LeastConn => "least-conn",
            PolicyKind::LeastMem => "least-mem",
            PolicyKind::P2c => "p2c",
            PolicyKind::Reuseport => "reuseport",
            PolicyKind::Shared => "shared",
        }
    }

    /// How connections reach the workers under this policy.
    pub fn mode(self) -> Mode {
        match self {
            PolicyKind::Reuseport => Mode::Reuseport,
            PolicyKind::Shared => Mode::Shared,
            _ => Mode::Dispatch,
        }
    }

    /// Whether the policy reads `rss_kib` (the supervisor samples RSS only then).
    pub fn needs_rss(self) -> bool {
        self == PolicyKind::LeastMem
    }

    /// The policy object for dispatch mode; `None` for the kernel-balanced modes.
    pub fn build(self) -> Option<Box<dyn Policy>> {
        match self {
            PolicyKind::RoundRobin => Some(Box::new(RoundRobin::default())),
            PolicyKind::LeastConn => Some(Box::new(LeastConn::default())),
            PolicyKind::LeastMem => Some(Box::new(LeastMem::default())),
            PolicyKind::P2c => Some(Box::new(P2c::default())),
            PolicyKind::Reuseport | PolicyKind::Shared => None,
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Index of the open worker minimising `key`, scanning from `start` so that ties rotate.
#[inline]
fn min_open_from<K: Ord + Copy>(
    workers: &[WorkerStat],
    listener: usize,
    start: usize,
    key: impl Fn(&WorkerStat) -> K,
) -> Option<usize> {
    let start = if start < workers.len() { start } else { 0 };
    let mut best: Option<(K, usize)> = None;
    // Scan [start..n) then [0..start): two straight loops, the first minimum wins, so equal
    // keys go to whoever is next after the previous pick.
    for i in (start..workers.len()).chain(0..start) {
        let w = &workers[i];
        if !w.is_open(listener) {
            continue;
        }
        let k = key(w);
        if best.is_none_or(|(bk, _)| k < bk) {
            best = Some((k, i));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::WorkerStat;

    /// Workers with the given active counts, all open on listener 0.
    pub fn open_with_active(active: &[u32]) -> Vec<WorkerStat> {
        active
            .iter()
            .map(|&a| WorkerStat {
                active: a,
                rss_kib: 0,
                open: 1,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::open_with_active;
    use super::*;

    #[test]
    fn min_scan_rotates_ties_and_skips_closed() {
        let mut w = open_with_active(&[0, 0, 0, 0]);
        assert_eq!(min_open_from(&w, 0, 0, |s| s.active), Some(0));
        assert_eq!(min_open_from(&w, 0, 2, |s| s.active), Some(2));
        assert_eq!(min_open_from(&w, 0, 3, |s| s.active), Some(3));
        w[3].open = 0;
        assert_eq!(min_open_from(&w, 0, 3, |s| s.active), Some(0));
        w[1].active = 5;
        w[0].active = 3;
        w[2].active = 4;
        assert_eq!(min_open_from(&w, 0, 1, |s| s.active), Some(0));
        assert_eq!(min_open_from(&w, 1, 0, |s| s.active), None);
        assert_eq!(min_open_from(&[], 0, 0, |s: &WorkerStat| s.active), None);
    }

    #[test]
    fn every_policy_picks_only_open_workers() {
        for kind in PolicyKind::ALL {
            let Some(mut policy) = kind.build() else {
                continue;
            };
            let mut w = open_with_active(&[0, 1, 2, 3, 4]);
            w[0].open = 0;
            w[2].open = 0;
            for _ in 0..50 {
                let i = policy.pick(&w, 0).unwrap();
                assert!(w[i].is_open(0), "{kind} picked closed worker {i}");
            }
            for s in &mut w {
                s.open = 0;
            }
            assert_eq!(policy.pick(&w, 0), None, "{kind}");
        }
    }
}
