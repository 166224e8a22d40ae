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
//!   died during the spawn. The worker is not forked for this: see [`crate::agent::spawn`].
//! - stdout and stderr are read continuously, line by line, so a chatty agent never blocks on
//!   a full pipe. Each line goes to tracing and to the [`OutputSink`].
//! - Ready detection is event-driven: the reader that sees a ready pattern flips a watch
//!   channel the launch is awaiting, raced against the agent's exit and the start-up timeout.
//! - One owner task per agent waits on the child, so it is always reaped (no zombies), and
//!   serves stop requests.
//!
//! The interface exists so benchmarks can measure the queue path with a launcher that returns
//! at once; production code only ever uses [`ProcessLauncher`].

use std::{fmt, os::unix::process::ExitStatusExt, process::ExitStatus, sync::Arc, time::Duration};

use super::{
    command::LaunchSpec,
    containment::{self, AgentScope, Containment},
    log_files::{LogFile, LogFiles},
    log_list::OutputSink,
    output::{Binding, OutputReader, Phase},
    spawn::{Child, Stdin},
};
use crate::settings::AgentSettings;
use agent_jobs::SessionId;
use futures::{FutureExt, future::BoxFuture};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

/// How long to wait for buffered output after an agent exited during start-up.
const READER_DRAIN: Duration = Duration::from_millis(200);

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
    /// No alive line (nor a ready line) within the alive timeout; the agent was killed.
    #[error("agent printed no alive line within {timeout:?} and was killed{}", last_line_suffix(.last_line))]
    NotAlive {
        /// The alive timeout.
        timeout: Duration,
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

impl LaunchError {
    /// The agent ran but did not get through a start-up phase in time (what the original
    /// worker counted as a start-up timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::NotAlive { .. } | Self::NotReady { .. })
    }
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
    /// Whether it was a warm process handed its session (see [`crate::agent::warm`]).
    pub warm: bool,
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

    /// Shutdown began: processes kept for later launches (a warm pool's) are stopped now,
    /// and no more are started. Launches still work.
    fn close(&self) {}

    /// Idle warm processes, for a launcher with a warm pool.
    fn warm_idle(&self) -> Option<usize> {
        None
    }

    /// Resolves once every process this launcher started has exited and its process group
    /// was killed; for the end of a shutdown, after every agent was told to stop. Launches
    /// made after this was called are not waited for.
    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// What the launcher judges start-up by, and how it treats output (from `[agent]`).
#[derive(Debug, Clone)]
pub struct Readiness {
    /// A line containing one of these means alive (imports done); empty: no alive phase.
    pub alive_patterns: Arc<[String]>,
    /// Time allowed from spawn to the first alive (or ready) line.
    pub alive_timeout: Duration,
    /// A line containing one of these means ready (connected).
    pub ready_patterns: Arc<[String]>,
    /// Time allowed from spawn to the first ready line.
    pub startup_timeout: Duration,
}

/// How much of an agent's output is kept (from `[agent]`).
#[derive(Debug, Clone, Copy)]
pub struct OutputLimits {
    /// Longest output line kept; the rest of a longer line is cut, with a marker.
    pub max_line_bytes: usize,
    /// A log file stops growing at this size.
    pub log_file_max_bytes: u64,
    /// Lines per second (burst: twice that) of each agent shown in the worker's own log.
    pub log_lines_per_second: u32,
}

impl OutputLimits {
    /// From `[agent]` settings.
    pub fn from_settings(agent: &AgentSettings) -> Self {
        Self {
            max_line_bytes: agent.max_line_bytes,
            log_file_max_bytes: agent.log_file_max_bytes,
            log_lines_per_second: agent.log_lines_per_second,
        }
    }
}

impl Default for OutputLimits {
    /// The defaults of `config/default.toml`.
    fn default() -> Self {
        Self {
            max_line_bytes: 64 * 1024,
            log_file_max_bytes: 64 * 1024 * 1024,
            log_lines_per_second: 50,
        }
    }
}

impl Readiness {
    /// From `[agent]` settings.
    pub fn from_settings(agent: &AgentSettings) -> Self {
        Self {
            alive_patterns: agent.alive_patterns.clone().into(),
            alive_timeout: agent.alive_timeout,
            ready_patterns: agent.ready_patterns.clone().into(),
            startup_timeout: agent.startup_timeout,
        }
    }

    /// Only a ready phase: ready when a line contains one of `patterns` within `timeout`.
    pub fn ready_only(patterns: Vec<String>, timeout: Duration) -> Self {
        Self {
            alive_patterns: Arc::from([]),
            alive_timeout: timeout,
            ready_patterns: patterns.into(),
            startup_timeout: timeout,
        }
    }

    /// When the alive phase must have ended, if it ends before the ready deadline.
    fn alive_deadline(&self, spawned: tokio::time::Instant) -> Option<tokio::time::Instant> {
        (!self.alive_patterns.is_empty() && self.alive_timeout < self.startup_timeout)
            .then(|| spawned + self.alive_timeout)
    }
}

/// Launches real processes.
#[derive(Debug, Clone)]
pub struct ProcessLauncher {
    readiness: Readiness,
    limits: OutputLimits,
    output: OutputSink,
    log_files: LogFiles,
    containment: Arc<Containment>,
    worker_id: String,
    /// The owner task of every agent (see [`own`]).
    owners: TaskTracker,
}

impl ProcessLauncher {
    /// A launcher judging start-up by `readiness`, keeping output within `limits`, sending
    /// output lines to `output` (and to log files, for launches that name one).
    pub fn new(readiness: Readiness, limits: OutputLimits, output: OutputSink) -> Self {
        Self {
            readiness,
            limits,
            output,
            log_files: LogFiles::start(limits.log_file_max_bytes),
            containment: Arc::new(Containment::ProcessGroup),
            worker_id: "worker".into(),
            owners: TaskTracker::new(),
        }
    }

    /// Contains each agent's whole tree with `containment` (the process group alone unless
    /// set), marking its processes as the agents of `worker_id`.
    pub fn contained(
        mut self,
        containment: Arc<Containment>,
        worker_id: impl Into<String>,
    ) -> Self {
        self.containment = containment;
        self.worker_id = worker_id.into();
        self
    }

    async fn launch_process(&self, spec: LaunchSpec) -> Result<RunningAgent, LaunchError> {
        let log_file = match &spec.log_file {
            Some(path) => self.log_files.open(&spec.session_id, path).await,
            None => None,
        };
        let process = self.start_process(
            Program {
                label: spec.session_id.clone(),
                scope: spec.session_id.to_string(),
                program: &spec.program,
                args: &spec.args,
                env: &spec.env,
                stdin: Stdin::Null,
            },
            self.readiness.clone(),
            true,
            log_file.map(|file| (self.log_files.clone(), file)),
        )?;
        self.await_start(process, &self.readiness).await
    }

    /// Spawns a process (see the module docs for how), starts its output readers with its
    /// output bound as `to_session` says, and its owner task.
    pub(crate) fn start_process(
        &self,
        program: Program<'_>,
        readiness: Readiness,
        to_session: bool,
        log_file: Option<(LogFiles, Arc<LogFile>)>,
    ) -> Result<Started, LaunchError> {
        let spawned_at = tokio::time::Instant::now();
        let label = program.label.clone();
        let mut scope = self.containment.prepare(&self.worker_id, &program.scope);
        let mut child = spawn(&program, &scope).map_err(|e| LaunchError::Spawn {
            program: program.program.to_owned(),
            reason: e.to_string(),
        })?;
        if let Some(error) = child.cgroup_error.take() {
            scope.cgroup_refused(&error, &label);
        }
        let pid = child.id();
        containment::agent_started(pid);
        // The agent leads a new group named after its pid (see `spawn`).
        let pgid = pid;
        tracing::info!(session_id = %label, pid, pgid, "agent_process_spawned");

        let (phase_tx, phase_rx) = watch::channel(Phase::Spawned);
        let last_line = Arc::new(std::sync::Mutex::new(None::<String>));
        let reader = OutputReader::new(
            Binding {
                label,
                to_session,
                readiness,
                phase: phase_tx,
                log_file,
                last_line: last_line.clone(),
            },
            self.limits.max_line_bytes,
            self.limits.log_lines_per_second,
            self.output.clone(),
        );
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(reader.clone().read(stdout, OutputStream::Stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(reader.clone().read(stderr, OutputStream::Stderr));
        }
        let stdin = child.stdin.take();

        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        self.owners.spawn(own(
            child,
            pgid,
            stop_rx,
            exit_tx,
            (self.containment.clone(), scope),
        ));
        Ok(Started {
            pid,
            spawned_at,
            phase: phase_rx,
            exited: exit_rx,
            handle: AgentHandle::new(stop_tx),
            last_line,
            reader,
            stdin,
        })
    }

    /// Waits for `process` to get through its start-up phases as `readiness` judges them,
    /// with deadlines from `process.spawned_at`. A process that does not is stopped.
    pub(crate) async fn await_start(
        &self,
        process: Started,
        readiness: &Readiness,
    ) -> Result<RunningAgent, LaunchError> {
        let Started {
            pid,
            spawned_at,
            phase: mut phase_rx,
            exited: mut exit_rx,
            handle,
            last_line,
            reader,
            stdin,
        } = process;
        // Only the output tasks may keep the readers: the phase channel closes when they reach
        // end-of-file, which is how an exit before the ready line is told without waiting out
        // the drain below.
        drop((reader, stdin));
        let pgid = pid;
        // Until the launch returns, dropping it (an immediate shutdown) kills the agent.
        let mut abandoned = StopOnDrop(Some(handle.clone()));

        let last = || last_line.lock().expect("last_line lock").clone();
        // Every wait below is bounded by a deadline from the spawn: an agent that closes its
        // output but keeps running, or a grandchild holding the pipes, must not hold the launch
        // past it. The alive phase ends first (when it is on and shorter).
        let ready_by = spawned_at + readiness.startup_timeout;
        let alive_by = readiness.alive_deadline(spawned_at);
        let mut outcome = None;
        if let Some(alive_by) = alive_by {
            let alive = tokio::time::timeout_at(
                alive_by,
                wait_for_phase(Phase::Alive, &mut phase_rx, &mut exit_rx),
            )
            .await;
            outcome = match alive {
                Ok(Outcome::Reached(Phase::Ready)) => Some(Outcome::Reached(Phase::Ready)),
                Ok(Outcome::Reached(_)) => None,
                Ok(ended) => Some(ended),
                Err(_elapsed) => Some(Outcome::TimedOut(Phase::Alive)),
            };
        }
        let outcome = match outcome {
            Some(outcome) => outcome,
            None => tokio::time::timeout_at(
                ready_by,
                wait_for_phase(Phase::Ready, &mut phase_rx, &mut exit_rx),
            )
            .await
            .unwrap_or(Outcome::TimedOut(Phase::Ready)),
        };
        // A ready line written just before the exit may still be in the pipe: give the readers
        // a moment to reach EOF (after the deadlines: the exit is known either way).
        let outcome = match outcome {
            Outcome::Exited(exit) => {
                let seen = phase_rx.wait_for(|p| *p == Phase::Ready).map(|r| r.is_ok());
                if tokio::time::timeout(READER_DRAIN, seen).await == Ok(true) {
                    Outcome::ReadyThenExited(exit)
                } else {
                    Outcome::Exited(exit)
                }
            }
            other => other,
        };
        abandoned.0 = None;
        let startup = spawned_at.elapsed();
        match outcome {
            Outcome::Reached(_) => Ok(RunningAgent {
                pid,
                pgid,
                startup,
                exited: exit_rx,
                handle,
                warm: false,
            }),
            Outcome::ReadyThenExited(exit) => {
                let (tx, exited) = oneshot::channel();
                let _ = tx.send(exit);
                Ok(RunningAgent {
                    pid,
                    pgid,
                    startup,
                    exited,
                    handle,
                    warm: false,
                })
            }
            Outcome::Exited(exit) => Err(LaunchError::ExitedBeforeReady {
                exit,
                last_line: last(),
            }),
            Outcome::TimedOut(phase) => {
                handle.stop(Duration::ZERO);
                let _ = exit_rx.await;
                Err(if phase == Phase::Alive {
                    LaunchError::NotAlive {
                        timeout: readiness.alive_timeout,
                        last_line: last(),
                    }
                } else {
                    LaunchError::NotReady {
                        timeout: readiness.startup_timeout,
                        last_line: last(),
                    }
                })
            }
        }
    }

    /// How agents are judged ready.
    pub(crate) fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// Opens the session's log file, when `spec` names one.
    pub(crate) async fn open_log_file(
        &self,
        spec: &LaunchSpec,
    ) -> Option<(LogFiles, Arc<LogFile>)> {
        let path = spec.log_file.as_ref()?;
        let file = self.log_files.open(&spec.session_id, path).await?;
        Some((self.log_files.clone(), file))
    }
}

/// What [`ProcessLauncher::start_process`] starts.
pub(crate) struct Program<'a> {
    /// The session id in logs (a warm process's own label).
    pub(crate) label: SessionId,
    /// The name of its containment scope (cgroup, marker): the session id, or for a warm
    /// process a name outside the session ids' alphabet, so no session can share its cgroup.
    pub(crate) scope: String,
    /// The program to execute.
    pub(crate) program: &'a str,
    /// Its arguments.
    pub(crate) args: &'a [String],
    /// Environment additions.
    pub(crate) env: &'a [(String, String)],
    /// What it reads.
    pub(crate) stdin: Stdin,
}

/// A spawned process whose output is being read, not yet judged ready.
pub(crate) struct Started {
    /// Its pid (and process group id).
    pub(crate) pid: u32,
    /// When it was spawned (or handed its session), where start-up deadlines count from.
    pub(crate) spawned_at: tokio::time::Instant,
    /// The phase its output reached.
    pub(crate) phase: watch::Receiver<Phase>,
    /// Resolves once it exited and was reaped.
    pub(crate) exited: oneshot::Receiver<AgentExit>,
    /// Stops it.
    pub(crate) handle: AgentHandle,
    /// Its last output line.
    pub(crate) last_line: Arc<std::sync::Mutex<Option<String>>>,
    /// Its output readers (to rebind a warm process's output to its session).
    pub(crate) reader: OutputReader,
    /// Its stdin, when piped.
    pub(crate) stdin: Option<tokio::net::unix::pipe::Sender>,
}

/// Waits until the agent's output reached `target` (or further), or it exited. Cancel-safe
/// (it runs under the phase deadlines): the exit is taken from `exit` only in the step that
/// returns it.
async fn wait_for_phase(
    target: Phase,
    phase: &mut watch::Receiver<Phase>,
    exit: &mut oneshot::Receiver<AgentExit>,
) -> Outcome {
    tokio::select! {
        // `biased`: an agent that printed its ready line and exited right after did start;
        // check the output before the exit.
        biased;
        reached = async { phase.wait_for(|p| *p >= target).await.map(|p| *p) } => match reached {
            Ok(p) => Outcome::Reached(p),
            // The readers drop the sender at EOF; a closed channel short of the target means the
            // agent closed its output, and its exit is what we report.
            Err(_) => Outcome::Exited(exit.await.unwrap_or(AgentExit::Code(-1))),
        },
        exited = &mut *exit => Outcome::Exited(exited.unwrap_or(AgentExit::Code(-1))),
    }
}

/// Stops the agent it holds when dropped.
pub(crate) struct StopOnDrop(pub(crate) Option<AgentHandle>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.stop(Duration::ZERO);
        }
    }
}

