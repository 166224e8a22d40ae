//! The agents' side of a running worker: the supervisor with its launcher, the session store
//! it writes through, the shipper of the agents' output and the replica's capacity; and how
//! the two shutdown requests reach the agents.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;

use super::{launcher::LauncherFactory, launcher::LauncherParts, startup::Connected};
use crate::{
    agent::{
        capacity::Capacity,
        log_list,
        supervisor::{RetryPolicy, Supervisor},
    },
    metrics,
    session::SessionStore,
    settings::Settings,
    shutdown::Shutdown,
};

/// The supervisor and what runs with it.
pub(super) struct Agents {
    pub(super) store: SessionStore,
    pub(super) capacity: Arc<Capacity>,
    pub(super) supervisor: Supervisor,
    /// Ships agent output to `agent:<id>:logs` until the last reader closes its sender.
    shipper: JoinHandle<()>,
}

impl Agents {
    /// Builds the launcher with `make_launcher` and starts the supervisor and the shipper.
    pub(super) fn start(
        settings: &Settings,
        make_launcher: LauncherFactory,
        connected: &Connected,
    ) -> Self {
        let store = SessionStore::from_settings(connected.conn.clone(), settings)
            .redis_health(connected.redis_health.clone());
        let (lines_tx, lines_rx) = log_list::channel();
        let shipper = tokio::spawn(log_list::ship(lines_rx, store.clone()));
        let capacity = Capacity::new(settings.agent.max_agents);
        let supervisor = Supervisor::new(
            make_launcher(LauncherParts {
                output: lines_tx,
                containment: connected.containment.0.clone(),
                worker_id: connected.id.clone(),
                capacity: capacity.clone(),
            }),
            store.clone(),
            connected.id.clone(),
            RetryPolicy::from_settings(settings),
            capacity.clone(),
        );
        Self {
            store,
            capacity,
            supervisor,
            shipper,
        }
    }

    /// Drains the agents for `shutdown.drain_timeout`, then stops the rest (a second request
    /// cuts the grace short) and waits until every one has exited and its end is recorded.
    pub(super) async fn drain_then_stop(
        &self,
        settings: &Settings,
        shutdown: &Shutdown,
        steps: ShutdownSteps,
    ) {
        let supervisor = &self.supervisor;
        let began = steps
            .closer
            .await
            .unwrap_or_else(|_| tokio::time::Instant::now());
        let agents = supervisor.agent_count();
        tracing::info!(
            agents,
            drain_timeout_ms = settings.shutdown.drain_timeout.as_millis() as u64,
            "worker_draining"
        );
        let left = supervisor
            .drain(settings.shutdown.drain_timeout, &shutdown.immediate)
            .await;
        let outcome = match (shutdown.immediate.is_cancelled(), left) {
            (true, _) => "immediate",
            (false, 0) => "ended",
            (false, _) => "timeout",
        };
        metrics::drain_finished(outcome, began.elapsed());
        tracing::info!(
            outcome,
            drained_ms = began.elapsed().as_millis() as u64,
            "worker_drained"
        );
        let grace = if shutdown.immediate.is_cancelled() {
            Duration::ZERO
        } else {
            settings.agent.stop_grace
        };
        tracing::info!(
            agents = left,
            grace_ms = grace.as_millis() as u64,
            "worker_stopping"
        );
        let hurry = {
            let (supervisor, immediate) = (supervisor.clone(), shutdown.immediate.clone());
            tokio::spawn(async move {
                immediate.cancelled().await;
                for id in supervisor.running_sessions() {
                    supervisor.stop(&id, "worker_shutdown", Duration::ZERO);
                }
            })
        };
        supervisor.shutdown(grace).await;
        hurry.abort();
        // It holds a supervisor, and with it the launcher's output sink the shipper waits on.
        steps.abandoner.abort();
        let _ = steps.abandoner.await;
    }

    /// Lets the supervisor go (every other holder of it must be gone: the job worker, the
    /// background tasks), and with it the launcher's output sink; waits (5 s at most) until
    /// the last output was shipped.
    pub(super) async fn close(self) {
        let Self {
            supervisor,
            shipper,
            ..
        } = self;
        drop(supervisor);
        // The shipper ends once the last agent output reader has closed its sender.
        let _ = tokio::time::timeout(Duration::from_secs(5), shipper).await;
    }
}

/// The supervisor's side of the two shutdown requests, watched from the start.
pub(super) struct ShutdownSteps {
    /// Resolves to when the first request came.
    closer: JoinHandle<tokio::time::Instant>,
    abandoner: JoinHandle<()>,
}

impl ShutdownSteps {
    /// Watches `shutdown` for `supervisor`.
    pub(super) fn watch(supervisor: &Supervisor, shutdown: &Shutdown) -> Self {
        // At the first request, launches in progress stop retrying, so the drain of the job
        // worker waits for at most one start-up attempt per job.
        let closer = {
            let (supervisor, graceful) = (supervisor.clone(), shutdown.graceful.clone());
            tokio::spawn(async move {
                graceful.cancelled().await;
                metrics::drain_started();
                supervisor.close();
                tokio::time::Instant::now()
            })
        };
        // At the second, they are abandoned: the drain must not wait out a start-up timeout.
        let abandoner = {
            let (supervisor, immediate) = (supervisor.clone(), shutdown.immediate.clone());
            tokio::spawn(async move {
                immediate.cancelled().await;
                supervisor.abandon_starts();
            })
        };
        Self { closer, abandoner }
    }
}
