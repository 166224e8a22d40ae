//! `[events]`: the session event stream (`agent-worker:events`) the session scripts append to.

use serde::Deserialize;

use super::{SettingsError, invalid};

/// The largest `events.max_len`: a bound that still keeps the stream's memory small (about
/// 100 bytes per event).
const MAX_EVENTS_MAX_LEN: u64 = 10_000_000;

/// `[events]`: the session event stream (`agent-worker:events`) the session scripts append to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// Approximate bound of the stream (`XADD MAXLEN ~`): older events are trimmed.
    pub max_len: u64,
}

impl EventSettings {
    /// Checks the section's values.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(1..=MAX_EVENTS_MAX_LEN).contains(&self.max_len) {
            return Err(invalid(
                "events.max_len",
                format!("must be between 1 and {MAX_EVENTS_MAX_LEN}"),
            ));
        }
        Ok(())
    }
}
