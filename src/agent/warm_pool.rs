//! The warm pool (`agent.warm_pool`): idle [warm processes](crate::agent::warm) kept per
//! replica, so a session's agent skips its import phase.
//!
//! - **Taking never waits.** A launch takes the oldest idle process if there is one, else it
//!   starts cold at once ([`PooledLauncher`]). A process serves one session: it leaves the
//!   pool when taken, never to come back. One lost at the handoff makes that launch start cold
//!   at once.
//! - **Refill.** After a take, a death, a recycle or a change of room, one task starts
//!   replacements, at most `agent.warm_concurrency` warm-ups at a time (they must not starve
//!   live agents of CPU). The target is `min(warm_pool, max_agents − running − starting)`: a
//!   replica with no room left keeps no idle processes (idle ones beyond
//!   `min(warm_pool, max_agents − running)` are stopped; starts in progress may still take
//!   one). Warm processes do not count against `agent.max_agents`; their number is bounded
//!   by `warm_pool`.
//! - **Failures.** A warm-up that exits or prints no warm line within `agent.warm_timeout`,
//!   and an idle process that dies, start a failure streak: the next warm-up waits 1 s,
//!   doubling up to 1 min, one at a time, and the streak is logged once when it begins
//!   (`warm_up_failed`, `warm_agent_died_idle` or `warm_agent_lost_at_handoff`, with
//!   `; retrying with back-off…`) and once when it ends (`warm_pool_recovered`).
//!   It ends when a warm process takes a session or has stayed idle for `HEALTHY_AFTER` (10 s), not
//!   at its warm line: a process that dies right after it would otherwise restart the back-off
//!   at 1 s every time. No respawn loop, and starts go on cold.
//! - **Recycling.** An idle process older than `agent.warm_max_idle` is replaced.
//! - **Shutdown.** [`Launcher::close`] (the first SIGTERM) stops the idle processes at once
//!   and starts no more; a SIGKILLed worker takes them with it (the death signal).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_jobs::SessionId;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    capacity::Capacity,
    cold::ProcessLauncher,
    command::LaunchSpec,
    exit::AgentExit,
    launcher::{LaunchError, Launcher, RunningAgent},
    streak::{HEALTHY_AFTER, Streak},
    warm::{HandoffError, WarmCommand, WarmProcess},
};
use crate::metrics;

/// How often the pool looks at the room left without being woken (agents that exit free room
/// without telling the pool).
const RECHECK: Duration = Duration::from_secs(1);

/// The pool's settings (from `[agent]`).
#[derive(Debug, Clone)]
pub struct WarmSettings {
    /// Idle processes kept (`agent.warm_pool`), at most.
    pub size: usize,
    /// How warm processes are started.
    pub command: WarmCommand,
    /// Warm-ups at a time (`agent.warm_concurrency`).
    pub concurrency: usize,
    /// Idle processes older than this are replaced (`agent.warm_max_idle`).
    pub max_idle: Duration,
}

impl WarmSettings {
    /// From `[agent]` settings.
    pub fn from_settings(agent: &crate::settings::AgentSettings) -> Self {
        Self {
            size: agent.warm_pool,
            command: WarmCommand {
                command: agent.warm_command().to_vec(),
                pattern: agent.warm_pattern.clone(),
                timeout: agent.warm_timeout,
            },
            concurrency: agent.warm_concurrency,
            max_idle: agent.warm_max_idle,
        }
    }
}

/// What the pool holds and is doing.
#[derive(Default)]
struct State {
    /// Idle processes, oldest first.
    idle: VecDeque<WarmProcess>,
    /// Warm-ups in progress.
    warming: usize,
    /// Failed warm-ups and deaths in a row, and the back-off they cause.
    streak: Streak,
    /// Labels of warm processes: `warm-<n>`.
    next_label: u64,
    /// Closed: nothing starts any more.
    closed: bool,
}

struct Pool {
    cold: ProcessLauncher,
    settings: WarmSettings,
    capacity: Arc<Capacity>,
    state: Mutex<State>,
    /// Something changed: look again.
    changed: Notify,
    closed: CancellationToken,
}

