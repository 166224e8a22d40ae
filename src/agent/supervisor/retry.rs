//! The retry policy of a launch: how many attempts, and the back-off between them.

use std::time::Duration;

use rand::RngExt;

/// Retry policy of a launch.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per start (>= 1).
    pub attempts: u32,
    /// Pause before the second attempt; doubled for each further one, with ±50 % jitter.
    pub backoff: Duration,
    /// How long to wait for a session that another worker is still starting, before handing
    /// the job back for a later retry: its start-up timeout plus the time to presume it dead.
    pub held_patience: Duration,
}

impl RetryPolicy {
    /// As the settings say: `agent.start_attempts` with `agent.retry_backoff`, and patience
    /// with a session held by another worker of `worker.orphan_timeout` (to presume it dead)
    /// plus `agent.startup_timeout` (its start) plus a heartbeat.
    pub fn from_settings(settings: &crate::settings::Settings) -> Self {
        Self {
            attempts: settings.agent.start_attempts,
            backoff: settings.agent.retry_backoff,
            held_patience: settings.worker.orphan_timeout
                + settings.agent.startup_timeout
                + settings.worker.heartbeat_interval,
        }
    }

    /// The pause after failed attempt number `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let base = self.backoff.saturating_mul(1 << (attempt - 1).min(16));
        // Jitter spreads retries of many sessions that failed together (an agent host
        // hiccup) instead of launching them again in lockstep.
        base.mul_f64(rand::rng().random_range(0.5..1.5))
    }
}
