//! The supervisor: owns every agent of this process, from launch to reaped exit.
//!
//! Agents outlive the job that started them: a job completes when its agent is ready, while
//! the agent runs for the whole session. So launches and exit watchers run as tasks of the
//! supervisor, not of the apalis worker. If the job worker dies mid-launch (a Redis blip), the
//! launch goes on, and the re-delivered job finds it here instead of starting a second agent.
//!
//! Per session there is at most one slot: `Starting` (a launch in progress, which later
//! deliveries join) or `Running` (a ready agent). Across replicas, each launch attempt first
//! claims the session in Redis (`lua/claim_session.lua`): a session owned by another live worker
//! is not started again here (`agent_already_running`). A launch makes up to `start_attempts`
//! attempts with exponential back-off and jitter, writing `starting` / `error` / `ready` to the
//! session hash as it goes. When an agent exits, its session's keys are removed (if this worker
//! still owns it) and the slot is freed, which also frees capacity for the next job.
//!
//! Shutdown has three steps: [`Supervisor::close`] (no more retries), [`Supervisor::drain`]
//! (let agents end on their own, up to a deadline) and [`Supervisor::shutdown`] (stop the rest).

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use agent_jobs::{SessionId, SessionStatus};
use futures::FutureExt;
use rand::RngExt;
use tokio::sync::{Notify, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    capacity::Capacity,
    command::AgentCommand,
    launcher::{AgentExit, AgentHandle, LaunchError, Launcher, RunningAgent},
};
use crate::{
    clock::unix_now,
    metrics as observability,
    session::{
        AgentRecord, Claim, ClaimAttempt, EndRecord, Ready, ReadyRecord, SessionEnd, SessionError,
        SessionStore, config::SessionConfig,
    },
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
}

/// A worker process idle for longer than this counts its next start as cold (the original
/// worker's `cold_start_count`).
const COLD_AFTER: Duration = Duration::from_secs(300);

/// Whether a start at `now` is cold: the process's first (`previous` is `None`), or its first
/// after [`COLD_AFTER`] without one.
fn is_cold(previous: Option<tokio::time::Instant>, now: tokio::time::Instant) -> bool {
    previous.is_none_or(|at| now.saturating_duration_since(at) > COLD_AFTER)
}

/// Attempts to record a session's end before giving up (about 30 s with the back-off).
const END_ATTEMPTS: u32 = 18;

/// How often a claim held by a worker that is still starting the session is looked at again.
const HELD_RECHECK: Duration = Duration::from_secs(1);

/// Retry policy of a launch.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per start (>= 1).
    pub attempts: u32,
    /// Pause before the second attempt; doubled for each further one, with ±50 % jitter.
    pub backoff: Duration,
    /// How long to wait for a session that another worker is still starting, before handing
    /// the job back for a later retry: its start-up timeout plus the time to presume it dead.
    pub held_patience: Duration,
}

impl RetryPolicy {
    /// As the settings say: `agent.start_attempts` with `agent.retry_backoff`, and patience
    /// with a session held by another worker of `worker.orphan_timeout` (to presume it dead)
    /// plus `agent.startup_timeout` (its start) plus a heartbeat.
    pub fn from_settings(settings: &crate::settings::Settings) -> Self {
        Self {
            attempts: settings.agent.start_attempts,
            backoff: settings.agent.retry_backoff,
            held_patience: settings.worker.orphan_timeout
                + settings.agent.startup_timeout
                + settings.worker.heartbeat_interval,
        }
    }

    /// The pause after failed attempt number `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let base = self.backoff.saturating_mul(1 << (attempt - 1).min(16));
        // Jitter spreads retries of many sessions that failed together (an agent host
        // hiccup) instead of launching them again in lockstep.
        base.mul_f64(rand::rng().random_range(0.5..1.5))
    }
}

type StartResult = Result<StartOutcome, StartError>;

enum Slot {
    Starting(watch::Receiver<Option<StartResult>>),
    Running {
        pid: u32,
        handle: AgentHandle,
        /// Why a stop was requested (the first reason); the agent has not exited yet.
        stopping: Option<String>,
        /// What we wrote about it, to write again if Redis loses it.
        record: Arc<AgentRecord>,
    },
}

impl Slot {
    /// Stops a running agent (SIGTERM now, SIGKILL after `grace`; a shorter grace later
    /// shortens the wait). `agent_stopped` is logged once per agent, at the first request:
    /// a shutdown that hurries a stop already under way asks again without a second line.
    /// Returns false for a launch in progress, which has nothing to stop yet.
    fn stop(&mut self, id: &SessionId, reason: &'static str, grace: Duration) -> bool {
        let Slot::Running {
            pid,
            handle,
            stopping,
            ..
        } = self
        else {
            return false;
        };
        if stopping.is_none() {
            tracing::info!(session_id = %id, pid = *pid, reason, "agent_stopped");
            observability::agent_stopped(reason);
            *stopping = Some(reason.to_owned());
        }
        handle.stop(grace);
        true
    }
}

