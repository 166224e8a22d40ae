//! What an operator reads and does, shared by the CLI (`status`, `dead list`, `dead retry`)
//! and the console ([`crate::console`]): one query per question, so both always agree.
//!
//! All of it reads the same keys the worker writes (see the README's contract section); none
//! of it needs a running worker. Every read is bounded by an index the worker keeps small
//! (workers, the dead set under `retention.dead_max`), never by the keyspace.

use std::{collections::HashMap, sync::LazyLock, time::Duration};

use agent_jobs::{
    AgentStart, QueueKeys, SessionId, SessionKeys,
    keys::{SESSIONS_READY, SESSIONS_STARTING, WORKER_AGENTS, WORKER_INFO, WORKER_WARM, WORKERS},
};
use redis::{Script, aio::ConnectionManager};
use serde::Serialize;

use crate::presence::WorkerInfo;

static RETRY_DEAD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../jobs/lua/retry_dead.lua")));

/// Job counts of the queue.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct QueueCounts {
    /// Ready to be fetched.
    pub ready: u64,
    /// Waiting for a due time (retries, foreign producers).
    pub scheduled: u64,
    /// Fetched by a worker, not finished.
    pub inflight: u64,
    /// Finished and kept (until retention trims them).
    pub done: u64,
    /// Failed for good.
    pub dead: u64,
}

/// Sessions by state.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SessionCounts {
    /// In `session:starting`.
    pub starting: u64,
    /// In `session:ready`.
    pub ready: u64,
}

/// One worker process.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WorkerRow {
    /// Its worker id.
    pub id: String,
    /// Seconds since its last presence heartbeat.
    pub last_seen_secs: u64,
    /// Agents it reported.
    pub agents: u64,
    /// Heard from within the orphan timeout.
    pub alive: bool,
    /// What it tells about itself (`None` for workers of versions that did not).
    pub info: Option<WorkerInfo>,
    /// Idle warm processes of its pool (`None` without a pool).
    pub warm_idle: Option<u64>,
}

/// `agent-worker status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    /// The queue name.
    pub queue: String,
    /// Job counts.
    pub jobs: QueueCounts,
    /// Session counts.
    pub sessions: SessionCounts,
    /// Worker processes, most recently seen first.
    pub workers: Vec<WorkerRow>,
    /// Redis's `maxmemory-policy` (`None` when `INFO` did not say): anything but
    /// `noeviction` lets it delete session records.
    pub maxmemory_policy: Option<String>,
}

/// Reads the status at `now` (unix seconds); workers silent for longer than `orphan_timeout`
/// are shown as not alive.
pub async fn status(
    conn: &ConnectionManager,
    keys: &QueueKeys,
    now: u64,
    orphan_timeout: Duration,
) -> redis::RedisResult<Status> {
    let mut conn = conn.clone();
    let runs: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.workers())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    let mut pipe = redis::pipe();
    pipe.llen(keys.active())
        .zcard(keys.scheduled())
        .scard(keys.done())
        .zcard(keys.done_at())
        .scard(keys.dead())
        .scard(SESSIONS_STARTING)
        .scard(SESSIONS_READY)
        .cmd("ZRANGE")
        .arg(WORKERS)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .hgetall(WORKER_AGENTS)
        .hgetall(WORKER_INFO)
        .hgetall(WORKER_WARM);
    for run in &runs {
        pipe.scard(keys.inflight(run));
    }
    let reply: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    // Replies in the order of the pipeline above: seven counts, the workers with their
    // presence scores, their agent counts, their info, their idle warm processes, then one
    // inflight count per apalis worker run.
    let count =
        |i: usize| -> redis::RedisResult<u64> { Ok(redis::from_redis_value_ref(&reply[i])?) };
    let [
        ready,
        scheduled,
        done_inbox,
        done_indexed,
        dead,
        starting,
        sessions_ready,
    ] = [
        count(0)?,
        count(1)?,
        count(2)?,
        count(3)?,
        count(4)?,
        count(5)?,
        count(6)?,
    ];
    let workers: Vec<(String, f64)> = redis::from_redis_value_ref(&reply[7])?;
    let agents: HashMap<String, u64> = redis::from_redis_value_ref(&reply[8])?;
    let info: HashMap<String, String> = redis::from_redis_value_ref(&reply[9])?;
    let warm: HashMap<String, u64> = redis::from_redis_value_ref(&reply[10])?;
    let inflight = reply[11..]
        .iter()
        .map(|v| redis::from_redis_value_ref::<u64>(v).unwrap_or(0))
        .sum();
    let mut rows: Vec<WorkerRow> = workers
        .into_iter()
        .map(|(id, seen)| {
            let last_seen_secs = now.saturating_sub(seen as u64);
            WorkerRow {
                agents: agents.get(&id).copied().unwrap_or(0),
                alive: last_seen_secs <= orphan_timeout.as_secs(),
                last_seen_secs,
                // Untrusted JSON like any value in Redis: unreadable is shown as unknown.
                info: info
                    .get(&id)
                    .and_then(|json| serde_json::from_str(json).ok()),
                warm_idle: warm.get(&id).copied(),
                id,
            }
        })
        .collect();
    rows.sort_by_key(|row| row.last_seen_secs);
    Ok(Status {
        queue: keys.queue().to_owned(),
        jobs: QueueCounts {
            ready,
            scheduled,
            inflight,
            done: done_inbox + done_indexed,
            dead,
        },
        sessions: SessionCounts {
            starting,
            ready: sessions_ready,
        },
        workers: rows,
        maxmemory_policy: crate::dataset::Sample::read(&conn)
            .await
            .ok()
            .and_then(|sample| sample.maxmemory_policy),
    })
}

