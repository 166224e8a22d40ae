//! Observability: metric names and recording helpers, the Prometheus recorder, readiness
//! state, the HTTP listener (`/metrics`, `/healthz`, `/readyz`) and the Redis probe.
//!
//! - Metrics go through the `metrics` facade into one process-wide Prometheus recorder
//!   ([`install_recorder`]). The rest of the code records only through the helpers here
//!   ([`job_finished`], [`agent_started`], [`redis_error`], ...), so every name, label and
//!   bucket layout lives in this file. Without an installed recorder the helpers are no-ops.
//! - [`Health`] holds the two facts readiness depends on: Redis answers, and the job worker
//!   runs (plus a one-way "draining" flag for shutdown).
//! - [`serve`] binds the listener first (port 0 works, [`HttpServer::local_addr`] tells the
//!   port) and serves in a task until its token is cancelled.
//! - [`probe_loop`] pings Redis every tick with a short timeout (so an outage flips readiness
//!   within about two ticks) and refreshes the queue depth gauges with one script call
//!   (`lua/queue_depth.lua`).
//!
//! Exposed series (all prefixed `agent_worker_`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `jobs_total` | counter | `outcome` = `done`, `retried`, `dead` |
//! | `job_duration_seconds` | histogram | `outcome` |
//! | `agent_startup_seconds` | histogram | |
//! | `agent_spawn_failures_total` | counter | |
//! | `agent_exits_total` | counter | |
//! | `agent_stops_total` | counter | `reason` |
//! | `agents_live` | gauge | |
//! | `agents_max` | gauge | |
//! | `queue_depth` | gauge | `queue`, `state` = `ready`, `scheduled`, `inflight`, `dead`, `done` |
//! | `sweep_runs_total` | counter | `outcome` = `ok`, `error` |
//! | `sweep_sessions_removed_total` | counter | |
//! | `retention_jobs_removed_total` | counter | `set` = `done`, `dead` |
//! | `redis_errors_total` | counter | `op` |
//! | `redis_up` | gauge | |
//! | `job_worker_restarts_total` | counter | |
//! | `redis_dataset_lost_total` | counter | |
//! | `sessions_restored_total` | counter | |
//! | `redis_evicting` | gauge | |

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, LazyLock, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use agent_jobs::QueueKeys;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use redis::{Script, aio::ConnectionManager};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Counter of finished agent-start jobs, by `outcome` ([`JobOutcome`]).
pub const JOBS_TOTAL: &str = "agent_worker_jobs_total";
/// Histogram of the time a job took in the handler (decode to ready agent), by `outcome`.
pub const JOB_DURATION_SECONDS: &str = "agent_worker_job_duration_seconds";
/// Histogram of agent start-up latency: spawn to the first ready line, successful starts only.
pub const AGENT_STARTUP_SECONDS: &str = "agent_worker_agent_startup_seconds";
/// Counter of failed launch attempts (each attempt of a start counts).
pub const AGENT_SPAWN_FAILURES_TOTAL: &str = "agent_worker_agent_spawn_failures_total";
/// Counter of agents that exited after having been ready.
pub const AGENT_EXITS_TOTAL: &str = "agent_worker_agent_exits_total";
/// Counter of agents the worker stopped, by `reason` (`session_ended`, `terminated`,
/// `max_age`, `session_taken_over`, `worker_shutdown`).
pub const AGENT_STOPS_TOTAL: &str = "agent_worker_agent_stops_total";
/// Gauge of this process's agents: running plus starting (what `agent.max_agents` bounds).
pub const AGENTS_LIVE: &str = "agent_worker_agents_live";
/// Gauge of `agent.max_agents`, so dashboards can show utilisation.
pub const AGENTS_MAX: &str = "agent_worker_agents_max";
/// Gauge of the job queue, by `queue` and `state` (`ready`, `scheduled`, `inflight`, `dead`,
/// `done`). The same value on every replica: aggregate with `max`, not `sum`.
pub const QUEUE_DEPTH: &str = "agent_worker_queue_depth";
/// Counter of sweeps this replica ran (it holds the tick's lease), by `outcome` (`ok`, `error`).
pub const SWEEP_RUNS_TOTAL: &str = "agent_worker_sweep_runs_total";
/// Counter of stale sessions the sweep removed.
pub const SWEEP_SESSIONS_REMOVED_TOTAL: &str = "agent_worker_sweep_sessions_removed_total";
/// Counter of finished jobs deleted by retention, by `set` (`done`, `dead`).
pub const RETENTION_JOBS_REMOVED_TOTAL: &str = "agent_worker_retention_jobs_removed_total";
/// Counter of failed Redis operations, by `op` (a short static name of the operation).
pub const REDIS_ERRORS_TOTAL: &str = "agent_worker_redis_errors_total";
/// Gauge: 1 while the last probe `PING` was answered in time, else 0.
pub const REDIS_UP: &str = "agent_worker_redis_up";
/// Counter of job-worker restarts after a backend error.
pub const JOB_WORKER_RESTARTS_TOTAL: &str = "agent_worker_job_worker_restarts_total";
/// Counter of heartbeats that found records of live agents lost by Redis.
pub const REDIS_DATASET_LOST_TOTAL: &str = "agent_worker_redis_dataset_lost_total";
/// Counter of session records written again after Redis lost them.
pub const SESSIONS_RESTORED_TOTAL: &str = "agent_worker_sessions_restored_total";
/// Gauge: 1 when Redis's `maxmemory-policy` lets it evict keys (with `redis.allow_eviction`).
pub const REDIS_EVICTING: &str = "agent_worker_redis_evicting";

