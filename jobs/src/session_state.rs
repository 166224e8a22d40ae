//! The session record, `session:<id>`, as the worker, the orchestrator and the agent share it
//! (contract §3): its statuses and its field names.
//!
//! Three writers: the worker (`starting`, `ready`, and at the end `completed` or `error`), the
//! orchestrator (`terminated` on a credit stop; also `status=starting` right after it
//! enqueues) and the agent (`completed` just before it exits). The worker writes `status` only
//! over its own values; [`SessionStatus::is_workers`] says which those are. The Lua scripts of
//! agent-worker spell the same values out; its tests keep them in step.

use std::fmt;

/// A session's `status`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// The worker (or the orchestrator, right after enqueueing) is starting its agent.
    Starting,
    /// The agent is connected.
    Ready,
    /// The start failed for good, or the agent exited with an error (see `error`).
    Error,
    /// The agent ended the call (it writes this itself), or exited cleanly.
    Completed,
    /// The orchestrator stopped the session (the user ran out of credit): a stop request.
    Terminated,
    /// A value none of the three writers above uses; left as it is.
    Other(String),
}

impl SessionStatus {
    /// The value as stored.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Error => "error",
            Self::Completed => "completed",
            Self::Terminated => "terminated",
            Self::Other(other) => other,
        }
    }

    /// The status stored as `value`.
    pub fn parse(value: &str) -> Self {
        match value {
            "starting" => Self::Starting,
            "ready" => Self::Ready,
            "error" => Self::Error,
            "completed" => Self::Completed,
            "terminated" => Self::Terminated,
            other => Self::Other(other.to_owned()),
        }
    }

    /// True for the statuses the worker may overwrite: `starting` and `ready`.
    pub fn is_workers(&self) -> bool {
        matches!(self, Self::Starting | Self::Ready)
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Field names of `session:<id>`.
pub mod fields {
    /// The status ([`super::SessionStatus`]).
    pub const STATUS: &str = "status";
    /// The worker that owns the session (its claim).
    pub const WORKER_ID: &str = "workerId";
    /// The voice the agent was started with.
    pub const VOICE_ID: &str = "voiceId";
    /// Who started the session.
    pub const USER_ID: &str = "userId";
    /// When the worker first claimed it (unix seconds).
    pub const CREATED_AT: &str = "createdAt";
    /// The agent-start job's task id.
    pub const TASK_ID: &str = "taskId";
    /// The agent's pid and process group.
    pub const AGENT_PID: &str = "agentPid";
    /// The agent's process group id.
    pub const AGENT_PGID: &str = "agentPgid";
    /// Spawn to ready, seconds.
    pub const STARTUP_TIME: &str = "startupTime";
    /// `1` when a warm process of the worker's pool took the session, else `0`.
    pub const WARM: &str = "warm";
    /// The last heartbeat or state change (unix seconds).
    pub const LAST_ACTIVE: &str = "lastActive";
    /// Why the start failed or the agent exited with an error.
    pub const ERROR: &str = "error";
    /// A failed attempt that was (or will be) retried.
    pub const LAST_ERROR: &str = "lastError";
    /// When the session ended on its worker (unix seconds).
    pub const ENDED_AT: &str = "endedAt";
    /// The agent's exit code, or the signal that killed it.
    pub const EXIT_CODE: &str = "exitCode";
    /// The signal that killed the agent.
    pub const EXIT_SIGNAL: &str = "exitSignal";
    /// Why the worker stopped the agent, when it did.
    pub const STOP_REASON: &str = "stopReason";
    /// The agent's log file (`agent.log_dir`).
    pub const LOG_FILE: &str = "logFile";
    /// The orchestrator's: why it terminated the session.
    pub const TERMINATION_REASON: &str = "terminationReason";
    /// The agent's: billing, whole minutes of conversation.
    pub const CONVERSATION_DURATION_MINUTES: &str = "conversationDurationMinutes";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_only_starting_and_ready_are_the_workers() {
        for value in [
            "starting",
            "ready",
            "error",
            "completed",
            "terminated",
            "paused",
        ] {
            assert_eq!(SessionStatus::parse(value).as_str(), value);
        }
        let workers: Vec<_> = ["starting", "ready", "error", "completed", "terminated", "x"]
            .into_iter()
            .filter(|v| SessionStatus::parse(v).is_workers())
            .collect();
        assert_eq!(workers, ["starting", "ready"]);
    }
}
