//! A ready agent, taken over: recorded as ready (`lua/mark_ready.lua`), counted, moved into a
//! `Running` slot, and watched until its exit, whose end is recorded for the orchestrator
//! (`lua/end_session.lua`) before its slot is freed.

use std::{sync::Arc, time::Duration};

use agent_jobs::{SessionId, SessionStatus};
use tokio::sync::oneshot;

use super::{
    start::StartOutcome,
    state::{Inner, Slot, StartingSlot},
};
use crate::{
    agent::{
        exit::AgentExit,
        launcher::{RunningAgent, StartMode},
    },
    metrics as observability,
    session::{AgentRecord, EndRecord, Ready, ReadyRecord, SessionEnd},
    start_timeline::StartTimeline,
};

/// Attempts to record a session's end before giving up (about 30 s with the back-off).
const END_ATTEMPTS: u32 = 18;

impl Inner {
    /// Takes over a ready agent: records it, counts it, and watches for its exit.
    pub(super) async fn adopt(
        self: Arc<Self>,
        slot: StartingSlot,
        agent: RunningAgent,
        record: AgentRecord,
        attempt: u32,
        timeline: StartTimeline,
    ) -> StartOutcome {
        let id = slot.id().clone();
        tracing::info!(
            session_id = %id,
            pid = agent.pid,
            startup_ms = agent.startup.as_millis() as u64,
            warm = agent.start == StartMode::Warm,
            start = agent.start.as_str(),
            attempt,
            "agent_ready"
        );
        observability::agent_started(agent.startup);
        let stop = self.mark_ready(&id, &agent, &record, &timeline).await;
        let (pid, startup) = (agent.pid, agent.startup);
        {
            let mut slots = self.slots.lock().expect("slots lock");
            let mut running = Slot::Running {
                pid,
                handle: agent.handle.clone(),
                stopping: None,
                record: Arc::new(record),
            };
            if let Some(reason) = stop {
                running.stop(&id, reason, Duration::ZERO);
            }
            if let Some(grace) = *self.stopping_all.lock().expect("stopping lock") {
                running.stop(&id, "worker_shutdown", grace);
            }
            let previous = slots.insert(id.clone(), running);
            self.capacity.agent_started();
            if matches!(previous, Some(Slot::Starting(_))) {
                self.capacity.launch_ended();
            }
            slot.keep();
        }
        self.watch_exit(id, pid, agent.exited);
        StartOutcome::Started { pid, startup }
    }

    /// Records the agent of `id` as ready. Returns why it must stop at once, if the session
    /// changed hands or ended while it was starting.
    async fn mark_ready(
        &self,
        id: &SessionId,
        agent: &RunningAgent,
        record: &AgentRecord,
        timeline: &StartTimeline,
    ) -> Option<&'static str> {
        let ready = self
            .store
            .mark_ready(
                id,
                &self.worker_id,
                record,
                Ready {
                    pid: agent.pid,
                    pgid: agent.pgid,
                    startup: agent.startup,
                    warm: agent.start.warm_value(),
                    timeline: Some(timeline),
                },
            )
            .await;
        // The session changed hands or ended while we were starting: our agent goes.
        let stop = match &ready {
            Ok(ReadyRecord::Recorded) | Err(_) => None,
            // Redis lost the record, not the orchestrator: data loss is never an end signal.
            Ok(ReadyRecord::Restored) => {
                observability::dataset_lost(1);
                tracing::warn!(
                    session_id = %id,
                    missing = 1,
                    restored = 1,
                    cause = "record and index entry gone during the start",
                    "redis_dataset_lost"
                );
                None
            }
            Ok(ReadyRecord::TakenOver) => Some("session_taken_over"),
            Ok(ReadyRecord::Gone) => Some("session_ended"),
            Ok(ReadyRecord::Ended(SessionStatus::Terminated)) => Some("terminated"),
            Ok(ReadyRecord::Ended(_)) => Some("session_ended"),
        };
        self.record(ready.map(drop));
        stop
    }

    /// A task of the supervisor's that waits for the agent of `id` to exit, records its end,
    /// then frees its slot.
    fn watch_exit(self: Arc<Self>, id: SessionId, pid: u32, exited: oneshot::Receiver<AgentExit>) {
        let inner = self.clone();
        self.tasks.spawn(async move {
            let exit = exited.await.ok();
            let shown = exit.map_or_else(|| "unknown".to_owned(), |exit| exit.to_string());
            tracing::info!(session_id = %id, pid, exit = %shown, "agent_exited");
            observability::agent_exited();
            // Recorded before the slot is freed: a new start of the session here would
            // otherwise race this end record.
            inner.record_end(&id, exit).await;
            inner.free(&id);
            inner.capacity.agent_exited();
        });
    }

    /// The session ends with its agent: the record stays for the orchestrator (see
    /// `lua/end_session.lua`). Retried for a while on Redis errors: without it the session
    /// would stay `ready` in the heartbeat index until the sweep removed it as stale, with
    /// the billing fields the agent wrote.
    async fn record_end(&self, id: &SessionId, exit: Option<AgentExit>) {
        let mut stop_reason = match self.slots.lock().expect("slots lock").get(id) {
            Some(Slot::Running { stopping, .. }) => stopping.clone(),
            _ => None,
        };
        let error = match exit {
            Some(AgentExit::Code(0)) => None,
            // Its own limit ended it: say which, as the reason a stop would give.
            Some(AgentExit::MemoryLimit { hit, .. }) => {
                tracing::warn!(session_id = %id, limit = %hit, "agent_memory_limit");
                observability::agent_stopped("memory_limit");
                stop_reason.get_or_insert_with(|| "memory_limit".to_owned());
                Some(hit.to_string())
            }
            Some(exit) => Some(format!("agent exited with {exit}")),
            None => Some("agent exited (status unknown)".to_owned()),
        };
        let end = SessionEnd {
            exit,
            error: error.as_deref(),
            stop_reason: stop_reason.as_deref(),
            timed_out: false,
        };
        let mut delay = Duration::from_millis(100);
        for attempt in 1.. {
            match self.store.end(id, &self.worker_id, &end).await {
                Ok(record) => {
                    let status = match &record {
                        EndRecord::Kept(status) => status.as_str(),
                        EndRecord::Gone => "gone",
                        EndRecord::NotOurs => "taken_over",
                    };
                    tracing::info!(session_id = %id, status, "session_ended");
                    return;
                }
                Err(error) if attempt >= END_ATTEMPTS => {
                    observability::redis_error("session_end");
                    tracing::warn!(session_id = %id, error = %error, "session_end_not_recorded");
                    return;
                }
                Err(_) => {
                    observability::redis_error("session_end");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