struct Inner {
    launcher: Arc<dyn Launcher>,
    store: SessionStore,
    worker_id: String,
    retry: RetryPolicy,
    capacity: Arc<Capacity>,
    slots: Mutex<HashMap<SessionId, Slot>>,
    /// Shutdown began: no further launch attempts.
    closing: AtomicBool,
    /// Immediate shutdown: launches in progress are abandoned.
    abandon: CancellationToken,
    /// Final stop under way: agents that become ready now are stopped with this grace.
    stopping_all: Mutex<Option<Duration>>,
    /// Notified whenever a slot is freed.
    freed: Notify,
    /// When this process last began a start (cold-start detection).
    last_start: Mutex<Option<tokio::time::Instant>>,
    tasks: TaskTracker,
}

/// Owns the agents of this process. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("worker_id", &self.inner.worker_id)
            .field("agents", &self.agent_count())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor launching with `launcher`, recording state in `store` under `worker_id`,
    /// counting its agents against `capacity`.
    pub fn new(
        launcher: Arc<dyn Launcher>,
        store: SessionStore,
        worker_id: impl Into<String>,
        retry: RetryPolicy,
        capacity: Arc<Capacity>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                launcher,
                store,
                worker_id: worker_id.into(),
                retry,
                capacity,
                slots: Mutex::new(HashMap::new()),
                closing: AtomicBool::new(false),
                abandon: CancellationToken::new(),
                stopping_all: Mutex::new(None),
                freed: Notify::new(),
                last_start: Mutex::new(None),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// This process's worker id, as written to `session:<id>` `workerId`.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// Idle warm processes of the launcher's pool, when it has one.
    pub fn warm_idle(&self) -> Option<usize> {
        self.inner.launcher.warm_idle()
    }

    /// Running agents plus launches in progress.
    pub fn agent_count(&self) -> usize {
        self.inner.slots.lock().expect("slots lock").len()
    }

    /// Starts an agent for the request's session unless this process already has one running
    /// or starting (then it waits for that launch's outcome instead) or another live worker
    /// owns the session.
    pub async fn start(&self, request: StartRequest) -> StartResult {
        let id = request.session_id.clone();
        let mut outcome = {
            let mut slots = self.inner.slots.lock().expect("slots lock");
            match slots.get(&id) {
                Some(Slot::Running { pid, .. }) => {
                    return Ok(StartOutcome::AlreadyRunning { pid: *pid });
                }
                Some(Slot::Starting(outcome)) => outcome.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    slots.insert(id, Slot::Starting(rx.clone()));
                    self.inner.capacity.launch_started();
                    observability::agents_live(slots.len());
                    let inner = self.inner.clone();
                    let slot = StartingSlot {
                        inner: inner.clone(),
                        id: request.session_id.clone(),
                        armed: true,
                    };
                    // A task of the supervisor, not of the job: it finishes even if the job's
                    // future is dropped. A panic drops the slot too, so later deliveries of the
                    // session never join a launch that no longer exists.
                    self.inner.tasks.spawn(async move {
                        let launch = AssertUnwindSafe(inner.launch(request, slot));
                        let result = launch.catch_unwind().await.unwrap_or_else(|_| {
                            Err(StartError::Failed(StartFailure {
                                attempts: 0,
                                last_error: "the launch panicked".into(),
                            }))
                        });
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let result = outcome
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone().expect("checked by wait_for"));
        match result {
            Ok(result) => result,
            // The launch task cannot drop its sender without sending, short of a panic.
            Err(_) => Err(StartError::Failed(StartFailure {
                attempts: 0,
                last_error: "the launch task ended without a result".into(),
            })),
        }
    }

    /// Sessions whose agent is running here (not those still starting).
    pub fn running_sessions(&self) -> Vec<SessionId> {
        self.inner
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Running { .. }))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// What this process wrote about the running agents of `ids` (those still running here).
    pub fn records(&self, ids: &[SessionId]) -> Vec<AgentRecord> {
        let slots = self.inner.slots.lock().expect("slots lock");
        ids.iter()
            .filter_map(|id| match slots.get(id) {
                Some(Slot::Running {
                    record,
                    stopping: None,
                    ..
                }) => Some((**record).clone()),
                _ => None,
            })
            .collect()
    }

    /// Stops the agent of `id` if it runs here: SIGTERM to its group, SIGKILL after `grace`.
    /// Its session is removed once it has exited. Returns false if there was nothing to stop.
    pub fn stop(&self, id: &SessionId, reason: &'static str, grace: Duration) -> bool {
        let mut slots = self.inner.slots.lock().expect("slots lock");
        match slots.get_mut(id) {
            Some(slot) => slot.stop(id, reason, grace),
            None => false,
        }
    }

    /// Begins shutdown: launches in progress make no further attempts. Agents, and launches
    /// that still succeed, run on until [`Supervisor::drain`] and [`Supervisor::shutdown`].
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner.launcher.close();
    }

    /// Immediate shutdown: launches in progress stop waiting for their agents, which are
    /// killed; their sessions stay `starting` with the reason in `lastError` and their jobs
    /// fail as retryable ([`StartError::Abandoned`]).
    pub fn abandon_starts(&self) {
        self.close();
        self.inner.abandon.cancel();
    }

    /// Waits until every agent has ended on its own, `timeout` has passed, or `immediate`
    /// fires. Returns the number of agents still running.
    pub async fn drain(&self, timeout: Duration, immediate: &CancellationToken) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the count is read, so a slot freed in between still wakes us.
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let left = self.agent_count();
            if left == 0 {
                return 0;
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep_until(deadline) => return left,
                _ = immediate.cancelled() => return left,
            }
        }
    }

    /// Stops every agent (SIGTERM to its group, SIGKILL after `grace`), including those whose
    /// launch is still in progress, and waits until all have exited and their sessions are
    /// removed.
    pub async fn shutdown(&self, grace: Duration) {
        self.close();
        {
            let mut slots = self.inner.slots.lock().expect("slots lock");
            *self.inner.stopping_all.lock().expect("stopping lock") = Some(grace);
            for (id, slot) in slots.iter_mut() {
                slot.stop(id, "worker_shutdown", grace);
            }
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.launcher.wait_for_exits().await;
    }
}

