//! What the supervisor is asked ([`StartRequest`]) and what a start leads to: an outcome
//! ([`StartOutcome`]) or why it did not happen ([`StartError`]). The job decides from these
//! whether it completes, retries or is dead.

use std::{sync::Arc, time::Duration};

use agent_jobs::{SessionId, SessionStatus};

use crate::{
    agent::command::AgentCommand,
    session::{Refusal, SessionError},
};

/// What a start request led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// A new agent is ready.
    Started {
        /// Its pid.
        pid: u32,
        /// Spawn to ready.
        startup: Duration,
    },
    /// This process already runs an agent for the session; nothing new was started.
    AlreadyRunning {
        /// The running agent's pid.
        pid: u32,
    },
    /// Another live worker owns the session; nothing was started here.
    RunningElsewhere {
        /// That worker's id.
        owner: String,
    },
    /// The session is over (`completed` or `terminated`, or its record gone during our
    /// retries): no agent was started, and none may be.
    SessionEnded {
        /// Its status, or `None` when the record is gone.
        status: Option<SessionStatus>,
    },
}

/// Every attempt to launch the agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent failed to start after {attempts} attempt(s): {last_error}")]
pub struct StartFailure {
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: String,
}

/// Why a start did not happen. Shared by every delivery waiting on the same launch, hence the
/// `Arc`s.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    /// The agent failed to start, every attempt. Permanent for this job.
    #[error(transparent)]
    Failed(#[from] StartFailure),
    /// The session could not be claimed because Redis failed; nothing was launched. The job
    /// may succeed later.
    #[error("could not claim the session: {0}")]
    Unavailable(Arc<SessionError>),
    /// Another worker has been starting the session for longer than we wait for it (its
    /// start-up timeout plus the time to presume it dead). The job may succeed later.
    #[error("session is still starting on worker {owner}")]
    StartingElsewhere {
        /// That worker's id.
        owner: String,
    },
    /// The session's config cannot be used (wrong type, no voice, a value the command line
    /// cannot carry). Permanent; the session was marked `error` if it was claimed.
    #[error(transparent)]
    Rejected(Arc<SessionError>),
    /// The claim refused the start (past its `start_by`, or its config deleted) and recorded
    /// that on the session. Permanent: the job goes dead with the reason.
    #[error(transparent)]
    Refused(Refusal),
    /// The worker is stopping and the start was cut short (its agent killed, or attempts
    /// left unmade). Retryable: the session stays `starting` with the reason in `lastError`,
    /// and this worker's claim lapses when it leaves, so another replica starts it.
    #[error("start abandoned: the worker is stopping")]
    Abandoned,
}

/// One agent start, as the job asks for it.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The session to start an agent for.
    pub session_id: SessionId,
    /// For the session hash (and the default config's `userName`).
    pub user_id: Option<String>,
    /// For the session hash.
    pub task_id: String,
    /// The job's meta hash, where the first claim of the session is recorded.
    pub job_meta: String,
    /// How the agent is launched (`agent.command` and the session's options, contract §4,
    /// built from the config read at each claim).
    pub command: Arc<AgentCommand>,
    /// The job's W3C trace context (`traceparent`, `tracestate`), continued by the start's
    /// trace and handed to the agent ([`crate::telemetry::start_trace`]).
    pub trace_context: Option<(String, Option<String>)>,
    /// The job's deadline (`start_by`, unix ms on Redis's clock), checked at each claim.
    pub start_by: Option<i64>,
}

/// What every delivery of a start waits for.
pub(super) type StartResult = Result<StartOutcome, StartError>;
