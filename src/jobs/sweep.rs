//! [`StaleSessionSweep`]: removing the keys of sessions whose agent is gone.
//!
//! A pid means nothing outside its host, so liveness is judged from the heartbeat index
//! (`agent-worker:session-heartbeats`, session id → unix seconds): the worker that owns an
//! agent moves its entry to "now" every `session.heartbeat_interval`, and every state change
//! (`starting`, `ready`, `error`) does too. A session whose entry is older than
//! `session.stale_after` has no live agent: its worker died, its start failed long ago, or it
//! is stuck in `starting`.
//!
//! The sweep reads candidates from the index with `ZRANGEBYSCORE … LIMIT` in batches, so its
//! cost grows with the number of stale sessions, not with the keyspace (no `KEYS`, no `SCAN`).
//! Each batch is removed by `lua/remove_sessions.lua`, which re-checks every entry inside the
//! script: a session that heartbeated after it was picked is left alone.
//!
//! Sessions written by the old system are not in the index. [`StaleSessionSweep::scan_legacy`]
//! (`agent-worker sweep --scan`, a one-off migration) walks `session:*` hashes with `SCAN` and
//! removes those idle for longer than `session.max_age`, again re-checked inside the script.
//!
//! It runs once per `sweep.interval`, on one replica: see [`crate::schedule`].

use std::time::{Duration, Instant};

use crate::connection::RedisConn;
use agent_jobs::{
    SessionId, SessionKeys,
    keys::{SESSION_HEARTBEATS, SESSION_STATE_PATTERN, session_of_state_key},
    session_state::fields,
};

use crate::{
    metrics,
    session::{Removal, SessionStore},
};

/// The outcome of one sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Candidate sessions looked at.
    pub examined: usize,
    /// Sessions removed (or that would be, in a dry run), with the reason.
    pub removed: Vec<(SessionId, String)>,
    /// Wall time.
    pub duration: Duration,
}

/// Removes stale sessions. Cheap to clone.
#[derive(Clone)]
pub struct StaleSessionSweep {
    conn: RedisConn,
    store: SessionStore,
    batch_size: usize,
    stale_after: Duration,
    max_age: Duration,
    ended_ttl: Duration,
    job_meta_prefix: Option<String>,
}

impl std::fmt::Debug for StaleSessionSweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaleSessionSweep")
            .field("batch_size", &self.batch_size)
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

impl StaleSessionSweep {
    /// A sweep over `store`'s Redis, `batch_size` sessions per script call.
    pub fn new(
        conn: RedisConn,
        store: SessionStore,
        batch_size: usize,
        stale_after: Duration,
        max_age: Duration,
    ) -> Self {
        Self {
            conn,
            store,
            batch_size: batch_size.max(1),
            stale_after,
            max_age,
            ended_ttl: Duration::from_secs(3600),
            job_meta_prefix: None,
        }
    }

    /// The sweep as the settings say (`sweep.batch_size`, `session.stale_after`,
    /// `session.max_age`, `session.ended_ttl`), for the worker and the `sweep` command alike.
    pub fn from_settings(
        conn: RedisConn,
        store: SessionStore,
        settings: &crate::settings::Settings,
    ) -> Self {
        Self::new(
            conn,
            store,
            settings.sweep.batch_size,
            settings.session.stale_after,
            settings.session.max_age,
        )
        .ended_ttl(settings.session.ended_ttl)
        .jobs_of(
            &agent_jobs::QueueKeys::new(&settings.redis.queue).expect("redis.queue is validated"),
        )
    }

    /// The queue whose agent-start jobs start these sessions: a live session the sweep removes
    /// has its job's claim record cleared, so a re-delivery of the job starts it again.
    pub fn jobs_of(mut self, queue: &agent_jobs::QueueKeys) -> Self {
        self.job_meta_prefix = Some(queue.meta_prefix());
        self
    }

    /// How long an ended session's record may stay before the sweep removes it, when its end
    /// was not recorded (1 h unless set).
    pub fn ended_ttl(mut self, ttl: Duration) -> Self {
        self.ended_ttl = ttl;
        self
    }

