//! Launching a voice agent process (contract §4) behind the [`Launcher`] interface.
//!
//! [`ProcessLauncher`] is the real one:
//! - No shell: program and arguments go to `execve` as separate strings, verbatim. (As with
//!   `execvp`, an executable file without `#!` is run by `/bin/sh` as a script, with the same
//!   argv; no value is ever parsed by a shell.)
//! - The agent leads its own process group, so stopping it reaches everything it started:
//!   SIGTERM to the group, a grace period, then SIGKILL.
//! - It cannot outlive the worker: `PR_SET_PDEATHSIG` asks the kernel to SIGKILL it when the
//!   worker dies, even by SIGKILL, and a check right after closes the race where the worker
//!   died during the spawn. The worker is not forked for this: see [`crate::spawn`].
//! - stdout and stderr are read continuously, line by line, so a chatty agent never blocks on
//!   a full pipe. Each line goes to tracing and to the [`OutputSink`].
//! - Ready detection is event-driven: the reader that sees a ready pattern flips a watch
//!   channel the launch is awaiting, raced against the agent's exit and the start-up timeout.
//! - One owner task per agent waits on the child, so it is always reaped (no zombies), and
//!   serves stop requests.
//!
//! The interface exists so benchmarks can measure the queue path with a launcher that returns
//! at once; production code only ever uses [`ProcessLauncher`].

use std::{
    fmt,
    os::unix::process::ExitStatusExt,
    process::ExitStatus,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_jobs::SessionId;

use crate::{session::SessionConfig, spawn::Child};
use futures::{FutureExt, future::BoxFuture};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    sync::{mpsc, oneshot, watch},
};
use tokio_util::task::TaskTracker;

/// Longest output line kept; the rest of a longer line is dropped (a line without newlines
/// must not grow memory without bound).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// How long to wait for buffered output after an agent exited during start-up.
const READER_DRAIN: Duration = Duration::from_millis(200);

/// What to launch for one session.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The session the agent serves.
    pub session_id: SessionId,
    /// Program to execute (path, or name looked up on `PATH`).
    pub program: String,
    /// Arguments, each passed verbatim as one argv element.
    pub args: Vec<String>,
    /// Variables added to the inherited environment.
    pub env: Vec<(String, String)>,
}

impl LaunchSpec {
    /// The agent's command line and environment for a session (contract §4): `command`
    /// (program and leading arguments), then `--room <id> --voice-id <voice>` and the optional
    /// `--opening-line` / `--system-prompt`, each value one argv element.
    pub fn for_session(command: &[String], id: &SessionId, config: &SessionConfig) -> Self {
        let (program, leading) = command
            .split_first()
            .expect("agent.command is validated non-empty");
        let mut args = leading.to_vec();
        args.extend([
            "--room".to_owned(),
            id.to_string(),
            "--voice-id".to_owned(),
            config.voice_id().to_owned(),
        ]);
        if let Some(line) = config.opening_line() {
            args.extend(["--opening-line".to_owned(), line.to_owned()]);
        }
        if let Some(prompt) = config.system_prompt() {
            args.extend(["--system-prompt".to_owned(), prompt.to_owned()]);
        }
        Self {
            session_id: id.clone(),
            program: program.clone(),
            args,
            env: vec![
                ("SESSION_ID".to_owned(), id.to_string()),
                ("VOICE_ID".to_owned(), config.voice_id().to_owned()),
                ("SESSION_CONFIG".to_owned(), config.to_json()),
            ],
        }
    }
}

/// How an agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl From<ExitStatus> for AgentExit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            (None, None) => Self::Code(-1),
        }
    }
}

impl fmt::Display for AgentExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "code {code}"),
            Self::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// Why a launch failed. All of these are worth another attempt: the agent or its host may
