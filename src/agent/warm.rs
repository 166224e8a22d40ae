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

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_jobs::SessionId;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::{
    io::AsyncWriteExt,
    net::unix::pipe,
    sync::{oneshot, watch},
};

use super::{
    command::LaunchSpec,
    launcher::{
        AgentExit, AgentHandle, LaunchError, ProcessLauncher, Program, Readiness, RunningAgent,
        Started, StopOnDrop,
    },
    output::{Binding, OutputReader, Phase},
    spawn::Stdin,
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

impl WarmProcess {
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

impl ProcessLauncher {
    /// Starts a warm process labelled `label` and waits for its warm line.
    pub(crate) async fn warm_up(
        &self,
        label: SessionId,
        warm: &WarmCommand,
    ) -> Result<WarmProcess, LaunchError> {
        let (program, args) = warm
            .command
            .split_first()
            .expect("agent.warm_command is validated non-empty");
        let readiness = Readiness::ready_only(vec![warm.pattern.clone()], warm.timeout);
        let mut started = self.start_process(
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
        let stdin = started.stdin.take().expect("a piped stdin");
        let reader = started.reader.clone();
        let agent = self.await_start(started, &readiness).await?;
        let exited = agent.exited;
        Ok(WarmProcess {
            label,
            pid: agent.pid,
            warm_at: Instant::now(),
            handle: agent.handle,
            exit: async move { exited.await.ok() }.boxed().shared(),
            reader,
            stdin,
        })
    }

    /// Hands `warm` its session and waits for it to be ready, as [`ProcessLauncher`] waits for
    /// a cold agent. Dropping the future kills the process.
    pub(crate) async fn hand_off(
        &self,
        warm: WarmProcess,
        spec: &LaunchSpec,
    ) -> Result<RunningAgent, HandoffError> {
        let mut guard = StopOnDrop(Some(warm.handle.clone()));
        if warm.has_exited() {
            return Err(HandoffError::Lost("it exited while idle".into()));
        }
        let log_file = self.open_log_file(spec).await;
        let (phase_tx, phase_rx) = watch::channel(Phase::Spawned);
        let last_line = Arc::new(Mutex::new(None));
        // Before the line is written: whatever the process prints from now on is the session's.
        warm.reader.rebind(Binding {
            label: spec.session_id.clone(),
            to_session: true,
            readiness: self.readiness().clone(),
            phase: phase_tx,
            log_file,
            last_line: last_line.clone(),
        });
        // What a process lost at the handoff prints as it dies is not the session's.
        let lost = |reason: String| {
            warm.reader.rebind(Binding {
                label: warm.label.clone(),
                to_session: false,
                readiness: Readiness::ready_only(Vec::new(), Duration::ZERO),
                phase: watch::channel(Phase::Spawned).0,
                log_file: None,
                last_line: Arc::new(Mutex::new(None)),
            });
            HandoffError::Lost(reason)
        };
        let handed_at = tokio::time::Instant::now();
        let mut stdin = warm.stdin;
        let line = handoff_line(spec);
        let written =
            tokio::time::timeout(HANDOFF_WRITE_TIMEOUT, stdin.write_all(line.as_bytes())).await;
        // End-of-file from here on, as a cold agent's /dev/null gives.
        drop(stdin);
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(lost(format!("writing its session failed: {error}")));
            }
            Err(_elapsed) => {
                return Err(lost(format!(
                    "it did not read its session within {HANDOFF_WRITE_TIMEOUT:?}"
                )));
            }
        }
        tracing::info!(
            session_id = %spec.session_id,
            pid = warm.pid,
            warm_label = %warm.label,
            "warm_agent_handed_session"
        );
        // The launch's wait takes the exit as a oneshot, as for a cold agent.
        let (exit_tx, exit_rx) = oneshot::channel();
        let exit = warm.exit.clone();
        tokio::spawn(async move {
            if let Some(exit) = exit.await {
                let _ = exit_tx.send(exit);
            }
        });
        let started = Started {
            pid: warm.pid,
            spawned_at: handed_at,
            phase: phase_rx,
            exited: exit_rx,
            handle: warm.handle.clone(),
            last_line,
            reader: warm.reader.clone(),
            stdin: None,
        };
        // The launch's own guard takes over.
        guard.0 = None;
        match self.await_start(started, self.readiness()).await {
            Ok(mut agent) => {
                agent.warm = true;
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