/// One dead job.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadJob {
    /// Its task id.
    pub task_id: String,
    /// The session of its payload, if the payload names a valid one.
    pub session_id: Option<String>,
    /// Why it failed, as stored by the worker.
    pub error: String,
    /// When it failed (unix seconds), if recorded.
    pub failed_at: Option<u64>,
}

/// The most recent `limit` dead jobs, newest first, and how many there are in all.
///
/// Bounded by `limit`, not by the dead set. Retention indexes dead ids by their finish time
/// (`<queue>:dead-at`) once per `retention.interval`; while every dead id is indexed (the
/// counts agree, the usual case), the newest come from one `ZRANGE … REV` of `limit`. Ids
/// that died since the last indexing are the newest of all, and only the dead set knows them:
/// then its ids (`SMEMBERS`, bounded by `retention.dead_max`) and their index entries (one
/// `ZMSCORE`) are read, and the unindexed ones are added to the candidates. Only candidates
/// have their meta and payload read.
pub async fn dead_jobs(
    conn: &ConnectionManager,
    keys: &QueueKeys,
    limit: usize,
) -> redis::RedisResult<DeadJobs> {
    let mut conn = conn.clone();
    if limit == 0 {
        let total: u64 = redis::cmd("SCARD")
            .arg(keys.dead())
            .query_async(&mut conn)
            .await?;
        return Ok(DeadJobs {
            jobs: Vec::new(),
            total,
        });
    }
    let (total, indexed, newest): (u64, u64, Vec<(String, f64)>) = redis::pipe()
        .scard(keys.dead())
        .zcard(keys.dead_at())
        .cmd("ZRANGE")
        .arg(keys.dead_at())
        .arg(0)
        .arg(limit - 1)
        .arg("REV")
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let mut candidates: Vec<String> = newest.into_iter().map(|(id, _)| id).collect();
    if total != indexed {
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys.dead())
            .query_async(&mut conn)
            .await?;
        let scores: Vec<Option<f64>> = if ids.is_empty() {
            Vec::new()
        } else {
            redis::cmd("ZMSCORE")
                .arg(keys.dead_at())
                .arg(&ids)
                .query_async(&mut conn)
                .await?
        };
        let dead: std::collections::HashSet<&String> = ids.iter().collect();
        // An index entry whose id left the dead set (a retry racing us) is no candidate.
        candidates.retain(|id| dead.contains(id));
        candidates.extend(
            ids.iter()
                .zip(scores)
                .filter(|(_, score)| score.is_none())
                .map(|(id, _)| id.clone()),
        );
    }
    if candidates.is_empty() {
        return Ok(DeadJobs {
            jobs: Vec::new(),
            total,
        });
    }
    let mut pipe = redis::pipe();
    for id in &candidates {
        pipe.cmd("HMGET")
            .arg(keys.meta(id))
            .arg("result")
            .arg("done_at")
            .hget(keys.data(), id);
    }
    let reply: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let mut jobs = Vec::with_capacity(candidates.len());
    for (id, pair) in candidates.into_iter().zip(reply.chunks_exact(2)) {
        let (result, done_at): (Option<String>, Option<String>) =
            redis::from_redis_value_ref(&pair[0])?;
        let payload: Option<Vec<u8>> = redis::from_redis_value_ref(&pair[1])?;
        jobs.push(DeadJob {
            session_id: payload
                .and_then(|bytes| AgentStart::decode(&bytes).ok())
                .map(|job| job.session_id.to_string()),
            error: result.map(|r| error_of(&r)).unwrap_or_default(),
            failed_at: done_at.and_then(|t| t.parse().ok()),
            task_id: id,
        });
    }
    jobs.sort_by_key(|job| std::cmp::Reverse(job.failed_at));
    jobs.truncate(limit);
    Ok(DeadJobs { jobs, total })
}

