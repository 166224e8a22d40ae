//! The cold start mode: [`ProcessLauncher`] starts a new process for each session, with the
//! session's command line and environment, and waits for it to be ready.
//!
//! It is the process owner ([`crate::agent::process`]) and the readiness wait
//! ([`crate::agent::startup`]) put together, and nothing else. The warm pool
//! ([`crate::agent::warm_pool`]) falls back to it, and starts its warm processes with its
//! parts.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{
    command::LaunchSpec,
    containment::Containment,
    launcher::{LaunchError, Launcher, RunningAgent},
    log_list::OutputSink,
    output::OutputLimits,
    phase::Readiness,
    process::{AgentProcesses, Program},
    spawn::Stdin,
    startup::await_start,
};

/// Launches real processes, cold.
#[derive(Debug, Clone)]
pub struct ProcessLauncher {
    readiness: Readiness,
    processes: AgentProcesses,
}

impl ProcessLauncher {
    /// A launcher judging start-up by `readiness`, keeping output within `limits`, sending
    /// output lines to `output` (and to log files, for launches that name one).
    pub fn new(readiness: Readiness, limits: OutputLimits, output: OutputSink) -> Self {
        Self {
            readiness,
            processes: AgentProcesses::new(limits, output),
        }
    }

    /// Contains each agent's whole tree with `containment` (the process group alone unless
    /// set), marking its processes as the agents of `worker_id`.
    pub fn contained(
        mut self,
        containment: Arc<Containment>,
        worker_id: impl Into<String>,
    ) -> Self {
        self.processes.contain(containment, worker_id.into());
        self
    }

    /// How agents are judged ready.
    pub(crate) fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The processes it owns, for the start modes built beside it.
    pub(crate) fn processes(&self) -> &AgentProcesses {
        &self.processes
    }

    async fn launch_process(&self, spec: LaunchSpec) -> Result<RunningAgent, LaunchError> {
        let log_file = self.processes.open_log_file(&spec).await;
        let spawned = self.processes.spawn(
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
            log_file,
        )?;
        await_start(spawned.into_started(), &self.readiness).await
    }
}

impl Launcher for ProcessLauncher {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<RunningAgent, LaunchError>> {
        Box::pin(self.launch_process(spec))
    }

    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.processes.wait_for_exits())
    }
}
