//! The forked start mode (`agent.zygote_command`): [`ZygoteLauncher`] keeps one
//! [zygote](crate::agent::zygote) per replica and asks it for each session's agent; whenever it
//! has none, or the one it has gives no agent, the session starts cold at once.
//!
//! - **Failures cost latency, never a start.** A zygote that refuses (say, a preload started a
//!   thread), fails to start, dies, or leaves a request without a reply for
//!   [`REPLY_TIMEOUT`](crate::agent::zygote::REPLY_TIMEOUT) is replaced after a back-off of the
//!   warm pool's kind ([`crate::agent::streak`]: 1 s doubling to 1 min, logged once when the
//!   streak begins and once when it ends). The streak ends when a zygote forks an agent that
//!   gets ready, or stays up for `HEALTHY_AFTER`. A request refused on its own (a fork that
//!   failed, a request too long) starts that session cold and keeps the zygote.
//! - **Recycling.** A zygote older than `agent.warm_max_idle`, or whose own memory (RSS) has
//!   grown past `agent.zygote_memory_max` (unset: twice its RSS when it became ready), is
//!   replaced: the new one is started first, so starts stay forked throughout.
//! - **Its agents are not its children.** Each is the worker's child, in its own group and
//!   cgroup: a zygote that dies, is recycled or is killed ends no session.
//! - **Shutdown.** [`Launcher::close`] stops the zygote. A SIGKILLed worker takes it with it
//!   (its death signal, and end-of-file on its socket).
//! - It needs the worker to be a child subreaper (`agent-worker run` is): a forked agent is
//!   re-parented to the nearest one. Without it the launcher starts every session cold, and
//!   says so once.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_jobs::SessionId;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{
    cold::ProcessLauncher,
    command::LaunchSpec,
    containment,
    launcher::{LaunchError, Launcher, RunningAgent, ZygoteStatus},
    streak::{HEALTHY_AFTER, Streak},
    zygote::{ForkError, Zygote, ZygoteCommand},
};
use crate::metrics;

/// How often the zygote's own memory is read.
const MEMORY_CHECK: Duration = Duration::from_secs(5);
/// Without `agent.zygote_memory_max`, a zygote whose RSS grows past this many times what it
/// had when it became ready is replaced.
const GROWTH_FACTOR: u64 = 2;

/// The zygote's settings (from `[agent]`).
#[derive(Debug, Clone)]
pub struct ZygoteSettings {
    /// How it is started.
    pub command: ZygoteCommand,
    /// It is replaced once older than this (`agent.warm_max_idle`).
    pub max_age: Duration,
    /// It is replaced once its RSS passes this (`agent.zygote_memory_max`); unset: twice its
    /// RSS when it became ready.
    pub memory_max: Option<u64>,
}

impl ZygoteSettings {
    /// From `[agent]` settings; `None` when `agent.zygote_command` is empty.
    pub fn from_settings(agent: &crate::settings::AgentSettings) -> Option<Self> {
        (!agent.zygote_command.is_empty()).then(|| Self {
            command: ZygoteCommand {
                command: agent.zygote_command.clone(),
                timeout: agent.zygote_timeout,
            },
            max_age: agent.warm_max_idle,
            memory_max: agent.zygote_memory_max.map(|b| b.0),
        })
    }
}

/// Launches by forking from the replica's zygote, else cold.
pub struct ZygoteLauncher {
    inner: Arc<Inner>,
}

struct Inner {
    cold: ProcessLauncher,
    settings: ZygoteSettings,
    /// The zygote requests go to, while one is ready.
    current: Mutex<Option<Arc<Zygote>>>,
    status: Mutex<ZygoteStatus>,
    streak: Mutex<Streak>,
    closed: CancellationToken,
}

/// Why a zygote stopped serving.
enum End {
    Failed(String),
    Recycle(String),
    Closed,
}

