//! The worker in the test's own process (`worker::run`, the real process launcher).

use std::time::Duration;

use agent_worker::{settings::Settings, shutdown::Shutdown, worker};
use tokio::task::JoinHandle;

use super::TestRedis;

/// An in-process worker.
pub struct TestWorker {
    shutdown: Shutdown,
    task: Option<JoinHandle<Result<(), worker::RefusedToStart>>>,
}

impl TestWorker {
    /// Starts `worker::run` with `settings` and the real process launcher.
    pub fn start(settings: Settings) -> Self {
        let shutdown = Shutdown::new();
        let launcher = worker::process_launcher(&settings.agent);
        let task = tokio::spawn(worker::run(settings, launcher, shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// Starts a worker with the test agent `ready` that only a wake-up can make fetch within a
    /// test's deadlines (no fallback poll; its next heartbeat, which also fetches, a minute
    /// away), and waits until it is idle ([`super::wait_idle`]).
    pub async fn start_woken_only(redis: &TestRedis) -> Self {
        let worker = Self::start(redis.settings(
            "ready",
            &[
                ("AGENT_WORKER__WORKER__HEARTBEAT_INTERVAL", "60s"),
                ("AGENT_WORKER__WORKER__ORPHAN_TIMEOUT", "180s"),
                ("AGENT_WORKER__WORKER__POLL_INTERVAL", "1h"),
            ],
        ));
        super::wait_idle(&redis.conn).await;
        worker
    }

    /// Stops the worker and its agents (no drain) and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.stop_now();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the worker stops within 30 s")
                .expect("the worker task does not panic")
                .expect("the worker started");
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.stop_now();
    }
}
