//! Every Redis key name of the contract, built in one place from validated input.
//!
//! Two families:
//! - [`QueueKeys`]: the apalis-redis 1.0 wire format of one queue (`<queue>:data`,
//!   `<queue>:meta:<task id>`, `<queue>:active`, ...) plus our wake-up channel.
//! - [`SessionKeys`]: the per-session keys of the contract (`session:<id>`,
//!   `session:<id>:config`, `agent:<id>:pid`, ...), only ever built from a [`SessionId`].

use crate::SessionId;

/// Set of session ids whose agent is starting.
pub const SESSIONS_STARTING: &str = "session:starting";
/// Set of session ids whose agent is ready.
pub const SESSIONS_READY: &str = "session:ready";

/// ZSET session id → unix seconds of its last heartbeat or state change. Written by the worker
/// that owns the session; the sweep reads it to find stale sessions without scanning the
/// keyspace. Deliberately outside the `session:` prefix, where a session id could collide.
pub const SESSION_HEARTBEATS: &str = "agent-worker:session-heartbeats";

/// ZSET worker id → unix seconds of its last presence heartbeat. A session claimed by a worker
/// missing here for longer than `worker.orphan_timeout` can be taken over.
pub const WORKERS: &str = "agent-worker:workers";

/// STREAM of session state changes (`starting`, `ready`, `error`, `completed`, `terminated`,
/// `stopped`, `swept`), appended by the worker's session scripts in the same call that records
/// each change and bounded by `events.max_len` (approximate `MAXLEN`). Fields: `session_id`,
/// `status`, `worker_id`, `ts` (Redis time, ms), `reason` (when there is one): version 1 of
/// the event format in jobs/README.md.
pub const EVENTS: &str = "agent-worker:events";

/// HASH worker id → number of agents it runs, refreshed with its presence (for `status`).
pub const WORKER_AGENTS: &str = "agent-worker:worker-agents";

/// HASH worker id → JSON of what the console shows about it (`host`, `version`,
/// `max_agents`, `clock_offset_ms`, `started_at`), refreshed with its presence.
pub const WORKER_INFO: &str = "agent-worker:worker-info";

/// HASH worker id → idle warm processes of its pool (`agent.warm_pool`), written with its
/// presence; absent for workers without a pool.
pub const WORKER_WARM: &str = "agent-worker:worker-warm";

/// Prefix of the per-tick leases of scheduled jobs: `agent-worker:tick-lease:<job>:<tick>`
/// (e.g. `…:sweep:<tick>`); whoever sets it first runs that tick.
pub const TICK_LEASE_PREFIX: &str = "agent-worker:tick-lease";

/// STRING: the lease of `tick` of the scheduled job `job` (`sweep`, `retention`): the holder's
/// worker id, set NX with a TTL ([`TICK_LEASE_PREFIX`]).
pub fn tick_lease(job: &str, tick: u64) -> String {
    format!("{TICK_LEASE_PREFIX}:{job}:{tick}")
}

/// The job meta key the session scripts get for a claim made outside a job (tests, tools): a
/// key nothing writes, so the script's write of the job's claim record finds no job.
pub const NO_JOB_META: &str = "agent-worker:no-job-meta";

/// ZSET apalis-redis 1.0's `register_worker.lua` writes (queue key → last registration) although it
/// neither declares nor documents it; named here for the ACL diagnosis of a refused write
/// (`deploy/redis/agent-worker.acl`).
pub const APALIS_QUEUES_LIST: &str = "core:apalis:queues:list";

/// `SCAN MATCH` pattern of the session records (`session:<id>`). It matches
/// `session:<id>:config` too, which [`session_of_state_key`] leaves out, and the state sets,
/// which a `SCAN … TYPE hash` leaves out.
pub const SESSION_STATE_PATTERN: &str = "session:*";

/// The session whose record ([`SessionKeys::state`]) `key` names, or `None` for a key that
/// is not `session:<valid id>`: `session:<id>:config` and the like have a second `:`, which
/// no session id has.
pub fn session_of_state_key(key: &str) -> Option<SessionId> {
    SessionId::parse(key.strip_prefix("session:")?).ok()
}