/// Buckets of [`AGENT_STARTUP_SECONDS`]: 10 ms to one minute (`agent.startup_timeout` is 30 s
/// by default; a real agent joins its room in a second or a few).
pub const STARTUP_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

/// Buckets of [`JOB_DURATION_SECONDS`]: 5 ms (a bad payload) to two minutes (three attempts of
/// a slow start with back-off).
pub const JOB_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0,
];

/// Timeout of one probe command: well under the tick, so an unresponsive Redis flips
/// readiness within about two ticks instead of after `redis.response_timeout`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often the recorder's histograms are drained when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// How an agent-start job ended, as the `outcome` label of [`JOBS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobOutcome {
    /// The handler returned `Ok` (agent ready, or already running here).
    Done,
    /// A transient failure: apalis-redis will run the job again.
    Retried,
    /// A permanent failure (or a panic): the job goes to the dead set.
    Dead,
}

impl JobOutcome {
    /// Every outcome, for pre-registering the series.
    pub const ALL: [Self; 3] = [Self::Done, Self::Retried, Self::Dead];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retried => "retried",
            Self::Dead => "dead",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recording helpers
// ---------------------------------------------------------------------------------------------

/// An agent-start job finished with `outcome` after `duration` in the handler.
pub fn job_finished(outcome: JobOutcome, duration: Duration) {
    counter!(JOBS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    histogram!(JOB_DURATION_SECONDS, "outcome" => outcome.as_str()).record(duration.as_secs_f64());
}

/// An agent became ready `startup` after it was spawned.
pub fn agent_started(startup: Duration) {
    histogram!(AGENT_STARTUP_SECONDS).record(startup.as_secs_f64());
}

/// One launch attempt failed (spawn error, exit before ready, start-up timeout).
pub fn agent_spawn_failed() {
    counter!(AGENT_SPAWN_FAILURES_TOTAL).increment(1);
}

/// A ready agent exited (on its own or stopped).
pub fn agent_exited() {
    counter!(AGENT_EXITS_TOTAL).increment(1);
}

/// The worker stopped an agent, for `reason` (a fixed name: it becomes a label).
pub fn agent_stopped(reason: &'static str) {
    counter!(AGENT_STOPS_TOTAL, "reason" => reason).increment(1);
}

/// This process now has `n` agents (running plus starting).
pub fn agents_live(n: usize) {
    gauge!(AGENTS_LIVE).set(n as f64);
}

/// The configured `agent.max_agents`.
pub fn agents_max(n: usize) {
    gauge!(AGENTS_MAX).set(n as f64);
}

/// A sweep run by this replica finished and removed `removed` sessions.
pub fn sweep_finished(removed: usize) {
    counter!(SWEEP_RUNS_TOTAL, "outcome" => "ok").increment(1);
    counter!(SWEEP_SESSIONS_REMOVED_TOTAL).increment(removed as u64);
}

/// A sweep run by this replica failed.
pub fn sweep_failed() {
    counter!(SWEEP_RUNS_TOTAL, "outcome" => "error").increment(1);
}

/// Retention deleted `done` finished and `dead` failed jobs.
pub fn retention_finished(done: u64, dead: u64) {
    counter!(RETENTION_JOBS_REMOVED_TOTAL, "set" => "done").increment(done);
    counter!(RETENTION_JOBS_REMOVED_TOTAL, "set" => "dead").increment(dead);
}

/// A Redis operation failed. `op` is a short, fixed name (`"ping"`, `"heartbeat"`, ...): it
/// becomes a label, so never pass anything built from data.
pub fn redis_error(op: &'static str) {
    counter!(REDIS_ERRORS_TOTAL, "op" => op).increment(1);
}

/// The job worker is being restarted after a backend error.
pub fn job_worker_restarted() {
    counter!(JOB_WORKER_RESTARTS_TOTAL).increment(1);
}

/// A heartbeat found records of live agents that Redis lost, and wrote `restored` again.
pub fn dataset_lost(restored: u64) {
    counter!(REDIS_DATASET_LOST_TOTAL).increment(1);
    counter!(SESSIONS_RESTORED_TOTAL).increment(restored);
}

/// Whether Redis's eviction policy lets it delete keys.
pub fn redis_evicting(evicting: bool) {
    gauge!(REDIS_EVICTING).set(if evicting { 1.0 } else { 0.0 });
}

fn redis_up(up: bool) {
    gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

/// Depth of one job queue, as read by [`QueueDepth::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    /// Ready task ids (`<queue>:active`).
    pub ready: u64,
    /// Task ids waiting for their due time (`<queue>:scheduled`).
    pub scheduled: u64,
    /// Task ids fetched by a registered worker and not yet acknowledged.
    pub inflight: u64,
    /// Failed task ids (`<queue>:dead`).
    pub dead: u64,
    /// Finished task ids (`<queue>:done`), until retention trims them.
    pub done: u64,
}

static QUEUE_DEPTH_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/queue_depth.lua")));

impl QueueDepth {
    /// Reads the depth of the queue `keys` in one round trip (`lua/queue_depth.lua`).
    pub async fn read(conn: &ConnectionManager, keys: &QueueKeys) -> redis::RedisResult<Self> {
        let (ready, scheduled, inflight, dead, done): (u64, u64, u64, u64, u64) =
            QUEUE_DEPTH_SCRIPT
                .key(keys.active())
                .key(keys.scheduled())
                .key(keys.workers())
                .key(keys.dead())
                .key(keys.done())
                .arg(keys.inflight_prefix())
                .invoke_async(&mut conn.clone())
                .await?;
        Ok(Self {
            ready,
            scheduled,
            inflight,
            dead,
            done,
        })
    }

    /// Sets the [`QUEUE_DEPTH`] gauges of `queue`.
    pub fn record(&self, queue: &str) {
        for (state, value) in [
            ("ready", self.ready),
            ("scheduled", self.scheduled),
            ("inflight", self.inflight),
            ("dead", self.dead),
            ("done", self.done),
        ] {
            gauge!(QUEUE_DEPTH, "queue" => queue.to_owned(), "state" => state).set(value as f64);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recorder
// ---------------------------------------------------------------------------------------------

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder on the first call and returns a handle to
/// it; later calls (several workers in one test process) return clones of the same handle.
///
/// Also describes every series (`# HELP` lines) and registers the counters at zero, so
/// `rate()` and alerts see them before the first event.
///
/// # Panics
///
/// If another `metrics` recorder was installed in this process by other means.
pub fn install_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(AGENT_STARTUP_SECONDS.to_owned()),
                    STARTUP_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(JOB_DURATION_SECONDS.to_owned()),
                        JOB_DURATION_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            describe();
            register_zeroes();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        JOBS_TOTAL,
        Unit::Count,
        "Agent-start jobs finished, by outcome."
    );
    describe_histogram!(
        JOB_DURATION_SECONDS,
        Unit::Seconds,
        "Time an agent-start job spent in the handler, by outcome."
    );
    describe_histogram!(
        AGENT_STARTUP_SECONDS,
        Unit::Seconds,
        "Agent start-up latency: spawn to first ready line."
    );
    describe_counter!(
        AGENT_SPAWN_FAILURES_TOTAL,
        Unit::Count,
        "Failed agent launch attempts."
    );
    describe_counter!(AGENT_EXITS_TOTAL, Unit::Count, "Ready agents that exited.");
    describe_counter!(
        AGENT_STOPS_TOTAL,
        Unit::Count,
        "Agents the worker stopped, by reason."
    );
    describe_gauge!(
        AGENTS_LIVE,
        Unit::Count,
        "Agents of this process, running plus starting."
    );
    describe_gauge!(AGENTS_MAX, Unit::Count, "Configured agent.max_agents.");
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Task ids in the job queue by state (same on every replica: aggregate with max)."
    );
    describe_counter!(
        SWEEP_RUNS_TOTAL,
        Unit::Count,
        "Stale-session sweeps run by this replica, by outcome."
    );
    describe_counter!(
        SWEEP_SESSIONS_REMOVED_TOTAL,
        Unit::Count,
        "Stale sessions removed by the sweep."
    );
    describe_counter!(
        RETENTION_JOBS_REMOVED_TOTAL,
        Unit::Count,
        "Finished jobs deleted by retention, by set."
    );
    describe_counter!(
        REDIS_ERRORS_TOTAL,
        Unit::Count,
        "Failed Redis operations, by operation."
    );
    describe_gauge!(
        REDIS_UP,
        "1 while Redis answered the last probe PING in time, else 0."
    );
    describe_counter!(
        REDIS_DATASET_LOST_TOTAL,
        Unit::Count,
        "Heartbeats that found session records of live agents lost by Redis."
    );
    describe_counter!(
        SESSIONS_RESTORED_TOTAL,
        Unit::Count,
        "Session records written again after Redis lost them."
    );
    describe_gauge!(
        REDIS_EVICTING,
        "1 when Redis's maxmemory-policy lets it evict keys (redis.allow_eviction)."
    );
    describe_counter!(
        JOB_WORKER_RESTARTS_TOTAL,
        Unit::Count,
        "Restarts of the job worker after backend errors."
    );
}

fn register_zeroes() {
    for outcome in JobOutcome::ALL {
        counter!(JOBS_TOTAL, "outcome" => outcome.as_str()).increment(0);
    }
    for outcome in ["ok", "error"] {
        counter!(SWEEP_RUNS_TOTAL, "outcome" => outcome).increment(0);
    }
    for set in ["done", "dead"] {
        counter!(RETENTION_JOBS_REMOVED_TOTAL, "set" => set).increment(0);
    }
    counter!(SWEEP_SESSIONS_REMOVED_TOTAL).increment(0);
    counter!(AGENT_SPAWN_FAILURES_TOTAL).increment(0);
    counter!(AGENT_EXITS_TOTAL).increment(0);
    for reason in [
        "session_ended",
        "terminated",
        "max_age",
        "session_taken_over",
        "worker_shutdown",
    ] {
        counter!(AGENT_STOPS_TOTAL, "reason" => reason).increment(0);
    }
    counter!(JOB_WORKER_RESTARTS_TOTAL).increment(0);
    counter!(REDIS_DATASET_LOST_TOTAL).increment(0);
    counter!(SESSIONS_RESTORED_TOTAL).increment(0);
    gauge!(AGENTS_LIVE).set(0.0);
    redis_up(false);
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

/// What readiness depends on. Shared as `Arc<Health>`; every flag starts false.
#[derive(Debug, Default)]
pub struct Health {
    redis: AtomicBool,
    redis_auth_failed: AtomicBool,
    job_worker: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    /// A new state: not ready (Redis not yet answered, job worker not yet running).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records whether Redis answered the last probe.
    pub fn set_redis(&self, answers: bool) {
        self.redis.store(answers, Ordering::Relaxed);
    }

    /// Records whether Redis refused our credentials (the reason `/readyz` gives).
    pub fn set_redis_auth_failed(&self, refused: bool) {
        self.redis_auth_failed.store(refused, Ordering::Relaxed);
    }

    /// Records whether the apalis job worker is running (true before each run, false when a
    /// run ends).
    pub fn set_job_worker(&self, running: bool) {
        self.job_worker.store(running, Ordering::Relaxed);
    }

    /// Marks the process as shutting down: not ready from now on, for good.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether Redis answered the last probe.
    pub fn redis(&self) -> bool {
        self.redis.load(Ordering::Relaxed)
    }

    /// Whether the job worker is running.
    pub fn job_worker(&self) -> bool {
        self.job_worker.load(Ordering::Relaxed)
    }

    /// Ready: Redis answers, the job worker runs, and no shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the process is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Some("draining")
        } else if self.redis_auth_failed.load(Ordering::Relaxed) {
            Some("redis authentication failed")
        } else if !self.redis() {
            Some("redis unreachable")
        } else if !self.job_worker() {
            Some("job worker not running")
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP listener
// ---------------------------------------------------------------------------------------------

/// The running HTTP listener of [`serve`].
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    task: JoinHandle<io::Result<()>>,
}

impl HttpServer {
    /// The bound address (the real port when `serve` was given port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the server has stopped (after its shutdown token was cancelled and open
    /// requests were answered).
    pub async fn stopped(self) -> io::Result<()> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(io::Error::other(join)),
        }
    }
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` in a spawned task until
/// `shutdown` is cancelled. Binding happens before this returns, so a taken port is an error
/// here, and port 0 works ([`HttpServer::local_addr`]). Also runs the recorder's upkeep
/// (histogram draining) while it serves.
///
/// - `GET /metrics`: the Prometheus text exposition of `handle`.
/// - `GET /healthz`: `200 ok` as long as the process (its runtime) runs.
/// - `GET /readyz`: `200 ready` while [`Health::is_ready`], else `503` with the reason.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> io::Result<HttpServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    tokio::spawn(upkeep_loop(handle.clone(), shutdown.clone()));
    let app = router(AppState { handle, health });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    tracing::info!(addr = %local_addr, "http_listening");
    Ok(HttpServer { local_addr, task })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.handle.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Histograms are drained into their buckets on render; without scrapes they would grow, so
/// drain them on a timer too (the exporter's own upkeep task needs its `http-listener`
/// feature, which we do not use).
async fn upkeep_loop(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(UPKEEP_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => handle.run_upkeep(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis probe
// ---------------------------------------------------------------------------------------------

/// Every `every` until `shutdown`: `PING` Redis with a [`PROBE_TIMEOUT`] (at most `every`)
/// and record the answer in `health` and [`REDIS_UP`]; when it answered, refresh the
/// [`QUEUE_DEPTH`] gauges of `keys` with one script call. With `every` = 1 s, a Redis that
/// goes away flips readiness within about 2 s. A failure streak is logged once when it starts
/// and once when it ends.
pub async fn probe_loop(
    conn: ConnectionManager,
    keys: QueueKeys,
    health: Arc<Health>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let timeout = PROBE_TIMEOUT.min(every);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match ping(&conn, timeout).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(failures, "redis_probe_recovered");
                }
                failures = 0;
                health.set_redis(true);
                health.set_redis_auth_failed(false);
                redis_up(true);
            }
            Err(error) => {
                // A password rotated under a running worker: say so, not "unreachable".
                let refused = error.as_ref().is_some_and(crate::connection::is_auth_error);
                health.set_redis_auth_failed(refused);
                if failures == 0 {
                    let error = error.map_or_else(
                        || format!("no answer within {timeout:?}"),
                        |e| e.to_string(),
                    );
                    if refused {
                        tracing::error!(error = %error, "redis_auth_failed");
                    } else {
                        tracing::warn!(error = %error, "redis_probe_failed");
                    }
                }
                failures += 1;
                health.set_redis(false);
                redis_up(false);
                redis_error("ping");
                continue;
            }
        }
        match tokio::time::timeout(timeout, QueueDepth::read(&conn, &keys)).await {
            Ok(Ok(depth)) => depth.record(keys.queue()),
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "queue_depth_failed");
                redis_error("queue_depth");
            }
            Err(_) => {
                tracing::debug!("queue_depth_timed_out");
                redis_error("queue_depth");
            }
        }
    }
}

/// `PING` within `timeout`: the error, or `None` when there was no answer in time.
async fn ping(
    conn: &ConnectionManager,
    timeout: Duration,
) -> Result<(), Option<redis::RedisError>> {
    let mut conn = conn.clone();
    let ping = redis::cmd("PING");
    match tokio::time::timeout(timeout, ping.query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(Some(error)),
        Err(_) => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let response = String::from_utf8(response).expect("utf-8");
        let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        (status, body.to_owned())
    }

    #[test]
    fn readiness_needs_redis_and_the_job_worker_and_ends_with_draining() {
        let health = Health::new();
        assert_eq!(health.not_ready_reason(), Some("redis unreachable"));
        health.set_redis(true);
        assert_eq!(health.not_ready_reason(), Some("job worker not running"));
        health.set_job_worker(true);
        assert!(health.is_ready());
        health.set_redis(false);
        assert_eq!(health.not_ready_reason(), Some("redis unreachable"));
        health.set_redis(true);
        health.set_draining();
        assert_eq!(health.not_ready_reason(), Some("draining"));
        health.set_job_worker(true);
        assert!(!health.is_ready());
    }

    #[test]
    fn outcome_labels() {
        let labels: Vec<_> = JobOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels, ["done", "retried", "dead"]);
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let counters = [
            JOBS_TOTAL,
            AGENT_SPAWN_FAILURES_TOTAL,
            AGENT_EXITS_TOTAL,
            AGENT_STOPS_TOTAL,
            SWEEP_RUNS_TOTAL,
            SWEEP_SESSIONS_REMOVED_TOTAL,
            RETENTION_JOBS_REMOVED_TOTAL,
            REDIS_ERRORS_TOTAL,
            JOB_WORKER_RESTARTS_TOTAL,
            REDIS_DATASET_LOST_TOTAL,
            SESSIONS_RESTORED_TOTAL,
        ];
        let histograms = [JOB_DURATION_SECONDS, AGENT_STARTUP_SECONDS];
        let gauges = [
            AGENTS_LIVE,
            AGENTS_MAX,
            QUEUE_DEPTH,
            REDIS_UP,
            REDIS_EVICTING,
        ];
        for name in counters.iter().chain(&histograms).chain(&gauges) {
            assert!(name.starts_with("agent_worker_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
        assert!(counters.iter().all(|n| n.ends_with("_total")));
        assert!(histograms.iter().all(|n| n.ends_with("_seconds")));
        assert!(gauges.iter().all(|n| !n.ends_with("_total")));
        for buckets in [STARTUP_BUCKETS, JOB_DURATION_BUCKETS] {
            assert!(
                buckets.windows(2).all(|w| w[0] < w[1]),
                "sorted: {buckets:?}"
            );
        }
    }

    #[test]
    fn the_recorder_is_installed_once_and_shared() {
        let first = install_recorder();
        let second = install_recorder();
        agents_max(7);
        agent_started(Duration::from_millis(1500));
        for handle in [&first, &second] {
            let text = handle.render();
            assert!(text.contains("agent_worker_agents_max 7"), "{text}");
            assert!(
                text.contains(r#"agent_worker_agent_startup_seconds_bucket{le="2"}"#),
                "{text}"
            );
            assert!(
                text.contains(r#"agent_worker_jobs_total{outcome="retried"}"#),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn endpoints_answer_from_health_and_the_recorder() {
        let handle = install_recorder();
        let health = Health::new();
        let shutdown = CancellationToken::new();
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            handle,
            health.clone(),
            shutdown.clone(),
        )
        .await
        .expect("bind port 0");
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: redis unreachable\n")
        );
        health.set_redis(true);
        health.set_job_worker(true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));

        redis_error("unit_test_op");
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains(r#"agent_worker_redis_errors_total{op="unit_test_op"} 1"#),
            "{body}"
        );
        assert!(
            body.contains("# TYPE agent_worker_jobs_total counter"),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);

        // A second listener on the same port is refused at bind time.
        let taken = serve(
            addr,
            install_recorder(),
            health.clone(),
            CancellationToken::new(),
        )
        .await;
        assert!(taken.is_err());

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.stopped())
            .await
            .expect("stops at once")
            .expect("stops cleanly");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
