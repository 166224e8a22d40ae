//! `[retention]`: trimming the finished jobs apalis-redis would otherwise keep forever.

use std::time::Duration;

use serde::Deserialize;

use super::{SettingsError, invalid};

/// `[retention]`: trimming finished jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Age after which done jobs are deleted.
    #[serde(with = "humantime_serde")]
    pub done: Duration,
    /// Age after which dead jobs are deleted.
    #[serde(with = "humantime_serde")]
    pub dead: Duration,
    /// Most dead jobs kept.
    pub dead_max: usize,
    /// Time between retention runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl RetentionSettings {
    /// Checks the section's values.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.interval < Duration::from_secs(1) {
            return Err(invalid("retention.interval", "must be at least 1s"));
        }
        if self.done.is_zero() {
            return Err(invalid("retention.done", "retention periods must be > 0"));
        }
        if self.dead.is_zero() {
            return Err(invalid("retention.dead", "retention periods must be > 0"));
        }
        Ok(())
    }
}
