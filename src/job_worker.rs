//! The apalis worker that runs agent-start jobs, and the loop that keeps it alive.
//!
//! apalis-redis 1.0 ends a worker on any backend error (a Redis restart, a failed heartbeat),
//! and apalis's `Monitor` restarts it at once, in a tight loop while Redis is down, under a
//! name that may still be registered. [`JobWorker::supervise`] supervises it itself instead:
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

use crate::connection::RedisConn;
use agent_jobs::keys::APALIS_QUEUES_LIST;
use apalis::{
    layers::WorkerBuilderExt,
    prelude::{BackendExt, WorkerBuilder, WorkerError},
};
use apalis_redis::RedisStorage;
use tokio_util::sync::CancellationToken;

use crate::{
    agent::capacity::{Capacity, CapacityLayer},
    connection::RedisHealth,
    health::Health,
    jobs::agent_start::{self, AgentStartJob, RawCodec, RawJob},
    metrics,
    queue::{QueueOps, Recovered},
    settings::Settings,
    wake::WakeHub,
};

/// A healthy run this long resets the restart back-off.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The apalis worker of agent-start jobs, with what its runs need.
pub struct JobWorker {
    /// The worker's settings (queue, batch size, heartbeats, back-off).
    pub settings: Settings,
    /// The shared connection (apalis-redis's and ours).
    pub conn: RedisConn,
    /// This process's worker id; each run is named `<worker id>-<run>`.
    pub worker_id: String,
    /// Our maintenance scripts on the queue.
    pub ops: QueueOps,
    /// Wake-ups from producers.
    pub hub: WakeHub,
    /// The job handler's shared state.
    pub job: Arc<AgentStartJob>,
    /// The capacity gate in front of the handler.
    pub capacity: Arc<Capacity>,
    /// Readiness: whether a run is in progress.
    pub health: Arc<Health>,
    /// Where Redis failures are noted.
    pub redis_health: RedisHealth,
}

impl JobWorker {
    /// Runs the job worker until `shutdown`, restarting it after every backend error (see the
    /// module docs).
    pub async fn supervise(&self, shutdown: &CancellationToken) {
        let max = self.settings.worker.restart_backoff_max;
        let mut backoff = RestartBackoff::new(max);
        for run in 0u64.. {
            let name = format!("{}-{run}", self.worker_id);
            if let Err(error) = self.ops.promote_due().await {
                tracing::debug!(error = %error, "promote_due_failed");
            }
            let started = Instant::now();
            self.health.set_job_worker(true);
            let result = run_job_worker(
                &self.settings,
                &self.conn,
                &name,
                &self.hub,
                self.job.clone(),
                &self.capacity,
                shutdown,
            )
            .await;
            self.health.set_job_worker(false);
            if shutdown.is_cancelled() {
                // apalis-redis does not deregister a worker that stopped cleanly: its registration
                // (and its metadata hash) would stay forever, one per process. Whatever it still
                // held goes back to the head of the queue for the other replicas.
                match self.ops.recover_inflight(&name).await {
                    Ok(recovered) => log_recovered(&name, recovered),
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
            let delay = backoff.after(&reason, started.elapsed());
            metrics::job_worker_restarted();
            self.redis_health.failed();
            tracing::warn!(
                worker = %name,
                error = %reason,
                restart_in_ms = delay.as_millis() as u64,
                "worker_restarted"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            recover(&self.ops, &name, shutdown, max).await;
        }
    }
}

/// The delay before the next run of the job worker: 100 ms doubling to
/// `worker.restart_backoff_max`, reset after a healthy run; an ACL refusal waits the maximum
/// at once and is logged once per streak.
struct RestartBackoff {
    next: Duration,
    max: Duration,
    /// The ACL refusal of the current streak of failed runs: logged once, not per restart.
    denied: Option<PermissionDenied>,
}

impl RestartBackoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST,
            max,
            denied: None,
        }
    }

    /// The delay after a run that ended with `reason` after `ran_for`.
    fn after(&mut self, reason: &str, ran_for: Duration) -> Duration {
        if ran_for >= HEALTHY_RUN {
            self.next = Self::FIRST;
        }
        match PermissionDenied::parse(reason) {
            Some(refusal) => {
                if self.denied.as_ref() != Some(&refusal) {
                    tracing::error!(
                        denied = refusal.kind,
                        key = refusal.key,
                        command = refusal.command.as_deref(),
                        script = refusal.script.as_deref(),
                        error = %reason,
                        "redis_permission_denied: {refusal}"
                    );
                }
                self.denied = Some(refusal);
                // Nothing changes until someone changes the ACL: no fast retries meanwhile.
                self.next = self.max;
            }
            None => self.denied = None,
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// apalis-redis 1.0.0's `lua/register_worker.lua` (the SHA1 Redis knows it by). It writes
/// `core:apalis:queues:list` ([`APALIS_QUEUES_LIST`]), a key it neither declares nor documents.
const APALIS_REGISTER_WORKER_SHA: &str = "0d5fbce91e1dcff1121ece41f7169da3c0e39194";

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
                log_recovered(name, recovered);
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

/// `inflight_jobs_recovered`, when `name`'s recovery moved any job.
fn log_recovered(name: &str, recovered: Recovered) {
    if recovered.requeued > 0 || recovered.quarantined > 0 {
        tracing::info!(
            worker = %name,
            requeued = recovered.requeued,
            quarantined = recovered.quarantined,
            "inflight_jobs_recovered"
        );
    }
}

/// One run of the apalis worker, until shutdown (`Ok`) or a backend error (`Err`).
async fn run_job_worker(
    settings: &Settings,
    conn: &RedisConn,
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
    let backend = RedisStorage::<RawJob, RedisConn>::new(conn.clone())
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

/// On every `worker.poll_interval`: due scheduled jobs are moved to the ready list in bounded
/// chunks, so a burst in the scheduled set cannot crash apalis-redis's fetch.
pub struct DuePromotion {
    ops: QueueOps,
    every: Duration,
}

impl DuePromotion {
    /// Promotion through `ops` every `every`.
    pub fn new(ops: QueueOps, every: Duration) -> Self {
        Self { ops, every }
    }

    /// Promotes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            match self.ops.promote_due().await {
                Ok(0) => {}
                Ok(moved) => tracing::info!(moved, "scheduled_jobs_promoted"),
                Err(error) => {
                    metrics::redis_error("promote_due");
                    tracing::debug!(error = %error, "promote_due_failed");
                }
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
