//! `[worker]`: how jobs are fetched and how the job worker is supervised.

use std::time::Duration;

use serde::Deserialize;

use super::{SettingsError, invalid};

/// `[worker]`: how jobs are fetched and how the job worker is supervised.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Agent starts in progress at once.
    pub concurrency: usize,
    /// Jobs fetched per round trip.
    pub batch_size: usize,
    /// Fallback poll interval when no wake-up arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// apalis-redis worker heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which a worker's fetched jobs are re-queued by others.
    #[serde(with = "humantime_serde")]
    pub orphan_timeout: Duration,
    /// Upper bound of the back-off between job-worker restarts.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
}

impl WorkerSettings {
    /// Checks the section's values.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.concurrency == 0 {
            return Err(invalid("worker.concurrency", "must be >= 1"));
        }
        if self.batch_size == 0 {
            return Err(invalid("worker.batch_size", "must be >= 1"));
        }
        if self.poll_interval.is_zero() {
            return Err(invalid("worker.poll_interval", "must be > 0"));
        }
        if self.heartbeat_interval < Duration::from_secs(1) {
            return Err(invalid(
                "worker.heartbeat_interval",
                "must be at least 1s (apalis-redis counts whole seconds)",
            ));
        }
        if self.orphan_timeout < self.heartbeat_interval * 2 {
            return Err(invalid(
                "worker.orphan_timeout",
                "must be at least twice worker.heartbeat_interval",
            ));
        }
        if self.restart_backoff_max.is_zero() {
            return Err(invalid("worker.restart_backoff_max", "must be > 0"));
        }
        Ok(())
    }

    /// Heartbeats a worker may miss before it is presumed dead: `orphan_timeout` in whole
    /// heartbeat intervals, rounded up (apalis-redis counts heartbeats).
    pub fn missed_heartbeats(&self) -> usize {
        let beat = self.heartbeat_interval.as_millis().max(1);
        self.orphan_timeout.as_millis().div_ceil(beat).max(2) as usize
    }
}
