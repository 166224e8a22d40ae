//! What the worker wrote about one running agent, kept in memory beside the agent so that a
//! record Redis lost can be written again from it (by the ready transition and by
//! [`SessionStore::restore`](super::SessionStore::restore)).

use std::time::Duration;

use agent_jobs::{SessionId, session_state::fields};

/// What the worker wrote about one running agent, held in memory so that a record Redis lost
/// can be written again ([`SessionStore::restore`](super::SessionStore::restore)).
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
    /// `warm`: how the agent started (0 cold, 1 a warm process, 2 forked by the zygote).
    pub warm: u8,
}

impl AgentRecord {
    /// The record's fields (all but `status` and `workerId`), as written.
    pub(super) fn fields(&self) -> Vec<(&'static str, String)> {
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
        if self.warm > 0 {
            pairs.push((fields::WARM, self.warm.to_string()));
        }
        pairs
    }
}
