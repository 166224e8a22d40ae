//! The launcher interface: [`Launcher`] starts an agent for a [`LaunchSpec`] and resolves once
//! it is ready ([`RunningAgent`]), or with why not ([`LaunchError`]); [`AgentHandle`] stops it.
//!
//! What the supervisor sees of every start mode, and nothing more:
//! - cold, [`crate::agent::cold::ProcessLauncher`]: a new process per session;
//! - warm, [`crate::agent::warm_pool::PooledLauncher`]: an idle warm process handed its
//!   session, else cold;
//! - forked, [`crate::agent::zygote_launcher::ZygoteLauncher`]: forked by the replica's
//!   zygote, else cold.
//!
//! Each mode is built from the same two parts below it: the process owner
//! ([`crate::agent::process`]: spawn or adopt a child, read its output, reap it, stop its
//! group, end its containment) and the readiness wait ([`crate::agent::startup`]). A new
//! mode (a zygote's fork server, say) is one more file beside `cold.rs` and `warm.rs` that
//! implements this trait with those two parts, and touches neither.
//!
//! The interface also exists so benchmarks can measure the queue path with a launcher that
//! returns at once; production code only uses the real ones.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use super::exit::AgentExit;
use super::{command::LaunchSpec, limits::Usage};

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
    /// How it started.
    pub start: StartMode,
    /// When it was spawned (or, for a warm process, handed its session): where `startup`
    /// counts from.
    pub spawned_at: tokio::time::Instant,
    /// When its output first showed it alive (its ready line, without an alive line).
    pub alive_at: tokio::time::Instant,
}

/// How an agent started: the session record's `warm` field says it (`0`, `1`, `2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// A new process, with its imports (`warm=0`).
    Cold,
    /// A warm process of the pool, handed its session ([`crate::agent::warm`]; `warm=1`).
    Warm,
    /// Forked by the zygote ([`crate::agent::zygote`]; `warm=2`).
    Forked,
}

impl StartMode {
    /// The value of the record's `warm` field.
    pub fn warm_value(self) -> u8 {
        match self {
            Self::Cold => 0,
            Self::Warm => 1,
            Self::Forked => 2,
        }
    }

    /// Its name in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Warm => "warm",
            Self::Forked => "forked",
        }
    }
}

/// What the replica's zygote is doing, for `status` and the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZygoteStatus {
    /// `starting`, `ready`, `backing-off` or `off`.
    pub state: String,
    /// Its pid, when ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Agents it forked that got ready, since the worker started.
    pub forked: u64,
    /// Why it is not ready, when it is not (the last failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Asks an agent's owner task to stop it, and reads what the agent uses.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    stop: mpsc::UnboundedSender<Duration>,
    usage: UsageCell,
}

/// The latest [`Usage`] of an agent, written by its owner task every `agent.limits_interval`.
pub type UsageCell = Arc<Mutex<Option<Usage>>>;

impl AgentHandle {
    /// A handle whose requests go to `stop`; for [`Launcher`] implementations.
    pub fn new(stop: mpsc::UnboundedSender<Duration>) -> Self {
        Self::with_usage(stop, UsageCell::default())
    }

    /// A handle whose requests go to `stop`, reading `usage`.
    pub fn with_usage(stop: mpsc::UnboundedSender<Duration>, usage: UsageCell) -> Self {
        Self { stop, usage }
    }

    /// What the agent's tree used at the last reading, if any.
    pub fn usage(&self) -> Option<Usage> {
        *self.usage.lock().expect("usage lock")
    }

    /// SIGTERM to the agent's group now, SIGKILL after `grace` if it is still there.
    /// A later call with a shorter grace shortens the wait. Does not wait for the exit.
    pub fn stop(&self, grace: Duration) {
        // The owner task is gone only when the process already exited: nothing to stop.
        let _ = self.stop.send(grace);
    }
}

/// Starts agents. See [`crate::agent::process`] for what the real ones guarantee of the
/// process.
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

    /// What its zygote is doing, for a launcher that forks from one.
    fn zygote(&self) -> Option<ZygoteStatus> {
        None
    }

    /// Resolves once every process this launcher started has exited and its process group
    /// was killed; for the end of a shutdown, after every agent was told to stop. Launches
    /// made after this was called are not waited for.
    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
