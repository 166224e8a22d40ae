//! The newest dead jobs, as `agent-worker dead list` prints them and the console's overview
//! and dead-job page show them.
//!
//! Bounded by the number asked for, not by the dead set. Retention indexes dead ids by their
//! finish time (`<queue>:dead-at`) once per `retention.interval`; while every dead id is
//! indexed (the counts agree, the usual case), the newest come from one `ZRANGE … REV` of
//! `limit`. Ids that died since the last indexing are the newest of all, and only the dead set
//! knows them: then its ids (`SMEMBERS`, bounded by `retention.dead_max`) and their index
//! entries (one `ZMSCORE`) are read, and the unindexed ones are added to the candidates. Only
//! candidates have their meta and payload read.

use std::collections::HashSet;

use crate::connection::RedisConn;
use agent_jobs::{AgentStart, QueueKeys};
use serde::Serialize;

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

/// What [`dead_jobs`] read.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeadJobs {
    /// The newest dead jobs, newest first.
    pub jobs: Vec<DeadJob>,
    /// Dead jobs in all.
    pub total: u64,
}

/// The most recent `limit` dead jobs, newest first, and how many there are in all (see the
/// module docs for what it reads).
pub async fn dead_jobs(
    conn: &RedisConn,
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
    let (total, candidates) = candidates(&mut conn, keys, limit).await?;
    let mut jobs = read_jobs(&mut conn, keys, candidates).await?;
    jobs.sort_by_key(|job| std::cmp::Reverse(job.failed_at));
    jobs.truncate(limit);
    Ok(DeadJobs { jobs, total })
}

/// How many jobs are dead, and the ids that may be among the newest `limit` (more than
/// `limit` when some are not indexed yet).
async fn candidates(
    conn: &mut RedisConn,
    keys: &QueueKeys,
    limit: usize,
) -> redis::RedisResult<(u64, Vec<String>)> {
    let (total, indexed, newest): (u64, u64, Vec<(String, f64)>) = redis::pipe()
        .scard(keys.dead())
        .zcard(keys.dead_at())
        .cmd("ZRANGE")
        .arg(keys.dead_at())
        .arg(0)
        .arg(limit - 1)
        .arg("REV")
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    let mut candidates: Vec<String> = newest.into_iter().map(|(id, _)| id).collect();
    if total == indexed {
        return Ok((total, candidates));
    }
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.dead())
        .query_async(conn)
        .await?;
    let scores: Vec<Option<f64>> = if ids.is_empty() {
        Vec::new()
    } else {
        redis::cmd("ZMSCORE")
            .arg(keys.dead_at())
            .arg(&ids)
            .query_async(conn)
            .await?
    };
    let dead: HashSet<&String> = ids.iter().collect();
    // An index entry whose id left the dead set (a retry racing us) is no candidate.
    candidates.retain(|id| dead.contains(id));
    candidates.extend(
        ids.iter()
            .zip(scores)
            .filter(|(_, score)| score.is_none())
            .map(|(id, _)| id.clone()),
    );
    Ok((total, candidates))
}

/// The meta (result, finish time) and payload of each of `ids`, in one pipeline.
async fn read_jobs(
    conn: &mut RedisConn,
    keys: &QueueKeys,
    ids: Vec<String>,
) -> redis::RedisResult<Vec<DeadJob>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("HMGET")
            .arg(keys.meta(id))
            .arg("result")
            .arg("done_at")
            .hget(keys.data(), id);
    }
    let reply: Vec<redis::Value> = pipe.query_async(conn).await?;
    let mut jobs = Vec::with_capacity(ids.len());
    for (id, pair) in ids.into_iter().zip(reply.chunks_exact(2)) {
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
    Ok(jobs)
}

/// The message of a stored result `{"Err":"AbortError: …"}`, or the raw text.
fn error_of(result: &str) -> String {
    serde_json::from_str::<serde_json::Value>(result)
        .ok()
        .and_then(|v| v.get("Err").and_then(|e| e.as_str()).map(str::to_owned))
        .map(|e| e.strip_prefix("AbortError: ").unwrap_or(&e).to_owned())
        .unwrap_or_else(|| result.to_owned())
}

/// A task id as producers make them (ULIDs, UUIDs): 1-64 of `[A-Za-z0-9_-]`. Task ids read
/// from Redis or a form are spliced into key names only when they pass.
pub fn is_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
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

    #[test]
    fn task_ids_are_plain() {
        assert!(is_task_id("01JABCDEF"));
        assert!(!is_task_id("a:b") && !is_task_id("") && !is_task_id("*"));
    }
}
