//! The session store: reading a session's config and writing its state (contract §1 and §3).
//!
//! Config is found by session id only: `session:<id>:config`, one `HGETALL`. There is no
//! fallback to the user-scoped `user:<name>:config` of the old system, which made two sessions
//! of one user share a voice. The read happens inside the claim (`lua/claim_session.lua`), so a
//! start costs one round trip before the launch: config, ownership check and `starting` at
//! once. A missing hash means defaults, written back in the same atomic step (so only if still
//! absent). A hash that cannot be used (wrong type, no voice, a value the agent's command line
//! cannot carry) is a permanent error naming the key and the problem.
//!
//! Each state transition is one script call or pipeline: one round trip, whatever the number
//! of fields. Every script that changes a session's status also appends the change to the
//! event stream `agent-worker:events` in that same call (`lua/session_events.lua`, the format
//! in jobs/README.md), which is what lets a producer wait for readiness without polling.

use crate::connection::RedisConn;
use std::{sync::LazyLock, time::Duration};

use agent_jobs::{
    SessionId, SessionKeys, SessionStatus,
    keys::{
        EVENTS, SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING, WORKERS, legacy_metrics,
    },
    session_state::fields,
};
use redis::{FromRedisValue, Script, ScriptInvocation, Value};

mod claim_reply;
pub mod config;

use config::SessionConfig;
use config::{config_from_pairs, validate};

use crate::{agent::exit::AgentExit, clock::Clock, connection::RedisHealth};

/// A script that changes a session's status: `lua/session_events.lua` (the event stream's
/// prologue) followed by the script, so every status change and its event are one atomic call.
/// Its last key must be [`EVENTS`] and its last argument the stream's bound
/// ([`SessionStore::events`] adds both).
macro_rules! session_script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/session_events.lua"),
            include_str!($file)
        ))
    };
}

static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| session_script!("lua/heartbeat.lua"));
static APPEND_LOGS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/append_logs.lua")));
static CLAIM: LazyLock<Script> = LazyLock::new(|| session_script!("lua/claim_session.lua"));
static MARK_READY: LazyLock<Script> = LazyLock::new(|| session_script!("lua/mark_ready.lua"));
static END: LazyLock<Script> = LazyLock::new(|| session_script!("lua/end_session.lua"));
static NOTE_ATTEMPT_ERROR: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/note_attempt_error.lua")));
static RESTORE: LazyLock<Script> = LazyLock::new(|| session_script!("lua/restore_sessions.lua"));
static REMOVE: LazyLock<Script> = LazyLock::new(|| session_script!("lua/remove_sessions.lua"));

/// Which sessions [`SessionStore::remove`] may remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Only those whose heartbeat index entry is at or before `cutoff` (unix time). A live
    /// session there has lost its agent and goes; an ended one (its end was not recorded)
    /// goes only once it ended at or before `ended_cutoff`, and until then just leaves the
    /// index.
    Stale {
        /// The heartbeat cutoff.
        cutoff: u64,
        /// The end cutoff: now minus `session.ended_ttl`.
        ended_cutoff: u64,
        /// `<queue>:meta` of the agent-start jobs, whose claim record of a removed live
        /// session is cleared (so a re-delivered job starts it again).
        job_meta_prefix: Option<String>,
    },
    /// Only legacy sessions (not in the index) whose newest of `lastActive` / `createdAt`
    /// is before this unix time.
    Legacy {
        /// The cutoff.
        cutoff: u64,
    },
}

/// What one heartbeat found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    /// Sessions whose keys were deleted by the orchestrator: their agents must stop.
    pub gone: Vec<SessionId>,
    /// Sessions older than the maximum age: their agents must stop.
    pub too_old: Vec<SessionId>,
    /// Sessions another worker has taken over: their agents here must stop.
    pub lost: Vec<SessionId>,
    /// Sessions the orchestrator marked `terminated` (the user ran out of credit): their
    /// agents must stop; the record keeps the orchestrator's status.
    pub terminated: Vec<SessionId>,
    /// Sessions whose record and heartbeat index entry are both gone: Redis lost them (or a
    /// sweep took them while we were cut off). Their agents are live: write them again
    /// ([`SessionStore::restore`]).
    pub vanished: Vec<SessionId>,
}

impl HeartbeatReport {
    /// Adds the findings of another batch.
    pub fn extend(&mut self, other: HeartbeatReport) {
        self.gone.extend(other.gone);
        self.too_old.extend(other.too_old);
        self.lost.extend(other.lost);
        self.terminated.extend(other.terminated);
        self.vanished.extend(other.vanished);
    }
}