impl ZygoteLauncher {
    /// Forks through a zygote started by `cold`'s process owner (which also launches cold).
    /// Its keeper task starts at once, inside the current tokio runtime.
    pub fn new(cold: ProcessLauncher, settings: ZygoteSettings) -> Self {
        let inner = Arc::new(Inner {
            cold,
            settings,
            current: Mutex::new(None),
            status: Mutex::new(ZygoteStatus {
                state: "starting".into(),
                pid: None,
                forked: 0,
                reason: None,
            }),
            streak: Mutex::new(Streak::default()),
            closed: CancellationToken::new(),
        });
        if containment::is_subreaper() {
            tokio::spawn(inner.clone().keep());
        } else {
            let reason = "the worker is not a child subreaper: forked agents could not be its \
                          children; every session starts cold";
            tracing::warn!(reason, "zygote_unavailable");
            inner.set_status("off", None, Some(reason.into()));
        }
        Self { inner }
    }

    async fn launch_forked(&self, spec: LaunchSpec) -> Result<RunningAgent, LaunchError> {
        let inner = &self.inner;
        let zygote = inner.current.lock().expect("zygote lock").clone();
        if let Some(zygote) = zygote {
            let (processes, readiness) = (inner.cold.processes(), inner.cold.readiness());
            match zygote.fork(processes, readiness, &spec).await {
                Ok(agent) => {
                    metrics::zygote_start("forked");
                    inner.forked("an agent it forked got ready");
                    return Ok(agent);
                }
                Err(ForkError::Failed(error)) => {
                    metrics::zygote_start("forked");
                    return Err(error);
                }
                Err(ForkError::Refused(reason)) => {
                    tracing::warn!(session_id = %spec.session_id, reason, "zygote_fork_refused");
                }
                Err(ForkError::Broken(reason)) => {
                    tracing::warn!(session_id = %spec.session_id, reason, "zygote_broken");
                    zygote.mark_broken(&reason);
                }
            }
        }
        metrics::zygote_start("cold");
        inner.cold.launch(spec).await
    }
}

impl Launcher for ZygoteLauncher {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<RunningAgent, LaunchError>> {
        Box::pin(self.launch_forked(spec))
    }

    fn close(&self) {
        self.inner.close();
    }

    fn zygote(&self) -> Option<ZygoteStatus> {
        Some(self.inner.status.lock().expect("status lock").clone())
    }

    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        self.inner.close();
        self.inner.cold.wait_for_exits()
    }
}

