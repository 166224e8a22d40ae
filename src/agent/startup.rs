//! The readiness wait: a started process goes through its start-up phases
//! ([`crate::agent::phase`]) within their deadlines, or is stopped.
//!
//! `await_start` takes a `Started`, which any start mode can produce: the cold launcher's
//! and a warm-up's from the process owner ([`crate::agent::process`]), a warm process's
//! handoff from the process it already owns, with the deadlines counted from the handoff. It
//! needs only the process's phase (moved forward by its output readers), its exit (from its
//! owner task), a handle to stop it and its last output line; never how it was started.
//!
//! The wait is event-driven: the reader that sees a ready line flips the phase watch this
//! awaits, raced against the exit and the deadline. Dropping the wait (an immediate shutdown)
//! kills the process (`StopOnDrop`).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::FutureExt;
use tokio::sync::{oneshot, watch};

use super::{
    exit::AgentExit,
    launcher::{AgentHandle, LaunchError, RunningAgent, StartMode},
    phase::{Phase, Readiness},
};

/// How long to wait for buffered output after an agent exited during start-up.
const READER_DRAIN: Duration = Duration::from_millis(200);

/// A process whose output is being read, not yet judged ready: what a start mode hands
/// [`await_start`].
pub(crate) struct Started {
    /// Its pid (and process group id).
    pub(crate) pid: u32,
    /// When it was spawned (or handed its session), where start-up deadlines count from.
    pub(crate) spawned_at: tokio::time::Instant,
    /// The phase its output reached. Its sender is held by the output readers only, so it
    /// closes when they reach end-of-file.
    pub(crate) phase: watch::Receiver<Phase>,
    /// Resolves once it exited and was reaped.
    pub(crate) exited: oneshot::Receiver<AgentExit>,
    /// Stops it.
    pub(crate) handle: AgentHandle,
    /// Its last output line.
    pub(crate) last_line: Arc<Mutex<Option<String>>>,
}

/// Waits for `started` to get through its start-up phases as `readiness` judges them, with
/// deadlines from `started.spawned_at`. A process that does not is stopped.
pub(crate) async fn await_start(
    started: Started,
    readiness: &Readiness,
) -> Result<RunningAgent, LaunchError> {
    let Started {
        pid,
        spawned_at,
        mut phase,
        mut exited,
        handle,
        last_line,
    } = started;
    // Until the launch returns, dropping it (an immediate shutdown) kills the agent.
    let mut abandoned = StopOnDrop(Some(handle.clone()));
    let (outcome, alive_at) = phases(spawned_at, readiness, &mut phase, &mut exited).await;
    abandoned.0 = None;
    let startup = spawned_at.elapsed();
    let alive_at = alive_at.unwrap_or(spawned_at + startup);
    let last = || last_line.lock().expect("last_line lock").clone();
    // It leads its own group: its pgid is its pid.
    let running = |exited, handle| RunningAgent {
        pid,
        pgid: pid,
        startup,
        exited,
        handle,
        start: StartMode::Cold,
        spawned_at,
        alive_at,
    };
    match outcome {
        Outcome::Reached(_) => Ok(running(exited, handle)),
        Outcome::ReadyThenExited(exit) => {
            let (tx, exited) = oneshot::channel();
            let _ = tx.send(exit);
            Ok(running(exited, handle))
        }
        Outcome::Exited(exit) => Err(LaunchError::ExitedBeforeReady {
            exit,
            last_line: last(),
        }),
        Outcome::TimedOut(phase) => {
            handle.stop(Duration::ZERO);
            let _ = exited.await;
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

/// How the start-up phases ended: each wait bounded by its deadline from `spawned_at`, and an
/// exit told apart from a ready line that was still in the pipe when it came; with when the
/// alive phase was reached, if it was watched for and reached before the ready line.
async fn phases(
    spawned_at: tokio::time::Instant,
    readiness: &Readiness,
    phase: &mut watch::Receiver<Phase>,
    exit: &mut oneshot::Receiver<AgentExit>,
) -> (Outcome, Option<tokio::time::Instant>) {
    // Every wait below is bounded by a deadline from the spawn: an agent that closes its
    // output but keeps running, or a grandchild holding the pipes, must not hold the launch
    // past it. The alive phase ends first (when it is on and shorter).
    let ready_by = spawned_at + readiness.startup_timeout;
    let mut outcome = None;
    let mut alive_at = None;
    if let Some(alive_by) = readiness.alive_deadline(spawned_at) {
        let alive =
            tokio::time::timeout_at(alive_by, wait_for_phase(Phase::Alive, phase, exit)).await;
        outcome = match alive {
            Ok(Outcome::Reached(Phase::Ready)) => Some(Outcome::Reached(Phase::Ready)),
            Ok(Outcome::Reached(_)) => {
                alive_at = Some(tokio::time::Instant::now());
                None
            }
            Ok(ended) => Some(ended),
            Err(_elapsed) => Some(Outcome::TimedOut(Phase::Alive)),
        };
    }
    let outcome = match outcome {
        Some(outcome) => outcome,
        None => tokio::time::timeout_at(ready_by, wait_for_phase(Phase::Ready, phase, exit))
            .await
            .unwrap_or(Outcome::TimedOut(Phase::Ready)),
    };
    // A ready line written just before the exit may still be in the pipe: give the readers
    // a moment to reach EOF (after the deadlines: the exit is known either way).
    let outcome = match outcome {
        Outcome::Exited(exit) => {
            let seen = phase.wait_for(|p| *p == Phase::Ready).map(|r| r.is_ok());
            if tokio::time::timeout(READER_DRAIN, seen).await == Ok(true) {
                Outcome::ReadyThenExited(exit)
            } else {
                Outcome::Exited(exit)
            }
        }
        other => other,
    };
    (outcome, alive_at)
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
