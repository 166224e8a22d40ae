//! The session heartbeat: every `session.heartbeat_interval`, one batched script call refreshes
//! the liveness of every agent this process runs (`lua/heartbeat.lua`), and its findings are
//! acted on: sessions the orchestrator ended (keys deleted, or `terminated`) and sessions past
//! `session.max_age` have their agents stopped; sessions another worker took over while we
//! were cut off too; records Redis lost are written again from memory, never taken for ended
//! ([`crate::dataset`]).

use std::time::Duration;

use crate::connection::RedisConn;
use agent_jobs::SessionId;
use tokio_util::sync::CancellationToken;

use crate::{
    agent::supervisor::Supervisor,
    clock::unix_now,
    connection::RedisHealth,
    dataset, metrics,
    session::{HeartbeatReport, SessionStore},
    settings::Settings,
};

/// Every `session.heartbeat_interval`: refresh the liveness of this process's agents in one
/// batched call, and stop those whose session was ended by the orchestrator (its keys deleted,
/// or `terminated`) or is older than `session.max_age`. Records Redis lost are written again
/// instead (see [`crate::dataset`]): data loss is never an end signal.
pub struct SessionHeartbeat {
    supervisor: Supervisor,
    store: SessionStore,
    conn: RedisConn,
    every: Duration,
    max_age: Duration,
    stop_grace: Duration,
    allow_eviction: bool,
    redis_health: RedisHealth,
}

impl SessionHeartbeat {
    /// The heartbeat of `supervisor`'s agents through `store`, as `settings` say
    /// (`session.heartbeat_interval`, `session.max_age`, `agent.stop_grace`,
    /// `redis.allow_eviction`); failures noted in `redis_health`.
    pub fn from_settings(
        supervisor: Supervisor,
        store: SessionStore,
        conn: RedisConn,
        settings: &Settings,
        redis_health: RedisHealth,
    ) -> Self {
        Self {
            supervisor,
            store,
            conn,
            every: settings.session.heartbeat_interval,
            max_age: settings.session.max_age,
            stop_grace: settings.agent.stop_grace,
            allow_eviction: settings.redis.allow_eviction,
            redis_health,
        }
    }

    /// Beats until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let first = dataset::Sample::read(&self.conn).await.unwrap_or_default();
        let mut dataset = DatasetWatch::new(first, self.allow_eviction);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let mut report = self.beat(&mut failing).await;
            // Read after the heartbeat, so it covers every eviction or restart up to the moment
            // records were found missing.
            let loss = dataset.observe(dataset::Sample::read(&self.conn).await.ok());
            if loss.is_some() {
                // Missing, and Redis restarted or evicted since the last look: lost, not ended.
                report.vanished.append(&mut report.gone);
            }
            if !report.vanished.is_empty() {
                restore(&self.supervisor, &self.store, &report.vanished, loss).await;
            }
            self.stop_ended(&report);
        }
    }

    /// One heartbeat of every running agent, in chunks that bound the time of one script call
    /// when a process owns many agents. `failing` makes a streak of failures logged once.
    async fn beat(&self, failing: &mut bool) -> HeartbeatReport {
        let sessions = self.supervisor.running_usage();
        let now = unix_now();
        let oldest = now.saturating_sub(self.max_age.as_secs());
        let mut report = HeartbeatReport::default();
        for chunk in sessions.chunks(1000) {
            match self
                .store
                .heartbeat(self.supervisor.worker_id(), chunk, now, oldest)
                .await
            {
                Ok(part) => {
                    *failing = false;
                    report.extend(part);
                }
                Err(error) => {
                    self.redis_health.failed();
                    metrics::redis_error("heartbeat");
                    if !*failing {
                        tracing::warn!(error = %error, sessions = chunk.len(), "heartbeat_failed");
                    }
                    *failing = true;
                }
            }
        }
        report
    }

    /// Stops the agents whose sessions ended, aged out or were taken over.
    fn stop_ended(&self, report: &HeartbeatReport) {
        let (supervisor, grace) = (&self.supervisor, self.stop_grace);
        for id in &report.gone {
            supervisor.stop(id, "session_ended", grace);
        }
        for id in &report.too_old {
            supervisor.stop(id, "max_age", grace);
        }
        // We were presumed dead and another worker took the session over: its agent is the
        // one that counts.
        for id in &report.lost {
            supervisor.stop(id, "session_taken_over", grace);
        }
        // The orchestrator's credit stop: the record keeps its `terminated`.
        for id in &report.terminated {
            supervisor.stop(id, "terminated", grace);
        }
    }
}

/// The dataset as read after each of the last two heartbeats. A record found missing now was
/// there at the previous heartbeat, which ran after the older of the two samples: a new run_id
/// or more evicted keys since that one mean it was lost, not deleted.
struct DatasetWatch {
    samples: [dataset::Sample; 2],
    allow_eviction: bool,
    warned_eviction: bool,
}

impl DatasetWatch {
    fn new(first: dataset::Sample, allow_eviction: bool) -> Self {
        Self {
            warned_eviction: first.evicts(),
            samples: [first.clone(), first],
            allow_eviction,
        }
    }

    /// Takes the `sample` read after a heartbeat (`None`: it could not be read); the cause
    /// when records were lost since the older sample.
    fn observe(&mut self, sample: Option<dataset::Sample>) -> Option<&'static str> {
        let sample = sample?;
        let loss = sample.loss_since(&self.samples[0]);
        // The policy can change under a running fleet (a managed service's parameter group):
        // say so once, and keep running, which is safer than stopping every call.
        metrics::redis_evicting(sample.evicts());
        if sample.evicts() && !self.allow_eviction && !self.warned_eviction {
            tracing::warn!(
                policy = sample.maxmemory_policy.as_deref().unwrap_or_default(),
                "redis_eviction_enabled: Redis now evicts keys; set maxmemory-policy noeviction"
            );
        }
        self.warned_eviction = sample.evicts();
        self.samples = [std::mem::take(&mut self.samples[1]), sample];
        loss
    }
}

/// Writes again the records of live agents that Redis lost; logs `redis_dataset_lost` once
/// per heartbeat that found any, with the counts.
async fn restore(
    supervisor: &Supervisor,
    store: &SessionStore,
    vanished: &[SessionId],
    cause: Option<&'static str>,
) {
    let records = supervisor.records(vanished);
    match store
        .restore(supervisor.worker_id(), &records, unix_now())
        .await
    {
        Ok(restored) => {
            metrics::dataset_lost(restored);
            tracing::warn!(
                missing = vanished.len(),
                restored,
                cause = cause.unwrap_or("records and index entries gone"),
                "redis_dataset_lost"
            );
        }
        Err(error) => {
            metrics::redis_error("restore");
            tracing::warn!(error = %error, missing = vanished.len(), "session_restore_failed");
        }
    }
}
