//! Wiring: the apalis worker that runs agent-start jobs, and the loop that keeps it alive.
//!
//! apalis-redis 1.0 ends a worker on any backend error (a Redis restart, a failed heartbeat),
//! and apalis's `Monitor` restarts it at once, in a tight loop while Redis is down, under a
//! name that may still be registered. [`run`] supervises the worker itself instead:
//! - each run gets a fresh name, `<worker id>-<run>`, so a restart never collides with the
//!   registration of the previous run;
//! - after an error it backs off (100 ms doubling to `worker.restart_backoff_max`, reset after a
//!   minute of healthy running), re-queues the dead run's fetched jobs at once
//!   ([`QueueOps::recover_inflight`]) and starts again; only a shutdown ends the loop;
//! - a refusal by Redis's ACL ([`PermissionDenied`]) is logged once per streak as
//!   `redis_permission_denied`, naming what it can, and retried at `worker.restart_backoff_max`;
//! - before each run and on every fallback tick, due scheduled jobs are promoted in chunks
//!   ([`QueueOps::promote_due`]), so a burst in the scheduled set cannot crash the fetch.
//!
//! Queue settings chosen against the defects of apalis-redis 1.0: `lock_tasks(false)` (the
//! lock does an `LREM` over the whole ready list per job, so throughput fell with the backlog),
//! `emit_events(false)` (nobody listens to its pub/sub events), an explicit queue name, the
//! configured heartbeat (its default orphan timeout is 300 s), and [`RawCodec`] so no payload
//! can fail the fetch.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use agent_jobs::QueueKeys;
use apalis::{
    layers::WorkerBuilderExt,
    prelude::{BackendExt, WorkerBuilder, WorkerError},
};
use apalis_redis::RedisStorage;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::{
    agent_start::{self, AgentStartJob, RawCodec, RawJob},
    capacity::{Capacity, CapacityLayer},
    clock,
    connection::{self, RedisHealth},
    containment::Containment,
    dataset,
    launcher::{AgentCommand, Launcher, OutputLimits, ProcessLauncher, Readiness},
    logs,
    logs::OutputSink,
    observability::{self, Health},
    queue::QueueOps,
    retention::{self, Retention},
    session::{HeartbeatReport, SessionStore, unix_now},
    settings::{AgentSettings, Settings},
    supervisor::{RetryPolicy, Supervisor},
    sweep::{self, StaleSessionSweep, TickLease},
    wake::{self, WakeHub},
};

/// A healthy run this long resets the restart back-off.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// A process-unique worker id: `<host>-<pid>-<random>`. Written to sessions as `workerId`;
/// apalis worker names add the run number.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let suffix = ulid::Ulid::generate().to_string();
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &suffix[suffix.len() - 6..]
    )
}

/// What a launcher is built with inside a running worker.
pub struct LauncherParts {
    /// Where agent output goes (for `agent:<id>:logs`).
    pub output: OutputSink,
    /// How agents' process trees are contained.
    pub containment: Arc<Containment>,
    /// This worker's id (marks its agents' processes).
    pub worker_id: String,
}

/// Builds the launcher from settings, given its parts.
pub type LauncherFactory = Box<dyn FnOnce(LauncherParts) -> Arc<dyn Launcher> + Send>;

/// The real launcher: agent processes, judged alive and ready by `agent.alive_patterns` and
/// `agent.ready_patterns` within their timeouts, contained as `agent.containment` says.
pub fn process_launcher(agent: &AgentSettings) -> LauncherFactory {
    let (readiness, limits) = (
        Readiness::from_settings(agent),
        OutputLimits::from_settings(agent),
    );
    Box::new(move |parts| {
        Arc::new(
            ProcessLauncher::new(readiness, limits, parts.output)
                .contained(parts.containment, parts.worker_id),
        )
    })
}

/// How a running worker is asked to stop.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// First signal: stop fetching, finish starts in progress, drain agents for up to
    /// `shutdown.drain_timeout`, then stop them.
    pub graceful: CancellationToken,
    /// Second signal: stop the agents now (no drain, no grace) and abandon starts in progress.
    pub immediate: CancellationToken,
}

impl Shutdown {
    /// Not yet asked to stop.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for both steps at once: stop fetching and stop the agents without draining.
    pub fn stop_now(&self) {
        self.graceful.cancel();
        self.immediate.cancel();
    }
}

