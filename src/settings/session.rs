//! `[session]`: the lifetimes of a session's keys and how its liveness is judged.

use std::time::Duration;

use serde::Deserialize;

use super::{SettingsError, invalid};

/// `[session]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// TTL of the keys the worker writes for a session.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Liveness refresh of owned agents.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Age of the last heartbeat after which a session is stale.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// Longest a session may live.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long an ended session's record stays for the orchestrator's end-of-session handler.
    #[serde(with = "humantime_serde")]
    pub ended_ttl: Duration,
    /// The tombstone rule: a start whose `session:<id>:config` is missing at claim although
    /// its job was enqueued longer ago than this (on Redis's clock, from the meta's
    /// `enqueued_at`) starts nothing: the config was deleted, not "not written yet".
    #[serde(with = "humantime_serde")]
    pub config_grace: Duration,
}

impl SessionSettings {
    /// Checks the section's values (`stale_after` against `agent.startup_timeout` is one of
    /// [`Settings::validate`](super::Settings::validate)'s rules between sections).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.ttl < Duration::from_secs(1) {
            return Err(invalid("session.ttl", "must be at least 1s"));
        }
        if self.heartbeat_interval < Duration::from_secs(1) {
            return Err(invalid("session.heartbeat_interval", "must be at least 1s"));
        }
        // A live agent must heartbeat at least twice per stale period.
        if self.stale_after < self.heartbeat_interval * 2 {
            return Err(invalid(
                "session.stale_after",
                "must be at least twice session.heartbeat_interval",
            ));
        }
        if self.max_age < self.stale_after {
            return Err(invalid(
                "session.max_age",
                "must be at least session.stale_after",
            ));
        }
        if self.ended_ttl < Duration::from_secs(1) {
            return Err(invalid("session.ended_ttl", "must be at least 1s"));
        }
        if self.config_grace < Duration::from_secs(1) {
            return Err(invalid("session.config_grace", "must be at least 1s"));
        }
        Ok(())
    }
}
