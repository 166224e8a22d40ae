//! A warm process: an agent started before its session, which has done its slow imports and
//! waits to be told which session it serves (the warm pool of [`crate::agent::warm_pool`]
//! keeps them).
//!
//! The handoff protocol, version 1 (documented for agent authors in `docs/warm-pool.md`):
//! 1. The worker starts `agent.warm_command` exactly as it starts a cold agent (no shell, its
//!    own process group and containment, the death signal, output read continuously), but
//!    without session arguments or session variables, and with stdin on a pipe.
//! 2. The process prints a line containing `agent.warm_pattern` once it can take a session.
//! 3. The worker writes one line of JSON to its stdin, then closes stdin (so anything that
//!    reads stdin later sees end-of-file, as a cold agent on `/dev/null` does):
//!    `{"v":1,"args":[...],"env":{...}}`. `args` are exactly the arguments the cold path
//!    appends to `agent.command` (`--room=…`, `--voice-id=…`, …); `env` the variables it adds
//!    (`SESSION_ID`, `VOICE_ID`, `SESSION_CONFIG`).
//! 4. From then on it is that session's agent: its output goes to the session's logs, it is
//!    judged alive and ready by `agent.alive_patterns` / `agent.ready_patterns` with the
//!    deadlines counted from the handoff, and it is supervised, stopped and recorded as any
//!    agent (with `warm=1` in `session:<id>`).
//!
//! A process that is gone before it took its session (it died idle, could not be written to,
//! or exited without printing a line after the handoff) is lost (`HandoffError::Lost`): the start
//! falls back to a cold launch at once, and the job never fails because of the pool. One
//! that printed output and then failed is the session's agent failing, as a cold one can.

use std::time::{Duration, Instant};

use agent_jobs::SessionId;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::{io::AsyncWriteExt, net::unix::pipe, sync::oneshot};

use super::{
    command::LaunchSpec,
    exit::AgentExit,
    launcher::{AgentHandle, LaunchError, RunningAgent, StartMode},
    output::{Binding, OutputReader},
    phase::Readiness,
    process::{AgentProcesses, Program, Spawned},
    spawn::Stdin,
    startup::{Started, StopOnDrop, await_start},
};

/// The version of the handoff line (`"v"`).
pub const PROTOCOL_VERSION: u32 = 1;

/// A warm process that does not read its session line within this is lost (its pipe holds
/// 64 KiB; a longer line needs the process to be reading).
const HANDOFF_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How warm processes are started and judged warm.
#[derive(Debug, Clone)]
pub struct WarmCommand {
    /// Program and leading arguments (`agent.warm_command`, else `agent.command`).
    pub command: Vec<String>,
    /// Substring of the warm line (`agent.warm_pattern`).
    pub pattern: String,
    /// Time allowed from the spawn to the warm line (`agent.warm_timeout`).
    pub timeout: Duration,
}

/// A warm process waiting for its session. Dropping it does not stop it: see [`Self::stop`].
pub(crate) struct WarmProcess {
    /// Its label in logs (`warm-<n>`), until it has a session.
    pub(crate) label: SessionId,
    /// Its pid.
    pub(crate) pid: u32,
    /// When it printed its warm line.
    pub(crate) warm_at: Instant,
    handle: AgentHandle,
    exit: Shared<BoxFuture<'static, Option<AgentExit>>>,
    reader: OutputReader,
    stdin: pipe::Sender,
}

/// Why a handoff gave no ready agent.
#[derive(Debug)]
pub(crate) enum HandoffError {
    /// The warm process was gone before it took its session: start cold instead.
    Lost(String),
    /// The session's agent failed its start-up, as a cold one can.
    Failed(LaunchError),
}

/// The line a warm process reads: `{"v":1,"args":[...],"env":{...}}` and a newline. JSON
/// escapes every control character, so the line holds no newline of a value.
pub fn handoff_line(spec: &LaunchSpec) -> String {
    let env: serde_json::Map<String, serde_json::Value> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut line = serde_json::json!({
        "v": PROTOCOL_VERSION,
        "args": spec.session_args(),
        "env": env,
    })
    .to_string();
    line.push('\n');
    line
}

impl WarmProcess {
    /// Starts a warm process labelled `label` through `processes` and waits for its warm line.
    pub(crate) async fn start(
        processes: &AgentProcesses,
        label: SessionId,
        warm: &WarmCommand,
    ) -> Result<Self, LaunchError> {
        let (program, args) = warm
            .command
            .split_first()
            .expect("agent.warm_command is validated non-empty");
        let readiness = Readiness::ready_only(vec![warm.pattern.clone()], warm.timeout);
        let Spawned {
            started,
            reader,
            stdin,
        } = processes.spawn(
            Program {
                label: label.clone(),
                // `~` is outside the session ids' alphabet: no session's cgroup or marker can
                // be this one.
                scope: label.as_str().replace('-', "~"),
                program,
                args,
                env: &[],
                stdin: Stdin::Piped,
            },
            readiness.clone(),
            false,
            None,
        )?;
        let stdin = stdin.expect("a piped stdin");
        let agent = await_start(started, &readiness).await?;
        let exited = agent.exited;
        Ok(Self {
            label,
            pid: agent.pid,
            warm_at: Instant::now(),
            handle: agent.handle,
            exit: async move { exited.await.ok() }.boxed().shared(),
            reader,
            stdin,
        })
    }

