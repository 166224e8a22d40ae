//! `[shutdown]`: the drain after SIGTERM.

use std::time::Duration;

use serde::Deserialize;

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long agents may go on after SIGTERM before they are stopped; any value is valid
    /// (zero stops them at once).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}
