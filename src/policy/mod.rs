//! Load-balancing policies: which worker gets the next connection. Run by the acceptor thread on
//! every connection, so `pick` allocates nothing and costs O(1) or O(workers) over a dense,
//! `Copy` table the acceptor owns (no atomics or pointers to chase on the hot path).
//!
//! # The load key
//!
//! `least-conn`, `least-mem` and `p2c` compare workers by one `u64`, [`load_key`], smallest
//! first; its fields, most significant first:
//!
//! | field | bits | meaning |
//! |---|---|---|
//! | `stuck` | 1 | connections have sat untaken in its channel for [`STUCK_AFTER`] with no sign of progress |
//! | `active` | 18 | dispatched − closed (saturating at 2^18 − 1): join-the-shortest-queue |
//! | `busy` | 1 | `queued > 0`: connections sit untaken in its channel (or the master's batch) |
//! | staleness | 32 | `!progress`: the worker that most recently proved it makes progress wins |
//! | rotation | 11 | position after the policy's cursor (least-conn), so remaining ties rotate |
//!
//! `least-mem` puts its RSS bit (beyond the tolerance of the smallest) just below `stuck`.
//!
//! Why this order: `active` is what least-connections means, and it is exact up to the lag of
//! CLOSED reports (a worker closes, the client reconnects, the master accepts before the CLOSED
//! arrives: the idle worker still counts 1). That lag only ever overstates a worker by the
//! connections it finished in the last moment, so it produces *ties* between an idle worker
//! and a busy one rather than wrong orders, and the two lower fields decide those ties on
//! signals that are fresh when the pick is made: the acceptor re-reads `queued` of the
//! candidates from the kernel (`SIOCOUTQ` on its own end of the channel) before it commits a
//! pick, and `progress` moves only when a worker demonstrably took or closed something. A
//! worker stuck in a long request takes nothing and closes nothing: its stamp stays where it
//! was, so it loses every tie to a worker that keeps serving, and once anything is queued to it,
//! `busy` is set too. Among workers that all progress, the most recent wins: the same
//! last-in-first-out choice the kernel makes when it wakes the most recently idle waiter on a
//! shared accept queue, which keeps a cache-warm worker serving at low load.
//!
//! Why `stuck` outranks `active`: a single-threaded server (node, a Python event loop) in a
//! long request takes nothing and closes nothing until it ends, so its count stays low while
//! a peer that keeps serving short requests holds a few more; by counts alone the stuck worker
//! wins, and every connection sent to it waits out the long request (the heavy-tailed
//! benchmark's p99 with node workers). Untaken connections older than [`STUCK_AFTER`] are
//! proof that it is not pulling: it loses to every worker that is, whatever the counts (under
//! least-conn, within a bound: below), which is what a shared accept queue does (only a worker
//! that calls `accept` gets a connection). Among stuck workers the counts decide again. Under
//! least-conn the rule gives way beyond [`STUCK_GAP`] (8) connections: once every worker that
//! is not stuck holds more than that above the least active one, that one takes the
//! connection, stuck or not, so a worker that only looked stuck (a node worker warming up, or
//! off its CPU for a millisecond, while a client opens a burst of keep-alive connections) falls
//! at most that far behind. The acceptor sets the bit (see `master::acceptor`); a worker that
//! takes everything it was sent, or reports a close, is cleared at once. Servers that take
//! connections on a thread of their own (the Rust worker API, the demo worker) are never stuck
//! while that thread runs.

mod least_conn;
mod least_mem;
mod p2c;
mod round_robin;

pub use least_conn::{LeastConn, STUCK_GAP};
pub use least_mem::{LeastMem, rss_tolerance_kib};
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
    /// Connections dispatched to the worker that it has not been seen to take: still in its
    /// channel or in the master's send batch. An upper bound (the worker may have taken them
    /// since); exact when 0 and right after the acceptor re-read it from the kernel.
    pub queued: u32,
    /// When the worker last proved it makes progress (a CLOSED report arrived, or its channel
    /// was seen empty after a dispatch), as the acceptor's connection counter; larger is more
    /// recent. Restarts at 0 for every worker when the counter's low 32 bits wrap.
    pub progress: u32,
    /// Connections have waited untaken in its channel for at least [`STUCK_AFTER`] and it
    /// showed no progress meanwhile: it is not pulling now (the module docs say why this
    /// outranks `active`).
    pub stuck: bool,
}