/// What the worker wrote about one running agent, held in memory so that a record Redis lost
/// can be written again ([`SessionStore::restore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// The session.
    pub session_id: SessionId,
    /// `userId`.
    pub user_id: Option<String>,
    /// `taskId`.
    pub task_id: String,
    /// `voiceId`.
    pub voice_id: String,
    /// `createdAt`: when this worker claimed the session.
    pub created_at: u64,
    /// `agentPid`, `agentPgid`.
    pub pid: u32,
    /// The agent's process group.
    pub pgid: u32,
    /// `startupTime`, seconds.
    pub startup: Duration,
    /// `logFile`.
    pub log_file: Option<String>,
    /// `warm`: a warm process took the session.
    pub warm: bool,
}

impl AgentRecord {
    /// The record's fields (all but `status` and `workerId`), as written.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![
            (fields::VOICE_ID, self.voice_id.clone()),
            (fields::TASK_ID, self.task_id.clone()),
            (fields::CREATED_AT, self.created_at.to_string()),
            (fields::AGENT_PID, self.pid.to_string()),
            (fields::AGENT_PGID, self.pgid.to_string()),
            (
                fields::STARTUP_TIME,
                format!("{:.3}", self.startup.as_secs_f64()),
            ),
        ];
        if let Some(user) = &self.user_id {
            pairs.push((fields::USER_ID, user.clone()));
        }
        if let Some(path) = &self.log_file {
            pairs.push((fields::LOG_FILE, path.clone()));
        }
        if self.warm {
            pairs.push((fields::WARM, "1".to_owned()));
        }
        pairs
    }
}

/// The outcome of [`SessionStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The session is ours and marked `starting`; its config, validated.
    Claimed(SessionConfig),
    /// Another live worker owns it.
    HeldBy {
        /// That worker's id.
        owner: String,
        /// True when its agent is ready; false while it is still starting.
        ready: bool,
    },
    /// The session is over: no agent may be started for it.
    Ended {
        /// Its status (`completed`, `terminated`, or one the worker does not know), or
        /// `None` when its record is gone (the orchestrator ended it during our retries).
        status: Option<SessionStatus>,
    },
}

/// What a claim attempt carries besides the session.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClaimAttempt<'a> {
    /// The job's meta hash (`<queue>:meta:<task id>`): a job that claimed its session once
    /// records it there, so a later claim of it (a retry, a re-delivery on any replica) knows
    /// that a missing record means the orchestrator ended the session. `None`: not recorded.
    pub job_meta: Option<&'a str>,
    /// The first start of this worker process, or its first after a long idle time (the
    /// original worker's cold-start counter).
    pub cold: bool,
    /// The agent's log file, recorded as `logFile` and in `agent:<id>:logfile`.
    pub log_file: Option<&'a str>,
}

/// The outcome of [`SessionStore::mark_ready`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyRecord {
    /// `ready` was recorded.
    Recorded,
    /// `ready` was recorded in a record written again: Redis lost the session's record during
    /// the start (its heartbeat index entry went with it, which the orchestrator never
    /// deletes), and the agent stays.
    Restored,
    /// Another worker owns the session now: our agent must go.
    TakenOver,
    /// The record is gone: the orchestrator ended the session during the start.
    Gone,
    /// The session ended during the start (this status, e.g. `terminated`): our agent must go.
    Ended(SessionStatus),
}

/// How a session ended on this worker, for [`SessionStore::end`].
#[derive(Debug, Clone, Default)]
pub struct SessionEnd<'a> {
    /// How its agent exited; `None` for a start that failed for good.
    pub exit: Option<AgentExit>,
    /// Why it failed (`None` for a clean exit).
    pub error: Option<&'a str>,
    /// Why the worker stopped the agent, when it did (`session_ended`, `worker_shutdown`, ...).
    pub stop_reason: Option<&'a str>,
    /// The last attempt timed out (the original worker's start-up timeout counter).
    pub timed_out: bool,
}

/// The outcome of [`SessionStore::end`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndRecord {
    /// The record stays for the orchestrator, with this status.
    Kept(SessionStatus),
    /// The record was already gone (the orchestrator ended the session first).
    Gone,
    /// Another worker owns the session: nothing was written.
    NotOurs,
}

