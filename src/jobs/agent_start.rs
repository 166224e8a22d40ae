//! The agent-start job: payload → session config → a ready agent.
//!
//! apalis decodes a job's arguments before the handler runs, and with apalis-redis 1.0 a
//! payload that fails to decode kills the worker and strands its whole fetched batch. So the
//! queue is read with [`RawCodec`], which hands over the stored bytes untouched, and decoding
//! happens here, where a bad payload is just a failed job. [`JobError::disposition`] is the one
//! place that decides between "dead now" (apalis `AbortError`) and "let the backend retry".

use crate::connection::RedisConn;
use std::{
    convert::Infallible,
    panic::AssertUnwindSafe,
    sync::{Arc, LazyLock},
};

use agent_jobs::{AgentStart, PayloadError, QueueKeys, SessionStatus};
use apalis::prelude::{AbortError, Attempt, BoxDynError, Codec, Data, TaskId};
use futures::FutureExt;
use redis::Script;
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
    /// The handler panicked (a bug): this job fails, not the worker and its other jobs.
    #[error("agent-start handler panicked: {0}")]
    Panicked(String),
}

/// What becomes of a failed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// apalis-redis runs it again later.
    Retry,
    /// It goes to the dead set now, with its reason; its session can be enqueued again.
    Dead,
}

impl JobError {
    /// The one retry-or-abort decision. Only Redis trouble (claiming the session) and a start
    /// cut short by a stopping worker are worth a later retry: bad input stays bad, launches
    /// were already retried with back-off, a panic is a bug. On the `last` attempt
    /// apalis-redis allows, everything is final.
    pub fn disposition(&self, last: bool) -> Disposition {
        let retryable = matches!(
            self,
            Self::Start(
                StartError::Unavailable(_)
                    | StartError::StartingElsewhere { .. }
                    | StartError::Abandoned
            )
        );
        if retryable && !last {
            Disposition::Retry
        } else {
            Disposition::Dead
        }
    }
}

/// A failed job and what becomes of it.
#[derive(Debug)]
pub struct Failure {
    /// Why it failed.
    pub error: JobError,
    /// Retried or dead.
    pub disposition: Disposition,
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
    pub conn: RedisConn,
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
    /// Runs one job: decode, load config, start (or find) the agent; a failure comes with
    /// its disposition (on the `last` attempt the backend allows, every failure is final). A
    /// dead job releases its session's idempotency key.
    pub async fn run(
        &self,
        raw: &[u8],
        task_id: &str,
        last: bool,
    ) -> Result<StartOutcome, Failure> {
        let fail = |error: JobError| Failure {
            disposition: error.disposition(last),
            error,
        };
        let (job, warnings) = AgentStart::decode_with_warnings(raw).map_err(|e| fail(e.into()))?;
        tracing::Span::current().record("session_id", job.session_id.as_str());
        // A malformed trace context costs no one their agent: the start gets a root trace.
        for warning in warnings {
            tracing::warn!(session_id = %job.session_id, warning = %warning, "payload_field_ignored");
        }
        let result = self.start(&job, task_id).await.map_err(fail);
        if let Err(failure) = &result
            && failure.disposition == Disposition::Dead
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
            // Checked by the decoder: a malformed one was dropped with a warning.
            trace_context: job
                .traceparent
                .clone()
                .map(|parent| (parent, job.tracestate.clone())),
            start_by: job.start_by,
        };
        let outcome = self.supervisor.start(request).await;
        if let Err(StartError::Refused(refusal)) = &outcome {
            observability::start_refused(refusal.kind.as_str());
            tracing::warn!(session_id = %job.session_id, kind = refusal.kind.as_str(), reason = %refusal.reason, "agent_start_refused");
        }
        let outcome = outcome?;
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
                    status = status.as_ref().map_or("gone", SessionStatus::as_str),
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
    let result = run.instrument(span.clone()).await.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        span.in_scope(|| tracing::error!(panic = %message, "agent_start_panicked"));
        let error = JobError::Panicked(message);
        Err(Failure {
            disposition: error.disposition(last),
            error,
        })
    });
    let failure = match result {
        Ok(_) => {
            observability::job_finished(JobOutcome::Done, started.elapsed());
            return Ok(());
        }
        Err(failure) => failure,
    };
    let (outcome, dead) = match failure.disposition {
        Disposition::Retry => (JobOutcome::Retried, false),
        Disposition::Dead => (JobOutcome::Dead, true),
    };
    observability::job_finished(outcome, started.elapsed());
    span.in_scope(
        || tracing::warn!(error = %failure.error, permanent = dead, "agent_start_failed"),
    );
    if dead {
        Err(Box::new(AbortError::new(failure.error)))
    } else {
        Err(Box::new(failure.error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::supervisor::StartFailure;

    #[test]
    fn only_redis_trouble_and_a_stopping_worker_are_retried_and_never_on_the_last_attempt() {
        let failed = JobError::Start(StartError::Failed(StartFailure {
            attempts: 3,
            last_error: "exited".into(),
        }));
        let elsewhere = JobError::Start(StartError::StartingElsewhere { owner: "w".into() });
        let abandoned = JobError::Start(StartError::Abandoned);
        let bad = JobError::Payload(AgentStart::decode(b"{}").unwrap_err());
        let panicked = JobError::Panicked("boom".into());
        for (error, retried) in [
            (&failed, false),
            (&elsewhere, true),
            (&abandoned, true),
            (&bad, false),
            (&panicked, false),
        ] {
            let want = if retried {
                Disposition::Retry
            } else {
                Disposition::Dead
            };
            assert_eq!(error.disposition(false), want, "{error}");
            assert_eq!(error.disposition(true), Disposition::Dead, "{error}");
        }
    }
}