/// How long connections may sit untaken in a worker's channel, with no close reported and
/// nothing taken, before the worker counts as stuck. Well above one event-loop turn of a busy
/// server (a few hundred microseconds here), well below the long requests a heavy-tailed mix
/// holds a worker in (tens of milliseconds).
pub const STUCK_AFTER: std::time::Duration = std::time::Duration::from_millis(1);

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

    /// Whether `pick` reads [`WorkerStat::active`]. When it does not, the acceptor reads the
    /// workers' CLOSED reports on a timer instead of waking up for each one.
    fn reads_active(&self) -> bool {
        true
    }
}

pub use rcluster_proto::Mode;

/// At most this many workers: beyond it `--workers` is a typo, not a plan (and a scan key keeps
/// a worker's position in 11 bits).
pub const MAX_WORKERS: usize = 1024;

/// The policies selectable with `--policy`. The CLI name, the module and the type agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Each worker in turn.
    RoundRobin,
    /// Fewest active connections (dispatched, not yet closed); ties rotate.
    LeastConn,
    /// Smallest resident memory (within 1/8, at least 16 MiB, counts as equal); ties broken by
    /// fewest active connections.
    LeastMem,
    /// The less loaded of two workers chosen at random.
    P2c,
    /// The kernel picks: one SO_REUSEPORT listening socket per worker.
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

    /// Other names the CLI accepts for this policy.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            PolicyKind::RoundRobin => &["rr"],
            PolicyKind::LeastConn => &["lc", "leastconn"],
            PolicyKind::LeastMem => &["lm"],
            PolicyKind::P2c => &["power-of-two"],
            PolicyKind::Reuseport => &["rp", "so-reuseport"],
            PolicyKind::Shared => &[],
        }
    }

    /// One line on what the policy picks (the CLI's help).
    pub fn about(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "Each worker in turn",
            PolicyKind::LeastConn => {
                "Fewest active connections (dispatched, not yet closed); ties rotate"
            }
            PolicyKind::LeastMem => {
                "Smallest resident memory (within 1/8, at least 16 MiB, counts as equal); ties \
                 broken by fewest active connections"
            }
            PolicyKind::P2c => "The less loaded of two workers chosen at random",
            PolicyKind::Reuseport => {
                "The kernel picks: one SO_REUSEPORT listening socket per worker"
            }
            PolicyKind::Shared => {
                "The kernel picks: all workers accept from one shared listening socket"
            }
        }
    }

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

/// Bits at the bottom of a scan key that hold the worker's position after `start`.
const ROTATION_BITS: u32 = 11;
const _: () = assert!(MAX_WORKERS < 1 << ROTATION_BITS);

/// Index of the open worker with the smallest `key`, ties going to the first at or after
/// `start` (so equal loads rotate). `key` must leave the low [`ROTATION_BITS`] bits zero.
///
/// One branch-free pass: each worker becomes one `u64` — its key, plus its distance from
/// `start` in the low bits, or `u64::MAX` when closed — and the minimum wins. The loop has no
/// data-dependent branch, so it stays fast and vectorisable at 64 workers.
#[inline]
fn min_open_from(
    workers: &[WorkerStat],
    listener: usize,
    start: usize,
    key: impl Fn(&WorkerStat) -> u64,
) -> Option<usize> {
    let n = workers.len();
    let start = if start < n { start } else { 0 };
    let bit = 1u64 << listener;
    // Closed workers OR in all ones, which never beats an open one. Four independent minimum
    // chains instead of one: a u64 min is a compare and a conditional move, and one chain would
    // serialise the whole scan on that latency.
    let scan = |slice: &[WorkerStat], first_distance: usize, best: u64| -> u64 {
        let entry = |j: usize, w: &WorkerStat| {
            let closed = u64::from(w.open & bit == 0).wrapping_neg();
            key(w) | (first_distance + j) as u64 | closed
        };
        let mut acc = [best, u64::MAX, u64::MAX, u64::MAX];
        let chunks = slice.chunks_exact(4);
        let rest = chunks.remainder();
        for (c, chunk) in chunks.enumerate() {
            for (lane, w) in chunk.iter().enumerate() {
                acc[lane] = acc[lane].min(entry(c * 4 + lane, w));
            }
        }
        let base = slice.len() - rest.len();
        for (j, w) in rest.iter().enumerate() {
            acc[j] = acc[j].min(entry(base + j, w));
        }
        acc[0].min(acc[1]).min(acc[2].min(acc[3]))
    };
    let (before, after) = workers.split_at(start);
    let best = scan(before, n - start, scan(after, 0, u64::MAX));
    if best == u64::MAX {
        return None;
    }
    let distance = (best & ((1 << ROTATION_BITS) - 1)) as usize;
    let i = start + distance;
    Some(if i >= n { i - n } else { i })
}