/// Why the worker would not start.
#[derive(Debug, thiserror::Error)]
pub enum RefusedToStart {
    /// Redis may evict keys and `redis.allow_eviction` is not set.
    #[error("{0}")]
    EvictingRedis(String),
    /// `agent.containment = "cgroup"` and no cgroup can be created.
    #[error(transparent)]
    NoCgroup(#[from] crate::containment::NoCgroup),
    /// The client of the wake-up listener could not be made (its TLS files went unreadable
    /// since the first connection).
    #[error("cannot open the Redis client of the wake-up listener: {0}")]
    WakeClient(redis::RedisError),
}

/// Runs the worker until `shutdown`: waits for Redis, processes agent-start jobs, supervises
/// agents, then drains and stops them and returns. Redis outages are waited out, never fatal;
/// a Redis that may evict session records is refused at start-up (see [`crate::dataset`]).
pub async fn run(
    settings: Settings,
    make_launcher: LauncherFactory,
    shutdown: Shutdown,
) -> Result<(), RefusedToStart> {
    run_with_health(settings, make_launcher, shutdown, Health::new()).await
}

/// [`run`], reporting readiness to `health` (served on `/readyz` by the caller).
pub async fn run_with_health(
    settings: Settings,
    make_launcher: LauncherFactory,
    shutdown: Shutdown,
    health: Arc<Health>,
) -> Result<(), RefusedToStart> {
    let redis_health = RedisHealth::new();
    let Some(conn) = connection::connect_with_retry(
        &settings.redis,
        &redis_health,
        &shutdown.graceful,
        |error| health.set_redis_auth_failed(error.is_auth_failure()),
    )
    .await
    else {
        return Ok(());
    };
    health.set_redis_auth_failed(false);
    check_eviction(&conn, &settings).await?;
    // The wake-up listener's own connection (pub/sub), with the same TLS settings.
    let client = connection::client(&settings.redis).map_err(RefusedToStart::WakeClient)?;

    observability::agents_max(settings.agent.max_agents);
    if let Err(error) = clock::sync(&mut conn.clone()).await {
        tracing::warn!(error = %error, "clock_sync_failed");
    }
    let keys = QueueKeys::new(&settings.redis.queue).expect("redis.queue is validated");
    let worker_id = worker_id();
    let containment = Arc::new(Containment::start(settings.agent.containment, &worker_id)?);
    tracing::info!(
        worker_id = %worker_id,
        queue = keys.queue(),
        redis = %settings.redis.url,
        tls = settings.redis.tls_mode().as_str(),
        max_agents = settings.agent.max_agents,
        containment = containment.name(),
        clock_offset_ms = clock::offset_ms(),
        "worker_started"
    );

    let store =
        SessionStore::from_settings(conn.clone(), &settings).redis_health(redis_health.clone());
    let (lines_tx, lines_rx) = logs::channel();
    let shipper = tokio::spawn(logs::ship(lines_rx, store.clone()));
    let capacity = Capacity::new(settings.agent.max_agents);
    let supervisor = Supervisor::new(
        make_launcher(LauncherParts {
            output: lines_tx,
            containment: containment.clone(),
            worker_id: worker_id.clone(),
        }),
        store.clone(),
        worker_id.clone(),
        RetryPolicy {
            attempts: settings.agent.start_attempts,
            backoff: settings.agent.retry_backoff,
            held_patience: settings.worker.orphan_timeout
                + settings.agent.startup_timeout
                + settings.worker.heartbeat_interval,
        },
        capacity.clone(),
    );
    let job = Arc::new(AgentStartJob {
        supervisor: supervisor.clone(),
        store: store.clone(),
        command: Arc::new(AgentCommand::from_settings(&settings.agent)),
        queue: keys.clone(),
        conn: conn.clone(),
    });

    // Background tasks run until the agents are gone: heartbeats must go on while agents
    // drain, or their sessions would look stale.
    let background = CancellationToken::new();
    let hub = WakeHub::new();
    let ops = QueueOps::new(conn.clone(), keys.clone());
    let sweep = StaleSessionSweep::from_settings(conn.clone(), store.clone(), &settings);
    let retention = Retention::new(
        conn.clone(),
        keys.clone(),
        settings.retention.done,
        settings.retention.dead,
        settings.retention.dead_max,
    );
    let (sweep_health, stale_after) = (redis_health.clone(), settings.session.stale_after);
    let mut tasks = vec![
        tokio::spawn(observability::probe_loop(
            conn.clone(),
            keys.clone(),
            health.clone(),
            Duration::from_secs(1),
            background.clone(),
        )),
        tokio::spawn(wake::listen(
            client,
            keys.wake_channel(),
            hub.clone(),
            background.clone(),
        )),
        tokio::spawn(promote_loop(
            ops.clone(),
            settings.worker.poll_interval,
            background.clone(),
        )),
        tokio::spawn(presence_loop(
            supervisor.clone(),
            store.clone(),
            conn.clone(),
            settings.worker.heartbeat_interval,
            redis_health.clone(),
            background.clone(),
        )),
        tokio::spawn(heartbeat_loop(
            supervisor.clone(),
            store.clone(),
            conn.clone(),
            settings.clone(),
            redis_health.clone(),
            background.clone(),
        )),
        tokio::spawn(sweep::every_tick(
            "sweep",
            TickLease::new(conn.clone(), worker_id.clone()),
            settings.sweep.interval,
            background.clone(),
            move |tick| {
                let sweep = sweep.clone();
                let connected_for = sweep_health.connected_for();
                async move {
                    // Right after an outage nobody's heartbeat is fresh: wait until live
                    // workers had stale_after to write theirs again.
                    if connected_for < stale_after {
                        tracing::info!(tick, "sweep_skipped_after_redis_outage");
                        return;
                    }
                    match sweep.run(unix_now(), false).await {
                        Ok(report) => {
                            observability::sweep_finished(report.removed.len());
                            sweep::log_report(&report, Some(tick), false);
                        }
                        Err(error) => {
                            observability::sweep_failed();
                            observability::redis_error("sweep");
                            tracing::warn!(tick, error = %error, "sweep_failed");
                        }
                    }
                }
            },
        )),
        tokio::spawn(sweep::every_tick(
            "retention",
            TickLease::new(conn.clone(), worker_id.clone()),
            settings.retention.interval,
            background.clone(),
            move |tick| {
                let retention = retention.clone();
                async move {
                    match retention.run(unix_now()).await {
                        Ok(report) => {
                            observability::retention_finished(
                                report.done_deleted,
                                report.dead_deleted,
                            );
                            retention::log_report(&report, tick);
                        }
                        Err(error) => {
                            observability::redis_error("retention");
                            tracing::warn!(tick, error = %error, "retention_failed");
                        }
                    }
                }
            },
        )),
    ];

    if crate::containment::is_subreaper() {
        tasks.push(tokio::spawn(reap_loop(background.clone())));
    }

    // At the first signal, launches in progress stop retrying, so the drain of the job worker
    // below waits for at most one start-up attempt per job.
    let closer = {
        let (supervisor, graceful) = (supervisor.clone(), shutdown.graceful.clone());
        tokio::spawn(async move {
            graceful.cancelled().await;
            supervisor.close();
        })
    };
    // At the second, they are abandoned: the drain must not wait out a start-up timeout.
    let abandoner = {
        let (supervisor, immediate) = (supervisor.clone(), shutdown.immediate.clone());
        tokio::spawn(async move {
            immediate.cancelled().await;
            supervisor.abandon_starts();
        })
    };

    supervise_job_worker(
        &settings,
        &conn,
        &worker_id,
        &ops,
        &hub,
        job,
        &capacity,
        &health,
        &redis_health,
        &shutdown.graceful,
    )
    .await;
    let _ = closer.await;

    let agents = supervisor.agent_count();
    tracing::info!(
        agents,
        drain_timeout_ms = settings.shutdown.drain_timeout.as_millis() as u64,
        "worker_draining"
    );
    let left = supervisor
        .drain(settings.shutdown.drain_timeout, &shutdown.immediate)
        .await;
    let grace = if shutdown.immediate.is_cancelled() {
        Duration::ZERO
    } else {
        settings.agent.stop_grace
    };
    tracing::info!(
        agents = left,
        grace_ms = grace.as_millis() as u64,
        "worker_stopping"
    );
    // A second signal during the graceful stop of the agents cuts their grace short.
    let hurry = {
        let (supervisor, immediate) = (supervisor.clone(), shutdown.immediate.clone());
        tokio::spawn(async move {
            immediate.cancelled().await;
            for id in supervisor.running_sessions() {
                supervisor.stop(&id, "worker_shutdown", Duration::ZERO);
            }
        })
    };
    supervisor.shutdown(grace).await;
    hurry.abort();
    // It holds a supervisor, and with it the launcher's output sink the shipper waits on.
    abandoner.abort();
    let _ = abandoner.await;
    background.cancel();
    for task in tasks {
        let _ = task.await;
    }
    if let Err(error) = store.leave(&worker_id).await {
        tracing::debug!(error = %error, "worker_deregistration_failed");
    }
    drop(supervisor);
    // The shipper ends once the last agent output reader has closed its sender.
    let _ = tokio::time::timeout(Duration::from_secs(5), shipper).await;
    containment.close();
    tracing::info!(worker_id = %worker_id, "worker_stopped");
    Ok(())
}

/// Refuses a Redis whose `maxmemory-policy` evicts keys, unless `redis.allow_eviction`; a
/// policy that cannot be read is warned about (managed services may hide it), not refused.
async fn check_eviction(
    conn: &ConnectionManager,
    settings: &Settings,
) -> Result<(), RefusedToStart> {
    match dataset::Sample::read(conn).await {
        Ok(sample) => {
            let policy = sample.maxmemory_policy.clone().unwrap_or_default();
            observability::redis_evicting(sample.evicts());
            if sample.maxmemory_policy.is_none() {
                tracing::warn!(
                    "redis_eviction_policy_unknown: INFO memory has no maxmemory_policy"
                );
            } else if sample.evicts() && !settings.redis.allow_eviction {
                let refusal = dataset::eviction_refusal(&policy);
                tracing::error!(policy = %policy, "redis_eviction_refused: {refusal}");
                return Err(RefusedToStart::EvictingRedis(refusal));
            } else if sample.evicts() {
                tracing::warn!(policy = %policy, "redis_eviction_allowed: session records may be evicted; lost ones are written again");
            }
        }
        Err(error) => {
            tracing::warn!(error = %error, "redis_eviction_policy_unknown: INFO failed");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn supervise_job_worker(
    settings: &Settings,
    conn: &ConnectionManager,
    worker_id: &str,
    ops: &QueueOps,
    hub: &WakeHub,
    job: Arc<AgentStartJob>,
    capacity: &Arc<Capacity>,
    health: &Health,
    redis_health: &RedisHealth,
    shutdown: &CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    // The ACL refusal of the current streak of failed runs: logged once, not per restart.
    let mut denied: Option<PermissionDenied> = None;
    for run in 0u64.. {
        let name = format!("{worker_id}-{run}");
        if let Err(error) = ops.promote_due().await {
            tracing::debug!(error = %error, "promote_due_failed");
        }
        let started = Instant::now();
        health.set_job_worker(true);
        let result =
            run_job_worker(settings, conn, &name, hub, job.clone(), capacity, shutdown).await;
        health.set_job_worker(false);
        if shutdown.is_cancelled() {
            // apalis-redis does not deregister a worker that stopped cleanly: its registration
            // (and its metadata hash) would stay forever, one per process. Whatever it still
            // held goes back to the head of the queue for the other replicas.
            match ops.recover_inflight(&name).await {
                Ok(recovered) if recovered.requeued > 0 || recovered.quarantined > 0 => {
                    tracing::info!(
                        worker = %name,
                        requeued = recovered.requeued,
                        quarantined = recovered.quarantined,
                        "inflight_jobs_recovered"
                    );
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(worker = %name, error = %error, "deregistration_failed")
                }
            }
            return;
        }
        let reason = match result {
            Ok(()) => "the worker stopped by itself".to_owned(),
            Err(error) => error.to_string(),
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff = Duration::from_millis(100);
        }
        match PermissionDenied::parse(&reason) {
            Some(refusal) => {
                if denied.as_ref() != Some(&refusal) {
                    tracing::error!(
                        denied = refusal.kind,
                        key = refusal.key,
                        command = refusal.command.as_deref(),
                        script = refusal.script.as_deref(),
                        error = %reason,
                        "redis_permission_denied: {refusal}"
                    );
                }
                denied = Some(refusal);
                // Nothing changes until someone changes the ACL: no fast retries meanwhile.
                backoff = settings.worker.restart_backoff_max;
            }
            None => denied = None,
        }
        observability::job_worker_restarted();
        redis_health.failed();
        tracing::warn!(
            worker = %name,
            error = %reason,
            restart_in_ms = backoff.as_millis() as u64,
            "worker_restarted"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.worker.restart_backoff_max);
        recover(ops, &name, shutdown, settings.worker.restart_backoff_max).await;
    }
}

/// apalis-redis 1.0.0's `lua/register_worker.lua` (the SHA1 Redis knows it by). It writes
/// `core:apalis:queues:list`, a key it neither declares nor documents.
const APALIS_REGISTER_WORKER_SHA: &str = "0d5fbce91e1dcff1121ece41f7169da3c0e39194";

/// The key [`APALIS_REGISTER_WORKER_SHA`] writes besides its declared keys.
const APALIS_QUEUES_LIST: &str = "core:apalis:queues:list";

/// A refusal by the Redis ACL of the worker's user, read from the text of a job worker error
/// (they reach us through apalis as text). Redis answers `NOPERM ...` to a command the client
/// sent, and `ERR The user executing the script can't ...` to one a script ran; the latter
/// names neither the key nor the command, only the script's hash, so the apalis-redis script
/// known to write an undeclared key is recognised here. The rule the worker needs is
/// `deploy/redis/agent-worker.acl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionDenied {
    /// What was refused: `key`, `channel` or `command`.
    pub kind: &'static str,
    /// The refused command, when Redis names it (top-level `NOPERM` replies).
    pub command: Option<String>,
    /// The script that ran the refused command: its name when known, else its SHA1.
    pub script: Option<String>,
    /// The refused key, when known.
    pub key: Option<&'static str>,
}

impl PermissionDenied {
    /// The refusal `error` reports, if it reports one.
    pub fn parse(error: &str) -> Option<Self> {
        let in_script = error.find("The user executing the script can't");
        let start = in_script.or_else(|| error.find("NOPERM").or_else(|| error.find("NoPerm")))?;
        let text = &error[start..];
        // "…access at least one of the keys mentioned in the command arguments", "…publish to
        // the channel mentioned in the command", "…run this command or subcommand"; at top
        // level "…access one of the keys / channels used as arguments", "…run the 'x' command".
        let kind = if text.contains("keys") {
            "key"
        } else if text.contains("channel") {
            "channel"
        } else {
            "command"
        };
        let command = (in_script.is_none() && kind == "command")
            .then(|| text.split('\'').nth(1).map(str::to_owned))
            .flatten();
        let sha = text.find("script: ").map(|i| {
            text[i + "script: ".len()..]
                .chars()
                .take_while(char::is_ascii_hexdigit)
                .collect::<String>()
        });
        let (script, key) = match sha {
            Some(sha) if sha == APALIS_REGISTER_WORKER_SHA => (
                Some("apalis-redis register_worker.lua".to_owned()),
                (kind == "key").then_some(APALIS_QUEUES_LIST),
            ),
            Some(sha) if sha.len() == 40 => (Some(sha), None),
            _ => (None, None),
        };
        Some(Self {
            kind,
            command,
            script,
            key,
        })
    }
}

impl std::fmt::Display for PermissionDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the Redis user of redis.url may not ")?;
        match (self.kind, self.key, &self.command) {
            ("key", Some(key), _) => write!(f, "access the key {key}")?,
            ("key", None, _) => write!(f, "access a key the worker needs")?,
            ("channel", ..) => write!(f, "use a pub/sub channel the worker needs")?,
            (_, _, Some(command)) => write!(f, "run the command {command}")?,
            _ => write!(f, "run a command the worker needs")?,
        }
        if let Some(script) = &self.script {
            write!(f, " (in script {script})")?;
        }
        write!(
            f,
            "; grant what deploy/redis/agent-worker.acl grants (the server's ACL LOG names what \
             was refused); the job worker retries every worker.restart_backoff_max"
        )
    }
}

/// Re-queues the dead run's jobs, retrying until Redis answers (or shutdown: then the
/// orphan recovery of other workers takes them after the orphan timeout).
async fn recover(ops: &QueueOps, name: &str, shutdown: &CancellationToken, max_delay: Duration) {
    let mut delay = Duration::from_millis(100);
    loop {
        match ops.recover_inflight(name).await {
            Ok(recovered) => {
                if recovered.requeued > 0 || recovered.quarantined > 0 {
                    tracing::info!(
                        worker = %name,
                        requeued = recovered.requeued,
                        quarantined = recovered.quarantined,
                        "inflight_jobs_recovered"
                    );
                }
                return;
            }
            Err(error) => {
                tracing::debug!(worker = %name, error = %error, "recover_inflight_failed")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(max_delay);
    }
}

/// One run of the apalis worker, until shutdown (`Ok`) or a backend error (`Err`).
async fn run_job_worker(
    settings: &Settings,
    conn: &ConnectionManager,
    name: &str,
    hub: &WakeHub,
    job: Arc<AgentStartJob>,
    capacity: &Arc<Capacity>,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let config = apalis_redis::Config::default()
        .queue(&settings.redis.queue)
        .batch_size(settings.worker.batch_size)
        .heartbeat_interval(settings.worker.heartbeat_interval)
        .missed_heartbeats(settings.missed_heartbeats())
        .lock_tasks(false)
        .emit_events(false)
        .idempotency_ttl(Some(settings.session.ttl));
    let backend = RedisStorage::<RawJob>::new(conn.clone())
        .with_config(config)
        .with_codec(RawCodec)
        .poll_with_strategy(hub.strategy(settings.worker.poll_interval));
    let stop = shutdown.clone();
    WorkerBuilder::new(name)
        .backend(backend)
        .concurrency(settings.worker.concurrency)
        .layer(CapacityLayer::new(capacity.clone()))
        .data(job)
        .build(agent_start::handle)
        .run_until(async move {
            stop.cancelled().await;
            Ok::<(), std::io::Error>(())
        })
        .await
}

/// Every `session.heartbeat_interval`: refresh the liveness of this process's agents in one
/// batched call, and stop those whose session was ended by the orchestrator (its keys deleted,
/// or `terminated`) or is older than `session.max_age`. Records Redis lost are written again
/// instead (see [`crate::dataset`]): data loss is never an end signal.
async fn heartbeat_loop(
    supervisor: Supervisor,
    store: SessionStore,
    conn: ConnectionManager,
    settings: Settings,
    redis_health: RedisHealth,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(settings.session.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let grace = settings.agent.stop_grace;
    let mut failing = false;
    // The dataset as read after each of the last two heartbeats. A record found missing now was
    // there at the previous heartbeat, which ran after the older of the two samples: a new
    // run_id or more evicted keys since that one mean it was lost, not deleted.
    let first = dataset::Sample::read(&conn).await.unwrap_or_default();
    let mut warned_eviction = first.evicts();
    let mut samples = [first.clone(), first];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let sessions = supervisor.running_sessions();
        let now = unix_now();
        let oldest = now.saturating_sub(settings.session.max_age.as_secs());
        let mut report = HeartbeatReport::default();
        // Chunks bound the time of one script call when a process owns many agents.
        for chunk in sessions.chunks(1000) {
            match store
                .heartbeat(supervisor.worker_id(), chunk, now, oldest)
                .await
            {
                Ok(part) => {
                    failing = false;
                    report.extend(part);
                }
                Err(error) => {
                    redis_health.failed();
                    observability::redis_error("heartbeat");
                    if !failing {
                        tracing::warn!(error = %error, sessions = chunk.len(), "heartbeat_failed");
                    }
                    failing = true;
                }
            }
        }
        // Read after the heartbeat, so it covers every eviction or restart up to the moment
        // records were found missing.
        let sample = dataset::Sample::read(&conn).await.ok();
        let loss = sample.as_ref().and_then(|s| s.loss_since(&samples[0]));
        if let Some(sample) = sample {
            // The policy can change under a running fleet (a managed service's parameter
            // group): say so once, and keep running, which is safer than stopping every call.
            observability::redis_evicting(sample.evicts());
            if sample.evicts() && !settings.redis.allow_eviction && !warned_eviction {
                tracing::warn!(
                    policy = sample.maxmemory_policy.as_deref().unwrap_or_default(),
                    "redis_eviction_enabled: Redis now evicts keys; set maxmemory-policy noeviction"
                );
            }
            warned_eviction = sample.evicts();
            samples = [std::mem::take(&mut samples[1]), sample];
        }
        if loss.is_some() {
            // Missing, and Redis restarted or evicted since the last look: lost, not ended.
            report.vanished.append(&mut report.gone);
        }
        if !report.vanished.is_empty() {
            restore(&supervisor, &store, &report.vanished, loss).await;
        }
        for id in &report.gone {
            supervisor.stop(id, "session_ended", grace);
        }
        for id in &report.too_old {
            supervisor.stop(id, "max_age", grace);
        }
        // We were presumed dead and another worker took the session over: its agent is the
        // one that counts.
        for id in &report.lost {
            supervisor.stop(id, "session_taken_over", grace);
        }
        // The orchestrator's credit stop: the record keeps its `terminated`.
        for id in &report.terminated {
            supervisor.stop(id, "terminated", grace);
        }
    }
}

/// Writes again the records of live agents that Redis lost; logs `redis_dataset_lost` once
/// per heartbeat that found any, with the counts.
async fn restore(
    supervisor: &Supervisor,
    store: &SessionStore,
    vanished: &[agent_jobs::SessionId],
    cause: Option<&'static str>,
) {
    let records = supervisor.records(vanished);
    match store
        .restore(supervisor.worker_id(), &records, unix_now())
        .await
    {
        Ok(restored) => {
            observability::dataset_lost(restored);
            tracing::warn!(
                missing = vanished.len(),
                restored,
                cause = cause.unwrap_or("records and index entries gone"),
                "redis_dataset_lost"
            );
        }
        Err(error) => {
            observability::redis_error("restore");
            tracing::warn!(error = %error, missing = vanished.len(), "session_restore_failed");
        }
    }
}

/// Every `worker.heartbeat_interval`: tell other replicas this process is alive (claims of a
/// silent worker can be taken over after `worker.orphan_timeout`) and how many agents it runs.
async fn presence_loop(
    supervisor: Supervisor,
    store: SessionStore,
    conn: ConnectionManager,
    every: Duration,
    redis_health: RedisHealth,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clock_failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Re-measured every tick: the host's clock may be stepped or drift. A failed
        // measurement keeps the last offset; presence is written regardless.
        match clock::sync(&mut conn.clone()).await {
            Ok(_) => clock_failing = false,
            Err(error) => {
                if !clock_failing {
                    tracing::warn!(error = %error, "clock_sync_failed");
                }
                clock_failing = true;
            }
        }
        let result = store
            .presence(supervisor.worker_id(), supervisor.agent_count(), unix_now())
            .await;
        if let Err(error) = result {
            redis_health.failed();
            observability::redis_error("presence");
            tracing::debug!(error = %error, "presence_failed");
        }
    }
}

/// As the subreaper of its agents' trees, the worker is the parent of every orphan in them:
/// it reaps those that exit on their own (see [`crate::containment`]).
async fn reap_loop(shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let _ = tokio::task::spawn_blocking(crate::containment::reap_adopted).await;
    }
}

async fn promote_loop(ops: QueueOps, every: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        match ops.promote_due().await {
            Ok(0) => {}
            Ok(moved) => tracing::info!(moved, "scheduled_jobs_promoted"),
            Err(error) => {
                observability::redis_error("promote_due");
                tracing::debug!(error = %error, "promote_due_failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_refusals_are_recognised_and_named() {
        // What the job worker's error says when the rule lacks `~core:apalis:queues:list`.
        let registration = "Failed to poll backend: PollNextError: ResponseError: The user \
            executing the script can't access at least one of the keys mentioned in the command \
            arguments script: 0d5fbce91e1dcff1121ece41f7169da3c0e39194, on @user_script:26.";
        let refusal = PermissionDenied::parse(registration).unwrap();
        assert_eq!(refusal.kind, "key");
        assert_eq!(refusal.key, Some("core:apalis:queues:list"));
        assert!(
            refusal
                .to_string()
                .contains("access the key core:apalis:queues:list")
        );

        let other = "ResponseError: The user executing the script can't publish to the channel \
            mentioned in the command script: 67ccb076758a96d024936f50c41599403853c976, on \
            @user_script:1.";
        let refusal = PermissionDenied::parse(other).unwrap();
        assert_eq!(refusal.kind, "channel");
        assert_eq!(
            refusal.script.as_deref(),
            Some("67ccb076758a96d024936f50c41599403853c976")
        );

        let top = "NoPerm: this user has no permissions to run the 'zrem' command";
        let refusal = PermissionDenied::parse(top).unwrap();
        assert_eq!(
            (refusal.kind, refusal.command.as_deref()),
            ("command", Some("zrem"))
        );
        assert!(refusal.to_string().contains("run the command zrem"));

        assert_eq!(
            PermissionDenied::parse("Failed to poll backend: connection refused"),
            None
        );
    }
}