/// A launcher that hands sessions to warm processes when one is idle, else launches cold.
pub struct PooledLauncher {
    pool: Arc<Pool>,
}

impl PooledLauncher {
    /// A pool of warm processes started through `cold` (which also launches cold), sized by
    /// `settings` and the room left in `capacity`. Its refill task starts at once, inside the
    /// current tokio runtime.
    pub fn new(cold: ProcessLauncher, settings: WarmSettings, capacity: Arc<Capacity>) -> Self {
        let pool = Arc::new(Pool {
            cold,
            settings,
            capacity,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            closed: CancellationToken::new(),
        });
        tokio::spawn(pool.clone().refill());
        Self { pool }
    }

    /// Idle warm processes now.
    pub fn idle(&self) -> usize {
        self.pool.state.lock().expect("pool lock").idle.len()
    }

    async fn launch_pooled(&self, spec: LaunchSpec) -> Result<RunningAgent, LaunchError> {
        let pool = &self.pool;
        if let Some(warm) = pool.take() {
            let handed = warm.hand_off(pool.cold.processes(), pool.cold.readiness(), &spec);
            match handed.await {
                Ok(agent) => {
                    metrics::warm_take(true);
                    pool.recovered("a warm process took a session");
                    return Ok(agent);
                }
                Err(HandoffError::Failed(error)) => {
                    metrics::warm_take(true);
                    return Err(error);
                }
                Err(HandoffError::Lost(reason)) => {
                    metrics::warm_up_failed();
                    // A loss can begin a streak too: then it says so, as the other failures do
                    // (the streak is logged once whichever failure began it).
                    if pool.failed() {
                        tracing::warn!(
                            session_id = %spec.session_id,
                            reason,
                            "warm_agent_lost_at_handoff; retrying with back-off, sessions start \
                             cold meanwhile"
                        );
                    } else {
                        tracing::warn!(
                            session_id = %spec.session_id,
                            reason,
                            "warm_agent_lost_at_handoff"
                        );
                    }
                    // Cold, at once, not another idle one: it may be as broken, and this
                    // loss may have cost the whole handoff write timeout already (a session
                    // must not pay it once per idle process).
                }
            }
        }
        metrics::warm_take(false);
        pool.cold.launch(spec).await
    }
}

impl Launcher for PooledLauncher {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<RunningAgent, LaunchError>> {
        Box::pin(self.launch_pooled(spec))
    }

    fn close(&self) {
        self.pool.close();
    }

    fn warm_idle(&self) -> Option<usize> {
        Some(self.idle())
    }

    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        self.pool.close();
        self.pool.cold.wait_for_exits()
    }
}

impl Pool {
    /// The oldest idle process that is still alive, out of the pool for good.
    fn take(&self) -> Option<WarmProcess> {
        let mut dead = Vec::new();
        let taken = {
            let mut state = self.state.lock().expect("pool lock");
            loop {
                match state.idle.pop_front() {
                    // Dead before its watcher could remove it: the watcher will find nothing
                    // to remove, so its death is counted here.
                    Some(warm) if warm.has_exited() => dead.push(warm.label.clone()),
                    other => break other,
                }
            }
        };
        for label in &dead {
            self.idle_death(label, "exited before it was taken".to_owned());
        }
        self.publish();
        self.changed.notify_one();
        taken
    }

    /// Stops the idle processes; no warm-up starts any more.
    fn close(&self) {
        let idle = {
            let mut state = self.state.lock().expect("pool lock");
            state.closed = true;
            std::mem::take(&mut state.idle)
        };
        for warm in &idle {
            warm.stop();
        }
        if !idle.is_empty() {
            tracing::info!(stopped = idle.len(), "warm_pool_closed");
        }
        self.closed.cancel();
        self.publish();
    }

    fn publish(&self) {
        metrics::warm_idle(self.state.lock().expect("pool lock").idle.len());
    }