/// The original worker's agent metrics, which the orchestrator serves at `/api/metrics/agent`
/// (contract §3). Written only with `compat.legacy_metrics`.
pub mod legacy_metrics {
    /// HASH of cumulative start-up buckets: `le_5` … `le_180` (seconds) and `le_inf`.
    pub const STARTUP_HISTOGRAM: &str = "metrics:agent:startup_duration_histogram";
    /// HASH `sum` (seconds, float) and `count` of successful starts.
    pub const STARTUP_DURATION: &str = "metrics:agent:startup_duration";
    /// Counter: start attempts that timed out (no alive line, or no ready line).
    pub const STARTUP_TIMEOUTS: &str = "metrics:agent:startup_timeout_count";
    /// Counter: start attempts retried after a failure.
    pub const RETRIES: &str = "metrics:agent:retry_count";
    /// Counter: starts that were a worker process's first, or its first after 300 s idle.
    pub const COLD_STARTS: &str = "metrics:agent:cold_start_count";
    /// The histogram's finite bucket bounds, in seconds, as the original worker wrote them.
    pub const BUCKETS: [u32; 10] = [5, 10, 15, 20, 30, 45, 60, 90, 120, 180];
}

/// The default apalis queue name for agent-start jobs.
pub const DEFAULT_QUEUE: &str = "agent-start";

/// Why a queue name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "queue name {name:?} is invalid: use 1-64 characters of letters, digits, '.', '_', '-' and ':'"
)]
pub struct QueueNameError {
    /// The refused name.
    pub name: String,
}

/// Key names of one apalis-redis queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    queue: String,
}

impl QueueKeys {
    /// Keys for `queue`, which must be 1–64 characters of `[A-Za-z0-9._:-]` (no glob or
    /// hash-tag characters, no spaces).
    pub fn new(queue: &str) -> Result<Self, QueueNameError> {
        let valid = !queue.is_empty()
            && queue.len() <= 64
            && queue
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
        if !valid {
            return Err(QueueNameError {
                name: queue.to_owned(),
            });
        }
        Ok(Self {
            queue: queue.to_owned(),
        })
    }

    /// The queue name itself.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// HASH task id → job payload (JSON).
    pub fn data(&self) -> String {
        format!("{}:data", self.queue)
    }

    /// Prefix of the per-task meta hashes; the key of one task is `<prefix>:<task id>`.
    pub fn meta_prefix(&self) -> String {
        format!("{}:meta", self.queue)
    }

    /// HASH of one task's metadata (`attempts`, `max_attempts`, `status`, ...).
    pub fn meta(&self, task_id: &str) -> String {
        format!("{}:meta:{task_id}", self.queue)
    }

    /// LIST of ready task ids.
    pub fn active(&self) -> String {
        format!("{}:active", self.queue)
    }

    /// ZSET task id → due time (unix seconds).
    pub fn scheduled(&self) -> String {
        format!("{}:scheduled", self.queue)
    }

    /// ZSET worker name → last heartbeat (unix seconds).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.queue)
    }

    /// HASH of apalis-redis's registration details of `worker` (backend, service).
    pub fn worker_metadata(&self, worker: &str) -> String {
        format!("{}:workers:metadata:{worker}", self.queue)
    }

    /// Prefix of the per-worker inflight sets.
    pub fn inflight_prefix(&self) -> String {
        format!("{}:inflight", self.queue)
    }

    /// SET of task ids fetched by `worker` and not yet acknowledged.
    pub fn inflight(&self, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.queue)
    }

    /// SET of finished task ids.
    pub fn done(&self) -> String {
        format!("{}:done", self.queue)
    }

    /// SET of task ids that failed for good.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.queue)
    }

    /// ZSET task id → finish time of done jobs, for retention (ours; ids move here from
    /// [`QueueKeys::done`]).
    pub fn done_at(&self) -> String {
        format!("{}:done-at", self.queue)
    }

    /// ZSET task id → finish time of dead jobs, for retention (ours; the ids stay in
    /// [`QueueKeys::dead`] too).
    pub fn dead_at(&self) -> String {
        format!("{}:dead-at", self.queue)
    }

    /// Prefix of the idempotency keys; one key is `<prefix>:<idempotency key>`.
    pub fn idempotency_prefix(&self) -> String {
        format!("{}:idempotency", self.queue)
    }

    /// STRING: the task id of the job holding idempotency key `key` (for agent-start jobs,
    /// [`SessionKeys::job_idempotency_key`]: `session:<id>`).
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idempotency:{key}", self.queue)
    }

    /// STRING: the task id of the agent-start job of session `id` (its idempotency key,
    /// [`SessionKeys::job_idempotency_key`], on this queue).
    pub fn session_idempotency(&self, id: &SessionId) -> String {
        self.idempotency(&SessionKeys::new(id).job_idempotency_key())
    }

    /// Pub/sub channel a producer publishes to after pushing ready jobs, so idle workers fetch
    /// at once instead of waiting for their fallback poll. Not part of apalis-redis.
    pub fn wake_channel(&self) -> String {
        format!("{}:wake", self.queue)
    }
}

