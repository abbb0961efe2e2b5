//! Bounded logging for anything a worker or another local process can trigger at will
//! (malformed channel messages, rejected notifications, `STATUS=` lines): a [`LogLimiter`]
//! lets a few lines through per window and counts the rest, so a flood costs a counter
//! increment, not a write, and the log says how much it hid. Pure: the caller passes the time.

use std::time::{Duration, Instant};

/// Lines a limiter lets through per window by default.
pub const LINES_PER_WINDOW: u32 = 5;
/// Default window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Allows at most `per_window` lines per `window`; counts the ones it suppresses.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(LINES_PER_WINDOW, WINDOW)
    }
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `suppressed` lines were dropped since the last one written (say so).
    Log {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop it.
    Suppress,
}

impl LogLimiter {
    /// A limiter for `per_window` lines per `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogLimiter {
            per_window,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Decides about one line at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let expired = self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.per_window {
            self.in_window += 1;
            Verdict::Log {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            Verdict::Suppress
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, for logging text a worker sent.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_few_through_per_window_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        assert_eq!(l.check(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check(t0), Verdict::Log { suppressed: 0 });
        for _ in 0..1000 {
            assert_eq!(l.check(t0), Verdict::Suppress);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.check(t1), Verdict::Log { suppressed: 1000 });
        assert_eq!(l.check(t1), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check(t1), Verdict::Suppress);
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a");
    }
}
