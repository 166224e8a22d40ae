//! Metrics: every series' name, labels and buckets, the helpers that record them, and the one
//! process-wide Prometheus recorder.
//!
//! The rest of the code records only through the helpers here ([`job_finished`],
//! [`agent_started`], [`redis_error`], ...), so every name, label and bucket layout lives in
//! this file. Without an installed recorder ([`install_recorder`]) the helpers are no-ops.
//! `/metrics` serves it ([`crate::http`]).
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
//! | `redis_failovers_total` | counter | `reason` = `readonly`, `loading`, `masterdown`, `reset`, `announced` |
//! | `draining` | gauge | |
//! | `drains_total` | counter | `outcome` = `ended`, `timeout`, `immediate` |
//! | `drain_seconds` | histogram | |
//! | `agent_helper_oom_kills_total` | counter | |
//! | `agent_memory_high_total` | counter | |
//! | `agent_memory_peak_bytes` | histogram | |
//! | `warm_idle` | gauge | |
//! | `warm_takes_total` | counter | `result` = `warm`, `cold` |
//! | `warm_up_seconds` | histogram | |
//! | `warm_up_failures_total` | counter | |
//! | `start_queue_wait_seconds` | histogram | `start` = `cold`, `warm`, `forked` |
//! | `start_claim_to_spawned_seconds` | histogram | `start` |
//! | `start_spawned_to_alive_seconds` | histogram | `start` |
//! | `start_alive_to_ready_seconds` | histogram | `start` |
//! | `otel_spans_dropped_total` | counter | |
//! | `zygote_up` | gauge | |
//! | `zygote_starts_total` | counter | `start` = `forked`, `cold` |
//! | `zygote_failures_total` | counter | |
//! | `starts_refused_total` | counter | `reason` = `start_expired`, `config_missing` |

use std::{sync::OnceLock, time::Duration};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
/// `max_age`, `session_taken_over`, `worker_shutdown`), and agents ended by their memory limit
/// (`memory_limit`).
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
/// Counter of moves of the worker's connection to a new primary (a failover), by `reason`
/// (`readonly`, `loading`, `masterdown`, `reset`, `announced`: what revealed it).
pub const REDIS_FAILOVERS_TOTAL: &str = "agent_worker_redis_failovers_total";
/// Gauge: 1 while this replica drains (after the first shutdown request), else 0.
pub const DRAINING: &str = "agent_worker_draining";
/// Counter of drains that finished, by `outcome` (`ended`, `timeout`, `immediate`).
pub const DRAINS_TOTAL: &str = "agent_worker_drains_total";
/// Histogram of drains: the first shutdown request to the last agent's end.
pub const DRAIN_SECONDS: &str = "agent_worker_drain_seconds";
/// Counter of helper processes the kernel's OOM killer killed inside a running agent's cgroup
/// (the agent itself went on).
pub const AGENT_HELPER_OOM_KILLS_TOTAL: &str = "agent_worker_agent_helper_oom_kills_total";
/// Counter of agents that went over `agent.memory_high` (counted once per agent).
pub const AGENT_MEMORY_HIGH_TOTAL: &str = "agent_worker_agent_memory_high_total";
/// Histogram of the peak memory of each ended agent's tree, to size `agent.memory_max` from.
pub const AGENT_MEMORY_PEAK_BYTES: &str = "agent_worker_agent_memory_peak_bytes";
/// Gauge of idle warm processes of this replica (`agent.warm_pool`).
pub const WARM_IDLE: &str = "agent_worker_warm_idle";
/// Counter of launches with the pool on, by `result`: `warm` (a warm process took the
/// session) or `cold` (none was idle, or the one taken died at the handoff).
pub const WARM_TAKES_TOTAL: &str = "agent_worker_warm_takes_total";
/// Histogram of warm-ups: a warm process's spawn to its warm line.
pub const WARM_UP_SECONDS: &str = "agent_worker_warm_up_seconds";
/// Counter of warm-ups that failed (exit or no warm line in time) and idle warm processes
/// that died.
pub const WARM_UP_FAILURES_TOTAL: &str = "agent_worker_warm_up_failures_total";
/// Gauge: 1 while this replica's zygote is ready to fork agents (`agent.zygote_command`).
pub const ZYGOTE_UP: &str = "agent_worker_zygote_up";
/// Counter of launches with the zygote on, by `start`: `forked`, or `cold` (no zygote was
/// ready, or the one asked gave no agent).
pub const ZYGOTE_STARTS_TOTAL: &str = "agent_worker_zygote_starts_total";
/// Counter of zygotes that failed: refused, did not start, died, or left a request unanswered.
pub const ZYGOTE_FAILURES_TOTAL: &str = "agent_worker_zygote_failures_total";
/// Counter of starts refused at their claim, by `reason`: `start_expired` (claimed after the
/// job's `start_by`) or `config_missing` (the tombstone rule: the config was deleted).
pub const STARTS_REFUSED_TOTAL: &str = "agent_worker_starts_refused_total";

