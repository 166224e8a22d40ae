//! `[sweep]`: removal of stale sessions.

use std::time::Duration;

use serde::Deserialize;

use super::{SettingsError, invalid};

/// `[sweep]`: removal of stale sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSettings {
    /// Time between sweeps (one replica per tick).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Sessions per script call.
    pub batch_size: usize,
}

impl SweepSettings {
    /// Checks the section's values.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.interval < Duration::from_secs(1) {
            return Err(invalid("sweep.interval", "must be at least 1s"));
        }
        if self.batch_size == 0 {
            return Err(invalid("sweep.batch_size", "must be >= 1"));
        }
        Ok(())
    }
}
