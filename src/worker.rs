//! The worker process, wired once: what `agent-worker run`, the demo and the tests all run.
//!
//! [`run`] connects to Redis (waiting for it), refuses a Redis that may evict session records
//! ([`crate::dataset`]), then starts, in this order:
//! - the HTTP listener (`/metrics`, `/healthz`, `/readyz`: [`crate::http`], and the console:
//!   [`crate::console`]), which answers until the very end, so probes and scrapes see the
//!   drain;
//! - the agents' supervisor ([`crate::agent::supervisor`]) with its launcher and the shipper of
//!   their output;
//! - the background tasks: the Redis probe ([`crate::health`]), wake-ups ([`crate::wake`]),
//!   the promotion of due jobs, presence ([`crate::presence`]), the session heartbeat
//!   ([`crate::heartbeat`]), the scheduled sweep and retention ([`crate::schedule`]) and, as
//!   a subreaper, the reaping of adopted orphans ([`crate::agent::containment`]);
//! - the job worker ([`crate::job_worker`]), until the first shutdown request.
//!
//! Then it stops in the order the agents need: no more fetching (starts in progress make no
//! further attempts), the drain (`shutdown.drain_timeout`), the stop of the rest (SIGTERM,
//! `agent.stop_grace`, SIGKILL; a second request cuts the grace), then the background tasks
//! (heartbeats go on while agents drain, or their sessions would look stale), deregistration,
//! and last the HTTP listener.

use std::{sync::Arc, time::Duration};

use agent_jobs::QueueKeys;
use redis::aio::ConnectionManager;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    agent::{
        capacity::Capacity,
        cold::ProcessLauncher,
        command::AgentCommand,
        containment::{self, Containment},
        launcher::Launcher,
        log_list::{self, OutputSink},
        output::OutputLimits,
        phase::Readiness,
        supervisor::{RetryPolicy, Supervisor},
        warm_pool::{PooledLauncher, WarmSettings},
    },
    clock,
    connection::{self, RedisHealth},
    console::Console,
    dataset,
    health::{self, Health},
    heartbeat, http,
    job_worker::{self, JobWorker},
    jobs::{
        agent_start::AgentStartJob,
        retention::{self, Retention},
        sweep::{self, StaleSessionSweep},
    },
    metrics,
    presence::{self, Presence, WorkerInfo},
    queue::QueueOps,
    schedule::{self, TickLease},
    session::SessionStore,
    settings::{AgentSettings, Settings},
    shutdown::Shutdown,
    wake::{self, WakeHub},
};

/// How often the Redis probe behind `/readyz` runs.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A process-unique worker id: `<host>-<pid>-<random>`. Written to sessions as `workerId`;
/// apalis worker names add the run number.
pub fn worker_id() -> String {
    let host = presence::host_name();
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
    /// The replica's room for agents (what a warm pool sizes itself by).
    pub capacity: Arc<Capacity>,
}

/// Builds the launcher from settings, given its parts.
pub type LauncherFactory = Box<dyn FnOnce(LauncherParts) -> Arc<dyn Launcher> + Send>;

/// The real launcher: agent processes, judged alive and ready by `agent.alive_patterns` and
/// `agent.ready_patterns` within their timeouts, contained as `agent.containment` says; with
/// `agent.warm_pool > 0`, handed to warm processes when one is idle.
pub fn process_launcher(agent: &AgentSettings) -> LauncherFactory {
    let (readiness, limits) = (
        Readiness::from_settings(agent),
        OutputLimits::from_settings(agent),
    );
    let warm = WarmSettings::from_settings(agent);
    Box::new(move |parts| {
        let cold = ProcessLauncher::new(readiness, limits, parts.output)
            .contained(parts.containment, parts.worker_id);
        if warm.size == 0 {
            Arc::new(cold)
        } else {
            Arc::new(PooledLauncher::new(cold, warm, parts.capacity))
        }
    })
}