/// behave differently next time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LaunchError {
    /// The program does not exist or is not executable.
    #[error("agent program {program:?} could not be executed: {reason}")]
    Spawn {
        /// The configured program.
        program: String,
        /// The OS error.
        reason: String,
    },
    /// The agent exited before printing a ready line.
    #[error("agent exited with {exit} before it was ready{}", last_line_suffix(.last_line))]
    ExitedBeforeReady {
        /// How it exited.
        exit: AgentExit,
        /// Its last output line, if any.
        last_line: Option<String>,
    },
    /// No ready line within the start-up timeout; the agent was killed.
    #[error("agent printed no ready line within {timeout:?} and was killed{}", last_line_suffix(.last_line))]
    NotReady {
        /// The start-up timeout.
        timeout: Duration,
        /// Its last output line, if any.
        last_line: Option<String>,
    },
}

fn last_line_suffix(line: &Option<String>) -> String {
    match line {
        Some(line) => format!("; last output: {line:?}"),
        None => String::new(),
    }
}

/// Where an output line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The agent's stdout.
    Stdout,
    /// The agent's stderr.
    Stderr,
}

/// One line of agent output.
#[derive(Debug, Clone)]
pub struct AgentLine {
    /// The agent's session.
    pub session_id: SessionId,
    /// The line, without its newline, lossily decoded, at most [`MAX_LINE_BYTES`].
    pub line: String,
}

/// Receives agent output for storage. Sending never waits: when the receiver falls behind,
/// lines are dropped from storage (they were already logged), never held in the agent's pipe.
pub type OutputSink = mpsc::Sender<AgentLine>;

/// A running, ready agent. Dropping it does not stop the process: call [`AgentHandle::stop`].
#[derive(Debug)]
pub struct RunningAgent {
    /// The agent's pid.
    pub pid: u32,
    /// Its process group id (equal to its pid: it leads its own group).
    pub pgid: u32,
    /// From spawn to the ready line.
    pub startup: Duration,
    /// Resolves once the process has exited and been reaped.
    pub exited: oneshot::Receiver<AgentExit>,
    /// Stops the agent.
    pub handle: AgentHandle,
}

/// Asks an agent's owner task to stop it.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    stop: mpsc::UnboundedSender<Duration>,
}

impl AgentHandle {
    /// A handle whose requests go to `stop`; for [`Launcher`] implementations.
    pub fn new(stop: mpsc::UnboundedSender<Duration>) -> Self {
        Self { stop }
    }

    /// SIGTERM to the agent's group now, SIGKILL after `grace` if it is still there.
    /// A later call with a shorter grace shortens the wait. Does not wait for the exit.
    pub fn stop(&self, grace: Duration) {
        // The owner task is gone only when the process already exited: nothing to stop.
        let _ = self.stop.send(grace);
    }
}

/// Starts agents. See the module docs for what the real one guarantees.
pub trait Launcher: Send + Sync + 'static {
    /// Launches an agent and resolves once it is ready, or with the reason it is not.
    /// A failed launch leaves no process behind, and neither does a launch whose future is
    /// dropped before it resolved.
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<RunningAgent, LaunchError>>;

    /// Resolves once every process this launcher started has exited and its process group
    /// was killed; for the end of a shutdown, after every agent was told to stop. Launches
    /// made after this was called are not waited for.
    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Launches real processes.
#[derive(Debug, Clone)]
pub struct ProcessLauncher {
    ready_patterns: Arc<[String]>,
    startup_timeout: Duration,
    output: OutputSink,
    /// The owner task of every agent (see [`own`]).
    owners: TaskTracker,
}

impl ProcessLauncher {
    /// A launcher judging readiness by `ready_patterns` within `startup_timeout`, sending
    /// output lines to `output`.
    pub fn new(ready_patterns: Vec<String>, startup_timeout: Duration, output: OutputSink) -> Self {
        Self {
            ready_patterns: ready_patterns.into(),
            startup_timeout,
            output,
            owners: TaskTracker::new(),
        }
    }

