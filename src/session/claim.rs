//! The claim: a session's config read, its ownership checked and `starting` recorded in one
//! script call (`lua/claim_session.lua`), before each launch attempt.
//!
//! Another live worker's claim is respected; one whose presence is older than
//! `worker.orphan_timeout` is taken over, but only once this process has itself been connected
//! that long (right after a cut-off, every other worker's presence looks stale).

use std::sync::LazyLock;

use agent_jobs::{
    SessionId, SessionKeys, SessionStatus,
    keys::{SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING, WORKERS, legacy_metrics},
};
use redis::Script;

use super::{
    SessionEnd, SessionError, SessionStore,
    claim_reply::ClaimReply,
    config::{SessionConfig, config_from_pairs, validate},
    flag, session_script,
};

static CLAIM: LazyLock<Script> =
    LazyLock::new(|| session_script(include_str!("../lua/claim_session.lua")));

/// The outcome of [`SessionStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The session is ours and marked `starting`; its config, validated, and when the producer
    /// enqueued the job (unix ms on Redis's clock), if its record says.
    Claimed(SessionConfig, Option<u64>),
    /// Another live worker owns it.
    HeldBy {
        /// That worker's id.
        owner: String,
        /// True when its agent is ready; false while it is still starting.
        ready: bool,
    },
    /// The start was refused and recorded (`lua/claim_session.lua`): past its deadline, or
    /// its config deleted (the tombstone rule). No agent may be started for this job.
    Refused(Refusal),
    /// The session is over: no agent may be started for it.
    Ended {
        /// Its status (`completed`, `terminated`, or one the worker does not know), or
        /// `None` when its record is gone (the orchestrator ended it during our retries).
        status: Option<SessionStatus>,
    },
}

/// Why a start was refused at its claim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// Which rule refused it.
    pub kind: RefusalKind,
    /// What the session and its event say (starts with the kind, says how late or how old).
    pub reason: String,
}

/// The rules that refuse a start at its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Claimed after the job's `start_by` (Redis's clock).
    StartExpired,
    /// The config is missing although the job is older than `session.config_grace`: deleted
    /// by the orchestrator, which ended the session.
    ConfigMissing,
}

impl RefusalKind {
    /// The stable name (`start_expired`, `config_missing`): the reason's first word and the
    /// metric's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StartExpired => "start_expired",
            Self::ConfigMissing => "config_missing",
        }
    }
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
    /// The job's deadline (`start_by`, unix ms on Redis's clock): a claim after it is
    /// refused (`start_expired`). `None`: no deadline.
    pub start_by: Option<i64>,
}

impl SessionStore {
    /// Reads the session's config and claims the session for `worker_id`, marking it
    /// `starting` (before each launch attempt), unless another live worker owns it or the
    /// session has ended: one script call, see `lua/claim_session.lua`. A missing config means
    /// defaults, written back, unless the tombstone rule refuses the start; a claim past the
    /// job's `start_by` is refused too ([`Claim::Refused`], recorded by the script).
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
        let mut invocation = CLAIM.prepare_invoke();
        invocation
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
            .arg(
                attempt
                    .start_by
                    .map(|ms| ms.to_string())
                    .unwrap_or_default(),
            )
            .arg(self.config_grace.as_millis() as u64)
            .arg(self.ended_ttl.as_secs().max(1));
        self.events(&mut invocation);
        let reply = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .and_then(ClaimReply::from_redis)
            .map_err(|source| SessionError::Redis {
                key: state.clone(),
                source,
            })?;
        match reply {
            ClaimReply::WrongType { found } => Err(SessionError::WrongType {
                key: config_key,
                found: found.unwrap_or_else(|| "value of another type".into()),
            }),
            ClaimReply::HeldBy { owner, ready } => Ok(Claim::HeldBy { owner, ready }),
            ClaimReply::Ended { status } => Ok(Claim::Ended { status }),
            ClaimReply::Refused { kind, reason } => Ok(Claim::Refused(Refusal {
                kind: match kind.as_str() {
                    "start_expired" => RefusalKind::StartExpired,
                    _ => RefusalKind::ConfigMissing,
                },
                reason,
            })),
            ClaimReply::Claimed {
                source,
                pairs,
                enqueued_ms,
            } => {
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
                config.map(|config| Claim::Claimed(config, enqueued_ms))
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
}
