//! `[agent]`: how the voice agent is launched, judged alive and ready, logged, contained, and
//! kept warm.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ByteSize, SettingsError, empty_as_none, invalid, size::optional_size};

/// Bounds of `agent.max_line_bytes`: long enough for a log line with a stack frame, short
/// enough that a line never costs much memory per agent.
const MIN_LINE_BYTES: usize = 1024;
const MAX_LINE_BYTES: usize = 1024 * 1024;

/// `[agent]`: how the voice agent is launched and judged ready.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Program and leading arguments.
    pub command: Vec<String>,
    /// Substrings of an output line that mean "ready".
    pub ready_patterns: Vec<String>,
    /// Time allowed to become ready.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Voice for sessions without a config hash.
    pub default_voice: String,
    /// Launch attempts per job.
    pub start_attempts: u32,
    /// Back-off before the second attempt (doubles, with jitter).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Output lines kept in `agent:<id>:logs`.
    pub log_lines: usize,
    /// Agents (running plus starting) per replica.
    pub max_agents: usize,
    /// How options and their values are put on the agent's command line.
    pub arg_style: ArgStyle,
    /// Substrings of an output line that mean "alive" (imports done); empty: no alive phase.
    pub alive_patterns: Vec<String>,
    /// Time allowed to print an alive line (or a ready line, which implies it).
    #[serde(with = "humantime_serde")]
    pub alive_timeout: Duration,
    /// Directory of the per-session log files (`<dir>/<session id>.log`); none when unset.
    #[serde(deserialize_with = "empty_as_none")]
    pub log_dir: Option<PathBuf>,
    /// Longest output line kept; the rest of a longer line is cut with a marker.
    pub max_line_bytes: usize,
    /// A per-session log file stops growing at this size.
    pub log_file_max_bytes: u64,
    /// Lines per second of each agent shown in the worker's own log (burst: twice that).
    pub log_lines_per_second: u32,
    /// How an agent's whole process tree is kept from outliving its session.
    pub containment: crate::agent::containment::ContainmentSetting,
    /// Idle warm processes kept per replica (0: every agent starts cold).
    pub warm_pool: usize,
    /// Program and leading arguments of a warm process; empty: `command`.
    pub warm_command: Vec<String>,
    /// Substring of the line a warm process prints when it can take a session.
    pub warm_pattern: String,
    /// Warm-ups in progress at once.
    pub warm_concurrency: usize,
    /// Time allowed from a warm process's spawn to its warm line.
    #[serde(with = "humantime_serde")]
    pub warm_timeout: Duration,
    /// An idle warm process older than this is replaced by a fresh one.
    #[serde(with = "humantime_serde")]
    pub warm_max_idle: Duration,
    /// Program and arguments of the replica's fork server (`docs/zygote.md`); empty: none.
    pub zygote_command: Vec<String>,
    /// Time allowed for the zygote's ready message, and for each of its replies.
    #[serde(with = "humantime_serde")]
    pub zygote_timeout: Duration,
    /// The zygote is replaced once its own memory (RSS) grows past this; unset: twice its RSS
    /// when it became ready.
    #[serde(deserialize_with = "optional_size")]
    pub zygote_memory_max: Option<ByteSize>,
    /// Hard memory limit of each agent's whole process tree; none when unset (see
    /// `limits.rs`).
    #[serde(deserialize_with = "optional_size")]
    pub memory_max: Option<ByteSize>,
    /// Soft memory limit: reclaim pressure and a one-time warning; none when unset.
    #[serde(deserialize_with = "optional_size")]
    pub memory_high: Option<ByteSize>,
    /// Processes (and threads) each agent's tree may have at once; 0: no limit.
    pub pids_max: u64,
    /// How often each running agent's memory and CPU time are read (and, where no cgroup
    /// enforces `memory_max`, how soon it is enforced).
    #[serde(with = "humantime_serde")]
    pub limits_interval: Duration,
}

/// How the session's options reach the agent's command line (`agent.arg_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgStyle {
    /// One element per option: `--voice-id=Craig`. Safe with argparse whatever the value
    /// (a value starting with `-` is never read as an option).
    Equals,
    /// Two elements: `--voice-id`, `Craig`, as the original Celery worker did, for agents that
    /// cannot parse the `=` form. A value starting with `-` breaks argparse agents.
    Separate,
}

impl AgentSettings {
    /// The command of warm processes: `warm_command`, or `command` when that is empty.
    pub fn warm_command(&self) -> &[String] {
        if self.warm_command.is_empty() {
            &self.command
        } else {
            &self.warm_command
        }
    }