    async fn launch_process(&self, spec: LaunchSpec) -> Result<RunningAgent, LaunchError> {
        let started = Instant::now();
        let mut child = spawn(&spec).map_err(|e| LaunchError::Spawn {
            program: spec.program.clone(),
            reason: e.to_string(),
        })?;
        let pid = child.id();
        // The agent leads a new group named after its pid (see `spawn`).
        let pgid = pid;
        tracing::info!(session_id = %spec.session_id, pid, pgid, "agent_process_spawned");

        let (ready_tx, mut ready_rx) = watch::channel(false);
        let last_line = Arc::new(std::sync::Mutex::new(None::<String>));
        let reader = OutputReader {
            session_id: spec.session_id.clone(),
            patterns: self.ready_patterns.clone(),
            ready: Arc::new(ready_tx),
            sink: self.output.clone(),
            last_line: last_line.clone(),
        };
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(reader.clone().read(stdout, OutputStream::Stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(reader.read(stderr, OutputStream::Stderr));
        }

        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let (exit_tx, mut exit_rx) = oneshot::channel();
        self.owners.spawn(own(child, pgid, stop_rx, exit_tx));
        let handle = AgentHandle::new(stop_tx);
        // Until the launch returns, dropping it (an immediate shutdown) kills the agent.
        let mut abandoned = StopOnDrop(Some(handle.clone()));

        let last = || last_line.lock().expect("last_line lock").clone();
        let mut ready_after_exit = ready_rx.clone();
        // Every wait below shares one deadline: an agent that closes its output but keeps
        // running, or a grandchild holding the pipes, must not hold the launch past it.
        let deadline = tokio::time::Instant::now() + self.startup_timeout;
        let outcome = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                // `biased`: an agent that printed its ready line and exited right after did
                // start; check readiness before the exit.
                biased;
                ready = ready_rx.wait_for(|ready| *ready).map(|r| r.is_ok()) => {
                    // The readers drop the sender at EOF; a closed channel without a ready line
                    // means the agent closed its output, and its exit is what we report.
                    if ready {
                        Outcome::Ready
                    } else {
                        Outcome::Exited((&mut exit_rx).await.unwrap_or(AgentExit::Code(-1)))
                    }
                }
                exit = &mut exit_rx => {
                    let exit = exit.unwrap_or(AgentExit::Code(-1));
                    // A ready line written just before the exit may still be in the pipe: give
                    // the readers a moment to reach EOF.
                    let seen = ready_after_exit.wait_for(|ready| *ready).map(|r| r.is_ok());
                    if tokio::time::timeout(READER_DRAIN, seen).await == Ok(true) {
                        Outcome::ReadyThenExited(exit)
                    } else {
                        Outcome::Exited(exit)
                    }
                }
            }
        })
        .await;
        abandoned.0 = None;
        match outcome {
            Ok(Outcome::Ready) => Ok(RunningAgent {
                pid,
                pgid,
                startup: started.elapsed(),
                exited: exit_rx,
                handle,
            }),
            Ok(Outcome::ReadyThenExited(exit)) => {
                let (tx, exited) = oneshot::channel();
                let _ = tx.send(exit);
                Ok(RunningAgent {
                    pid,
                    pgid,
                    startup: started.elapsed(),
                    exited,
                    handle,
                })
            }
            Ok(Outcome::Exited(exit)) => Err(LaunchError::ExitedBeforeReady {
                exit,
                last_line: last(),
            }),
            Err(_elapsed) => {
                handle.stop(Duration::ZERO);
                let _ = exit_rx.await;
                Err(LaunchError::NotReady {
                    timeout: self.startup_timeout,
                    last_line: last(),
                })
            }
        }
    }
}

/// Stops the agent it holds when dropped.
struct StopOnDrop(Option<AgentHandle>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.stop(Duration::ZERO);
        }
    }
}

/// How the wait for readiness ended (before the deadline).
enum Outcome {
    Ready,
    ReadyThenExited(AgentExit),
    Exited(AgentExit),
}

impl Launcher for ProcessLauncher {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<RunningAgent, LaunchError>> {
        Box::pin(self.launch_process(spec))
    }

    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        // An abandoned launch's agent has no supervisor watching it; its owner task is what
        // kills the rest of its group, which the death signal does not reach.
        self.owners.close();
        Box::pin(self.owners.wait())
    }
}

