//! The liveness of this worker's sessions: the heartbeat that refreshes them and reports what
//! changed under them (`lua/heartbeat.lua`), and the restore that writes again the records
//! Redis lost (`lua/restore_sessions.lua`). One script call per batch, whatever its size.

use std::sync::LazyLock;

use agent_jobs::{
    SessionId, SessionKeys,
    keys::{SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING},
};
use redis::Script;

use super::{AgentRecord, SessionStore, session_script};
use crate::agent::limits::Usage;

static HEARTBEAT: LazyLock<Script> =
    LazyLock::new(|| session_script(include_str!("../lua/heartbeat.lua")));
static RESTORE: LazyLock<Script> =
    LazyLock::new(|| session_script(include_str!("../lua/restore_sessions.lua")));

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

impl SessionStore {
    /// Refreshes the liveness of `ids` (agents this worker owns) in one script call: see
    /// `lua/heartbeat.lua`. `max_age_cutoff` is the unix time before which a session's
    /// `createdAt` makes it too old.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        sessions: &[(SessionId, Option<Usage>)],
        now: u64,
        max_age_cutoff: u64,
    ) -> redis::RedisResult<HeartbeatReport> {
        if sessions.is_empty() {
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
        for (id, usage) in sessions {
            let keys = SessionKeys::new(id);
            invocation
                .key(keys.state())
                .key(keys.agent_health())
                .key(keys.agent_pid())
                .arg(id.as_str());
            match usage {
                Some(usage) => invocation
                    .arg(usage.memory_bytes)
                    .arg(usage.peak_bytes)
                    .arg(format!("{:.3}", usage.cpu_seconds)),
                None => invocation.arg("").arg("").arg(""),
            };
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
}
