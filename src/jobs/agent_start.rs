//! The agent-start job: payload → session config → a ready agent.
//!
//! apalis decodes a job's arguments before the handler runs, and with apalis-redis 1.0 a
//! payload that fails to decode kills the worker and strands its whole fetched batch. So the
//! queue is read with [`RawCodec`], which hands over the stored bytes untouched, and decoding
//! happens here, where a bad payload is just a failed job. [`JobError::is_permanent`] is the one
//! place that decides between "dead now" (apalis `AbortError`) and "let the backend retry".

use std::{
    convert::Infallible,
    panic::AssertUnwindSafe,
    sync::{Arc, LazyLock},
};

use agent_jobs::{AgentStart, PayloadError, QueueKeys};
use apalis::prelude::{AbortError, Attempt, BoxDynError, Codec, Data, TaskId};
use futures::FutureExt;
use redis::{Script, aio::ConnectionManager};
use tracing::Instrument;

use crate::{
    agent::{
        command::AgentCommand,
        supervisor::{StartError, StartOutcome, StartRequest, Supervisor},
    },
    metrics::{self as observability, JobOutcome},
    session::SessionStore,
};

/// The attempt at which apalis-redis 1.0 stops rescheduling a failed job (hard-coded in its
/// `handle_results.lua`).
const LAST_BACKEND_ATTEMPT: usize = 25;

/// The stored bytes of a job, not yet decoded.
#[derive(Debug, Clone)]
pub struct RawJob(pub Vec<u8>);

/// A codec that cannot fail: it passes the stored bytes through as a [`RawJob`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec<RawJob> for RawCodec {
    type Error = Infallible;
    type Compact = Vec<u8>;

    fn encode(&self, job: &RawJob) -> Result<Vec<u8>, Infallible> {
        Ok(job.0.clone())
    }

    fn decode(&self, bytes: &Vec<u8>) -> Result<RawJob, Infallible> {
        Ok(RawJob(bytes.clone()))
    }
}

/// Why an agent-start job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The payload is not a valid agent-start job.
    #[error("invalid agent-start payload: {0}")]
    Payload(#[from] PayloadError),
    /// The start failed: every launch attempt (made in-process already), or the claim.
    #[error(transparent)]
    Start(#[from] StartError),
}

impl JobError {
    /// True when the job must go to the dead set now; false when apalis-redis may retry it.
    /// Only Redis trouble (reading the config, claiming the session) is worth a later retry:
    /// bad input stays bad, and launches were already retried with back-off.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Payload(_) | Self::Start(StartError::Failed(_) | StartError::Rejected(_)) => true,
            Self::Start(StartError::Unavailable(_) | StartError::Abandoned) => false,
        }
    }
}

static RELEASE_IDEMPOTENCY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/release_idempotency.lua")));

/// What the handler needs, shared by all jobs of a process.
#[derive(Clone)]
pub struct AgentStartJob {
    /// Owns the agents.
    pub supervisor: Supervisor,
    /// Session config and state.
    pub store: SessionStore,
    /// How the agent is launched for a session.
    pub command: Arc<AgentCommand>,
    /// The queue the jobs come from (for their idempotency keys).
    pub queue: QueueKeys,
    /// For the idempotency release.
    pub conn: ConnectionManager,
}

impl std::fmt::Debug for AgentStartJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStartJob")
            .field("queue", &self.queue.queue())
            .field("command", &self.command.command)
            .finish_non_exhaustive()
    }
}

impl AgentStartJob {
    /// Runs one job: decode, load config, start (or find) the agent. On the `last` attempt the
    /// backend allows, every failure is final.
    pub async fn run(
        &self,
        raw: &[u8],
        task_id: &str,
        last: bool,
    ) -> Result<StartOutcome, JobError> {
        let job = AgentStart::decode(raw)?;
        tracing::Span::current().record("session_id", job.session_id.as_str());
        let result = self.start(&job, task_id).await;
        if let Err(error) = &result
            && (last || error.is_permanent())
        {
            self.release_idempotency(&job, task_id).await;
        }
        result
    }

    /// A dead job must not keep its session from being enqueued again.
    async fn release_idempotency(&self, job: &AgentStart, task_id: &str) {
        let key = self
            .queue
            .idempotency(&agent_jobs::producer::idempotency_key(job));
        let released: redis::RedisResult<i64> = RELEASE_IDEMPOTENCY
            .key(&key)
            .arg(task_id)
            .invoke_async(&mut self.conn.clone())
            .await;
        if let Err(error) = released {
            observability::redis_error("idempotency_release");
            tracing::warn!(key = %key, error = %error, "idempotency_release_failed");
        }
    }

    async fn start(&self, job: &AgentStart, task_id: &str) -> Result<StartOutcome, JobError> {
        let request = StartRequest {
            session_id: job.session_id.clone(),
            user_id: job.user_id.clone(),
            task_id: task_id.to_owned(),
            job_meta: self.queue.meta(task_id),
            command: self.command.clone(),
        };
        let outcome = self.supervisor.start(request).await?;
        match &outcome {
            StartOutcome::AlreadyRunning { pid } => {
                tracing::info!(session_id = %job.session_id, pid, "agent_already_running");
            }
            StartOutcome::RunningElsewhere { owner } => {
                tracing::info!(session_id = %job.session_id, owner = %owner, "agent_already_running");
            }
            StartOutcome::SessionEnded { status } => {
                tracing::info!(
                    session_id = %job.session_id,
                    status = status.as_deref().unwrap_or("gone"),
                    "agent_start_skipped_session_ended"
                );
            }
            StartOutcome::Started { .. } => {}
        }
        Ok(outcome)
    }
}

/// The apalis handler.
pub async fn handle(
    job: RawJob,
    task_id: TaskId,
    attempt: Attempt,
    ctx: Data<Arc<AgentStartJob>>,
) -> Result<(), BoxDynError> {
    let started = std::time::Instant::now();
    let task_id = task_id.to_string();
    let span = tracing::info_span!(
        "agent_start",
        task_id = %task_id,
        session_id = tracing::field::Empty
    );
    // A panic must fail this job, not the worker and every job fetched with it. (apalis's
    // catch_panic layer does the same, but its handler type defeats the Send inference of
    // the worker future.)
    // apalis-redis gives up on a job after 25 attempts, moving it to the dead set as `Failed`;
    // our last one aborts instead, so it is dead with a reason and its session is released.
    let last = attempt.current() >= LAST_BACKEND_ATTEMPT;
    let run = AssertUnwindSafe(ctx.run(&job.0, &task_id, last)).catch_unwind();
    let result = match run.instrument(span.clone()).await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            span.in_scope(|| tracing::error!(panic = %message, "agent_start_panicked"));
            observability::job_finished(JobOutcome::Dead, started.elapsed());
            return Err(Box::new(AbortError::new(std::io::Error::other(format!(
                "agent-start handler panicked: {message}"
            )))));
        }
    };
    let outcome = match &result {
        Ok(_) => JobOutcome::Done,
        Err(error) if last || error.is_permanent() => JobOutcome::Dead,
        Err(_) => JobOutcome::Retried,
    };
    observability::job_finished(outcome, started.elapsed());
    match result {
        Ok(_) => Ok(()),
        Err(error) => {
            span.in_scope(|| {
                tracing::warn!(
                    error = %error,
                    permanent = error.is_permanent(),
                    "agent_start_failed"
                )
            });
            if last || error.is_permanent() {
                Err(Box::new(AbortError::new(error)))
            } else {
                Err(Box::new(error))
            }
        }
    }
}
