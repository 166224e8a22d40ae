//! `[redis]`: where the queue and the session keys live, and how to reach them.
//!
//! The `tls_*` keys are fields here (a `[redis]` table cannot be split), but their meaning and
//! checks are in `tls.rs`.

use std::{path::PathBuf, time::Duration};

use agent_jobs::QueueKeys;
use serde::Deserialize;

use super::{RedisUrl, Secret, SettingsError, empty_as_none, invalid};

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
    /// `host:port` of each Redis Sentinel; empty: `url` names the server (or a managed
    /// service's primary endpoint). Set, every connection asks them for the primary.
    pub sentinels: Vec<String>,
    /// The primary's name the sentinels monitor (`sentinel monitor <name> ...`).
    pub sentinel_master: String,
    /// The sentinels' own password (`requirepass` in their config); empty: none.
    pub sentinel_password: Secret,
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
        self.validate_sentinels()
    }

    /// The sentinels' addresses, parsed (empty without Sentinel).
    pub fn sentinel_addrs(&self) -> Vec<(String, u16)> {
        self.sentinels
            .iter()
            .filter_map(|addr| parse_host_port(addr))
            .collect()
    }

    fn validate_sentinels(&self) -> Result<(), SettingsError> {
        if let Some(bad) = self.sentinels.iter().find(|a| parse_host_port(a).is_none()) {
            return Err(invalid(
                "redis.sentinels",
                format!("{bad:?} is not host:port (e.g. \"sentinel-1:26379\")"),
            ));
        }
        match (self.sentinels.is_empty(), self.sentinel_master.is_empty()) {
            (false, true) => Err(invalid(
                "redis.sentinel_master",
                "must name the primary the sentinels monitor when redis.sentinels is set",
            )),
            (true, false) => Err(invalid(
                "redis.sentinel_master",
                "is set but redis.sentinels is empty (list the sentinels' host:port)",
            )),
            _ if self.sentinels.is_empty() && self.sentinel_password.is_set() => Err(invalid(
                "redis.sentinel_password",
                "is set but redis.sentinels is empty",
            )),
            _ => Ok(()),
        }
    }
}

/// `host:port` with a non-empty host and a port; `[v6]:port` too.
fn parse_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.trim().rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::super::load::load_with_env;

    #[test]
    fn sentinels_are_host_port_and_need_the_primary_s_name() {
        let settings = load_with_env(&[
            ("AGENT_WORKER__REDIS__SENTINELS", "s1:26379,[::1]:26380"),
            ("AGENT_WORKER__REDIS__SENTINEL_MASTER", "mymaster"),
        ])
        .unwrap();
        assert_eq!(
            settings.redis.sentinel_addrs(),
            [("s1".to_owned(), 26379), ("::1".to_owned(), 26380)]
        );
        let error = |env: &[(&str, &str)]| load_with_env(env).unwrap_err().to_string();
        assert!(
            error(&[("AGENT_WORKER__REDIS__SENTINELS", "s1:26379")])
                .contains("redis.sentinel_master")
        );
        assert!(
            error(&[
                ("AGENT_WORKER__REDIS__SENTINELS", "s1"),
                ("AGENT_WORKER__REDIS__SENTINEL_MASTER", "m"),
            ])
            .contains("redis.sentinels: \"s1\" is not host:port")
        );
        assert!(
            error(&[("AGENT_WORKER__REDIS__SENTINEL_MASTER", "m")])
                .contains("redis.sentinels is empty")
        );
        assert!(
            error(&[("AGENT_WORKER__REDIS__SENTINEL_PASSWORD", "pw")])
                .contains("redis.sentinel_password")
        );
    }
}
