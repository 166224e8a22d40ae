//! One start, from the first claim to a ready agent or the end of the start: claim the
//! session (`lua/claim_session.lua`), launch, and after a failure back off and claim again, up
//! to `agent.start_attempts`; a session another worker is still starting is looked at again
//! until its fate is known. See the supervisor's module docs for the whole.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use agent_jobs::SessionId;
use tracing::Instrument;

use super::{
    start::{StartError, StartFailure, StartOutcome, StartRequest, StartResult},
    state::{Inner, StartingSlot},
};
use crate::{
    agent::launcher::{LaunchError, RunningAgent},
    clock::unix_now,
    metrics as observability,
    session::{AgentRecord, Claim, ClaimAttempt, SessionEnd, config::SessionConfig},
    start_timeline::{Claimed, StartTimeline},
    telemetry::start_trace::StartTrace,
};

/// A worker process idle for longer than this counts its next start as cold (the original
/// worker's `cold_start_count`).
const COLD_AFTER: Duration = Duration::from_secs(300);

/// Whether a start at `now` is cold: the process's first (`previous` is `None`), or its first
/// after [`COLD_AFTER`] without one.
fn is_cold(previous: Option<tokio::time::Instant>, now: tokio::time::Instant) -> bool {
    previous.is_none_or(|at| now.saturating_duration_since(at) > COLD_AFTER)
}

/// How often a claim held by a worker that is still starting the session is looked at again.
const HELD_RECHECK: Duration = Duration::from_secs(1);

/// One launch's progress across its attempts.
struct Attempts {
    /// Attempts made so far.
    made: u32,
    /// When this worker first claimed the session (its `createdAt`).
    claimed_at: Option<u64>,
    /// Until when a session another worker is still starting is waited for.
    held_until: tokio::time::Instant,
    /// `logFile`, when `agent.log_dir` is set.
    log_file: Option<String>,
    /// The latest claim: where the launch's phases count from.
    claim: Option<Claimed>,
}

/// What one claim decided.
enum ClaimStep {
    /// Ours, with this config: launch.
    Launch(SessionConfig),
    /// Held by a worker still starting it: look again shortly.
    Recheck,
    /// The start is over, with this result.
    Finish(StartResult),
}

/// What one launch attempt came to.
enum AttemptStep {
    /// The agent is ready.
    Ready(RunningAgent),
    /// It failed: retry, or give up.
    Failed(LaunchError),
    /// The worker is stopping at once.
    Abandoned,
}

impl Inner {
    /// Claims and launches, attempt after attempt, until an agent is ready or the start is
    /// over: see the module docs. All of it inside the start's trace.
    pub(super) async fn launch(
        self: Arc<Self>,
        request: StartRequest,
        slot: StartingSlot,
    ) -> StartResult {
        let (parent, state) = match &request.trace_context {
            Some((parent, state)) => (Some(parent.as_str()), state.as_deref()),
            None => (None, None),
        };
        let trace = StartTrace::begin(request.session_id.as_str(), parent, state);
        let span = trace.span().clone();
        let result = self
            .launch_traced(request, slot, &trace)
            .instrument(span)
            .await;
        trace.finished(result.as_ref().err().map(ToString::to_string));
        result
    }

