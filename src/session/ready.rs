//! The start's transitions: a failed launch attempt noted on the record (the status stays
//! `starting`), then `ready` with the agent's pid once it is up (`lua/mark_ready.lua`). Both
//! write only while this worker still owns the session.

use std::{sync::LazyLock, time::Duration};

use agent_jobs::{
    SessionId, SessionKeys, SessionStatus,
    keys::{SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING, legacy_metrics},
};
use redis::{FromRedisValue, Script, Value};

use super::{AgentRecord, SessionError, SessionStore, flag, session_script};
use crate::start_timeline::StartTimeline;

static MARK_READY: LazyLock<Script> =
    LazyLock::new(|| session_script(include_str!("../lua/mark_ready.lua")));
static NOTE_ATTEMPT_ERROR: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/note_attempt_error.lua")));

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

/// A ready agent, as [`SessionStore::mark_ready`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Ready<'a> {
    /// Its pid.
    pub pid: u32,
    /// Its process group id.
    pub pgid: u32,
    /// Its start-up time (from the handoff, for a warm process).
    pub startup: Duration,
    /// How the agent started, as the record's `warm` field says it: 0 cold, 1 a warm
    /// process of the pool, 2 forked by the zygote.
    pub warm: u8,
    /// Its start's phases: the record's `startTimeline`, the `ready` event's phase fields.
    pub timeline: Option<&'a StartTimeline>,
}

impl SessionStore {
    /// Status `ready`, with the agent's pid and start-up time; writes `agent:<id>:pid` and
    /// `agent:<id>:health` (and the legacy start-up histogram). Only if `worker_id` still owns
    /// the session and it has not ended meanwhile (`lua/mark_ready.lua`). A record Redis lost
    /// during the start is written again from `record` ([`ReadyRecord::Restored`]).
    pub async fn mark_ready(
        &self,
        id: &SessionId,
        worker_id: &str,
        record: &AgentRecord,
        ready: Ready<'_>,
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
            .arg(ready.warm)
            .arg(flag(self.legacy_metrics));
        let fields = record.fields();
        invocation.arg(fields.len());
        for (name, value) in fields {
            invocation.arg(name).arg(value);
        }
        let timeline = ready.timeline;
        invocation.arg(timeline.map(StartTimeline::to_json).unwrap_or_default());
        let extra = timeline
            .map(StartTimeline::event_fields)
            .unwrap_or_default();
        invocation.arg(extra.len());
        for (name, value) in extra {
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
}