/// Histogram of the queue wait of started agents: the producer's enqueue to the claim, both on
/// Redis's clock ([`crate::start_timeline`]), by `start` (`cold`, `warm`, `forked`).
pub const START_QUEUE_WAIT_SECONDS: &str = "agent_worker_start_queue_wait_seconds";
/// Histogram of the claim to the agent's spawn (or a warm process's handoff), by `start`.
pub const START_CLAIM_TO_SPAWNED_SECONDS: &str = "agent_worker_start_claim_to_spawned_seconds";
/// Histogram of the spawn (or handoff) to the agent's alive line, by `start`.
pub const START_SPAWNED_TO_ALIVE_SECONDS: &str = "agent_worker_start_spawned_to_alive_seconds";
/// Histogram of the alive line to the ready line, by `start`.
pub const START_ALIVE_TO_READY_SECONDS: &str = "agent_worker_start_alive_to_ready_seconds";
/// Counter of finished spans the OpenTelemetry exporter dropped: its queue was full (the
/// collector is slow or unreachable), never waited for.
pub const OTEL_SPANS_DROPPED_TOTAL: &str = "agent_worker_otel_spans_dropped_total";

/// The phase histograms of a start, in the order [`start_phases`] takes them.
const START_PHASES: [&str; 3] = [
    START_CLAIM_TO_SPAWNED_SECONDS,
    START_SPAWNED_TO_ALIVE_SECONDS,
    START_ALIVE_TO_READY_SECONDS,
];

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

/// Buckets of [`DRAIN_SECONDS`]: a second (an idle replica) to the 4 h a call may last.
pub const DRAIN_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// Buckets of [`AGENT_MEMORY_PEAK_BYTES`]: 32 MiB (a bare interpreter) to 8 GiB.
pub const MEMORY_BUCKETS: &[f64] = &[
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    402653184.0,
    536870912.0,
    805306368.0,
    1073741824.0,
    1610612736.0,
    2147483648.0,
    3221225472.0,
    4294967296.0,
    6442450944.0,
    8589934592.0,
];

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