    async fn launch_traced(
        self: Arc<Self>,
        request: StartRequest,
        slot: StartingSlot,
        trace: &StartTrace,
    ) -> StartResult {
        let id = request.session_id.clone();
        let mut attempts = Attempts {
            made: 0,
            claimed_at: None,
            held_until: tokio::time::Instant::now() + self.retry.held_patience,
            log_file: request
                .command
                .log_file(&id)
                .map(|p| p.to_string_lossy().into_owned()),
            claim: None,
        };
        loop {
            if self.abandon.is_cancelled() {
                return Err(StartError::Abandoned);
            }
            let claim = self.claim(&request, &mut attempts);
            let config = match claim.instrument(trace.claim_span()).await {
                ClaimStep::Launch(config) => config,
                ClaimStep::Recheck => continue,
                ClaimStep::Finish(result) => return result,
            };
            attempts.made += 1;
            match self.attempt(&request, &config, trace, attempts.made).await {
                AttemptStep::Ready(agent) => {
                    let claimed = attempts.claim.unwrap_or_else(|| Claimed::now(None));
                    let timeline = StartTimeline::of(&claimed, &agent);
                    timeline.record_metrics();
                    trace.phases(&timeline);
                    let record = AgentRecord {
                        session_id: id.clone(),
                        user_id: request.user_id.clone(),
                        task_id: request.task_id.clone(),
                        voice_id: config.voice_id().to_owned(),
                        created_at: attempts.claimed_at.unwrap_or_else(unix_now),
                        pid: agent.pid,
                        pgid: agent.pgid,
                        startup: agent.startup,
                        log_file: attempts.log_file.clone(),
                        warm: agent.start.warm_value(),
                    };
                    let adopted = self
                        .clone()
                        .adopt(slot, agent, record, attempts.made, timeline);
                    return Ok(adopted.await);
                }
                AttemptStep::Abandoned => return Err(self.abandoned(&id).await),
                AttemptStep::Failed(error) => {
                    if let Some(result) = self.after_failure(&request, &attempts, error).await {
                        return result;
                    }
                }
            }
        }
    }

    /// Claims the session for the next attempt (see `SessionStore::claim`).
    async fn claim(&self, request: &StartRequest, attempts: &mut Attempts) -> ClaimStep {
        // Decided and recorded at once (concurrent first starts count one cold start), and
        // put back if this claim starts nothing.
        let (cold, before) = match attempts.claimed_at {
            None => self.take_cold(),
            Some(_) => (false, None),
        };
        let claim = self
            .store
            .claim(
                &request.session_id,
                request.user_id.as_deref(),
                &request.task_id,
                &self.worker_id,
                ClaimAttempt {
                    job_meta: Some(&request.job_meta),
                    cold,
                    log_file: attempts.log_file.as_deref(),
                    start_by: request.start_by,
                },
            )
            .await;
        if cold && !matches!(claim, Ok(Claim::Claimed(..))) {
            *self.last_start.lock().expect("last_start lock") = before;
        }
        let finish = ClaimStep::Finish;
        match claim {
            Ok(Claim::Claimed(config, enqueued_ms)) => {
                attempts.claimed_at.get_or_insert_with(unix_now);
                attempts.claim = Some(Claimed::now(enqueued_ms));
                tracing::info!(
                    session_id = %request.session_id,
                    voice_id = config.voice_id(),
                    source = config.source().as_str(),
                    fields = ?config.field_names(),
                    "session_config_loaded"
                );
                ClaimStep::Launch(config)
            }
            Ok(Claim::HeldBy { owner, ready: true }) => {
                finish(Ok(StartOutcome::RunningElsewhere { owner }))
            }
            // Still starting elsewhere: that worker may be alive (then its start completes or
            // fails) or dead but not yet presumed so. Look again until one is known;
            // completing this job now could leave the session with no agent at all.
            Ok(Claim::HeldBy {
                owner,
                ready: false,
            }) => {
                if tokio::time::Instant::now() >= attempts.held_until {
                    return finish(Err(StartError::StartingElsewhere { owner }));
                }
                tokio::select! {
                    _ = tokio::time::sleep(HELD_RECHECK) => ClaimStep::Recheck,
                    // Not ours: nothing to write.
                    _ = self.abandon.cancelled() => finish(Err(StartError::Abandoned)),
                }
            }
            // Completed, terminated, or ended by the orchestrator during our retries:
            // starting an agent now would bill a session nobody is in.
            Ok(Claim::Ended { status }) => finish(Ok(StartOutcome::SessionEnded { status })),
            // Too late, or its config deleted: recorded by the claim, permanent for the job.
            Ok(Claim::Refused(refusal)) => finish(Err(StartError::Refused(refusal))),
            Err(error) if error.is_permanent() => {
                finish(Err(StartError::Rejected(Arc::new(error))))
            }
            // Without a claim there is no launch: another replica may own the session.
            Err(error) => finish(Err(StartError::Unavailable(Arc::new(error)))),
        }
    }