    /// Resolves when the process has exited (with how, if known).
    pub(crate) fn exited(&self) -> impl Future<Output = Option<AgentExit>> + Send + 'static {
        self.exit.clone()
    }

    /// Whether it has exited already.
    pub(crate) fn has_exited(&self) -> bool {
        self.exit.peek().is_some()
    }

    /// Kills it (and everything it started) at once.
    pub(crate) fn stop(&self) {
        self.handle.stop(Duration::ZERO);
    }

    /// Hands it its session and waits for it to be ready as `readiness` judges it, as a cold
    /// agent is waited for (its log file opened through `processes`). Dropping the future
    /// kills the process.
    pub(crate) async fn hand_off(
        self,
        processes: &AgentProcesses,
        readiness: &Readiness,
        spec: &LaunchSpec,
    ) -> Result<RunningAgent, HandoffError> {
        let mut guard = StopOnDrop(Some(self.handle.clone()));
        if self.has_exited() {
            return Err(HandoffError::Lost("it exited while idle".into()));
        }
        let log_file = processes.open_log_file(spec).await;
        let (binding, phase) =
            Binding::new(spec.session_id.clone(), true, readiness.clone(), log_file);
        let last_line = binding.last_line.clone();
        // Before the line is written: whatever the process prints from now on is the session's.
        self.reader.rebind(binding);
        let handed_at = tokio::time::Instant::now();
        let Self {
            label,
            pid,
            handle,
            exit,
            reader,
            stdin,
            ..
        } = self;
        let lost = |reason: String| {
            // What a process lost at the handoff prints as it dies is not the session's.
            let idle = Readiness::ready_only(Vec::new(), Duration::ZERO);
            reader.rebind(Binding::new(label.clone(), false, idle, None).0);
            HandoffError::Lost(reason)
        };
        write_session(stdin, spec).await.map_err(&lost)?;
        tracing::info!(
            session_id = %spec.session_id,
            pid,
            warm_label = %label,
            "warm_agent_handed_session"
        );
        let started = Started {
            pid,
            spawned_at: handed_at,
            phase,
            exited: exit_receiver(exit),
            handle,
            last_line,
        };
        // The launch's own guard takes over.
        guard.0 = None;
        match await_start(started, readiness).await {
            Ok(mut agent) => {
                agent.start = StartMode::Warm;
                Ok(agent)
            }
            // Nothing printed since the handoff: the process died under us rather than the
            // session's agent failing (a cold start says which it was).
            Err(LaunchError::ExitedBeforeReady {
                exit,
                last_line: None,
            }) => Err(lost(format!(
                "it exited with {exit} before printing anything of its session"
            ))),
            Err(error) => Err(HandoffError::Failed(error)),
        }
    }
}

/// Writes the handoff line of `spec` to a warm process's `stdin`, then closes it; the reason
/// the process is lost if that fails.
async fn write_session(mut stdin: pipe::Sender, spec: &LaunchSpec) -> Result<(), String> {
    let line = handoff_line(spec);
    let written =
        tokio::time::timeout(HANDOFF_WRITE_TIMEOUT, stdin.write_all(line.as_bytes())).await;
    // End-of-file from here on, as a cold agent's /dev/null gives.
    drop(stdin);
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("writing its session failed: {error}")),
        Err(_elapsed) => Err(format!(
            "it did not read its session within {HANDOFF_WRITE_TIMEOUT:?}"
        )),
    }
}

/// The exit of a warm process as the readiness wait takes it, a oneshot, as for a cold agent.
fn exit_receiver(
    exit: Shared<BoxFuture<'static, Option<AgentExit>>>,
) -> oneshot::Receiver<AgentExit> {
    let (exit_tx, exit_rx) = oneshot::channel();
    tokio::spawn(async move {
        if let Some(exit) = exit.await {
            let _ = exit_tx.send(exit);
        }
    });
    exit_rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::command::LaunchSpec;

    #[test]
    fn the_handoff_line_is_one_line_of_json_with_the_session_args_only() {
        let spec = LaunchSpec {
            session_id: SessionId::parse("s-1").unwrap(),
            program: "python3".into(),
            args: vec![
                "agent.py".into(),
                "--room=s-1".into(),
                "--opening-line=line one\nline two \"quoted\" -r oops".into(),
            ],
            leading_args: 1,
            env: vec![("SESSION_ID".into(), "s-1".into())],
            log_file: None,
        };
        let line = handoff_line(&spec);
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["v"], 1);
        assert_eq!(
            parsed["args"],
            serde_json::json!([
                "--room=s-1",
                "--opening-line=line one\nline two \"quoted\" -r oops"
            ])
        );
        assert_eq!(parsed["env"]["SESSION_ID"], "s-1");
    }
}