/// An agent-start job finished with `outcome` after `duration` in the handler.
pub fn job_finished(outcome: JobOutcome, duration: Duration) {
    counter!(JOBS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    histogram!(JOB_DURATION_SECONDS, "outcome" => outcome.as_str()).record(duration.as_secs_f64());
}

/// An agent became ready `startup` after it was spawned.
pub fn agent_started(startup: Duration) {
    histogram!(AGENT_STARTUP_SECONDS).record(startup.as_secs_f64());
}

/// An agent started `start` (`cold`, `warm`, `forked`: [`crate::agent::launcher::StartMode`])
/// after `queue_wait` in the queue (when the producer recorded its enqueue) and `phases`:
/// claim to spawned, spawned to alive, alive to ready.
pub fn start_phases(start: &str, queue_wait: Option<Duration>, phases: [Duration; 3]) {
    let start = start.to_owned();
    if let Some(wait) = queue_wait {
        histogram!(START_QUEUE_WAIT_SECONDS, "start" => start.clone()).record(wait.as_secs_f64());
    }
    for (name, took) in START_PHASES.into_iter().zip(phases) {
        histogram!(name, "start" => start.clone()).record(took.as_secs_f64());
    }
}

/// The OpenTelemetry exporter dropped `n` finished spans.
pub fn otel_spans_dropped(n: u64) {
    counter!(OTEL_SPANS_DROPPED_TOTAL).increment(n);
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

/// The number of idle warm processes.
pub fn warm_idle(n: usize) {
    gauge!(WARM_IDLE).set(n as f64);
}

/// A launch took a warm process (`warm`) or started cold with the pool on.
pub fn warm_take(warm: bool) {
    counter!(WARM_TAKES_TOTAL, "result" => if warm { "warm" } else { "cold" }).increment(1);
}

/// A warm process printed its warm line `duration` after its spawn.
pub fn warm_up_finished(duration: Duration) {
    histogram!(WARM_UP_SECONDS).record(duration.as_secs_f64());
}

/// A start was refused at its claim (`start_expired` or `config_missing`).
pub fn start_refused(reason: &'static str) {
    counter!(STARTS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A warm-up failed, or an idle warm process died.
pub fn warm_up_failed() {
    counter!(WARM_UP_FAILURES_TOTAL).increment(1);
}

/// A launch with the zygote on started its agent as `start` says (`forked` or `cold`).
pub fn zygote_start(start: &'static str) {
    counter!(ZYGOTE_STARTS_TOTAL, "start" => start).increment(1);
}

/// The replica's zygote became ready (`true`) or stopped serving.
pub fn zygote_up(up: bool) {
    gauge!(ZYGOTE_UP).set(if up { 1.0 } else { 0.0 });
}

/// A zygote failed (see [`ZYGOTE_FAILURES_TOTAL`]).
pub fn zygote_failed() {
    counter!(ZYGOTE_FAILURES_TOTAL).increment(1);
}

/// The connection moved to a new primary; `reason` is [`crate::connection::Fault::as_str`].
pub fn redis_failover(reason: &'static str) {
    counter!(REDIS_FAILOVERS_TOTAL, "reason" => reason).increment(1);
}

/// The replica started draining (the first shutdown request).
pub fn drain_started() {
    gauge!(DRAINING).set(1.0);
}

/// The drain ended after `took`: every agent ended on its own (`ended`), the drain timeout
/// cut the rest (`timeout`), or a second request did (`immediate`).
pub fn drain_finished(outcome: &'static str, took: Duration) {
    counter!(DRAINS_TOTAL, "outcome" => outcome).increment(1);
    histogram!(DRAIN_SECONDS).record(took.as_secs_f64());
}

/// The OOM killer killed `n` helpers inside a running agent.
pub fn helper_oom_killed(n: u64) {
    counter!(AGENT_HELPER_OOM_KILLS_TOTAL).increment(n);
}

/// An agent went over `agent.memory_high`.
pub fn memory_high() {
    counter!(AGENT_MEMORY_HIGH_TOTAL).increment(1);
}

/// An agent ended; its tree used at most `bytes`.
pub fn agent_memory_peak(bytes: u64) {
    histogram!(AGENT_MEMORY_PEAK_BYTES).record(bytes as f64);
}

/// Whether Redis answered the last probe.
pub fn redis_up(up: bool) {
    gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

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
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(WARM_UP_SECONDS.to_owned()),
                        STARTUP_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(DRAIN_SECONDS.to_owned()), DRAIN_BUCKETS)
                })
                .and_then(|b| {
                    // The queue wait and every phase: the start-up buckets.
                    b.set_buckets_for_metric(
                        Matcher::Prefix("agent_worker_start_".to_owned()),
                        STARTUP_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(AGENT_MEMORY_PEAK_BYTES.to_owned()),
                        MEMORY_BUCKETS,
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

/// What kind of series a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every series: name, kind, unit (`None`: a plain number or a 0/1 flag) and `# HELP` text.
const SERIES: &[(&str, Kind, Option<Unit>, &str)] = &[
    (
        JOBS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Agent-start jobs finished, by outcome.",
    ),
    (
        JOB_DURATION_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Time an agent-start job spent in the handler, by outcome.",
    ),
    (
        AGENT_STARTUP_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Agent start-up latency: spawn to first ready line.",
    ),
    (
        AGENT_SPAWN_FAILURES_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Failed agent launch attempts.",
    ),
    (
        AGENT_EXITS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Ready agents that exited.",
    ),
    (
        AGENT_STOPS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Agents the worker stopped, by reason.",
    ),
    (
        AGENTS_LIVE,
        Kind::Gauge,
        Some(Unit::Count),
        "Agents of this process, running plus starting.",
    ),
    (
        AGENTS_MAX,
        Kind::Gauge,
        Some(Unit::Count),
        "Configured agent.max_agents.",
    ),
    (
        QUEUE_DEPTH,
        Kind::Gauge,
        Some(Unit::Count),
        "Task ids in the job queue by state (same on every replica: aggregate with max).",
    ),
    (
        SWEEP_RUNS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Stale-session sweeps run by this replica, by outcome.",
    ),
    (
        SWEEP_SESSIONS_REMOVED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Stale sessions removed by the sweep.",
    ),
    (
        RETENTION_JOBS_REMOVED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Finished jobs deleted by retention, by set.",
    ),
    (
        REDIS_ERRORS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Failed Redis operations, by operation.",
    ),
    (
        REDIS_UP,
        Kind::Gauge,
        None,
        "1 while Redis answered the last probe PING in time, else 0.",
    ),
    (
        REDIS_DATASET_LOST_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Heartbeats that found session records of live agents lost by Redis.",
    ),
    (
        SESSIONS_RESTORED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Session records written again after Redis lost them.",
    ),
    (
        REDIS_EVICTING,
        Kind::Gauge,
        None,
        "1 when Redis's maxmemory-policy lets it evict keys (redis.allow_eviction).",
    ),
    (
        REDIS_FAILOVERS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Moves of the worker's connection to a new primary, by what revealed the failover.",
    ),
    (
        JOB_WORKER_RESTARTS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Restarts of the job worker after backend errors.",
    ),
    (
        DRAINING,
        Kind::Gauge,
        None,
        "1 from the first shutdown request until the process exits: no new starts, live calls go on.",
    ),
    (
        DRAINS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Drains finished, by outcome: ended (every call ended on its own), timeout (shutdown.drain_timeout cut the rest), immediate (a second request).",
    ),
    (
        DRAIN_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "From the first shutdown request to the last agent's end.",
    ),
    (
        AGENT_HELPER_OOM_KILLS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Helper processes the OOM killer killed inside a running agent's cgroup (the agent went on).",
    ),
    (
        AGENT_MEMORY_HIGH_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Agents that went over agent.memory_high (once per agent).",
    ),
    (
        AGENT_MEMORY_PEAK_BYTES,
        Kind::Histogram,
        Some(Unit::Bytes),
        "Peak memory of each ended agent's whole process tree.",
    ),
    (
        WARM_IDLE,
        Kind::Gauge,
        Some(Unit::Count),
        "Idle warm agent processes.",
    ),
    (
        WARM_TAKES_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Launches with the warm pool on, by result (warm or cold).",
    ),
    (
        WARM_UP_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Warm-ups: a warm process's spawn to its warm line.",
    ),
    (
        WARM_UP_FAILURES_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Failed warm-ups and idle warm processes that died.",
    ),
    (
        START_QUEUE_WAIT_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Started agents' queue wait: the producer's enqueue to the claim (Redis's clock), by start mode.",
    ),
    (
        START_CLAIM_TO_SPAWNED_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Claim to the agent's spawn or warm handoff, by start mode.",
    ),
    (
        START_SPAWNED_TO_ALIVE_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Spawn or handoff to the agent's alive line, by start mode.",
    ),
    (
        START_ALIVE_TO_READY_SECONDS,
        Kind::Histogram,
        Some(Unit::Seconds),
        "The agent's alive line to its ready line, by start mode.",
    ),
    (
        OTEL_SPANS_DROPPED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Finished spans the OpenTelemetry exporter dropped because its queue was full.",
    ),
    (
        ZYGOTE_UP,
        Kind::Gauge,
        None,
        "1 while this replica's zygote is ready to fork agents.",
    ),
    (
        ZYGOTE_STARTS_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Launches with the zygote on, by how the agent started (forked or cold).",
    ),
    (
        ZYGOTE_FAILURES_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Zygotes that refused, did not start, died or left a request unanswered.",
    ),
    (
        STARTS_REFUSED_TOTAL,
        Kind::Counter,
        Some(Unit::Count),
        "Starts refused at their claim, by reason (start_expired, config_missing).",
    ),
];

/// `# HELP` and `# TYPE` of every series in [`SERIES`].
fn describe() {
    for &(name, kind, unit, help) in SERIES {
        match (kind, unit) {
            (Kind::Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Kind::Counter, None) => describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => describe_histogram!(name, help),
        }
    }
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
        "memory_limit",
    ] {
        counter!(AGENT_STOPS_TOTAL, "reason" => reason).increment(0);
    }
    counter!(JOB_WORKER_RESTARTS_TOTAL).increment(0);
    counter!(AGENT_HELPER_OOM_KILLS_TOTAL).increment(0);
    counter!(AGENT_MEMORY_HIGH_TOTAL).increment(0);
    for reason in ["readonly", "loading", "masterdown", "reset", "announced"] {
        counter!(REDIS_FAILOVERS_TOTAL, "reason" => reason).increment(0);
    }
    for outcome in ["ended", "timeout", "immediate"] {
        counter!(DRAINS_TOTAL, "outcome" => outcome).increment(0);
    }
    gauge!(DRAINING).set(0.0);
    counter!(REDIS_DATASET_LOST_TOTAL).increment(0);
    counter!(SESSIONS_RESTORED_TOTAL).increment(0);
    for result in ["warm", "cold"] {
        counter!(WARM_TAKES_TOTAL, "result" => result).increment(0);
    }
    counter!(WARM_UP_FAILURES_TOTAL).increment(0);
    counter!(OTEL_SPANS_DROPPED_TOTAL).increment(0);
    for reason in ["start_expired", "config_missing"] {
        counter!(STARTS_REFUSED_TOTAL, "reason" => reason).increment(0);
    }
    gauge!(WARM_IDLE).set(0.0);
    for start in ["forked", "cold"] {
        counter!(ZYGOTE_STARTS_TOTAL, "start" => start).increment(0);
    }
    counter!(ZYGOTE_FAILURES_TOTAL).increment(0);
    gauge!(ZYGOTE_UP).set(0.0);
    gauge!(AGENTS_LIVE).set(0.0);
    redis_up(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_labels() {
        let labels: Vec<_> = JobOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels, ["done", "retried", "dead"]);
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let of = |kind| -> Vec<&str> {
            SERIES
                .iter()
                .filter(|series| series.1 == kind)
                .map(|series| series.0)
                .collect()
        };
        let (counters, histograms, gauges) =
            (of(Kind::Counter), of(Kind::Histogram), of(Kind::Gauge));
        let names: Vec<_> = SERIES.iter().map(|series| series.0).collect();
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "each series described once");
        for name in counters.iter().chain(&histograms).chain(&gauges) {
            assert!(name.starts_with("agent_worker_"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
        assert!(counters.iter().all(|n| n.ends_with("_total")));
        assert!(
            histograms
                .iter()
                .all(|n| n.ends_with("_seconds") || n.ends_with("_bytes"))
        );
        assert!(gauges.iter().all(|n| !n.ends_with("_total")));
        for buckets in [
            STARTUP_BUCKETS,
            JOB_DURATION_BUCKETS,
            DRAIN_BUCKETS,
            MEMORY_BUCKETS,
        ] {
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
}
