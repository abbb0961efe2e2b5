//! Stall detection that does not wait for a full channel (acceptor thread for dispatch mode,
//! supervisor for reuseport mode). A [`QueueWatch`] is fed samples of a queue's length — the
//! bytes a dispatch channel holds unread (`SIOCOUTQ` on the master's end, DESIGN.md §7) or the
//! accept queue of a worker's own reuseport listener (`TCP_INFO`'s `tcpi_unacked`) — taken on a
//! timer, off the per-connection path. The queue made progress when it was empty or shorter
//! than at the previous sample; a queue that is not empty and made no progress for the stall
//! timeout belongs to a worker that takes nothing (stopped, wedged, or one that closed its
//! channel: the master's duplicate of the worker's end keeps the channel open, so its queue
//! just grows). The caller reclaims what is queued and has the worker replaced.
//!
//! Sampling at a fraction of the timeout is an approximation: a worker that takes exactly as
//! much as arrives between every two samples for the whole timeout, never emptying its queue,
//! looks stalled too. Such a worker is overloaded for the whole timeout; replacing it hands its
//! queue to the others.

use std::time::{Duration, Instant};

/// How often queues are sampled for a given stall timeout: eight samples per timeout, between
/// 10 ms and 1 s.
pub fn sample_period(stall_timeout: Duration) -> Duration {
    (stall_timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// One queue's progress.
#[derive(Debug, Clone, Copy)]
pub struct QueueWatch {
    last_len: u64,
    last_progress: Instant,
}

impl QueueWatch {
    /// A queue first seen at `now` (counts as progress).
    pub fn new(now: Instant) -> Self {
        QueueWatch {
            last_len: 0,
            last_progress: now,
        }
    }

    /// Feeds the length sampled at `now`; returns true if the queue is not empty and has made
    /// no progress for `timeout`.
    pub fn sample(&mut self, len: u64, now: Instant, timeout: Duration) -> bool {
        if len == 0 || len < self.last_len {
            self.last_progress = now;
        }
        self.last_len = len;
        len > 0 && now.saturating_duration_since(self.last_progress) >= timeout
    }

    /// Forget the past (the queue was just reclaimed, or the worker resumed).
    pub fn reset(&mut self, now: Instant) {
        *self = QueueWatch::new(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_queue_that_never_shrinks_is_a_stall() {
        let t0 = Instant::now();
        let mut w = QueueWatch::new(t0);
        assert!(!w.sample(768, at(t0, 100), T));
        assert!(!w.sample(768, at(t0, 600), T));
        assert!(!w.sample(1536, at(t0, 900), T));
        assert!(
            w.sample(1536, at(t0, 1000), T),
            "1 s since the last progress, at 0"
        );
    }

    #[test]
    fn shrinking_or_empty_is_progress() {
        let t0 = Instant::now();
        let mut w = QueueWatch::new(t0);
        for i in 0..100u64 {
            // Grows and shrinks in turn: never a stall.
            let len = if i % 2 == 0 { 1536 } else { 768 };
            assert!(!w.sample(len, at(t0, 300 * i), T));
        }
        let mut w = QueueWatch::new(t0);
        assert!(!w.sample(0, at(t0, 5000), T));
        assert!(!w.sample(768, at(t0, 5500), T));
        assert!(w.sample(768, at(t0, 6000), T));
        w.reset(at(t0, 6000));
        assert!(!w.sample(768, at(t0, 6500), T));
    }

    #[test]
    fn period_is_bounded() {
        assert_eq!(
            sample_period(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            sample_period(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
        assert_eq!(
            sample_period(Duration::from_secs(2)),
            Duration::from_millis(250)
        );
    }
}