/// Why the worker would not start.
#[derive(Debug, thiserror::Error)]
pub enum RefusedToStart {
    /// `http.addr` cannot be bound.
    #[error("cannot listen on http.addr {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Redis may evict keys and `redis.allow_eviction` is not set.
    #[error("{0}")]
    EvictingRedis(String),
    /// `agent.containment = "cgroup"` and no cgroup can be created.
    #[error(transparent)]
    NoCgroup(#[from] containment::NoCgroup),
    /// The client of the wake-up listener could not be made (its TLS files went unreadable
    /// since the first connection).
    #[error("cannot open the Redis client of the wake-up listener: {0}")]
    WakeClient(redis::RedisError),
}

/// Runs the worker until `shutdown`: serves HTTP, waits for Redis, processes agent-start jobs,
/// supervises agents, then drains and stops them and returns (see the module docs). Redis
/// outages are waited out, never fatal.
pub async fn run(
    settings: Settings,
    make_launcher: LauncherFactory,
    shutdown: Shutdown,
) -> Result<(), RefusedToStart> {
    let health = Health::new();
    let http_stop = CancellationToken::new();
    let handle = metrics::install_recorder();
    let console = Console::new(&settings, handle.clone());
    let server = http::serve_with(
        settings.http.addr,
        handle,
        health.clone(),
        console.router(),
        http_stop.clone(),
    )
    .await
    .map_err(|source| RefusedToStart::Http {
        addr: settings.http.addr,
        source,
    })?;
    tracing::info!(actions = console.has_actions(), "console_serving");
    tokio::spawn(console.clone().sample_rates(http_stop.clone()));
    let draining = {
        let (health, graceful) = (health.clone(), shutdown.graceful.clone());
        tokio::spawn(async move {
            graceful.cancelled().await;
            health.set_draining();
        })
    };
    let result = run_worker(settings, make_launcher, &shutdown, health, &console).await;
    draining.abort();
    http_stop.cancel();
    if let Err(error) = server.stopped().await {
        tracing::warn!(error = %error, "http_listener_failed");
    }
    result
}

async fn run_worker(
    settings: Settings,
    make_launcher: LauncherFactory,
    shutdown: &Shutdown,
    health: Arc<Health>,
    console: &Console,
) -> Result<(), RefusedToStart> {
    let redis_health = RedisHealth::new();
    let Some(conn) = connection::connect_with_retry(
        &settings.redis,
        &redis_health,
        &shutdown.graceful,
        |error| {
            health.set_redis_auth_failed(error.is_auth_failure());
            health.set_redis_tls_failed(error.is_tls_failure());
        },
    )
    .await
    else {
        return Ok(());
    };
    health.set_redis_auth_failed(false);
    health.set_redis_tls_failed(false);
    console.connected(conn.clone());
    check_eviction(&conn, &settings).await?;
    // The wake-up listener's own connection (pub/sub), with the same TLS settings.
    let client = connection::client(&settings.redis).map_err(RefusedToStart::WakeClient)?;
    if let Err(error) = clock::sync(&mut conn.clone()).await {
        tracing::warn!(error = %error, "clock_sync_failed");
    }
    let keys = QueueKeys::new(&settings.redis.queue).expect("redis.queue is validated");
    let worker_id = worker_id();
    let containment = Arc::new(Containment::start(settings.agent.containment, &worker_id)?);
    metrics::agents_max(settings.agent.max_agents);
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
    let (lines_tx, lines_rx) = log_list::channel();
    let shipper = tokio::spawn(log_list::ship(lines_rx, store.clone()));
    let capacity = Capacity::new(settings.agent.max_agents);
    let supervisor = Supervisor::new(
        make_launcher(LauncherParts {
            output: lines_tx,
            containment: containment.clone(),
            worker_id: worker_id.clone(),
            capacity: capacity.clone(),
        }),
        store.clone(),
        worker_id.clone(),
        RetryPolicy::from_settings(&settings),
        capacity.clone(),
    );
    let presence = Presence::new(
        conn.clone(),
        worker_id.clone(),
        WorkerInfo::of_this_process(settings.agent.max_agents),
    );
    let hub = WakeHub::new();
    let ops = QueueOps::new(conn.clone(), keys.clone());
    let background = CancellationToken::new();
    let tasks = spawn_background(Background {
        settings: &settings,
        conn: &conn,
        client,
        keys: &keys,
        worker_id: &worker_id,
        store: &store,
        supervisor: &supervisor,
        presence: presence.clone(),
        ops: ops.clone(),
        hub: hub.clone(),
        health: &health,
        redis_health: &redis_health,
        token: &background,
    });
    let shutdown_steps = ShutdownSteps::watch(&supervisor, shutdown);

    let job_worker = JobWorker {
        job: Arc::new(AgentStartJob {
            supervisor: supervisor.clone(),
            store: store.clone(),
            command: Arc::new(AgentCommand::from_settings(&settings.agent)),
            queue: keys.clone(),
            conn: conn.clone(),
        }),
        settings: settings.clone(),
        conn: conn.clone(),
        worker_id: worker_id.clone(),
        ops,
        hub,
        capacity,
        health,
        redis_health,
    };
    job_worker.supervise(&shutdown.graceful).await;
    drop(job_worker);

    stop_agents(&settings, &supervisor, shutdown, shutdown_steps).await;
    background.cancel();
    for task in tasks {
        let _ = task.await;
    }
    if let Err(error) = presence.leave().await {
        tracing::debug!(error = %error, "worker_deregistration_failed");
    }
    drop(supervisor);
    // The shipper ends once the last agent output reader has closed its sender.
    let _ = tokio::time::timeout(Duration::from_secs(5), shipper).await;
    containment.close();
    tracing::info!(worker_id = %worker_id, "worker_stopped");
    Ok(())
}

/// What the background tasks are started with.
struct Background<'a> {
    settings: &'a Settings,
    conn: &'a ConnectionManager,
    client: redis::Client,
    keys: &'a QueueKeys,
    worker_id: &'a str,
    store: &'a SessionStore,
    supervisor: &'a Supervisor,
    presence: Presence,
    ops: QueueOps,
    hub: WakeHub,
    health: &'a Arc<Health>,
    redis_health: &'a RedisHealth,
    token: &'a CancellationToken,
}