    /// Ends a failure streak, if one is going on.
    fn recovered(&self, how: &str) {
        let mut state = self.state.lock().expect("pool lock");
        end_streak(&mut state, how);
    }

    /// A warm-up failed or a warm process died: a streak of failures backs off. Returns
    /// whether this failure began the streak.
    fn failed(&self) -> bool {
        let first = self.state.lock().expect("pool lock").streak.failed();
        self.changed.notify_one();
        first
    }

    /// The refill task: looks at the pool whenever something changed, at the end of a back-off
    /// or an idle process's life, and every [`RECHECK`].
    async fn refill(self: Arc<Self>) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wake_at = self.clone().step();
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.closed.cancelled() => return,
            }
        }
    }

    /// Recycles old idle processes, stops those beyond the room left, starts warm-ups up to
    /// the target. Returns when to look again at the latest.
    fn step(self: Arc<Self>) -> tokio::time::Instant {
        let mut next = NextLook::new(tokio::time::Instant::now());
        let (max, running, starting) = (
            self.capacity.max(),
            self.capacity.agents(),
            self.capacity.starting(),
        );
        let target = self
            .settings
            .size
            .min(max.saturating_sub(running + starting));
        let keep = self.settings.size.min(max.saturating_sub(running));
        let (stop, labels) = {
            let mut state = self.state.lock().expect("pool lock");
            if state.closed {
                return next.at;
            }
            let stop = self.retire(&mut state, keep, &mut next);
            let labels = self.plan_warm_ups(&mut state, target, &mut next);
            (stop, labels)
        };
        for warm in stop {
            warm.stop();
        }
        self.publish();
        for label in labels {
            tokio::spawn(self.clone().warm_one(label));
        }
        next.at
    }

    /// Takes out of the pool the idle processes to stop: those older than
    /// `agent.warm_max_idle` (recycled), then the newest beyond `keep`. Ends a failure streak
    /// once an idle process has stayed up [`HEALTHY_AFTER`]. `next` learns when the next of
    /// these is due.
    fn retire(&self, state: &mut State, keep: usize, next: &mut NextLook) -> Vec<WarmProcess> {
        let mut stop = Vec::new();
        while let Some(oldest) = state.idle.front() {
            if oldest.warm_at.elapsed() < self.settings.max_idle {
                let expires = oldest.warm_at + self.settings.max_idle;
                next.due_in(expires.saturating_duration_since(Instant::now()));
                break;
            }
            let old = state.idle.pop_front().expect("just seen");
            tracing::info!(warm_label = %old.label, pid = old.pid, "warm_agent_recycled");
            stop.push(old);
        }
        if state.streak.is_on() {
            match state.idle.iter().map(|w| w.warm_at).min() {
                Some(oldest) if oldest.elapsed() >= HEALTHY_AFTER => {
                    end_streak(state, "a warm process stayed up");
                }
                Some(oldest) => next.due_in(HEALTHY_AFTER.saturating_sub(oldest.elapsed())),
                None => {}
            }
        }
        while state.idle.len() > keep {
            // The newest go first: the oldest are taken first and would be recycled first.
            stop.push(state.idle.pop_back().expect("len > keep"));
        }
        stop
    }

    /// Counts the warm-ups to start now towards `target` (none while backing off, one at a
    /// time during a failure streak) and returns their labels. `next` learns when a back-off
    /// ends.
    fn plan_warm_ups(
        &self,
        state: &mut State,
        target: usize,
        next: &mut NextLook,
    ) -> Vec<SessionId> {
        let backing_off = state.streak.backing_off(next.now);
        if let Some(at) = backing_off {
            next.due_at(at);
        }
        let backing_off = backing_off.is_some();
        let have = state.idle.len() + state.warming;
        let mut start = 0;
        if !backing_off && have < target && state.warming < self.settings.concurrency {
            start = (target - have).min(self.settings.concurrency - state.warming);
            // During a failure streak, one at a time, and none while an idle one has not
            // proven healthy yet (it may be about to die like the ones before).
            if state.streak.is_on() {
                let unproven = state
                    .idle
                    .iter()
                    .any(|w| w.warm_at.elapsed() < HEALTHY_AFTER);
                start = if state.warming > 0 || unproven {
                    0
                } else {
                    start.min(1)
                };
            }
            state.warming += start;
        }
        (0..start)
            .map(|_| {
                // Each its own: the label names the process's cgroup, too.
                state.next_label += 1;
                SessionId::parse(format!("warm-{}", state.next_label))
                    .expect("warm-<n> is a valid session id")
            })
            .collect()
    }

    /// One warm-up, into the pool or counted as a failure.
    async fn warm_one(self: Arc<Self>, label: SessionId) {
        let started = tokio::time::Instant::now();
        let warmed = tokio::select! {
            warmed = WarmProcess::start(self.cold.processes(), label.clone(), &self.settings.command) => warmed,
            // Dropping the warm-up kills its process.
            _ = self.closed.cancelled() => {
                self.state.lock().expect("pool lock").warming -= 1;
                return;
            }
        };
        match warmed {
            Ok(warm) => {
                metrics::warm_up_finished(started.elapsed());
                tracing::debug!(warm_label = %label, pid = warm.pid, "warm_agent_ready");
                let exited = warm.exited();
                let mut state = self.state.lock().expect("pool lock");
                state.warming -= 1;
                // A failure streak ends only once this one proves healthy (see the module docs).
                if state.closed {
                    warm.stop();
                } else {
                    state.idle.push_back(warm);
                }
                drop(state);
                let pool = Arc::downgrade(&self);
                tokio::spawn(async move {
                    let exit = exited.await;
                    if let Some(pool) = pool.upgrade() {
                        pool.died_idle(&label, exit);
                    }
                });
            }
            Err(error) => {
                metrics::warm_up_failed();
                self.state.lock().expect("pool lock").warming -= 1;
                if self.failed() {
                    tracing::warn!(
                        warm_label = %label,
                        error = %error,
                        "warm_up_failed; retrying with back-off, sessions start cold meanwhile"
                    );
                } else {
                    tracing::debug!(warm_label = %label, error = %error, "warm_up_failed");
                }
            }
        }
        self.publish();
        self.changed.notify_one();
    }

    /// A warm process exited: if it was still idle, it died there (a failure).
    fn died_idle(&self, label: &SessionId, exit: Option<AgentExit>) {
        let removed = {
            let mut state = self.state.lock().expect("pool lock");
            let before = state.idle.len();
            state.idle.retain(|warm| &warm.label != label);
            before != state.idle.len() && !state.closed
        };
        if removed {
            self.idle_death(
                label,
                exit.map_or_else(|| "unknown".to_owned(), |e| e.to_string()),
            );
            self.publish();
        }
    }

    /// Counts the death of an idle warm process as a failure of the streak.
    fn idle_death(&self, label: &SessionId, exit: String) {
        metrics::warm_up_failed();
        if self.failed() {
            tracing::warn!(
                warm_label = %label,
                exit,
                "warm_agent_died_idle; retrying with back-off, sessions start cold meanwhile"
            );
        } else {
            tracing::debug!(warm_label = %label, exit, "warm_agent_died_idle");
        }
    }
}

/// When the refill task looks at the pool again: [`RECHECK`] after `now` at the latest, sooner
/// when something falls due.
struct NextLook {
    now: tokio::time::Instant,
    at: tokio::time::Instant,
}

impl NextLook {
    fn new(now: tokio::time::Instant) -> Self {
        Self {
            now,
            at: now + RECHECK,
        }
    }

    /// Something falls due `after` from now.
    fn due_in(&mut self, after: Duration) {
        self.due_at(self.now + after);
    }

    /// Something falls due at `at`.
    fn due_at(&mut self, at: tokio::time::Instant) {
        self.at = self.at.min(at);
    }
}

/// Ends the failure streak of `state`, logging it once.
fn end_streak(state: &mut State, how: &str) {
    if let Some(failures) = state.streak.end() {
        tracing::info!(failures, how, "warm_pool_recovered");
    }
}