/// Key names of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    id: SessionId,
}

impl SessionKeys {
    /// Keys of session `id`.
    pub fn new(id: &SessionId) -> Self {
        Self { id: id.clone() }
    }

    /// The session these keys belong to.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// HASH written by the orchestrator: `voiceId`, `userName`, `updatedAt`, ...
    pub fn config(&self) -> String {
        format!("session:{}:config", self.id)
    }

    /// HASH of the session's state, written by the worker.
    pub fn state(&self) -> String {
        format!("session:{}", self.id)
    }

    /// STRING: the agent's pid.
    pub fn agent_pid(&self) -> String {
        format!("agent:{}:pid", self.id)
    }

    /// LIST: the agent's last output lines.
    pub fn agent_logs(&self) -> String {
        format!("agent:{}:logs", self.id)
    }

    /// HASH: `last_check`, `status`.
    pub fn agent_health(&self) -> String {
        format!("agent:{}:health", self.id)
    }

    /// STRING: the path of the agent's log file (with `agent.log_dir`).
    pub fn agent_logfile(&self) -> String {
        format!("agent:{}:logfile", self.id)
    }

    /// The idempotency key of the session's agent-start job, `session:<id>`: one agent per
    /// session, whoever enqueues it. Not a key itself: the suffix of
    /// [`QueueKeys::idempotency`], and the `idempotency_key` field of the job's meta.
    pub fn job_idempotency_key(&self) -> String {
        format!("session:{}", self.id)
    }

    /// Every key of the session that its record is made of, in the order the session scripts
    /// take them: state, config, pid, logs, health, logfile.
    pub fn all(&self) -> [String; 6] {
        [
            self.state(),
            self.config(),
            self.agent_pid(),
            self.agent_logs(),
            self.agent_health(),
            self.agent_logfile(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_match_apalis_redis() {
        let q = QueueKeys::new("agent-start").unwrap();
        assert_eq!(q.data(), "agent-start:data");
        assert_eq!(q.meta("01J"), "agent-start:meta:01J");
        assert_eq!(q.active(), "agent-start:active");
        assert_eq!(q.inflight("w1"), "agent-start:inflight:w1");
        assert_eq!(q.idempotency_prefix(), "agent-start:idempotency");
        assert_eq!(
            q.idempotency("session:s-1"),
            "agent-start:idempotency:session:s-1"
        );
    }

    #[test]
    fn queue_names_are_validated() {
        for bad in ["", "a b", "q*", "{q}", &"q".repeat(65)] {
            assert!(QueueKeys::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_keys() {
        let k = SessionKeys::new(&SessionId::parse("s-1").unwrap());
        assert_eq!(k.config(), "session:s-1:config");
        assert_eq!(k.state(), "session:s-1");
        assert_eq!(k.agent_pid(), "agent:s-1:pid");
        assert_eq!(k.agent_logs(), "agent:s-1:logs");
        assert_eq!(k.agent_health(), "agent:s-1:health");
        assert_eq!(k.agent_logfile(), "agent:s-1:logfile");
        assert_eq!(k.all()[0], "session:s-1");
        assert_eq!(k.job_idempotency_key(), "session:s-1");
        assert_eq!(
            QueueKeys::new("q").unwrap().session_idempotency(k.id()),
            "q:idempotency:session:s-1"
        );
    }

    #[test]
    fn tick_leases() {
        assert_eq!(tick_lease("sweep", 7), "agent-worker:tick-lease:sweep:7");
    }

    #[test]
    fn only_session_records_name_a_session() {
        let id = |key| session_of_state_key(key).map(|id| id.to_string());
        assert_eq!(id("session:s-1").as_deref(), Some("s-1"));
        for other in [
            "session:s-1:config",
            "session:",
            "session:a b",
            "agent:s-1:pid",
            "sessions:s-1",
        ] {
            assert_eq!(id(other), None, "{other}");
        }
    }
}
