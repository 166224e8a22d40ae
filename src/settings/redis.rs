//! `[redis]`: where the queue and the session keys live, and how to reach them.
//!
//! The `tls_*` keys are fields here (a `[redis]` table cannot be split), but their meaning and
//! checks are in `tls.rs`.

use std::{path::PathBuf, time::Duration};

use agent_jobs::QueueKeys;
use serde::Deserialize;

use super::{RedisUrl, SettingsError, empty_as_none, invalid};

/// `[redis]`: where the queue and the session keys live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Server URL; may carry a password, so it only prints redacted.
    pub url: RedisUrl,
    /// apalis queue name of agent-start jobs.
    pub queue: String,
    /// Per-command response timeout.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Connection establishment timeout.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Run on a Redis whose `maxmemory-policy` evicts keys (refused otherwise).
    pub allow_eviction: bool,
    /// PEM bundle of the CAs trusted for a `rediss://` server's certificate, instead of the
    /// system's roots; none when unset.
    #[serde(deserialize_with = "empty_as_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate (chain) presented to a server that asks for client certificates; set
    /// with [`RedisSettings::tls_key_file`].
    #[serde(deserialize_with = "empty_as_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of [`RedisSettings::tls_cert_file`].
    #[serde(deserialize_with = "empty_as_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Accept any server certificate (no verification at all). An explicit opt-out, warned
    /// about at start-up.
    pub tls_insecure: bool,
}

impl RedisSettings {
    /// Checks the section's values, the TLS keys' included (files read).
    pub fn validate(&self) -> Result<(), SettingsError> {
        // Neither the URL nor the parser's message (which may quote it) is shown: an
        // unparseable URL may hold its password anywhere.
        if ::redis::Client::open(self.url.expose()).is_err() {
            return Err(invalid(
                "redis.url",
                "is not a valid Redis URL (redis://[user:password@]host[:port][/db] or \
                 rediss://...; not shown, it may contain a password; percent-encode \
                 reserved characters of the password)",
            ));
        }
        self.validate_tls()?;
        QueueKeys::new(&self.queue).map_err(|e| invalid("redis.queue", e.to_string()))?;
        if self.response_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "redis.response_timeout",
                "must be at least 1s (slow scripts would fail workers)",
            ));
        }
        if self.connection_timeout.is_zero() {
            return Err(invalid("redis.connection_timeout", "must be > 0"));
        }
        Ok(())
    }
}
