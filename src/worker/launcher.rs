//! Which launcher a worker's agents get: built by the run step from the parts only a running
//! worker has, by a factory the caller chose (the real one, or a test's or a bench's wrapper).

use std::sync::Arc;

use crate::{
    agent::{
        capacity::Capacity,
        cold::ProcessLauncher,
        containment::Containment,
        launcher::Launcher,
        log_list::OutputSink,
        output::OutputLimits,
        phase::Readiness,
        warm_pool::{PooledLauncher, WarmSettings},
        zygote_launcher::{ZygoteLauncher, ZygoteSettings},
    },
    settings::AgentSettings,
};

/// What a launcher is built with inside a running worker.
pub struct LauncherParts {
    /// Where agent output goes (for `agent:<id>:logs`).
    pub output: OutputSink,
    /// How agents' process trees are contained.
    pub containment: Arc<Containment>,
    /// This worker's id (marks its agents' processes).
    pub worker_id: String,
    /// The replica's room for agents (what a warm pool sizes itself by).
    pub capacity: Arc<Capacity>,
}

/// Builds the launcher from settings, given its parts.
pub type LauncherFactory = Box<dyn FnOnce(LauncherParts) -> Arc<dyn Launcher> + Send>;

/// The real launcher: agent processes, judged alive and ready by `agent.alive_patterns` and
/// `agent.ready_patterns` within their timeouts, contained as `agent.containment` says; with
/// `agent.warm_pool > 0`, handed to warm processes when one is idle; with
/// `agent.zygote_command`, forked by the replica's zygote.
pub fn process_launcher(agent: &AgentSettings) -> LauncherFactory {
    let (readiness, limits) = (
        Readiness::from_settings(agent),
        OutputLimits::from_settings(agent),
    );
    let warm = WarmSettings::from_settings(agent);
    let zygote = ZygoteSettings::from_settings(agent);
    Box::new(move |parts| {
        let cold = ProcessLauncher::new(readiness, limits, parts.output)
            .contained(parts.containment, parts.worker_id);
        match zygote {
            // The settings refuse a zygote beside a warm pool.
            Some(zygote) => Arc::new(ZygoteLauncher::new(cold, zygote)),
            None if warm.size > 0 => Arc::new(PooledLauncher::new(cold, warm, parts.capacity)),
            None => Arc::new(cold),
        }
    })
}
