//! Logging a failure that repeats every tick (a full disk, a database away) without flooding
//! the log: the first failure, then one line a minute with how many there were, then the
//! recovery.

use std::time::{Duration, Instant};

/// How often a failure that keeps repeating is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// The state of one repeating operation's failures.
#[derive(Debug, Default)]
pub struct RepeatedFailure {
    /// Failures since the last success.
    failures: u64,
    last_logged: Option<Instant>,
}

impl RepeatedFailure {
    /// Records a failure; `Some(n)` when it should be logged now, with `n` failures in a row
    /// so far.
    pub fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failures += 1;
        let due = self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= REPEAT_EVERY);
        due.then(|| {
            self.last_logged = Some(now);
            self.failures
        })
    }

    /// Records a success; `Some(n)` when it ends a run of `n` failures (log the recovery).
    pub fn succeeded(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.failures);
        self.last_logged = None;
        (failures > 0).then_some(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_then_one_a_minute_then_the_recovery() {
        let t0 = Instant::now();
        let mut f = RepeatedFailure::default();
        assert_eq!(f.succeeded(), None);
        assert_eq!(f.failed(t0), Some(1));
        for i in 1..12 {
            assert_eq!(f.failed(t0 + Duration::from_secs(5 * i)), None);
        }
        assert_eq!(f.failed(t0 + REPEAT_EVERY), Some(13));
        assert_eq!(f.failed(t0 + REPEAT_EVERY + Duration::from_secs(5)), None);
        assert_eq!(f.succeeded(), Some(14));
        assert_eq!(f.succeeded(), None);
        // A new run starts with a line at once.
        assert_eq!(f.failed(t0 + REPEAT_EVERY * 2), Some(1));
    }
}
