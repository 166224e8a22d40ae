//! The tasks that run beside the job worker, from the start of the run until the agents are
//! gone: each owns what it needs and runs until the one token they share is cancelled.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{agents::Agents, startup::Connected};
use crate::{
    agent::containment,
    connection::Locator,
    health::{Health, RedisProbe},
    heartbeat::SessionHeartbeat,
    job_worker::DuePromotion,
    jobs::{
        retention::{self, Retention},
        sweep::{self, StaleSessionSweep},
    },
    presence::{Presence, PresenceHeartbeat},
    queue::QueueOps,
    schedule::{EveryTick, TickLease},
    settings::Settings,
    wake::{WakeHub, WakeListener},
};

/// How often the Redis probe behind `/readyz` runs.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The running background tasks.
pub(super) struct Background {
    token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Starts every task that runs beside the job worker until [`Background::stop`] (after
    /// the agents are gone). Each task clones what it needs from `c` (the build step's
    /// connection and choices), `agents` and the handles it shares with the job worker.
    pub(super) fn start(
        settings: &Settings,
        c: &Connected,
        health: &Arc<Health>,
        agents: &Agents,
        presence: &Presence,
        hub: &WakeHub,
        ops: &QueueOps,
    ) -> Self {
        let mut tasks = Self::new();
        tasks.spawn(|stop| {
            RedisProbe::new(c.conn.clone(), c.keys.clone(), health.clone(), PROBE_EVERY).run(stop)
        });
        tasks.spawn(|stop| {
            WakeListener::new(c.conn.clone(), c.keys.wake_channel(), hub.clone()).run(stop)
        });
        tasks.spawn(|stop| DuePromotion::new(ops.clone(), settings.worker.poll_interval).run(stop));
        tasks.spawn(|stop| {
            let every = settings.worker.heartbeat_interval;
            let (supervisor, redis_health) = (agents.supervisor.clone(), c.redis_health.clone());
            PresenceHeartbeat::new(presence.clone(), supervisor, every, redis_health).run(stop)
        });
        tasks.spawn(|stop| {
            let (supervisor, store) = (agents.supervisor.clone(), agents.store.clone());
            let redis_health = c.redis_health.clone();
            SessionHeartbeat::from_settings(
                supervisor,
                store,
                c.conn.clone(),
                settings,
                redis_health,
            )
            .run(stop)
        });
        let sweep =
            StaleSessionSweep::from_settings(c.conn.clone(), agents.store.clone(), settings);
        let redis_health = c.redis_health.clone();
        let lease = || TickLease::new(c.conn.clone(), &c.id);
        tasks.spawn(|stop| {
            EveryTick::new("sweep", lease(), settings.sweep.interval, move |tick| {
                let (sweep, connected_for) = (sweep.clone(), redis_health.connected_for());
                async move { sweep::scheduled(&sweep, tick, connected_for).await }
            })
            .run(stop)
        });
        let retention = Retention::from_settings(c.conn.clone(), c.keys.clone(), settings);
        tasks.spawn(|stop| {
            EveryTick::new(
                "retention",
                lease(),
                settings.retention.interval,
                move |tick| {
                    let retention = retention.clone();
                    async move { retention::scheduled(&retention, tick).await }
                },
            )
            .run(stop)
        });
        // Under Sentinel, a failover moves the connection when the sentinels announce it, not
        // only at the next error.
        if let Locator::Sentinel(sentinels) = c.conn.locator() {
            let (conn, sentinels) = (c.conn.clone(), sentinels.clone());
            tasks.spawn(|stop| conn.follow_announcements(sentinels, stop));
        }
        if let Some(reaper) = OrphanReaper::if_subreaper() {
            tasks.spawn(|stop| reaper.run(stop));
        }
        tasks
    }

    /// None yet.
    fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// Spawns the loop `run` makes of the tasks' token (a loop's `run(self, token)`).
    fn spawn<F>(&mut self, run: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.push(tokio::spawn(run(self.token.clone())));
    }

    /// Cancels every task and waits until each has returned.
    pub(super) async fn stop(self) {
        self.token.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// As the subreaper of its agents' trees, the worker is the parent of every orphan in them:
/// every `every`, it reaps those that exited on their own (see [`crate::agent::containment`]).
pub(super) struct OrphanReaper {
    every: Duration,
}

impl OrphanReaper {
    /// A reaper when this process is a subreaper (`None` otherwise: orphans go to init).
    pub(super) fn if_subreaper() -> Option<Self> {
        containment::is_subreaper().then_some(Self {
            every: Duration::from_secs(2),
        })
    }

    /// Reaps until `shutdown`.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let _ = tokio::task::spawn_blocking(containment::reap_adopted).await;
        }
    }
}
