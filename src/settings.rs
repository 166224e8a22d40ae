//! Typed settings: `config/default.toml`, then `--config FILE`, then the environment.
//!
//! Layers, later ones winning ([`load`](Settings::load)): the defaults compiled in from
//! `config/default.toml`; the file given with `--config`; `REDIS_URL` (for `redis.url` only,
//! and only when the more specific `AGENT_WORKER__REDIS__URL` is not set);
//! `AGENT_WORKER__<SECTION>__<KEY>` variables. Unknown keys are errors (a typo must not
//! silently fall back to a default).
//!
//! One file per `[section]` of `config/default.toml`, each struct with its fields and its own
//! `validate` beside them, as svix-server's configuration does; [`Settings::validate`] calls
//! every section's and then checks the rules that span sections. Every error names its key.
//! Adding a key is a field (and its check) in its section's file plus its default and comment
//! in `config/default.toml`: the loader learns from the defaults which keys are lists.
//!
//! Apart from the sections: [`Secret`] and [`RedisUrl`], which never print what they hold
//! (`secret.rs`), and the `redis.tls_*` keys' mode, checks and certificate files (`tls.rs`).

mod agent;
mod compat;
mod events;
mod http;
mod limits;
mod load;
mod redis;
mod retention;
mod secret;
mod session;
mod shutdown;
mod size;
mod sweep;
mod telemetry;
mod tls;
mod worker;

use std::path::PathBuf;

use serde::Deserialize;

pub use self::{
    agent::{AgentSettings, ArgStyle},
    compat::CompatSettings,
    events::EventSettings,
    http::{HttpSettings, MIN_ADMIN_TOKEN_LEN},
    load::DEFAULT_TOML,
    redis::RedisSettings,
    retention::RetentionSettings,
    secret::{RedisUrl, Secret, redact_url},
    session::SessionSettings,
    shutdown::ShutdownSettings,
    size::ByteSize,
    sweep::SweepSettings,
    telemetry::{LogFormat, TelemetrySettings},
    tls::TlsMode,
    worker::WorkerSettings,
};

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A file could not be read or parsed, or a value has the wrong type.
    #[error("invalid settings: {0}")]
    Load(#[from] config::ConfigError),
    /// A value is out of range; the message names the key.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// `section.key`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// [`SettingsError::Invalid`] for `key`: the shorthand of every section's checks.
fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// All settings of agent-worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[redis]`
    pub redis: RedisSettings,
    /// `[worker]`
    pub worker: WorkerSettings,
    /// `[agent]`
    pub agent: AgentSettings,
    /// `[session]`
    pub session: SessionSettings,
    /// `[sweep]`
    pub sweep: SweepSettings,
    /// `[shutdown]`
    pub shutdown: ShutdownSettings,
    /// `[retention]`
    pub retention: RetentionSettings,
    /// `[http]`
    pub http: HttpSettings,
    /// `[telemetry]`
    pub telemetry: TelemetrySettings,
    /// `[compat]`
    pub compat: CompatSettings,
    /// `[events]`
    pub events: EventSettings,
}

impl Settings {
    /// Checks every value that deserialized but is out of range: each section's own rules,
    /// then the rules between sections. The first error found is returned.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.redis.validate()?;
        self.worker.validate()?;
        self.agent.validate()?;
        self.session.validate()?;
        // A start attempt (which refreshes the session's index entry) must end before the
        // session looks stale, or the sweep would remove a session that is still starting.
        if self.session.stale_after <= self.agent.startup_timeout {
            return Err(invalid(
                "session.stale_after",
                "must be longer than agent.startup_timeout",
            ));
        }
        self.sweep.validate()?;
        self.retention.validate()?;
        self.http.validate()?;
        self.events.validate()
    }

    /// Heartbeats a worker may miss before it is presumed dead; see
    /// [`WorkerSettings::missed_heartbeats`].
    pub fn missed_heartbeats(&self) -> usize {
        self.worker.missed_heartbeats()
    }
}

/// An empty string (the way `config/default.toml` says "unset") as `None`; for the optional
/// paths of several sections.
fn empty_as_none<'de, D>(deserializer: D) -> Result<Option<PathBuf>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value: Option<String> = Option::deserialize(deserializer)?;
    Ok(value.filter(|v| !v.is_empty()).map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::load::load_with_env;

    /// Each section's checks run, and the rule between sections: one wrong value per
    /// section, and the error names that value's key.
    #[test]
    fn every_section_is_checked_and_errors_name_the_key() {
        for (variable, value, key) in [
            (
                "REDIS__CONNECTION_TIMEOUT",
                "0s",
                "redis.connection_timeout",
            ),
            ("WORKER__BATCH_SIZE", "0", "worker.batch_size"),
            (
                "AGENT__LOG_FILE_MAX_BYTES",
                "1024",
                "agent.log_file_max_bytes",
            ),
            ("SESSION__ENDED_TTL", "0s", "session.ended_ttl"),
            ("SESSION__STALE_AFTER", "90s", "session.stale_after"),
            ("SWEEP__BATCH_SIZE", "0", "sweep.batch_size"),
            ("RETENTION__DONE", "0s", "retention.done"),
            ("RETENTION__DEAD", "0s", "retention.dead"),
            ("HTTP__ADMIN_TOKEN", "short", "http.admin_token"),
            ("EVENTS__MAX_LEN", "0", "events.max_len"),
        ] {
            let variable = format!("AGENT_WORKER__{variable}");
            let err = load_with_env(&[(&variable, value)])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("invalid setting {key}: ")),
                "{variable}={value}: {err}"
            );
        }
        let err = load_with_env(&[("AGENT_WORKER__SESSION__STALE_AFTER", "90s")]).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("must be longer than agent.startup_timeout"),
            "{err}"
        );
    }
}
