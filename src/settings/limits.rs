//! The `agent.memory_*`, `agent.pids_max` and `agent.limits_interval` keys: per-agent
//! resource limits over the agent's whole process tree. Fields of [`AgentSettings`] (the
//! `[agent]` table), checked here. How they are enforced: `crate::agent::limits`.

use std::time::Duration;

use super::{AgentSettings, ByteSize, SettingsError, invalid};

/// A memory limit below this is a typo (`512` bytes for `512MiB`): no agent starts in it.
const MIN_MEMORY: ByteSize = ByteSize(16 << 20);
/// Fewer processes than this and an ordinary agent (an interpreter, a few helper threads)
/// cannot start.
const MIN_PIDS: u64 = 16;

impl AgentSettings {
    /// The limits: sizes large enough for any agent, `memory_high` below `memory_max`.
    pub(super) fn validate_limits(&self) -> Result<(), SettingsError> {
        for (key, size) in [
            ("agent.memory_max", self.memory_max),
            ("agent.memory_high", self.memory_high),
        ] {
            if let Some(size) = size
                && size < MIN_MEMORY
            {
                return Err(invalid(
                    key,
                    format!("{size} is below {MIN_MEMORY}; write a unit (e.g. 512MiB, 2GiB)"),
                ));
            }
        }
        if let (Some(high), Some(max)) = (self.memory_high, self.memory_max)
            && high >= max
        {
            return Err(invalid(
                "agent.memory_high",
                format!("({high}) must be below agent.memory_max ({max})"),
            ));
        }
        if self.pids_max != 0 && self.pids_max < MIN_PIDS {
            return Err(invalid(
                "agent.pids_max",
                format!("must be 0 (no limit) or at least {MIN_PIDS}"),
            ));
        }
        if self.limits_interval < Duration::from_millis(100) {
            return Err(invalid("agent.limits_interval", "must be at least 100ms"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::load_with_env;
    use super::*;

    #[test]
    fn sizes_are_human_and_checked_against_each_other() {
        let settings = load_with_env(&[
            ("AGENT_WORKER__AGENT__MEMORY_MAX", "2GiB"),
            ("AGENT_WORKER__AGENT__MEMORY_HIGH", "1536MiB"),
        ])
        .unwrap();
        assert_eq!(settings.agent.memory_max, Some(ByteSize(2 << 30)));
        assert_eq!(settings.agent.memory_high, Some(ByteSize(1536 << 20)));
        let defaults = load_with_env(&[]).unwrap().agent;
        assert_eq!((defaults.memory_max, defaults.memory_high), (None, None));
        assert_eq!(defaults.pids_max, 512);
        let error = |env: &[(&str, &str)]| load_with_env(env).unwrap_err().to_string();
        assert!(
            error(&[
                ("AGENT_WORKER__AGENT__MEMORY_MAX", "1GiB"),
                ("AGENT_WORKER__AGENT__MEMORY_HIGH", "1GiB"),
            ])
            .contains("agent.memory_high: (1 GiB) must be below agent.memory_max (1 GiB)")
        );
        assert!(error(&[("AGENT_WORKER__AGENT__MEMORY_MAX", "512")]).contains("agent.memory_max"));
        assert!(
            error(&[("AGENT_WORKER__AGENT__MEMORY_MAX", "2 bananas")]).contains("unknown unit")
        );
        assert!(error(&[("AGENT_WORKER__AGENT__PIDS_MAX", "3")]).contains("agent.pids_max"));
    }
}
