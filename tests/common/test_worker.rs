//! The worker in the test's own process (`worker::run`, the real process launcher).

use std::time::Duration;

use agent_worker::{settings::Settings, shutdown::Shutdown, worker};
use tokio::task::JoinHandle;

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