/// How a wait for a start-up phase ended.
enum Outcome {
    Reached(Phase),
    ReadyThenExited(AgentExit),
    Exited(AgentExit),
    TimedOut(Phase),
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

fn spawn(spec: &Program<'_>, scope: &AgentScope) -> std::io::Result<Child> {
    let mut env: Vec<(&str, &str)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Python writes stdout to a pipe in 8 KiB blocks; its ready line would sit in the buffer
    // until the start-up timeout. Agents in other languages ignore this.
    env.push(("PYTHONUNBUFFERED", "1"));
    // Inherited by everything the agent starts: how escaped descendants are found.
    env.push((containment::SCOPE_VAR, scope.marker()));
    // Agents are launched from the runtime's worker threads, which live as long as the
    // process: the death signal, which follows the spawning thread, fires only with the worker.
    crate::agent::spawn::spawn_into(
        spec.program,
        spec.args,
        &env,
        scope.cgroup_procs(),
        spec.stdin,
    )
}

/// Waits on the child (reaping it) and serves stop requests: SIGTERM to the group at once,
/// SIGKILL when the shortest requested grace runs out.
async fn own(
    child: Child,
    pgid: u32,
    mut stop_rx: mpsc::UnboundedReceiver<Duration>,
    exit_tx: oneshot::Sender<AgentExit>,
    (containment, scope): (Arc<Containment>, AgentScope),
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
    containment::agent_reaped(child.id());
    // And what left the group (setsid): its cgroup, or its marked re-parented descendants.
    let _ = tokio::task::spawn_blocking(move || containment.end(scope)).await;
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
