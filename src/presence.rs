//! Worker presence: which worker processes are alive, for session claims and `status`.
//!
//! `agent-worker:workers` (worker id → unix seconds of its last presence, on Redis's clock),
//! `agent-worker:worker-agents` (worker id → agents it runs), `agent-worker:worker-info`
//! (worker id → [`WorkerInfo`] as JSON, for the console) and, with a warm pool,
//! `agent-worker:worker-warm` (worker id → its idle warm processes), written every
//! `worker.heartbeat_interval`. A session claimed by a worker silent for longer than
//! `worker.orphan_timeout` can be taken over: that worker's agents died with it. The clock's
//! offset to Redis is measured on the same tick ([`crate::clock`]). Retention forgets workers
//! silent for an hour (`lua/forget_workers.lua`).

use std::time::Duration;

use crate::connection::RedisConn;
use agent_jobs::keys::{WORKER_AGENTS, WORKER_INFO, WORKER_WARM, WORKERS};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    agent::{launcher::ZygoteStatus, supervisor::Supervisor},
    clock::{self, unix_now},
    connection::RedisHealth,
    metrics,
};

/// What a worker tells about itself beside its presence (`agent-worker:worker-info`), so an
/// operator sees which host and version a replica is, how full and how far off-clock it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The host (container) name.
    pub host: String,
    /// agent-worker's version.
    pub version: String,
    /// Its `agent.max_agents`.
    pub max_agents: u64,
    /// Its clock's offset to Redis's at the last presence tick, in milliseconds.
    pub clock_offset_ms: i64,
    /// When it started (unix seconds, Redis's clock).
    pub started_at: u64,
    /// Since when it drains (unix seconds, Redis's clock): it was asked to stop (a deploy),
    /// fetches no more jobs, and exits when its last call has ended. Absent while it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<u64>,
    /// What each of its running agents' trees used at the last reading.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentUsage>,
    /// Its zygote, when its agents are forked from one (`agent.zygote_command`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zygote: Option<ZygoteStatus>,
}

/// One running agent's resource use, as its worker last read it (`agent.limits_interval`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUsage {
    /// Its session.
    pub session_id: String,
    /// Memory of its whole tree now, in bytes.
    pub memory_bytes: u64,
    /// The most its tree has used, in bytes.
    pub memory_peak_bytes: u64,
    /// CPU time of its tree so far, in milliseconds.
    pub cpu_ms: u64,
}

impl WorkerInfo {
    /// This process, with `max_agents`, started now.
    pub fn of_this_process(max_agents: usize) -> Self {
        Self {
            host: host_name(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            max_agents: max_agents as u64,
            clock_offset_ms: clock::offset_ms(),
            started_at: unix_now(),
            draining_since: None,
            agents: Vec::new(),
            zygote: None,
        }
    }
}

/// The kernel's host name (a pod's name in Kubernetes), `host` when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into())
}

/// This worker's presence records.
#[derive(Clone)]
pub struct Presence {
    conn: RedisConn,
    worker_id: String,
    info: WorkerInfo,
    /// Fires at the first shutdown request: from then on the worker drains.
    draining: CancellationToken,
    /// When it began draining, once known.
    draining_since: std::sync::Arc<std::sync::OnceLock<u64>>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl Presence {
    /// The presence of `worker_id`, described by `info`; reported draining once `draining`
    /// fires (the first shutdown request).
    pub fn new(
        conn: RedisConn,
        worker_id: impl Into<String>,
        info: WorkerInfo,
        draining: CancellationToken,
    ) -> Self {
        Self {
            conn,
            worker_id: worker_id.into(),
            info,
            draining,
            draining_since: Default::default(),
        }
    }

    /// "Alive now, with `agents` agents" (and `warm` idle warm processes, with a pool, and the
    /// clock offset measured last): one pipelined round trip.
    pub async fn beat(
        &self,
        agents: usize,
        warm: Option<usize>,
        (usage, zygote): (Vec<AgentUsage>, Option<ZygoteStatus>),
        now: u64,
    ) -> redis::RedisResult<()> {
        let info = WorkerInfo {
            clock_offset_ms: clock::offset_ms(),
            draining_since: self.draining_since.get().copied(),
            agents: usage,
            zygote,
            ..self.info.clone()
        };
        let info = serde_json::to_string(&info).expect("WorkerInfo serializes");
        let mut pipe = redis::pipe();
        pipe.zadd(WORKERS, &self.worker_id, now)
            .ignore()
            .hset(WORKER_AGENTS, &self.worker_id, agents)
            .ignore()
            .hset(WORKER_INFO, &self.worker_id, info)
            .ignore();
        if let Some(warm) = warm {
            pipe.hset(WORKER_WARM, &self.worker_id, warm).ignore();
        }
        pipe.query_async(&mut self.conn.clone()).await
    }

    /// Deregisters this worker on a clean exit.
    pub async fn leave(&self) -> redis::RedisResult<()> {
        redis::pipe()
            .zrem(WORKERS, &self.worker_id)
            .ignore()
            .hdel(WORKER_AGENTS, &self.worker_id)
            .ignore()
            .hdel(WORKER_INFO, &self.worker_id)
            .hdel(WORKER_WARM, &self.worker_id)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
    }
}

/// Every `worker.heartbeat_interval`: tell other replicas this process is alive (claims of a
/// silent worker can be taken over after `worker.orphan_timeout`) and how many agents it runs;
/// the clock's offset to Redis is measured on the same tick.
pub struct PresenceHeartbeat {
    presence: Presence,
    supervisor: Supervisor,
    every: Duration,
    redis_health: RedisHealth,
}

impl PresenceHeartbeat {
    /// `presence` written every `every` with what `supervisor` runs; failures noted in
    /// `redis_health`. Once the presence drains, that is written at once, and at every tick
    /// after.
    pub fn new(
        presence: Presence,
        supervisor: Supervisor,
        every: Duration,
        redis_health: RedisHealth,
    ) -> Self {
        Self {
            presence,
            supervisor,
            every,
            redis_health,
        }
    }

    /// Writes presence until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clock_failing = false;
        let mut reported_draining = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                _ = self.presence.draining.cancelled(), if !reported_draining => {
                    let _ = self.presence.draining_since.set(unix_now());
                    reported_draining = true;
                }
            }
            // Re-measured every tick: the host's clock may be stepped or drift. A failed
            // measurement keeps the last offset; presence is written regardless.
            match clock::sync(&mut self.presence.conn.clone()).await {
                Ok(_) => clock_failing = false,
                Err(error) => {
                    if !clock_failing {
                        tracing::warn!(error = %error, "clock_sync_failed");
                    }
                    clock_failing = true;
                }
            }
            let (agents, warm) = (self.supervisor.agent_count(), self.supervisor.warm_idle());
            let usage = self
                .supervisor
                .running_usage()
                .into_iter()
                .filter_map(|(id, usage)| {
                    let usage = usage?;
                    Some(AgentUsage {
                        session_id: id.to_string(),
                        memory_bytes: usage.memory_bytes,
                        memory_peak_bytes: usage.peak_bytes,
                        cpu_ms: (usage.cpu_seconds * 1000.0) as u64,
                    })
                })
                .collect();
            if let Err(error) = self
                .presence
                .beat(agents, warm, (usage, self.supervisor.zygote()), unix_now())
                .await
            {
                self.redis_health.failed();
                metrics::redis_error("presence");
                tracing::debug!(error = %error, "presence_failed");
            }
        }
    }
}
