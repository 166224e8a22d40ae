//! A failure streak with back-off, for what the worker keeps running beside its agents (the
//! warm pool's warm-ups, the zygote): the first failure waits `FIRST_BACKOFF`, each further
//! one doubles the wait up to `MAX_BACKOFF`, and the streak ends on a proven success. Its
//! owner logs the beginning (`Streak::failed` says whether this failure began it) and the end
//! (`Streak::end` says how many failures it had), once each: no log per retry, no respawn
//! loop.

use std::time::Duration;

use tokio::time::Instant;

/// First pause after a failure; doubles while they keep failing.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between failed tries.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// What a failure has to prove it is over: one that works for this long (or serves a
/// session) ends the streak. One that comes up and dies soon after must not reset the back-off.
pub(crate) const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Failures in a row and when the next try may start.
#[derive(Debug, Default)]
pub(crate) struct Streak {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Streak {
    /// Counts a failure and backs off; true when it began the streak.
    pub(crate) fn failed(&mut self) -> bool {
        let first = self.failures == 0;
        self.failures = self.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + backoff);
        first
    }

    /// Ends the streak; the number of failures it had, if there was one.
    pub(crate) fn end(&mut self) -> Option<u32> {
        let failures = std::mem::take(&mut self.failures);
        self.retry_at = None;
        (failures > 0).then_some(failures)
    }

    /// Whether a streak is going on.
    pub(crate) fn is_on(&self) -> bool {
        self.failures > 0
    }

    /// When the back-off ends, while it has not ended by `now`.
    pub(crate) fn backing_off(&self, now: Instant) -> Option<Instant> {
        self.retry_at.filter(|at| *at > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause the streak asks for now, to a tenth of a second.
    fn pause(streak: &Streak) -> Duration {
        let now = Instant::now();
        let at = streak.backing_off(now).map_or(now, |at| at);
        Duration::from_millis((at - now).as_millis().div_ceil(100) as u64 * 100)
    }

    #[test]
    fn the_back_off_doubles_to_its_cap_and_ends_once() {
        let mut streak = Streak::default();
        assert!(!streak.is_on());
        assert!(streak.failed(), "the first failure begins the streak");
        assert_eq!(pause(&streak), FIRST_BACKOFF);
        assert!(!streak.failed());
        assert_eq!(pause(&streak), 2 * FIRST_BACKOFF);
        for _ in 0..20 {
            streak.failed();
        }
        assert_eq!(pause(&streak), MAX_BACKOFF);
        assert_eq!(streak.backing_off(Instant::now() + MAX_BACKOFF), None);
        assert_eq!(streak.end(), Some(22));
        assert_eq!(streak.end(), None, "an ended streak is not ended twice");
        assert!(!streak.is_on());
        assert_eq!(pause(&streak), Duration::ZERO);
    }
}