/// Starts every task that runs beside the job worker until `token` is cancelled (after the
/// agents are gone).
fn spawn_background(b: Background<'_>) -> Vec<JoinHandle<()>> {
    let settings = b.settings;
    let sweep = StaleSessionSweep::from_settings(b.conn.clone(), b.store.clone(), settings);
    let retention = Retention::from_settings(b.conn.clone(), b.keys.clone(), settings);
    let sweep_health = b.redis_health.clone();
    let mut tasks = vec![
        tokio::spawn(health::probe_loop(
            b.conn.clone(),
            b.keys.clone(),
            b.health.clone(),
            PROBE_EVERY,
            b.token.clone(),
        )),
        tokio::spawn(wake::listen(
            b.client,
            b.keys.wake_channel(),
            b.hub,
            b.token.clone(),
        )),
        tokio::spawn(job_worker::promote_loop(
            b.ops,
            settings.worker.poll_interval,
            b.token.clone(),
        )),
        tokio::spawn(presence::presence_loop(
            b.supervisor.clone(),
            b.presence,
            b.conn.clone(),
            settings.worker.heartbeat_interval,
            b.redis_health.clone(),
            b.token.clone(),
        )),
        tokio::spawn(heartbeat::heartbeat_loop(
            b.supervisor.clone(),
            b.store.clone(),
            b.conn.clone(),
            settings.clone(),
            b.redis_health.clone(),
            b.token.clone(),
        )),
        tokio::spawn(schedule::every_tick(
            "sweep",
            TickLease::new(b.conn.clone(), b.worker_id),
            settings.sweep.interval,
            b.token.clone(),
            move |tick| {
                let (sweep, connected_for) = (sweep.clone(), sweep_health.connected_for());
                async move { sweep::scheduled(&sweep, tick, connected_for).await }
            },
        )),
        tokio::spawn(schedule::every_tick(
            "retention",
            TickLease::new(b.conn.clone(), b.worker_id),
            settings.retention.interval,
            b.token.clone(),
            move |tick| {
                let retention = retention.clone();
                async move { retention::scheduled(&retention, tick).await }
            },
        )),
    ];
    if containment::is_subreaper() {
        tasks.push(tokio::spawn(reap_loop(b.token.clone())));
    }
    tasks
}

/// The supervisor's side of the two shutdown requests, watched from the start.
struct ShutdownSteps {
    closer: JoinHandle<()>,
    abandoner: JoinHandle<()>,
}

impl ShutdownSteps {
    fn watch(supervisor: &Supervisor, shutdown: &Shutdown) -> Self {
        // At the first request, launches in progress stop retrying, so the drain of the job
        // worker waits for at most one start-up attempt per job.
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
        Self { closer, abandoner }
    }
}

/// Drains the agents for `shutdown.drain_timeout`, then stops the rest (a second request cuts
/// the grace short) and waits until every one has exited and its end is recorded.
async fn stop_agents(
    settings: &Settings,
    supervisor: &Supervisor,
    shutdown: &Shutdown,
    steps: ShutdownSteps,
) {
    let _ = steps.closer.await;
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
    steps.abandoner.abort();
    let _ = steps.abandoner.await;
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
            metrics::redis_evicting(sample.evicts());
            if sample.maxmemory_policy.is_none() {
                tracing::warn!(
                    "redis_eviction_policy_unknown: INFO memory has no maxmemory_policy"
                );
            } else if sample.evicts() && !settings.redis.allow_eviction {
                let refusal = dataset::eviction_refusal(&policy);
                tracing::error!(policy = %policy, "redis_eviction_refused: {refusal}");
                return Err(RefusedToStart::EvictingRedis(refusal));
            } else if sample.evicts() {
                tracing::warn!(
                    policy = %policy,
                    "redis_eviction_allowed: session records may be evicted; lost ones are written again"
                );
            }
        }
        Err(error) => {
            tracing::warn!(error = %error, "redis_eviction_policy_unknown: INFO failed");
        }
    }
    Ok(())
}

/// As the subreaper of its agents' trees, the worker is the parent of every orphan in them:
/// it reaps those that exit on their own (see [`crate::agent::containment`]).
async fn reap_loop(shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let _ = tokio::task::spawn_blocking(containment::reap_adopted).await;
    }
}
