//! [`Retention`]: keeping Redis memory bounded by trimming finished jobs.
//!
//! apalis-redis 1.0 keeps every finished job forever: its id in the done or dead SET, its
//! payload in `<queue>:data`, its meta hash. Retention, once per `retention.interval` on one
//! replica (the same per-tick lease as the sweep):
//! 1. indexes newly finished ids by finish time (`lua/index_finished.lua`): done ids move from
//!    the done SET into `<queue>:done-at`; dead ids are added to `<queue>:dead-at`;
//! 2. deletes done jobs older than `retention.done`, dead jobs older than `retention.dead`, and
//!    the oldest dead jobs beyond `retention.dead_max` (`lua/delete_finished.lua`), each with its
//!    data and meta;
//! 3. forgets workers whose presence is older than [`FORGET_WORKERS_AFTER`]
//!    (`lua/forget_workers.lua`): each process has its own id, so every restart leaves an entry.
//!
//! Every step works in batches read from a sorted index, so its cost grows with the number of
//! jobs to trim, not with the size of the sets. A job waiting for a retry (in the scheduled set,
//! status `Failed`) is in neither index, and the delete script re-checks the status of each job,
//! so it is never removed.

use crate::connection::RedisConn;
use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use agent_jobs::{
    QueueKeys,
    keys::{WORKER_AGENTS, WORKER_INFO, WORKER_WARM, WORKERS},
};
use redis::Script;

static INDEX: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/index_finished.lua")));
static DELETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/delete_finished.lua")));
static FORGET_WORKERS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/forget_workers.lua")));

/// A worker silent this long is forgotten (presence entry and agent count). Far beyond any
/// orphan timeout: by then its sessions were taken over or swept long ago, and `status` has
/// shown it as silent for an hour.
pub const FORGET_WORKERS_AFTER: Duration = Duration::from_secs(3600);

/// Jobs handled per script call: bounds the time of one Redis command.
const BATCH: usize = 1000;

/// What one retention run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Finished jobs newly indexed.
    pub indexed: u64,
    /// Done jobs deleted.
    pub done_deleted: u64,
    /// Dead jobs deleted (by age or beyond the maximum).
    pub dead_deleted: u64,
    /// Long-silent workers forgotten.
    pub workers_forgotten: u64,
    /// Wall time.
    pub duration: Duration,
}

/// Trims finished jobs of one queue.
#[derive(Clone)]
pub struct Retention {
    conn: RedisConn,
    keys: QueueKeys,
    done_after: Duration,
    dead_after: Duration,
    dead_max: usize,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention")
            .field("queue", &self.keys.queue())
            .field("done_after", &self.done_after)
            .field("dead_after", &self.dead_after)
            .field("dead_max", &self.dead_max)
            .finish()
    }
}

impl Retention {
    /// Retention of `keys`' queue with the given limits.
    pub fn new(
        conn: RedisConn,
        keys: QueueKeys,
        done_after: Duration,
        dead_after: Duration,
        dead_max: usize,
    ) -> Self {
        Self {
            conn,
            keys,
            done_after,
            dead_after,
            dead_max,
        }
    }

    /// Retention as `[retention]` says.
    pub fn from_settings(
        conn: RedisConn,
        keys: QueueKeys,
        settings: &crate::settings::Settings,
    ) -> Self {
        Self::new(
            conn,
            keys,
            settings.retention.done,
            settings.retention.dead,
            settings.retention.dead_max,
        )
    }

    /// One retention run at `now` (unix seconds).
    pub async fn run(&self, now: u64) -> redis::RedisResult<RetentionReport> {
        let started = Instant::now();
        let mut report = RetentionReport::default();
        let mut conn = self.conn.clone();
        loop {
            let (done, dead): (u64, u64) = INDEX
                .key(self.keys.done())
                .key(self.keys.done_at())
                .key(self.keys.dead())
                .key(self.keys.dead_at())
                .arg(self.keys.meta_prefix())
                .arg(now)
                .arg(BATCH)
                .invoke_async(&mut conn)
                .await?;
            report.indexed += done + dead;
            if done < BATCH as u64 {
                break;
            }
        }
        let done_cutoff = now.saturating_sub(self.done_after.as_secs());
        report.done_deleted = self
            .trim_older(&self.keys.done_at(), &self.keys.done(), "done", done_cutoff)
            .await?;
        let dead_cutoff = now.saturating_sub(self.dead_after.as_secs());
        report.dead_deleted = self
            .trim_older(&self.keys.dead_at(), &self.keys.dead(), "dead", dead_cutoff)
            .await?;
        loop {
            let count: usize = redis::cmd("ZCARD")
                .arg(self.keys.dead_at())
                .query_async(&mut conn)
                .await?;
            if count <= self.dead_max {
                break;
            }
            let excess = (count - self.dead_max).min(BATCH);
            let oldest: Vec<String> = redis::cmd("ZRANGE")
                .arg(self.keys.dead_at())
                .arg(0)
                .arg(excess - 1)
                .query_async(&mut conn)
                .await?;
            report.dead_deleted += self
                .delete(&self.keys.dead_at(), &self.keys.dead(), "dead", &oldest)
                .await?;
        }
        let silent_since = now.saturating_sub(FORGET_WORKERS_AFTER.as_secs());
        loop {
            let forgotten: u64 = FORGET_WORKERS
                .key(WORKERS)
                .key(WORKER_AGENTS)
                .key(WORKER_INFO)
                .key(WORKER_WARM)
                .arg(silent_since)
                .arg(BATCH)
                .invoke_async(&mut conn)
                .await?;
            report.workers_forgotten += forgotten;
            if forgotten < BATCH as u64 {
                break;
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    }

    async fn trim_older(
        &self,
        index: &str,
        set: &str,
        kind: &str,
        cutoff: u64,
    ) -> redis::RedisResult<u64> {
        let mut deleted = 0;
        loop {
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(index)
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(0)
                .arg(BATCH)
                .query_async(&mut self.conn.clone())
                .await?;
            if ids.is_empty() {
                return Ok(deleted);
            }
            deleted += self.delete(index, set, kind, &ids).await?;
            if ids.len() < BATCH {
                return Ok(deleted);
            }
        }
    }

    async fn delete(
        &self,
        index: &str,
        set: &str,
        kind: &str,
        ids: &[String],
    ) -> redis::RedisResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut invocation = DELETE.prepare_invoke();
        invocation
            .key(index)
            .key(set)
            .key(self.keys.data())
            .arg(kind);
        for id in ids {
            invocation.key(self.keys.meta(id)).arg(id);
        }
        invocation.invoke_async(&mut self.conn.clone()).await
    }
}

/// Logs one retention run.
pub fn log_report(report: &RetentionReport, tick: u64) {
    tracing::info!(
        tick,
        indexed = report.indexed,
        done_deleted = report.done_deleted,
        dead_deleted = report.dead_deleted,
        workers_forgotten = report.workers_forgotten,
        duration_ms = report.duration.as_millis() as u64,
        "retention_complete"
    );
}

/// One scheduled retention run (tick `tick`), as the worker runs it: logged and counted.
pub async fn scheduled(retention: &Retention, tick: u64) {
    match retention.run(crate::clock::unix_now()).await {
        Ok(report) => {
            crate::metrics::retention_finished(report.done_deleted, report.dead_deleted);
            log_report(&report, tick);
        }
        Err(error) => {
            crate::metrics::redis_error("retention");
            tracing::warn!(tick, error = %error, "retention_failed");
        }
    }
}
