//! The supervisor: owns every agent of this process, from launch to reaped exit.
//!
//! Agents outlive the job that started them: a job completes when its agent is ready, while
//! the agent runs for the whole session. So launches and exit watchers run as tasks of the
//! supervisor, not of the apalis worker. If the job worker dies mid-launch (a Redis blip), the
//! launch goes on, and the re-delivered job finds it here instead of starting a second agent.
//!
//! Per session there is at most one slot: `Starting` (a launch in progress, which later
//! deliveries join) or `Running` (a ready agent). Across replicas, each launch attempt first
//! claims the session in Redis (`lua/claim_session.lua`): a session owned by another live worker
//! is not started again here (`agent_already_running`). A launch makes up to `start_attempts`
//! attempts with exponential back-off and jitter, writing `starting` / `error` / `ready` to the
//! session hash as it goes. When an agent exits, its session's keys are removed (if this worker
//! still owns it) and the slot is freed, which also frees capacity for the next job.
//!
//! Shutdown has three steps: [`Supervisor::close`] (no more retries), [`Supervisor::drain`]
//! (let agents end on their own, up to a deadline) and [`Supervisor::shutdown`] (stop the rest).
//!
//! Its files, bottom-up: `start.rs` (requests, outcomes, errors) and `retry.rs` (the policy);
//! `state.rs` (the slots and what the tasks share); `running.rs` (a ready agent taken over and
//! watched until its end is recorded); `launch.rs` (claim and launch, attempt after attempt,
//! handing a ready agent to `running.rs`); this file (the supervisor itself, which begins each
//! start) and `shutdown.rs` (its stop steps).

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use agent_jobs::SessionId;
use futures::FutureExt;
use tokio::sync::watch;

mod launch;
mod retry;
mod running;
mod shutdown;
mod start;
mod state;

pub use retry::RetryPolicy;
pub use start::{StartError, StartFailure, StartOutcome, StartRequest};

use super::{capacity::Capacity, launcher::Launcher};
use crate::{
    metrics as observability,
    session::{AgentRecord, SessionStore},
};
use start::StartResult;
use state::{Inner, Slot, StartingSlot};

/// Owns the agents of this process. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("worker_id", &self.inner.worker_id)
            .field("agents", &self.agent_count())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor launching with `launcher`, recording state in `store` under `worker_id`,
    /// counting its agents against `capacity`.
    pub fn new(
        launcher: Arc<dyn Launcher>,
        store: SessionStore,
        worker_id: impl Into<String>,
        retry: RetryPolicy,
        capacity: Arc<Capacity>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner::new(
                launcher,
                store,
                worker_id.into(),
                retry,
                capacity,
            )),
        }
    }

    /// This process's worker id, as written to `session:<id>` `workerId`.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// Idle warm processes of the launcher's pool, when it has one.
    pub fn warm_idle(&self) -> Option<usize> {
        self.inner.launcher.warm_idle()
    }

    /// What the replica's zygote is doing, when agents are forked from one.
    pub fn zygote(&self) -> Option<crate::agent::launcher::ZygoteStatus> {
        self.inner.launcher.zygote()
    }

    /// Running agents plus launches in progress.
    pub fn agent_count(&self) -> usize {
        self.inner.slots.lock().expect("slots lock").len()
    }

    /// Starts an agent for the request's session unless this process already has one running
    /// or starting (then it waits for that launch's outcome instead) or another live worker
    /// owns the session.
    pub async fn start(&self, request: StartRequest) -> StartResult {
        let id = request.session_id.clone();
        let mut outcome = {
            let mut slots = self.inner.slots.lock().expect("slots lock");
            match slots.get(&id) {
                Some(Slot::Running { pid, .. }) => {
                    return Ok(StartOutcome::AlreadyRunning { pid: *pid });
                }
                Some(Slot::Starting(outcome)) => outcome.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    slots.insert(id, Slot::Starting(rx.clone()));
                    self.inner.capacity.launch_started();
                    observability::agents_live(slots.len());
                    let inner = self.inner.clone();
                    let slot = StartingSlot::new(inner.clone(), request.session_id.clone());
                    // A task of the supervisor, not of the job: it finishes even if the job's
                    // future is dropped. A panic drops the slot too, so later deliveries of the
                    // session never join a launch that no longer exists.
                    self.inner.tasks.spawn(async move {
                        let launch = AssertUnwindSafe(inner.launch(request, slot));
                        let result = launch.catch_unwind().await.unwrap_or_else(|_| {
                            Err(StartError::Failed(StartFailure {
                                attempts: 0,
                                last_error: "the launch panicked".into(),
                            }))
                        });
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let result = outcome
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone().expect("checked by wait_for"));
        match result {
            Ok(result) => result,
            // The launch task cannot drop its sender without sending, short of a panic.
            Err(_) => Err(StartError::Failed(StartFailure {
                attempts: 0,
                last_error: "the launch task ended without a result".into(),
            })),
        }
    }

    /// Sessions whose agent is running here (not those still starting).
    pub fn running_sessions(&self) -> Vec<SessionId> {
        self.inner
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Running { .. }))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The running agents, each with what its tree used at the last reading.
    pub fn running_usage(&self) -> Vec<(SessionId, Option<crate::agent::limits::Usage>)> {
        self.inner
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Running { handle, .. } => Some((id.clone(), handle.usage())),
                _ => None,
            })
            .collect()
    }

    /// What this process wrote about the running agents of `ids` (those still running here).
    pub fn records(&self, ids: &[SessionId]) -> Vec<AgentRecord> {
        let slots = self.inner.slots.lock().expect("slots lock");
        ids.iter()
            .filter_map(|id| match slots.get(id) {
                Some(Slot::Running {
                    record,
                    stopping: None,
                    ..
                }) => Some((**record).clone()),
                _ => None,
            })
            .collect()
    }

    /// Stops the agent of `id` if it runs here: SIGTERM to its group, SIGKILL after `grace`.
    /// Its session is removed once it has exited. Returns false if there was nothing to stop.
    pub fn stop(&self, id: &SessionId, reason: &'static str, grace: Duration) -> bool {
        let mut slots = self.inner.slots.lock().expect("slots lock");
        match slots.get_mut(id) {
            Some(slot) => slot.stop(id, reason, grace),
            None => false,
        }
    }
}
