//! Loading: the compiled-in defaults, `--config FILE`, `REDIS_URL` and `AGENT_WORKER__*`
//! variables, merged in that order and then validated.
//!
//! Environment variables carry strings, so the loader must know which keys are lists (their
//! values are split at commas). It reads that from the defaults: a key whose default is an
//! array is a list. A new list key therefore needs nothing here.

use std::{collections::HashMap, path::Path};

use config::{Config, Environment, File, FileFormat, Source, ValueKind};

use super::{Settings, SettingsError};

/// The defaults, compiled in so the binary runs without its source tree.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

const ENV_PREFIX: &str = "AGENT_WORKER";

impl Settings {
    /// Loads settings from the defaults, `file` and the process environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars().collect())
    }

    /// Like [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let defaults = File::from_str(DEFAULT_TOML, FileFormat::Toml);
        let list_keys = list_keys(&defaults)?;
        let mut builder = Config::builder().add_source(defaults);
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        let specific_url = format!("{ENV_PREFIX}__REDIS__URL");
        if let (Some(url), false) = (env.get("REDIS_URL"), env.contains_key(&specific_url)) {
            builder = builder.set_override("redis.url", url.clone())?;
        }
        let prefixed: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let mut environment = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(prefixed));
        for key in &list_keys {
            environment = environment.with_list_parse_key(key);
        }
        builder = builder.add_source(environment);
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }
}

/// The `section.key` names whose default is an array (`agent.command`, ...), the keys an
/// environment variable gives as a comma-separated list.
fn list_keys(defaults: &impl Source) -> Result<Vec<String>, SettingsError> {
    let mut keys = Vec::new();
    for (section, value) in defaults.collect()? {
        let ValueKind::Table(table) = value.kind else {
            continue;
        };
        for (key, value) in table {
            if let ValueKind::Array(_) = value.kind {
                keys.push(format!("{section}.{key}"));
            }
        }
    }
    Ok(keys)
}

/// Loads with only `pairs` as the environment, for the tests of every section.
#[cfg(test)]
pub(super) fn load_with_env(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    let env = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_from(None, env)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::settings::LogFormat;

    #[test]
    fn defaults_load_and_validate() {
        let s = load_with_env(&[]).unwrap();
        assert_eq!(s.redis.queue, "agent-start");
        assert_eq!(s.session.ttl, Duration::from_secs(4 * 3600));
        assert_eq!(s.agent.default_voice, "Ashley");
        assert_eq!(s.telemetry.format, LogFormat::Pretty);
    }

    #[test]
    fn environment_overrides_with_lists_and_durations() {
        let s = load_with_env(&[
            ("AGENT_WORKER__AGENT__COMMAND", "python3,-m,voice_agent"),
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "45s"),
            ("AGENT_WORKER__WORKER__CONCURRENCY", "7"),
            ("AGENT_WORKER__TELEMETRY__FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(s.agent.command, ["python3", "-m", "voice_agent"]);
        assert_eq!(s.agent.startup_timeout, Duration::from_secs(45));
        assert_eq!(s.worker.concurrency, 7);
        assert_eq!(s.telemetry.format, LogFormat::Json);
    }

    /// Every key whose default is a list takes a comma-separated list from the environment,
    /// and no other key does (a comma in a scalar stays part of its value).
    #[test]
    fn list_keys_are_the_lists_of_the_defaults() {
        let keys = list_keys(&File::from_str(DEFAULT_TOML, FileFormat::Toml)).unwrap();
        for key in [
            "agent.command",
            "agent.warm_command",
            "agent.zygote_command",
            "agent.ready_patterns",
            "agent.alive_patterns",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "agent.default_voice"), "{keys:?}");
        let s = load_with_env(&[
            ("AGENT_WORKER__AGENT__WARM_COMMAND", "python3,-m,warm"),
            ("AGENT_WORKER__AGENT__READY_PATTERNS", "Connected to,joined"),
            ("AGENT_WORKER__AGENT__DEFAULT_VOICE", "Craig,Ashley"),
        ])
        .unwrap();
        assert_eq!(s.agent.warm_command, ["python3", "-m", "warm"]);
        assert_eq!(s.agent.ready_patterns, ["Connected to", "joined"]);
        assert_eq!(s.agent.default_voice, "Craig,Ashley");
    }

    #[test]
    fn redis_url_precedence() {
        let plain = load_with_env(&[("REDIS_URL", "redis://plain:1/")]).unwrap();
        assert_eq!(plain.redis.url.expose(), "redis://plain:1/");
        let both = load_with_env(&[
            ("REDIS_URL", "redis://plain:1/"),
            ("AGENT_WORKER__REDIS__URL", "redis://specific:2/"),
        ])
        .unwrap();
        assert_eq!(both.redis.url.expose(), "redis://specific:2/");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = load_with_env(&[("AGENT_WORKER__WORKER__CONCURRENCY", "0")]).unwrap_err();
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
        let err = load_with_env(&[("AGENT_WORKER__REDIS__QUEUE", "a b")]).unwrap_err();
        assert!(err.to_string().contains("redis.queue"), "{err}");
        let err = load_with_env(&[("AGENT_WORKER__AGENT__NO_SUCH_KEY", "1")]).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }
}