/// A key of `active` alone (saturating like [`load_key`]'s field), for the least active open
/// worker whatever its other fields: least-conn's bound on how far the stuck rule may skew the
/// counts.
#[inline]
fn active_key(w: &WorkerStat) -> u64 {
    u64::from(w.active.min(ACTIVE_MAX)) << ROTATION_BITS
}

/// Largest `active` count the load key distinguishes.
pub const ACTIVE_MAX: u32 = (1 << 18) - 1;

/// The `stuck` bit of [`load_key`] (its highest).
pub const STUCK_BIT: u64 = 1 << 62;

/// The load key of the module docs without the rotation bits (they are zero): stuck, active
/// connections, then busy, then staleness of progress. Uses the low 63 bits.
#[inline]
pub fn load_key(w: &WorkerStat) -> u64 {
    let stuck = u64::from(w.stuck);
    let active = u64::from(w.active.min(ACTIVE_MAX));
    let busy = u64::from(w.queued != 0);
    let stale = u64::from(!w.progress);
    ((stuck << 51) | (active << 33) | (busy << 32) | stale) << ROTATION_BITS
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
                open: 1,
                ..WorkerStat::default()
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
        assert_eq!(min_open_from(&w, 0, 0, load_key), Some(0));
        assert_eq!(min_open_from(&w, 0, 2, load_key), Some(2));
        assert_eq!(min_open_from(&w, 0, 3, load_key), Some(3));
        w[3].open = 0;
        assert_eq!(min_open_from(&w, 0, 3, load_key), Some(0));
        w[1].active = 5;
        w[0].active = 3;
        w[2].active = 4;
        assert_eq!(min_open_from(&w, 0, 1, load_key), Some(0));
        assert_eq!(min_open_from(&w, 1, 0, load_key), None);
        assert_eq!(min_open_from(&[], 0, 0, load_key), None);
        // Out-of-range start and a single worker.
        assert_eq!(min_open_from(&w[..1], 0, 7, load_key), Some(0));
    }

    #[test]
    fn load_key_orders_stuck_then_active_then_busy_then_progress() {
        let w = |active, queued, progress| WorkerStat {
            active,
            queued,
            progress,
            open: 1,
            rss_kib: 0,
            stuck: false,
        };
        // A stuck worker loses to any other, whatever the counts.
        let stuck = WorkerStat {
            stuck: true,
            ..w(0, 1, u32::MAX)
        };
        assert!(load_key(&w(ACTIVE_MAX, 5, 0)) < load_key(&stuck));
        assert_eq!(load_key(&stuck) & STUCK_BIT, STUCK_BIT);
        // Fewer active connections win over everything below.
        assert!(load_key(&w(1, 5, 0)) < load_key(&w(2, 0, u32::MAX)));
        // Among equals, nothing untaken wins over progress.
        assert!(load_key(&w(1, 0, 0)) < load_key(&w(1, 1, u32::MAX)));
        // Then the more recent progress.
        assert!(load_key(&w(1, 0, 9)) < load_key(&w(1, 0, 8)));
        // Saturation keeps the order total and the rotation bits and the top bit free.
        let max = load_key(&WorkerStat {
            stuck: true,
            ..w(u32::MAX, u32::MAX, 0)
        });
        assert_eq!(max & ((1 << ROTATION_BITS) - 1), 0);
        assert_eq!(max >> 63, 0);
        assert!(load_key(&w(ACTIVE_MAX - 1, 1, 0)) < max);
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
