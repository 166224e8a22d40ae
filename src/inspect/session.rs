//! One session in full, as the console's `/sessions/<id>` shows it: its record, its config,
//! its place in the heartbeat index, its job and the agent's last output lines. Everything is
//! returned as stored; what may be shown of it is the page's decision
//! (`crate::console::mask`).
//!
//! Two round trips: the record, config, logs and heartbeat in one pipeline; then its job's
//! meta.

use crate::connection::RedisConn;
use agent_jobs::{
    QueueKeys, SessionId, SessionKeys, keys::SESSION_HEARTBEATS, session_state::fields,
};

use super::dead::is_task_id;

/// One session in full; every value as stored (untrusted text, prompts included).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionDetail {
    /// `session:<id>`, field by field, sorted by name.
    pub record: Vec<(String, String)>,
    /// `session:<id>:config`, sorted by name.
    pub config: Vec<(String, String)>,
    /// The agent's last output lines, oldest first (`agent:<id>:logs`).
    pub logs: Vec<String>,
    /// The score of the session in the heartbeat index (its last heartbeat).
    pub heartbeat: Option<u64>,
    /// `agent:<id>:health`, sorted by name (`last_check`, `status`, and what the agent's tree
    /// uses: `memory_bytes`, `memory_peak_bytes`, `cpu_seconds`).
    pub health: Vec<(String, String)>,
    /// The session's job (`taskId` of the record): its id and meta hash, sorted by name.
    pub job: Option<(String, Vec<(String, String)>)>,
}

impl SessionDetail {
    /// True when nothing of the session is left in Redis.
    pub fn is_empty(&self) -> bool {
        self.record.is_empty() && self.config.is_empty() && self.logs.is_empty()
    }

    /// The health hash's field `name`.
    pub fn health_field(&self, name: &str) -> Option<&str> {
        self.health
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The record's field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.record
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Everything about session `id`.
pub async fn session_detail(
    conn: &RedisConn,
    queue: &QueueKeys,
    id: &SessionId,
) -> redis::RedisResult<SessionDetail> {
    let mut conn = conn.clone();
    let keys = SessionKeys::new(id);
    type Reply = (
        Vec<(String, String)>,
        Vec<(String, String)>,
        Vec<String>,
        Option<f64>,
        Vec<(String, String)>,
    );
    let (mut record, mut config, logs, heartbeat, mut health): Reply = redis::pipe()
        .hgetall(keys.state())
        .hgetall(keys.config())
        .lrange(keys.agent_logs(), 0, -1)
        .zscore(SESSION_HEARTBEATS, id.as_str())
        .hgetall(keys.agent_health())
        .query_async(&mut conn)
        .await?;
    record.sort();
    config.sort();
    health.sort();
    let mut detail = SessionDetail {
        record,
        config,
        logs,
        heartbeat: heartbeat.map(|t| t as u64),
        health,
        job: None,
    };
    // The task id comes from Redis: only a plain one is spliced into a key name.
    if let Some(task) = detail.field(fields::TASK_ID).filter(|t| is_task_id(t)) {
        let task = task.to_owned();
        let mut meta: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(queue.meta(&task))
            .query_async(&mut conn)
            .await?;
        meta.sort();
        detail.job = Some((task, meta));
    }
    Ok(detail)
}