    /// Checks the section's values: the launch, the start-up phases, the output, the warm
    /// pool.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_launch()?;
        self.validate_phases()?;
        self.validate_warm_pool()?;
        self.validate_zygote()?;
        self.validate_limits()?;
        self.validate_output()
    }

    /// What is started, how often it is tried and how many run at once.
    fn validate_launch(&self) -> Result<(), SettingsError> {
        match self.command.first() {
            None => return Err(invalid("agent.command", "must name a program")),
            Some(program) if program.trim().is_empty() => {
                return Err(invalid("agent.command", "the program is empty"));
            }
            Some(_) => {}
        }
        if self.default_voice.is_empty() {
            return Err(invalid("agent.default_voice", "must not be empty"));
        }
        if self.start_attempts == 0 {
            return Err(invalid("agent.start_attempts", "must be >= 1"));
        }
        if self.max_agents == 0 {
            return Err(invalid("agent.max_agents", "must be >= 1"));
        }
        Ok(())
    }

    /// The alive and ready phases: their patterns and time limits.
    fn validate_phases(&self) -> Result<(), SettingsError> {
        if self.ready_patterns.is_empty() || self.ready_patterns.iter().any(|p| p.is_empty()) {
            return Err(invalid(
                "agent.ready_patterns",
                "needs at least one non-empty pattern",
            ));
        }
        if self.startup_timeout.is_zero() {
            return Err(invalid("agent.startup_timeout", "must be > 0"));
        }
        if self.alive_patterns.iter().any(|p| p.is_empty()) {
            return Err(invalid(
                "agent.alive_patterns",
                "patterns must not be empty (an empty list turns the alive phase off)",
            ));
        }
        if self.alive_timeout.is_zero() {
            return Err(invalid("agent.alive_timeout", "must be > 0"));
        }
        Ok(())
    }

    /// The `warm_*` keys, which only matter with a pool.
    fn validate_warm_pool(&self) -> Result<(), SettingsError> {
        if self.warm_pool == 0 {
            return Ok(());
        }
        if self.warm_pattern.is_empty() {
            return Err(invalid("agent.warm_pattern", "must not be empty"));
        }
        if self.warm_concurrency == 0 {
            return Err(invalid("agent.warm_concurrency", "must be >= 1"));
        }
        if self.warm_timeout.is_zero() {
            return Err(invalid("agent.warm_timeout", "must be > 0"));
        }
        if self.warm_max_idle < Duration::from_secs(1) {
            return Err(invalid("agent.warm_max_idle", "must be at least 1s"));
        }
        if self.warm_command.first().is_some_and(|p| p.is_empty()) {
            return Err(invalid(
                "agent.warm_command",
                "the program must not be empty",
            ));
        }
        Ok(())
    }

    /// The `zygote_*` keys: one start mode per replica, so no warm pool beside a zygote.
    fn validate_zygote(&self) -> Result<(), SettingsError> {
        let Some(program) = self.zygote_command.first() else {
            return Ok(());
        };
        if program.trim().is_empty() {
            return Err(invalid(
                "agent.zygote_command",
                "the program must not be empty",
            ));
        }
        if self.warm_pool > 0 {
            return Err(invalid(
                "agent.zygote_command",
                "a replica forks from its zygote or keeps a warm pool, not both: set agent.warm_pool = 0",
            ));
        }
        if self.zygote_timeout.is_zero() {
            return Err(invalid("agent.zygote_timeout", "must be > 0"));
        }
        Ok(())
    }

    /// Where the agent's output goes and how much of it is kept.
    fn validate_output(&self) -> Result<(), SettingsError> {
        if self.log_lines == 0 {
            return Err(invalid("agent.log_lines", "must be >= 1"));
        }
        if !(MIN_LINE_BYTES..=MAX_LINE_BYTES).contains(&self.max_line_bytes) {
            return Err(invalid(
                "agent.max_line_bytes",
                format!("must be between {MIN_LINE_BYTES} and {MAX_LINE_BYTES}"),
            ));
        }
        if let Some(dir) = &self.log_dir
            && !dir.is_absolute()
        {
            return Err(invalid(
                "agent.log_dir",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        if self.log_file_max_bytes < 1024 * 1024 {
            return Err(invalid(
                "agent.log_file_max_bytes",
                "must be at least 1 MiB",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::settings::load::load_with_env;

    #[test]
    fn agent_launch_settings() {
        let s = load_with_env(&[]).unwrap();
        assert_eq!(s.agent.arg_style, ArgStyle::Equals);
        assert_eq!(s.agent.startup_timeout, Duration::from_secs(90));
        assert_eq!(s.agent.alive_patterns.len(), 3);
        assert_eq!(s.agent.log_dir, None);
        assert!(s.compat.legacy_metrics);
        assert_eq!(s.events.max_len, 10_000);
        let s = load_with_env(&[
            ("AGENT_WORKER__AGENT__ARG_STYLE", "separate"),
            (
                "AGENT_WORKER__AGENT__ALIVE_PATTERNS",
                "READY_TO_IMPORT,imports done",
            ),
            ("AGENT_WORKER__AGENT__LOG_DIR", "/var/log/voice-agents"),
        ])
        .unwrap();
        assert_eq!(s.agent.arg_style, ArgStyle::Separate);
        assert_eq!(s.agent.alive_patterns, ["READY_TO_IMPORT", "imports done"]);
        assert_eq!(
            s.agent.log_dir.as_deref(),
            Some(Path::new("/var/log/voice-agents"))
        );
        let err = load_with_env(&[("AGENT_WORKER__AGENT__LOG_DIR", "logs")]).unwrap_err();
        assert!(err.to_string().contains("agent.log_dir"), "{err}");
        let err = load_with_env(&[("AGENT_WORKER__AGENT__ARG_STYLE", "spaced")]).unwrap_err();
        assert!(err.to_string().contains("arg_style"), "{err}");
    }
}