/// Why a session's config or state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The config key holds another Redis type. Permanent.
    #[error("{key} is a Redis {found}, not a hash")]
    WrongType {
        /// The key.
        key: String,
        /// The type found (`string`, `list`, ...).
        found: String,
    },
    /// A field of the config hash cannot be used. Permanent.
    #[error("{key}: field {field} {problem}")]
    UnusableField {
        /// The key.
        key: String,
        /// The field name.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Redis failed; the same job may succeed later.
    #[error("redis error on {key}: {source}")]
    Redis {
        /// The key being read or written.
        key: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

impl SessionError {
    /// True when retrying cannot help (the data itself is wrong).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Redis { .. })
    }
}

/// A ready agent, as [`SessionStore::mark_ready`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// Its pid.
    pub pid: u32,
    /// Its process group id.
    pub pgid: u32,
    /// Its start-up time (from the handoff, for a warm process).
    pub startup: Duration,
    /// Whether a warm process took the session (`warm=1`).
    pub warm: bool,
}

/// Reads session config and writes session state.
#[derive(Clone)]
pub struct SessionStore {
    conn: RedisConn,
    ttl: Duration,
    ended_ttl: Duration,
    default_voice: String,
    log_lines: usize,
    worker_timeout: Duration,
    redis_health: RedisHealth,
    legacy_metrics: bool,
    events_max_len: u64,
    clock: Clock,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    /// A store writing keys with `ttl`, defaulting the voice to `default_voice`, keeping
    /// `log_lines` output lines per agent.
    pub fn new(
        conn: RedisConn,
        ttl: Duration,
        default_voice: impl Into<String>,
        log_lines: usize,
    ) -> Self {
        Self {
            conn,
            ttl,
            default_voice: default_voice.into(),
            log_lines,
            worker_timeout: Duration::from_secs(15),
            redis_health: RedisHealth::new(),
            ended_ttl: Duration::from_secs(3600),
            legacy_metrics: false,
            events_max_len: DEFAULT_EVENTS_MAX_LEN,
            clock: Clock::redis(),
        }
    }

    /// A store as the worker's settings say: `session.ttl`, `session.ended_ttl`,
    /// `agent.default_voice`, `agent.log_lines`, `worker.orphan_timeout` and
    /// `compat.legacy_metrics`. Every command that reads or writes sessions builds it here,
    /// so none of them runs on defaults of its own.
    pub fn from_settings(conn: RedisConn, settings: &crate::settings::Settings) -> Self {
        Self::new(
            conn,
            settings.session.ttl,
            settings.agent.default_voice.clone(),
            settings.agent.log_lines,
        )
        .ended_ttl(settings.session.ended_ttl)
        .worker_timeout(settings.worker.orphan_timeout)
        .legacy_metrics(settings.compat.legacy_metrics)
        .events_max_len(settings.events.max_len)
    }

    /// The approximate bound of the event stream [`EVENTS`] (`events.max_len`; 10,000 unless
    /// set): every script that records a status change trims it with `XADD MAXLEN ~`.
    pub fn events_max_len(mut self, max_len: u64) -> Self {
        self.events_max_len = max_len.max(1);
        self
    }

    /// Adds what `lua/session_events.lua` expects last: the stream's key and its bound.
    fn events(&self, invocation: &mut ScriptInvocation<'_>) {
        invocation.key(EVENTS).arg(self.events_max_len);
    }

    /// How long an ended session's record stays (`session.ended_ttl`; 1 h unless set).
    pub fn ended_ttl(mut self, ttl: Duration) -> Self {
        self.ended_ttl = ttl;
        self
    }

    /// Also write the original worker's `metrics:agent:*` keys (`compat.legacy_metrics`; off
    /// unless set).
    pub fn legacy_metrics(mut self, on: bool) -> Self {
        self.legacy_metrics = on;
        self
    }

    /// Judge other workers' liveness only after this process has been connected for a while
    /// (see [`RedisHealth`]).
    pub fn redis_health(mut self, health: RedisHealth) -> Self {
        self.redis_health = health;
        self
    }

    /// The clock of the timestamps it writes (`createdAt`, `lastActive`, `endedAt`, the
    /// heartbeat index); Redis's unless set.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How long a worker may be silent before its sessions can be taken over
    /// (`worker.orphan_timeout`; 15 s unless set).
    pub fn worker_timeout(mut self, timeout: Duration) -> Self {
        self.worker_timeout = timeout;
        self
    }

    fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs().max(1)
    }

    /// Reads the session's config and claims the session for `worker_id`, marking it
    /// `starting` (before each launch attempt), unless another live worker owns it or the
    /// session has ended: one script call, see `lua/claim_session.lua`. A missing config means
    /// defaults, written back.
    ///
    /// A config that cannot be used is a permanent error; if the session was claimed, it is
    /// marked `error` with the reason first, so the orchestrator sees why.
    pub async fn claim(
        &self,
        id: &SessionId,
        user_id: Option<&str>,
        task_id: &str,
        worker_id: &str,
        attempt: ClaimAttempt<'_>,
    ) -> Result<Claim, SessionError> {
        let keys = SessionKeys::new(id);
        let (state, config_key) = (keys.state(), keys.config());
        let now = self.clock.unix_now();
        let reply = CLAIM
            .key(&state)
            .key(&config_key)
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .key(SESSION_HEARTBEATS)
            .key(WORKERS)
            .key(keys.agent_logfile())
            .key(legacy_metrics::COLD_STARTS)
            .key(attempt.job_meta.unwrap_or(agent_jobs::keys::NO_JOB_META))
            .arg(worker_id)
            .arg(now)
            .arg(self.owner_dead_before(now))
            .arg(self.ttl_secs())
            .arg(id.as_str())
            .arg(task_id)
            .arg(user_id.unwrap_or_default())
            .arg(&self.default_voice)
            .arg(attempt.log_file.unwrap_or_default())
            .arg(flag(attempt.cold && self.legacy_metrics))
            .arg(flag(attempt.job_meta.is_some()))
            .key(EVENTS)
            .arg(self.events_max_len)
            .invoke_async(&mut self.conn.clone())
            .await
            .and_then(claim_reply::ClaimReply::from_redis)
            .map_err(|source| SessionError::Redis {
                key: state.clone(),
                source,
            })?;
        match reply {
            claim_reply::ClaimReply::WrongType { found } => Err(SessionError::WrongType {
                key: config_key,
                found: found.unwrap_or_else(|| "value of another type".into()),
            }),
            claim_reply::ClaimReply::HeldBy { owner, ready } => Ok(Claim::HeldBy { owner, ready }),
            claim_reply::ClaimReply::Ended { status } => Ok(Claim::Ended { status }),
            claim_reply::ClaimReply::Claimed { source, pairs } => {
                let config = config_from_pairs(&config_key, pairs)
                    .and_then(|map| validate(&config_key, map, source));
                if let Err(error) = &config {
                    // Ours now, and unusable: say why on the session, then give up on it.
                    let end = SessionEnd {
                        error: Some(&error.to_string()),
                        ..SessionEnd::default()
                    };
                    if let Err(mark) = self.end(id, worker_id, &end).await {
                        tracing::warn!(session_id = %id, error = %mark, "session_error_not_recorded");
                    }
                }
                config.map(Claim::Claimed)
            }
        }
    }

    /// Presence older than this (unix seconds) means its worker is dead. Right after this process
    /// was cut off from Redis, every other worker's presence is stale too (nobody could write
    /// it): no takeover until the others had `worker_timeout` to write theirs again.
    fn owner_dead_before(&self, now: u64) -> u64 {
        if self.redis_health.connected_for() < self.worker_timeout {
            return 0;
        }
        now.saturating_sub(self.worker_timeout.as_secs())
    }

    /// Status `ready`, with the agent's pid and start-up time; writes `agent:<id>:pid` and
    /// `agent:<id>:health` (and the legacy start-up histogram). Only if `worker_id` still owns
    /// the session and it has not ended meanwhile (`lua/mark_ready.lua`). A record Redis lost
    /// during the start is written again from `record` ([`ReadyRecord::Restored`]).
    pub async fn mark_ready(
        &self,
        id: &SessionId,
        worker_id: &str,
        record: &AgentRecord,
        ready: Ready,
    ) -> Result<ReadyRecord, SessionError> {
        let keys = SessionKeys::new(id);
        let state = keys.state();
        let mut invocation = MARK_READY.prepare_invoke();
        invocation
            .key(&state)
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .key(keys.agent_pid())
            .key(keys.agent_health())
            .key(SESSION_HEARTBEATS)
            .key(legacy_metrics::STARTUP_HISTOGRAM)
            .key(legacy_metrics::STARTUP_DURATION)
            .arg(worker_id)
            .arg(self.clock.unix_now())
            .arg(self.ttl_secs())
            .arg(id.as_str())
            .arg(ready.pid)
            .arg(ready.pgid)
            .arg(format!("{:.3}", ready.startup.as_secs_f64()))
            .arg(flag(ready.warm))
            .arg(flag(self.legacy_metrics));
        let fields = record.fields();
        invocation.arg(fields.len());
        for (name, value) in fields {
            invocation.arg(name).arg(value);
        }
        if self.legacy_metrics {
            for bucket in legacy_metrics::BUCKETS {
                invocation.arg(bucket);
            }
        }
        self.events(&mut invocation);
        let reply: Value = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|source| SessionError::Redis { key: state, source })?;
        Ok(match reply {
            Value::Int(1) => ReadyRecord::Recorded,
            Value::Int(2) => ReadyRecord::Restored,
            Value::Int(-1) => ReadyRecord::Gone,
            Value::Int(_) => ReadyRecord::TakenOver,
            other => ReadyRecord::Ended(SessionStatus::parse(
                &String::from_redis_value(other).unwrap_or_default(),
            )),
        })
    }

    /// Records a failed launch attempt, as `lastError` (the status stays `starting`), if
    /// `worker_id` still owns the session; counts the legacy retry (when `retrying`) and
    /// start-up timeout (when `timed_out`) in the same call.
    pub async fn note_attempt_error(
        &self,
        id: &SessionId,
        worker_id: &str,
        message: &str,
        retrying: bool,
        timed_out: bool,
    ) -> Result<(), SessionError> {
        let state = SessionKeys::new(id).state();
        NOTE_ATTEMPT_ERROR
            .key(&state)
            .key(legacy_metrics::RETRIES)
            .key(legacy_metrics::STARTUP_TIMEOUTS)
            .arg(worker_id)
            .arg(message)
            .arg(flag(retrying && self.legacy_metrics))
            .arg(flag(timed_out && self.legacy_metrics))
            .invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map(drop)
            .map_err(|source| SessionError::Redis { key: state, source })
    }

    /// Records the end of a session on this worker (its agent exited, or its start failed for
    /// good), if `worker_id` still owns it (`lua/end_session.lua`): `endedAt` and the exit,
    /// `completed` or `error` only over the worker's own statuses, out of the state sets and
    /// the heartbeat index, every key kept with a TTL of at most `session.ended_ttl` for the
    /// orchestrator's end-of-session handler. A record that is already gone is not recreated.
    pub async fn end(
        &self,
        id: &SessionId,
        worker_id: &str,
        end: &SessionEnd<'_>,
    ) -> Result<EndRecord, SessionError> {
        let keys = SessionKeys::new(id);
        let (exit_field, exit_value) = match end.exit {
            Some(AgentExit::Code(code))
            | Some(AgentExit::MemoryLimit {
                code: Some(code), ..
            }) => (fields::EXIT_CODE, code),
            Some(AgentExit::Signal(signal))
            | Some(AgentExit::MemoryLimit {
                signal: Some(signal),
                ..
            }) => (fields::EXIT_SIGNAL, signal),
            Some(AgentExit::MemoryLimit { .. }) | None => ("", 0),
        };
        let mut invocation = END.prepare_invoke();
        for key in keys.all() {
            invocation.key(key);
        }
        let reply: Option<String> = invocation
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .key(SESSION_HEARTBEATS)
            .key(legacy_metrics::STARTUP_TIMEOUTS)
            .arg(worker_id)
            .arg(self.clock.unix_now())
            .arg(self.ended_ttl.as_secs().max(1))
            .arg(id.as_str())
            .arg(exit_field)
            .arg(exit_value)
            .arg(end.error.unwrap_or_default())
            .arg(end.stop_reason.unwrap_or_default())
            .arg(flag(end.timed_out && self.legacy_metrics))
            .key(EVENTS)
            .arg(self.events_max_len)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|source| SessionError::Redis {
                key: keys.state(),
                source,
            })?;
        Ok(match reply {
            None => EndRecord::NotOurs,
            Some(status) if status.is_empty() => EndRecord::Gone,
            Some(status) => EndRecord::Kept(SessionStatus::parse(&status)),
        })
    }

    /// Refreshes the liveness of `ids` (agents this worker owns) in one script call: see
    /// `lua/heartbeat.lua`. `max_age_cutoff` is the unix time before which a session's
    /// `createdAt` makes it too old.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        ids: &[SessionId],
        now: u64,
        max_age_cutoff: u64,
    ) -> redis::RedisResult<HeartbeatReport> {
        if ids.is_empty() {
            return Ok(HeartbeatReport::default());
        }
        let mut invocation = HEARTBEAT.prepare_invoke();
        invocation
            .key(SESSION_HEARTBEATS)
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .arg(now)
            .arg(self.ttl_secs())
            .arg(max_age_cutoff)
            .arg(worker_id);
        for id in ids {
            let keys = SessionKeys::new(id);
            invocation
                .key(keys.state())
                .key(keys.agent_health())
                .key(keys.agent_pid())
                .arg(id.as_str());
        }
        self.events(&mut invocation);
        let [gone, too_old, lost, terminated, vanished]: [Vec<String>; 5] =
            invocation.invoke_async(&mut self.conn.clone()).await?;
        // The ids came from us; parsing them again only guards against a script change.
        let parse = |ids: Vec<String>| {
            ids.into_iter()
                .filter_map(|id| SessionId::parse(id).ok())
                .collect()
        };
        Ok(HeartbeatReport {
            gone: parse(gone),
            too_old: parse(too_old),
            lost: parse(lost),
            terminated: parse(terminated),
            vanished: parse(vanished),
        })
    }

    /// Writes again the records of live agents that Redis lost (`lua/restore_sessions.lua`):
    /// the fields the worker owns, `ready`, the state set, pid, health and the heartbeat
    /// index. Returns how many were restored (a session another worker owns by now is not).
    pub async fn restore(
        &self,
        worker_id: &str,
        records: &[AgentRecord],
        now: u64,
    ) -> redis::RedisResult<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut invocation = RESTORE.prepare_invoke();
        invocation
            .key(SESSION_HEARTBEATS)
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .arg(worker_id)
            .arg(now)
            .arg(self.ttl_secs());
        for record in records {
            let keys = SessionKeys::new(&record.session_id);
            let fields = record.fields();
            invocation
                .key(keys.state())
                .key(keys.agent_pid())
                .key(keys.agent_health())
                .arg(record.session_id.as_str())
                .arg(record.pid)
                .arg(fields.len());
            for (name, value) in fields {
                invocation.arg(name).arg(value);
            }
        }
        self.events(&mut invocation);
        invocation.invoke_async(&mut self.conn.clone()).await
    }

    /// Removes the sessions among `ids` that `removal` allows, with every key they own, in one
    /// atomic script call (`lua/remove_sessions.lua`). Returns each removed session and why.
    /// With `dry_run`, the same decisions and nothing written.
    pub async fn remove(
        &self,
        removal: &Removal,
        ids: &[SessionId],
        dry_run: bool,
    ) -> redis::RedisResult<Vec<(SessionId, String)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (mode, cutoff, ended_cutoff, meta_prefix) = match removal {
            Removal::Stale {
                cutoff,
                ended_cutoff,
                job_meta_prefix,
            } => (
                "stale",
                *cutoff,
                *ended_cutoff,
                job_meta_prefix.as_deref().unwrap_or_default(),
            ),
            Removal::Legacy { cutoff } => ("legacy", *cutoff, 0, ""),
        };
        let mut invocation = REMOVE.prepare_invoke();
        invocation
            .key(SESSION_HEARTBEATS)
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .arg(mode)
            .arg(cutoff)
            .arg(ended_cutoff)
            .arg(flag(dry_run))
            .arg(meta_prefix);
        for id in ids {
            for key in SessionKeys::new(id).all() {
                invocation.key(key);
            }
            invocation.arg(id.as_str());
        }
        self.events(&mut invocation);
        let flat: Vec<String> = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| Some((SessionId::parse(&pair[0]).ok()?, pair[1].clone())))
            .collect())
    }

    /// Appends output lines to the agents' `agent:<id>:logs`, keeping the last `log_lines`,
    /// for sessions that still exist, with the record's TTL (`lua/append_logs.lua`). One round
    /// trip for the batch.
    pub async fn append_logs(&self, batch: &[(SessionId, Vec<String>)]) -> redis::RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut invocation = APPEND_LOGS.prepare_invoke();
        invocation.arg(self.log_lines).arg(self.ttl_secs());
        for (id, lines) in batch {
            let keys = SessionKeys::new(id);
            invocation
                .key(keys.state())
                .key(keys.agent_logs())
                .arg(lines.len());
            for line in lines {
                invocation.arg(line);
            }
        }
        invocation
            .invoke_async::<u64>(&mut self.conn.clone())
            .await
            .map(drop)
    }
}

/// `events.max_len` of a store built without settings.
pub const DEFAULT_EVENTS_MAX_LEN: u64 = 10_000;

/// A script flag.
fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}