impl Inner {
    /// The keeper: starts a zygote, watches it until it fails, is due for recycling or the
    /// launcher closes, and starts the next (after a back-off when it failed).
    async fn keep(self: Arc<Self>) {
        let mut serial = 0u64;
        loop {
            let backoff = self
                .streak
                .lock()
                .expect("streak lock")
                .backing_off(tokio::time::Instant::now());
            if let Some(at) = backoff {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = self.closed.cancelled() => break,
                }
            }
            serial += 1;
            if self.current.lock().expect("zygote lock").is_none() {
                let reason = self.status.lock().expect("status lock").reason.clone();
                self.set_status("starting", None, reason);
            }
            let label = SessionId::parse(format!("zygote-{serial}")).expect("a valid label");
            let started = tokio::select! {
                started = Zygote::start(self.cold.processes(), label.clone(), &self.settings.command) => started,
                // Dropping the start kills its process.
                _ = self.closed.cancelled() => break,
            };
            let zygote = match started {
                Ok(zygote) => Arc::new(zygote),
                Err(reason) => {
                    self.failed(&label, "zygote_start_failed", reason);
                    continue;
                }
            };
            tracing::info!(zygote = %label, pid = zygote.pid, "zygote_ready");
            let previous = self
                .current
                .lock()
                .expect("zygote lock")
                .replace(zygote.clone());
            if let Some(previous) = previous {
                previous.retire();
            }
            metrics::zygote_up(true);
            self.set_status("ready", Some(zygote.pid), None);
            match self.watch(&zygote).await {
                End::Closed => break,
                // The next one starts while this one still serves.
                End::Recycle(why) => {
                    tracing::info!(zygote = %label, pid = zygote.pid, why, "zygote_recycled")
                }
                End::Failed(reason) => {
                    self.withdraw(&zygote);
                    self.failed(&label, "zygote_failed", reason);
                }
            }
        }
        self.close();
    }

    /// Waits until `zygote` dies, a request finds it broken, it is due for recycling or the
    /// launcher closes; ends a failure streak once it has stayed up [`HEALTHY_AFTER`].
    async fn watch(&self, zygote: &Zygote) -> End {
        let recycle_at = tokio::time::Instant::from_std(zygote.ready_at + self.settings.max_age);
        let mut memory = tokio::time::interval(MEMORY_CHECK);
        // What it holds once ready: its imports. A zygote only forks after that, so growth
        // beyond it is a leak (of the shim, or of a preloaded module's background work).
        let baseline = zygote.rss_bytes();
        let healthy = tokio::time::sleep(HEALTHY_AFTER);
        tokio::pin!(healthy);
        let mut proven = false;
        loop {
            tokio::select! {
                exit = zygote.exited() => {
                    let exit = exit.map_or_else(|| "unknown".into(), |e| e.to_string());
                    return End::Failed(format!("it exited with {exit}"));
                }
                reason = zygote.broken() => return End::Failed(reason),
                _ = tokio::time::sleep_until(recycle_at) => {
                    return End::Recycle(format!("older than {:?}", self.settings.max_age));
                }
                _ = memory.tick() => {
                    let max = self.settings.memory_max.or(baseline.map(|b| b * GROWTH_FACTOR));
                    if let (Some(max), Some(rss)) = (max, zygote.rss_bytes())
                        && rss > max
                    {
                        return End::Recycle(format!("its RSS of {rss} bytes passed {max}"));
                    }
                }
                _ = &mut healthy, if !proven => {
                    proven = true;
                    self.recovered("a zygote stayed up");
                }
                _ = self.closed.cancelled() => return End::Closed,
            }
        }
    }

    /// Takes `zygote` out of service, if it still is in it, and stops it.
    fn withdraw(&self, zygote: &Arc<Zygote>) {
        let mut current = self.current.lock().expect("zygote lock");
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, zygote)) {
            *current = None;
        }
        drop(current);
        zygote.retire();
        metrics::zygote_up(false);
    }

    /// A zygote failed: back off, say so once per streak.
    fn failed(&self, label: &SessionId, event: &str, reason: String) {
        metrics::zygote_failed();
        let first = self.streak.lock().expect("streak lock").failed();
        if first {
            tracing::warn!(zygote = %label, reason, event, "zygote_down; retrying with back-off, sessions start cold meanwhile");
        } else {
            tracing::debug!(zygote = %label, reason, event, "zygote_down");
        }
        self.set_status("backing-off", None, Some(reason));
    }

    /// An agent it forked got ready.
    fn forked(&self, how: &str) {
        self.status.lock().expect("status lock").forked += 1;
        self.recovered(how);
    }

    /// Ends a failure streak, if one is going on.
    fn recovered(&self, how: &str) {
        if let Some(failures) = self.streak.lock().expect("streak lock").end() {
            tracing::info!(failures, how, "zygote_recovered");
        }
    }

    fn set_status(&self, state: &str, pid: Option<u32>, reason: Option<String>) {
        let mut status = self.status.lock().expect("status lock");
        status.state = state.into();
        status.pid = pid;
        status.reason = reason;
    }

    /// Stops the zygote; none starts any more.
    fn close(&self) {
        self.closed.cancel();
        if let Some(zygote) = self.current.lock().expect("zygote lock").take() {
            zygote.retire();
            metrics::zygote_up(false);
        }
        let mut status = self.status.lock().expect("status lock");
        if status.state != "off" {
            status.state = "off".into();
            status.pid = None;
            status.reason = Some("shutting down".into());
        }
    }
}