/// What [`dead_jobs`] read.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadJobs {
    /// The newest dead jobs, newest first.
    pub jobs: Vec<DeadJob>,
    /// Dead jobs in all.
    pub total: u64,
}

/// The message of a stored result `{"Err":"AbortError: …"}`, or the raw text.
fn error_of(result: &str) -> String {
    serde_json::from_str::<serde_json::Value>(result)
        .ok()
        .and_then(|v| v.get("Err").and_then(|e| e.as_str()).map(str::to_owned))
        .map(|e| e.strip_prefix("AbortError: ").unwrap_or(&e).to_owned())
        .unwrap_or_else(|| result.to_owned())
}

/// Puts dead jobs back on the ready list as new; `None` means every dead job. Returns the ids
/// re-queued (ids that are not dead are skipped).
pub async fn retry_dead(
    conn: &ConnectionManager,
    keys: &QueueKeys,
    ids: Option<Vec<String>>,
) -> redis::RedisResult<Vec<String>> {
    let mut conn = conn.clone();
    let ids = match ids {
        Some(ids) => ids,
        None => {
            redis::cmd("SMEMBERS")
                .arg(keys.dead())
                .query_async(&mut conn)
                .await?
        }
    };
    let mut requeued = Vec::new();
    for chunk in ids.chunks(1000) {
        let mut invocation = RETRY_DEAD.prepare_invoke();
        invocation
            .key(keys.dead())
            .key(keys.dead_at())
            .key(keys.active())
            .key(keys.data())
            .arg(keys.wake_channel());
        for id in chunk {
            invocation.key(keys.meta(id)).arg(id);
        }
        let done: Vec<String> = invocation.invoke_async(&mut conn).await?;
        requeued.extend(done);
    }
    Ok(requeued)
}

/// Ends a session the way the orchestrator's end-of-session handler does (contract §5): its
/// keys (`session:<id>`, its config, pid, logs, health, log file) and its entries in
/// `session:starting` / `session:ready` are deleted in one `MULTI`. The worker that runs its
/// agent notices at its next heartbeat and stops the agent. The entry in the worker's own
/// heartbeat index is left alone on purpose: a record gone *with* that entry reads as Redis
/// data loss, which makes the worker write the record again instead of stopping the agent.
/// Returns whether there was a record to delete.
pub async fn stop_session(conn: &ConnectionManager, id: &SessionId) -> redis::RedisResult<bool> {
    let keys = SessionKeys::new(id);
    let (deleted, _, _): (u64, u64, u64) = redis::pipe()
        .atomic()
        .del(keys.all().as_slice())
        .srem(SESSIONS_STARTING, id.as_str())
        .srem(SESSIONS_READY, id.as_str())
        .query_async(&mut conn.clone())
        .await?;
    Ok(deleted > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_errors_are_unwrapped() {
        assert_eq!(
            error_of(r#"{"Err":"AbortError: invalid agent-start payload: x"}"#),
            "invalid agent-start payload: x"
        );
        assert_eq!(error_of("plain"), "plain");
    }
}
