//! The supervisor's part of the worker's stop order, in three steps: [`Supervisor::close`]
//! (no more retries), [`Supervisor::drain`] (let agents end on their own, up to a deadline)
//! and [`Supervisor::shutdown`] (stop the rest); [`Supervisor::abandon_starts`] for an
//! immediate stop.

use std::{sync::atomic::Ordering, time::Duration};

use tokio_util::sync::CancellationToken;

use super::Supervisor;

impl Supervisor {
    /// Begins shutdown: launches in progress make no further attempts. Agents, and launches
    /// that still succeed, run on until [`Supervisor::drain`] and [`Supervisor::shutdown`].
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner.launcher.close();
    }

    /// Immediate shutdown: launches in progress stop waiting for their agents, which are
    /// killed; their sessions stay `starting` with the reason in `lastError` and their jobs
    /// fail as retryable ([`super::StartError::Abandoned`]).
    pub fn abandon_starts(&self) {
        self.close();
        self.inner.abandon.cancel();
    }

    /// Waits until every agent has ended on its own, `timeout` has passed, or `immediate`
    /// fires. Returns the number of agents still running.
    pub async fn drain(&self, timeout: Duration, immediate: &CancellationToken) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the count is read, so a slot freed in between still wakes us.
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let left = self.agent_count();
            if left == 0 {
                return 0;
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep_until(deadline) => return left,
                _ = immediate.cancelled() => return left,
            }
        }
    }

    /// Stops every agent (SIGTERM to its group, SIGKILL after `grace`), including those whose
    /// launch is still in progress, and waits until all have exited and their sessions are
    /// removed.
    pub async fn shutdown(&self, grace: Duration) {
        self.close();
        {
            let mut slots = self.inner.slots.lock().expect("slots lock");
            *self.inner.stopping_all.lock().expect("stopping lock") = Some(grace);
            for (id, slot) in slots.iter_mut() {
                slot.stop(id, "worker_shutdown", grace);
            }
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.launcher.wait_for_exits().await;
    }
}