    /// Removes every indexed session whose last heartbeat is older than `stale_after` at
    /// `now` (unix seconds). With `dry_run`, reports what would be removed and removes nothing.
    pub async fn run(&self, now: u64, dry_run: bool) -> redis::RedisResult<SweepReport> {
        let started = Instant::now();
        let cutoff = now.saturating_sub(self.stale_after.as_secs());
        let mut report = SweepReport::default();
        let mut conn = self.conn.clone();
        // A dry run removes nothing, so it pages with an offset; a real run always reads the
        // head of the range, which shrinks as it goes: every candidate leaves the index
        // (removed, or an ended session released to its TTL), or was refreshed meanwhile.
        let mut offset = 0;
        let removal = Removal::Stale {
            cutoff,
            ended_cutoff: now.saturating_sub(self.ended_ttl.as_secs()),
            job_meta_prefix: self.job_meta_prefix.clone(),
        };
        loop {
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(SESSION_HEARTBEATS)
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(offset)
                .arg(self.batch_size)
                .query_async(&mut conn)
                .await?;
            let fetched = ids.len();
            report.examined += fetched;
            let (valid, invalid) = parse_ids(ids);
            if !invalid.is_empty() && !dry_run {
                // Not ours to interpret; drop them from the index so they are not read again.
                redis::cmd("ZREM")
                    .arg(SESSION_HEARTBEATS)
                    .arg(&invalid)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            report
                .removed
                .extend(self.store.remove(&removal, &valid, dry_run).await?);
            if dry_run {
                offset += fetched;
            }
            if fetched < self.batch_size {
                break;
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Migration: walks `session:<id>` hashes with `SCAN` and removes those that are not in
    /// the heartbeat index (written by the old system) and idle for longer than `max_age`.
    pub async fn scan_legacy(&self, now: u64, dry_run: bool) -> redis::RedisResult<SweepReport> {
        let started = Instant::now();
        let cutoff = now.saturating_sub(self.max_age.as_secs());
        let mut report = SweepReport::default();
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(SESSION_STATE_PATTERN)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("hash")
                .query_async(&mut conn)
                .await?;
            // `session:<id>` only, not `session:<id>:config` and friends.
            let ids: Vec<SessionId> = keys
                .iter()
                .filter_map(|key| session_of_state_key(key))
                .collect();
            report.examined += ids.len();
            for batch in ids.chunks(self.batch_size) {
                let candidates = self.legacy_candidates(batch, cutoff).await?;
                let removed = self
                    .store
                    .remove(&Removal::Legacy { cutoff }, &candidates, dry_run)
                    .await?;
                report.removed.extend(removed);
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Those of `ids` that look like idle legacy sessions (the script checks again).
    async fn legacy_candidates(
        &self,
        ids: &[SessionId],
        cutoff: u64,
    ) -> redis::RedisResult<Vec<SessionId>> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.zscore(SESSION_HEARTBEATS, id.as_str())
                .cmd("HMGET")
                .arg(SessionKeys::new(id).state())
                .arg(fields::LAST_ACTIVE)
                .arg(fields::CREATED_AT);
        }
        let flat: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let mut candidates = Vec::new();
        for (id, pair) in ids.iter().zip(flat.chunks_exact(2)) {
            let indexed: Option<f64> = redis::from_redis_value_ref(&pair[0])?;
            let times: Vec<Option<String>> = redis::from_redis_value_ref(&pair[1])?;
            let newest = times
                .iter()
                .filter_map(|t| t.as_deref()?.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            if indexed.is_none() && newest > 0 && newest < cutoff {
                candidates.push(id.clone());
            }
        }
        Ok(candidates)
    }
}

fn parse_ids(ids: Vec<String>) -> (Vec<SessionId>, Vec<String>) {
    let mut valid = Vec::with_capacity(ids.len());
    let mut invalid = Vec::new();
    for id in ids {
        match SessionId::parse(id.as_str()) {
            Ok(parsed) => valid.push(parsed),
            Err(_) => invalid.push(id),
        }
    }
    (valid, invalid)
}

/// Logs one finished sweep: `session_swept` per session, then `sweep_complete`.
pub fn log_report(report: &SweepReport, tick: Option<u64>, dry_run: bool) {
    for (id, reason) in &report.removed {
        tracing::info!(session_id = %id, reason = %reason, dry_run, "session_swept");
    }
    tracing::info!(
        tick,
        examined = report.examined,
        removed = report.removed.len(),
        duration_ms = report.duration.as_millis() as u64,
        dry_run,
        "sweep_complete"
    );
}

/// One scheduled sweep (tick `tick`), as the worker runs it: skipped right after a Redis outage
/// (nobody's heartbeat is fresh then: live workers get `stale_after` to write theirs again),
/// logged and counted either way.
pub async fn scheduled(sweep: &StaleSessionSweep, tick: u64, connected_for: Duration) {
    if connected_for < sweep.stale_after {
        tracing::info!(tick, "sweep_skipped_after_redis_outage");
        return;
    }
    match sweep.run(crate::clock::unix_now(), false).await {
        Ok(report) => {
            metrics::sweep_finished(report.removed.len());
            log_report(&report, Some(tick), false);
        }
        Err(error) => {
            metrics::sweep_failed();
            metrics::redis_error("sweep");
            tracing::warn!(tick, error = %error, "sweep_failed");
        }
    }
}
