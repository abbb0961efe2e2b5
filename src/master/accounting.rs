//! Per-worker connection counts a worker cannot lie to (acceptor thread). A worker reports
//! `CLOSED(n)`; the master counts what it dispatched. The sum of CLOSED can never exceed what
//! was dispatched: a report that would is a protocol violation, clamped (so the worker cannot
//! make itself look idle, or wrap the count), logged rate-limited, and after
//! [`VIOLATION_LIMIT`] violations of any kind (bad counts, malformed messages, fds sent to the
//! master) the worker is reported once for replacement.

use std::time::Instant;

use super::ratelimit::{LogLimiter, Verdict};

/// Protocol violations after which a worker is replaced.
pub const VIOLATION_LIMIT: u32 = 16;

/// `closed + count`, bounded by `dispatched`: `Ok(new closed)` for an honest report,
/// `Err(dispatched)` (the clamped value) for one claiming more closes than connections.
pub fn add_closed(dispatched: u64, closed: u64, count: u64) -> Result<u64, u64> {
    match closed.checked_add(count) {
        Some(sum) if sum <= dispatched => Ok(sum),
        _ => Err(dispatched.max(closed)),
    }
}

/// A worker's record of protocol violations.
#[derive(Debug, Default, Clone)]
pub struct Conduct {
    violations: u32,
    reported: bool,
    log: LogLimiter,
}

/// What the caller does about one violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// Write a log line now (with this many earlier ones suppressed).
    pub log: Option<u64>,
    /// Report the worker for replacement now (once per worker).
    pub replace: bool,
}

impl Conduct {
    /// Records one violation at `now`.
    pub fn violation(&mut self, now: Instant) -> Response {
        self.violations = self.violations.saturating_add(1);
        let replace = !self.reported && self.violations >= VIOLATION_LIMIT;
        self.reported |= replace;
        let log = match self.log.check(now) {
            Verdict::Log { suppressed } => Some(suppressed),
            Verdict::Suppress => None,
        };
        Response { log, replace }
    }

    /// Violations so far.
    pub fn violations(&self) -> u32 {
        self.violations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_never_exceeds_dispatched() {
        assert_eq!(add_closed(10, 3, 7), Ok(10));
        assert_eq!(add_closed(10, 3, 8), Err(10));
        assert_eq!(add_closed(10, 3, u64::MAX), Err(10));
        assert_eq!(add_closed(u64::MAX, 1, u64::MAX), Err(u64::MAX));
    }

    #[test]
    fn replaced_once_after_the_limit_and_logged_boundedly() {
        let now = Instant::now();
        let mut c = Conduct::default();
        let mut logged = 0;
        let mut replaced = 0;
        for _ in 0..10_000 {
            let r = c.violation(now);
            logged += usize::from(r.log.is_some());
            replaced += usize::from(r.replace);
        }
        assert_eq!(replaced, 1);
        assert!(logged <= super::super::ratelimit::LINES_PER_WINDOW as usize);
        assert_eq!(c.violations(), 10_000);
    }
}