    /// One launch of the agent with `config`, raced against an immediate shutdown.
    async fn attempt(
        &self,
        request: &StartRequest,
        config: &SessionConfig,
        trace: &StartTrace,
        made: u32,
    ) -> AttemptStep {
        let id = &request.session_id;
        let mut spec = request.command.spec(id, config);
        // The start's trace context, to the agent whatever its start mode (a warm process and
        // the zygote's fork get their session's environment from the spec too).
        spec.env.extend(trace.agent_env().iter().cloned());
        // Dropping the launch kills its agent (see `Launcher::launch`). `biased`: once
        // abandoned, a launch that has not finished is not waited for.
        tokio::select! {
            biased;
            _ = self.abandon.cancelled() => {
                tracing::info!(session_id = %id, attempt = made, "agent_start_abandoned");
                AttemptStep::Abandoned
            }
            launched = self.launcher.launch(spec) => match launched {
                Ok(agent) => AttemptStep::Ready(agent),
                Err(error) => AttemptStep::Failed(error),
            },
        }
    }

    /// After a failed attempt: the next one after a back-off (`None`), or the end of the
    /// start (the last attempt failed, or the worker began to stop).
    async fn after_failure(
        &self,
        request: &StartRequest,
        attempts: &Attempts,
        error: LaunchError,
    ) -> Option<StartResult> {
        let (id, made) = (&request.session_id, attempts.made);
        let last_error = error.to_string();
        observability::agent_spawn_failed();
        tracing::warn!(
            session_id = %id,
            attempt = made,
            attempts = self.retry.attempts,
            error = %last_error,
            "agent_spawn_failed"
        );
        if made < self.retry.attempts {
            // The session stays `starting` between attempts (an orchestrator may give up on
            // `error`); the attempt's error is kept for operators.
            let retrying = !self.closing.load(Ordering::SeqCst);
            self.record(
                self.store
                    .note_attempt_error(
                        id,
                        &self.worker_id,
                        &last_error,
                        retrying,
                        error.is_timeout(),
                    )
                    .await,
            );
            if retrying {
                tokio::select! {
                    _ = tokio::time::sleep(self.retry.delay_after(made)) => {}
                    _ = self.abandon.cancelled() => {}
                }
            }
            if !self.closing.load(Ordering::SeqCst) {
                return None;
            }
            // Shutdown began: the attempts left are another replica's to make.
            return Some(Err(StartError::Abandoned));
        }
        let end = SessionEnd {
            error: Some(&last_error),
            timed_out: error.is_timeout(),
            ..SessionEnd::default()
        };
        self.record(self.store.end(id, &self.worker_id, &end).await.map(drop));
        Some(Err(StartError::Failed(StartFailure {
            attempts: made,
            last_error,
        })))
    }

    /// Records a start now; true (with the previous start, to put back) when it is the
    /// process's first, or its first after [`COLD_AFTER`] without one.
    fn take_cold(&self) -> (bool, Option<tokio::time::Instant>) {
        let mut last = self.last_start.lock().expect("last_start lock");
        let now = tokio::time::Instant::now();
        let before = last.replace(now);
        (is_cold(before, now), before)
    }

    /// An abandoned start of a session we claimed: the reason goes to `lastError` and the
    /// session stays `starting`, so the retried job's claim takes it over once we are gone.
    async fn abandoned(&self, id: &SessionId) -> StartError {
        let error = StartError::Abandoned;
        self.record(
            self.store
                .note_attempt_error(id, &self.worker_id, &error.to_string(), false, false)
                .await,
        );
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_start_and_the_first_after_five_idle_minutes_are_cold() {
        let now = tokio::time::Instant::now() + Duration::from_secs(3600);
        assert!(is_cold(None, now));
        assert!(!is_cold(Some(now - Duration::from_secs(299)), now));
        assert!(!is_cold(Some(now - COLD_AFTER), now));
        assert!(is_cold(Some(now - Duration::from_secs(301)), now));
    }
}
