//! The supervisor's shared state: one slot per session ([`Slot`]: a launch in progress, or a
//! running agent), and what the supervisor's tasks share ([`Inner`]). The launch loop
//! (`launch.rs`), the taking over of a ready agent (`running.rs`) and the supervisor's own
//! methods all work on it; it depends on none of them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use agent_jobs::SessionId;
use tokio::sync::{Notify, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{retry::RetryPolicy, start::StartResult};
use crate::{
    agent::{
        capacity::Capacity,
        launcher::{AgentHandle, Launcher},
    },
    metrics as observability,
    session::{AgentRecord, SessionStore},
};

/// A session's place in the supervisor: one per session, whatever the number of deliveries.
pub(super) enum Slot {
    Starting(watch::Receiver<Option<StartResult>>),
    Running {
        pid: u32,
        handle: AgentHandle,
        /// Why a stop was requested (the first reason); the agent has not exited yet.
        stopping: Option<String>,
        /// What we wrote about it, to write again if Redis loses it.
        record: Arc<AgentRecord>,
    },
}

impl Slot {
    /// Stops a running agent (SIGTERM now, SIGKILL after `grace`; a shorter grace later
    /// shortens the wait). `agent_stopped` is logged once per agent, at the first request:
    /// a shutdown that hurries a stop already under way asks again without a second line.
    /// Returns false for a launch in progress, which has nothing to stop yet.
    pub(super) fn stop(&mut self, id: &SessionId, reason: &'static str, grace: Duration) -> bool {
        let Slot::Running {
            pid,
            handle,
            stopping,
            ..
        } = self
        else {
            return false;
        };
        if stopping.is_none() {
            tracing::info!(session_id = %id, pid = *pid, reason, "agent_stopped");
            observability::agent_stopped(reason);
            *stopping = Some(reason.to_owned());
        }
        handle.stop(grace);
        true
    }
}

/// What the supervisor and its tasks share.
pub(super) struct Inner {
    pub(super) launcher: Arc<dyn Launcher>,
    pub(super) store: SessionStore,
    pub(super) worker_id: String,
    pub(super) retry: RetryPolicy,
    pub(super) capacity: Arc<Capacity>,
    pub(super) slots: Mutex<HashMap<SessionId, Slot>>,
    /// Shutdown began: no further launch attempts.
    pub(super) closing: AtomicBool,
    /// Immediate shutdown: launches in progress are abandoned.
    pub(super) abandon: CancellationToken,
    /// Final stop under way: agents that become ready now are stopped with this grace.
    pub(super) stopping_all: Mutex<Option<Duration>>,
    /// Notified whenever a slot is freed.
    pub(super) freed: Notify,
    /// When this process last began a start (cold-start detection).
    pub(super) last_start: Mutex<Option<tokio::time::Instant>>,
    pub(super) tasks: TaskTracker,
}

/// A launch in progress owns the session's `Starting` slot and its capacity through this:
/// dropped on any way out of the launch (a return, an abandoned future, a panic), it frees
/// both; an agent that became ready moves into a `Running` slot instead ([`Self::keep`]).
pub(super) struct StartingSlot {
    inner: Arc<Inner>,
    id: SessionId,
    armed: bool,
}

impl StartingSlot {
    /// The `Starting` slot of `id`, just inserted, with its launch counted in the capacity.
    pub(super) fn new(inner: Arc<Inner>, id: SessionId) -> Self {
        Self {
            inner,
            id,
            armed: true,
        }
    }

    /// The session whose slot it is.
    pub(super) fn id(&self) -> &SessionId {
        &self.id
    }

    /// The slot now holds a running agent: nothing to free.
    pub(super) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for StartingSlot {
    fn drop(&mut self) {
        if self.armed {
            self.inner.free(&self.id);
        }
    }
}

impl Inner {
    /// Nothing running yet: launching with `launcher`, recording in `store` as `worker_id`.
    pub(super) fn new(
        launcher: Arc<dyn Launcher>,
        store: SessionStore,
        worker_id: String,
        retry: RetryPolicy,
        capacity: Arc<Capacity>,
    ) -> Self {
        Self {
            launcher,
            store,
            worker_id,
            retry,
            capacity,
            slots: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            abandon: CancellationToken::new(),
            stopping_all: Mutex::new(None),
            freed: Notify::new(),
            last_start: Mutex::new(None),
            tasks: TaskTracker::new(),
        }
    }

    /// Frees the slot of `id` (and its launch's capacity, if it was still starting).
    pub(super) fn free(&self, id: &SessionId) {
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(Slot::Starting(_)) = slots.remove(id) {
            self.capacity.launch_ended();
        }
        observability::agents_live(slots.len());
        drop(slots);
        self.freed.notify_waiters();
    }

    /// State writes are best effort: the agent matters more than its bookkeeping, and a
    /// re-delivered job rewrites the state.
    pub(super) fn record(&self, result: Result<(), crate::session::SessionError>) {
        if let Err(error) = result {
            observability::redis_error("session_state");
            tracing::warn!(error = %error, "session_state_write_failed");
        }
    }
}
