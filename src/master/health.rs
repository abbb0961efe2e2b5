//! Heartbeat health checks (`--heartbeat-timeout`): which workers stopped heartbeating. Pure
//! bookkeeping on the supervisor's thread (the message bus reports each heartbeat; the
//! supervisor replaces what [`Heartbeats::expired`] returns), so it is tested without processes.
//!
//! A worker is checked only once it has sent a heartbeat: one that never speaks the bus is not
//! replaced for silence (stall detection and active probes cover it). A worker's event loop
//! that runs but whose application hangs keeps accepting, so its channel never fills and stall
//! detection never fires; heartbeats sent from the application's own loop catch it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::master::lifecycle::WorkerId;

/// The last heartbeat of each worker that sent one.
#[derive(Debug)]
pub struct Heartbeats {
    timeout: Duration,
    last: HashMap<WorkerId, Instant>,
}

impl Heartbeats {
    /// Workers silent for longer than `timeout` expire.
    pub fn new(timeout: Duration) -> Heartbeats {
        Heartbeats {
            timeout,
            last: HashMap::new(),
        }
    }

    /// A heartbeat from worker `id` at `now`.
    pub fn beat(&mut self, id: WorkerId, now: Instant) {
        self.last.insert(id, now);
    }

    /// Stops checking `id` (it exited, is draining or is being replaced).
    pub fn forget(&mut self, id: WorkerId) {
        self.last.remove(&id);
    }

    /// The workers whose last heartbeat is more than the timeout before `now`; they are
    /// forgotten, so each is reported once.
    pub fn expired(&mut self, now: Instant) -> Vec<WorkerId> {
        let timeout = self.timeout;
        let mut out: Vec<WorkerId> = self
            .last
            .iter()
            .filter(|&(_, &t)| now.saturating_duration_since(t) > timeout)
            .map(|(&id, _)| id)
            .collect();
        out.sort_unstable();
        for id in &out {
            self.last.remove(id);
        }
        out
    }

    /// When the next worker expires if nobody beats meanwhile.
    pub fn next_deadline(&self) -> Option<Instant> {
        // One millisecond past the timeout: `expired` wants strictly more than the timeout.
        self.last
            .values()
            .min()
            .map(|&t| t + self.timeout + Duration::from_millis(1))
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_workers_that_beat_and_then_stop_expire_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut h = Heartbeats::new(3 * s);
        assert_eq!(h.next_deadline(), None, "nobody beats: nothing to check");
        h.beat(1, t0);
        h.beat(2, t0);
        h.beat(2, t0 + 2 * s);
        assert_eq!(h.expired(t0 + 3 * s), Vec::<WorkerId>::new());
        assert_eq!(
            h.next_deadline(),
            Some(t0 + 3 * s + Duration::from_millis(1))
        );
        assert_eq!(h.expired(t0 + 4 * s), vec![1]);
        assert_eq!(
            h.expired(t0 + 4 * s),
            Vec::<WorkerId>::new(),
            "reported once"
        );
        h.forget(2);
        assert_eq!(h.expired(t0 + 60 * s), Vec::<WorkerId>::new());
        assert_eq!(h.next_deadline(), None);
    }
}
