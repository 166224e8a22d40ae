//! The agent's command line and environment for a session (contract §4).
//!
//! `agent.command` (program and leading arguments), then the session's options, each one argv
//! element (`--name=value`, so argparse and Pipecat's second `parse_known_args` pass can never
//! read a value for an option), an option left out when its value is empty; `SESSION_ID`,
//! `VOICE_ID` and `SESSION_CONFIG` added to the inherited environment. Never a shell.

use std::{path::PathBuf, sync::Arc};

use agent_jobs::SessionId;

use crate::{
    session::config::{SESSION_OPTIONS, SessionConfig},
    settings::{AgentSettings, ArgStyle},
};

/// Variables whose values are only known at launch time (the current Redis primary under
/// Sentinel), added after the session's own.
pub type LaunchEnv = Arc<dyn Fn() -> Vec<(String, String)> + Send + Sync>;

/// How the agent of a session is launched: `agent.command`, `agent.arg_style` and
/// `agent.log_dir`. Built once from settings.
#[derive(Clone)]
pub struct AgentCommand {
    /// Program and leading arguments (validated non-empty).
    pub command: Vec<String>,
    /// How options reach the command line.
    pub arg_style: ArgStyle,
    /// Where per-session log files go, if anywhere.
    pub log_dir: Option<PathBuf>,
    /// Variables computed at each launch, if any.
    pub launch_env: Option<LaunchEnv>,
}

impl std::fmt::Debug for AgentCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the launch variables: they may carry a Redis password.
        f.debug_struct("AgentCommand")
            .field("command", &self.command)
            .field("arg_style", &self.arg_style)
            .field("log_dir", &self.log_dir)
            .finish_non_exhaustive()
    }
}

impl AgentCommand {
    /// From `[agent]` settings.
    pub fn from_settings(agent: &AgentSettings) -> Self {
        Self {
            command: agent.command.clone(),
            arg_style: agent.arg_style,
            log_dir: agent.log_dir.clone(),
            launch_env: None,
        }
    }

    /// Adds the variables `env` computes at each launch.
    pub fn with_launch_env(mut self, env: LaunchEnv) -> Self {
        self.launch_env = Some(env);
        self
    }

    /// The session's options (contract §4): `--room=<id> --voice-id=<voice>
    /// [--opening-line=<text>] [--system-prompt=<text>]`, each option one element (or two with
    /// `agent.arg_style = separate`), an option whose value is empty left out as the original
    /// worker did. With the `=` form a value starting with `-` can never be taken for an
    /// option by argparse, nor by Pipecat's second `parse_known_args` pass.
    pub fn session_args(&self, id: &SessionId, config: &SessionConfig) -> Vec<String> {
        let mut args = Vec::with_capacity(8);
        let mut option = |name: &str, value: &str| {
            if value.is_empty() {
                return;
            }
            match self.arg_style {
                ArgStyle::Equals => args.push(format!("{name}={value}")),
                ArgStyle::Separate => args.extend([name.to_owned(), value.to_owned()]),
            }
        };
        option("--room", id.as_str());
        for (field, name) in SESSION_OPTIONS {
            option(name, config.get(field).unwrap_or_default());
        }
        args
    }

    /// The session's log file, `<agent.log_dir>/<session id>.log` (a session id holds no `/`).
    pub fn log_file(&self, id: &SessionId) -> Option<PathBuf> {
        Some(self.log_dir.as_ref()?.join(format!("{id}.log")))
    }

    /// The agent's command line, environment and log file for a session: `agent.command`,
    /// then [`AgentCommand::session_args`]; `SESSION_ID`, `VOICE_ID` and `SESSION_CONFIG` (the
    /// whole config hash as JSON) added to the inherited environment.
    pub fn spec(&self, id: &SessionId, config: &SessionConfig) -> LaunchSpec {
        let (program, leading) = self
            .command
            .split_first()
            .expect("agent.command is validated non-empty");
        let mut args = leading.to_vec();
        args.extend(self.session_args(id, config));
        let mut env = vec![
            ("SESSION_ID".to_owned(), id.to_string()),
            ("VOICE_ID".to_owned(), config.voice_id().to_owned()),
            ("SESSION_CONFIG".to_owned(), config.to_json()),
        ];
        if let Some(launch_env) = &self.launch_env {
            env.extend(launch_env());
        }
        LaunchSpec {
            session_id: id.clone(),
            program: program.clone(),
            args,
            leading_args: leading.len(),
            env,
            log_file: self.log_file(id),
        }
    }
}

/// What to launch for one session.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The session the agent serves.
    pub session_id: SessionId,
    /// Program to execute (path, or name looked up on `PATH`).
    pub program: String,
    /// Arguments, each passed verbatim as one argv element.
    pub args: Vec<String>,
    /// How many of `args` are `agent.command`'s leading arguments; the rest are the session's
    /// (what a warm process is handed: see [`crate::agent::warm`]).
    pub leading_args: usize,
    /// Variables added to the inherited environment.
    pub env: Vec<(String, String)>,
    /// Where the agent's whole output is appended, if anywhere.
    pub log_file: Option<PathBuf>,
}

impl LaunchSpec {
    /// The session's own arguments: `args` after `agent.command`'s leading ones.
    pub fn session_args(&self) -> &[String] {
        &self.args[self.leading_args.min(self.args.len())..]
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(pairs: &[(&str, &str)]) -> SessionConfig {
        SessionConfig::for_tests(pairs)
    }

    fn command(style: ArgStyle) -> AgentCommand {
        AgentCommand {
            command: vec!["python3".into(), "/app/voice_assistant.py".into()],
            arg_style: style,
            log_dir: Some(PathBuf::from("/var/log/voice-agents")),
            launch_env: None,
        }
    }

    #[test]
    fn options_are_one_element_each_and_empty_ones_are_left_out() {
        let id = SessionId::parse("s-1").unwrap();
        let cfg = config(&[
            ("voiceId", "Craig"),
            ("openingLine", "-r oops"),
            ("systemPrompt", ""),
        ]);
        let spec = command(ArgStyle::Equals).spec(&id, &cfg);
        assert_eq!(spec.program, "python3");
        assert_eq!(
            spec.args,
            [
                "/app/voice_assistant.py",
                "--room=s-1",
                "--voice-id=Craig",
                "--opening-line=-r oops"
            ]
        );
        assert_eq!(
            spec.log_file.as_deref(),
            Some(Path::new("/var/log/voice-agents/s-1.log"))
        );
        let separate = command(ArgStyle::Separate).session_args(&id, &cfg);
        assert_eq!(
            separate,
            [
                "--room",
                "s-1",
                "--voice-id",
                "Craig",
                "--opening-line",
                "-r oops"
            ]
        );
    }
}