/// A launch in progress owns the session's `Starting` slot and its capacity through this:
/// dropped on any way out of the launch (a return, an abandoned future, a panic), it frees
/// both; an agent that became ready moves into a `Running` slot instead ([`Self::keep`]).
struct StartingSlot {
    inner: Arc<Inner>,
    id: SessionId,
    armed: bool,
}

impl StartingSlot {
    /// The slot now holds a running agent: nothing to free.
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for StartingSlot {
    fn drop(&mut self) {
        if self.armed {
            self.inner.free(&self.id);
        }
    }
}

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
    /// over: see the module docs.
    async fn launch(self: Arc<Self>, request: StartRequest, slot: StartingSlot) -> StartResult {
        let id = request.session_id.clone();
        let mut attempts = Attempts {
            made: 0,
            claimed_at: None,
            held_until: tokio::time::Instant::now() + self.retry.held_patience,
            log_file: request
                .command
                .log_file(&id)
                .map(|p| p.to_string_lossy().into_owned()),
        };
        loop {
            if self.abandon.is_cancelled() {
                return Err(StartError::Abandoned);
            }
            let config = match self.claim(&request, &mut attempts).await {
                ClaimStep::Launch(config) => config,
                ClaimStep::Recheck => continue,
                ClaimStep::Finish(result) => return result,
            };
            attempts.made += 1;
            match self.attempt(&request, &config, attempts.made).await {
                AttemptStep::Ready(agent) => {
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
                        warm: agent.warm,
                    };
                    return Ok(self.clone().adopt(slot, agent, record, attempts.made).await);
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
                },
            )
            .await;
        if cold && !matches!(claim, Ok(Claim::Claimed(_))) {
            *self.last_start.lock().expect("last_start lock") = before;
        }
        let finish = ClaimStep::Finish;
        match claim {
            Ok(Claim::Claimed(config)) => {
                attempts.claimed_at.get_or_insert_with(unix_now);
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
        made: u32,
    ) -> AttemptStep {
        let id = &request.session_id;
        let spec = request.command.spec(id, config);
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

    /// Takes over a ready agent: records it, counts it, and watches for its exit.
    async fn adopt(
        self: Arc<Self>,
        slot: StartingSlot,
        agent: RunningAgent,
        record: AgentRecord,
        attempt: u32,
    ) -> StartOutcome {
        let id = slot.id.clone();
        tracing::info!(
            session_id = %id,
            pid = agent.pid,
            startup_ms = agent.startup.as_millis() as u64,
            warm = agent.warm,
            attempt,
            "agent_ready"
        );
        observability::agent_started(agent.startup);
        let ready = self
            .store
            .mark_ready(
                &id,
                &self.worker_id,
                &record,
                Ready {
                    pid: agent.pid,
                    pgid: agent.pgid,
                    startup: agent.startup,
                    warm: agent.warm,
                },
            )
            .await;
        // The session changed hands or ended while we were starting: our agent goes.
        let stop = match &ready {
            Ok(ReadyRecord::Recorded) | Err(_) => None,
            // Redis lost the record, not the orchestrator: data loss is never an end signal.
            Ok(ReadyRecord::Restored) => {
                observability::dataset_lost(1);
                tracing::warn!(
                    session_id = %id,
                    missing = 1,
                    restored = 1,
                    cause = "record and index entry gone during the start",
                    "redis_dataset_lost"
                );
                None
            }
            Ok(ReadyRecord::TakenOver) => Some("session_taken_over"),
            Ok(ReadyRecord::Gone) => Some("session_ended"),
            Ok(ReadyRecord::Ended(SessionStatus::Terminated)) => Some("terminated"),
            Ok(ReadyRecord::Ended(_)) => Some("session_ended"),
        };
        self.record(ready.map(drop));
        let (pid, startup) = (agent.pid, agent.startup);
        {
            let mut slots = self.slots.lock().expect("slots lock");
            let mut running = Slot::Running {
                pid,
                handle: agent.handle.clone(),
                stopping: None,
                record: Arc::new(record),
            };
            if let Some(reason) = stop {
                running.stop(&id, reason, Duration::ZERO);
            }
            if let Some(grace) = *self.stopping_all.lock().expect("stopping lock") {
                running.stop(&id, "worker_shutdown", grace);
            }
            let previous = slots.insert(id.clone(), running);
            self.capacity.agent_started();
            if matches!(previous, Some(Slot::Starting(_))) {
                self.capacity.launch_ended();
            }
            slot.keep();
        }
        let inner = self.clone();
        self.tasks.spawn(async move {
            let exit = agent.exited.await.ok();
            let shown = exit.map_or_else(|| "unknown".to_owned(), |exit| exit.to_string());
            tracing::info!(session_id = %id, pid, exit = %shown, "agent_exited");
            observability::agent_exited();
            // Recorded before the slot is freed: a new start of the session here would
            // otherwise race this end record.
            inner.record_end(&id, exit).await;
            inner.free(&id);
            inner.capacity.agent_exited();
        });
        StartOutcome::Started { pid, startup }
    }

    /// The session ends with its agent: the record stays for the orchestrator (see
    /// `lua/end_session.lua`). Retried for a while on Redis errors: without it the session
    /// would stay `ready` in the heartbeat index until the sweep removed it as stale, with
    /// the billing fields the agent wrote.
    async fn record_end(&self, id: &SessionId, exit: Option<AgentExit>) {
        let stop_reason = match self.slots.lock().expect("slots lock").get(id) {
            Some(Slot::Running { stopping, .. }) => stopping.clone(),
            _ => None,
        };
        let error = match exit {
            Some(AgentExit::Code(0)) => None,
            Some(exit) => Some(format!("agent exited with {exit}")),
            None => Some("agent exited (status unknown)".to_owned()),
        };
        let end = SessionEnd {
            exit,
            error: error.as_deref(),
            stop_reason: stop_reason.as_deref(),
            timed_out: false,
        };
        let mut delay = Duration::from_millis(100);
        for attempt in 1.. {
            match self.store.end(id, &self.worker_id, &end).await {
                Ok(record) => {
                    let status = match &record {
                        EndRecord::Kept(status) => status.as_str(),
                        EndRecord::Gone => "gone",
                        EndRecord::NotOurs => "taken_over",
                    };
                    tracing::info!(session_id = %id, status, "session_ended");
                    return;
                }
                Err(error) if attempt >= END_ATTEMPTS => {
                    observability::redis_error("session_end");
                    tracing::warn!(session_id = %id, error = %error, "session_end_not_recorded");
                    return;
                }
                Err(_) => {
                    observability::redis_error("session_end");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn free(&self, id: &SessionId) {
        let mut slots = self.slots.lock().expect("slots lock");
        if let Some(Slot::Starting(_)) = slots.remove(id) {
            self.capacity.launch_ended();
        }
        observability::agents_live(slots.len());
        drop(slots);
        self.freed.notify_waiters();
    }

    /// State writes are best effort: the agent matters more than its bookkeeping, and a
    /// re-delivered job rewrites the state.
    fn record(&self, result: Result<(), crate::session::SessionError>) {
        if let Err(error) = result {
            observability::redis_error("session_state");
            tracing::warn!(error = %error, "session_state_write_failed");
        }
    }
}

#[cfg(test)]
mod cold_start_tests {
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