fn spawn(spec: &LaunchSpec) -> std::io::Result<Child> {
    let mut env: Vec<(&str, &str)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Python writes stdout to a pipe in 8 KiB blocks; its ready line would sit in the buffer
    // until the start-up timeout. Agents in other languages ignore this.
    env.push(("PYTHONUNBUFFERED", "1"));
    // Agents are launched from the runtime's worker threads, which live as long as the
    // process: the death signal, which follows the spawning thread, fires only with the worker.
    crate::spawn::spawn(&spec.program, &spec.args, &env)
}

/// Waits on the child (reaping it) and serves stop requests: SIGTERM to the group at once,
/// SIGKILL when the shortest requested grace runs out.
async fn own(
    child: Child,
    pgid: u32,
    mut stop_rx: mpsc::UnboundedReceiver<Duration>,
    exit_tx: oneshot::Sender<AgentExit>,
) {
    let group = Pid::from_raw(pgid as i32);
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        let deadline = kill_at;
        tokio::select! {
            status = child.wait() => break status,
            Some(grace) = stop_rx.recv() => {
                signal_group(group, Signal::SIGTERM);
                let at = tokio::time::Instant::now() + grace;
                kill_at = Some(kill_at.map_or(at, |current| current.min(at)));
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                signal_group(group, Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    // Processes the agent started live on in its group after it exits (the death signal is not
    // inherited by them). The group id cannot be reused while any of them exists, and a new
    // group taking the same id in the microseconds since the reap would need the pid space to
    // wrap around: killing the group now is safe, and leaves nothing behind.
    signal_group(group, Signal::SIGKILL);
    let exit = match status {
        Ok(status) => AgentExit::from(status),
        // wait() only fails if the child was already reaped elsewhere, which we never do.
        Err(_) => AgentExit::Code(-1),
    };
    let _ = exit_tx.send(exit);
}

fn signal_group(group: Pid, signal: Signal) {
    // ESRCH means the group is already gone, which is what we wanted.
    let _ = nix::sys::signal::killpg(group, signal);
}

#[derive(Clone)]
struct OutputReader {
    session_id: SessionId,
    patterns: Arc<[String]>,
    ready: Arc<watch::Sender<bool>>,
    sink: OutputSink,
    last_line: Arc<std::sync::Mutex<Option<String>>>,
}

impl OutputReader {
    async fn read(self, pipe: impl AsyncRead + Unpin, stream: OutputStream) {
        let mut reader = BufReader::with_capacity(8 * 1024, pipe);
        let mut line = Vec::with_capacity(256);
        // A read error ends the stream like EOF: the agent's exit is reported by its owner.
        while let Ok(chunk) = reader.fill_buf().await {
            if chunk.is_empty() {
                if !line.is_empty() {
                    self.emit(&line, stream);
                }
                break;
            }
            let (take, complete) = match chunk.iter().position(|&b| b == b'\n') {
                Some(newline) => (newline, true),
                None => (chunk.len(), false),
            };
            let room = MAX_LINE_BYTES.saturating_sub(line.len());
            line.extend_from_slice(&chunk[..take.min(room)]);
            reader.consume(take + usize::from(complete));
            if complete {
                self.emit(&line, stream);
                line.clear();
            }
        }
    }

    fn emit(&self, raw: &[u8], stream: OutputStream) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = String::from_utf8_lossy(raw).into_owned();
        tracing::info!(
            target: "agent_output",
            session_id = %self.session_id,
            stream = ?stream,
            line = %text,
        );
        if !*self.ready.borrow() && self.patterns.iter().any(|p| text.contains(p.as_str())) {
            self.ready.send_replace(true);
        }
        *self.last_line.lock().expect("last_line lock") = Some(text.clone());
        // Full or closed: drop from storage rather than block the agent.
        let _ = self.sink.try_send(AgentLine {
            session_id: self.session_id.clone(),
            line: text,
        });
    }
}
