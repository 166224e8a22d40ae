//! The fleet at a glance, as `agent-worker status` prints it and the console's overview and
//! workers pages show it: the queue's job counts, the sessions by state, every worker in the
//! presence index.
//!
//! [`status`] costs two round trips whatever the fleet's size (the apalis worker runs, then one
//! pipeline of counts and presence hashes) plus `INFO` for the eviction policy.

use std::{collections::HashMap, time::Duration};

use crate::connection::RedisConn;
use agent_jobs::{
    QueueKeys,
    keys::{
        SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING, WORKER_AGENTS, WORKER_INFO,
        WORKER_WARM, WORKERS,
    },
};
use serde::Serialize;

use crate::{dataset, presence::WorkerInfo};

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
    conn: &RedisConn,
    keys: &QueueKeys,
    now: u64,
    orphan_timeout: Duration,
) -> redis::RedisResult<Status> {
    let mut conn = conn.clone();
    // Inflight jobs are counted per apalis worker run: their names come first.
    let runs: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.workers())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    let reply: Vec<redis::Value> = pipeline(keys, &runs).query_async(&mut conn).await?;
    let (jobs, sessions, presence) = decode(&reply)?;
    Ok(Status {
        queue: keys.queue().to_owned(),
        jobs,
        sessions,
        workers: presence.rows(now, orphan_timeout),
        maxmemory_policy: dataset::Sample::read(&conn)
            .await
            .ok()
            .and_then(|sample| sample.maxmemory_policy),
    })
}

/// Sessions in the workers' heartbeat index (`agent-worker:session-heartbeats`): those a
/// worker runs an agent for, whatever their record says.
pub async fn heartbeating(conn: &RedisConn) -> redis::RedisResult<u64> {
    redis::cmd("ZCARD")
        .arg(SESSION_HEARTBEATS)
        .query_async(&mut conn.clone())
        .await
}

/// The one pipeline of [`status`]: seven counts, the workers with their presence scores, their
/// agent counts, their info, their idle warm processes, then one inflight count per apalis
/// worker run in `runs` ([`decode`] reads the reply in this order).
fn pipeline(keys: &QueueKeys, runs: &[String]) -> redis::Pipeline {
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
    for run in runs {
        pipe.scard(keys.inflight(run));
    }
    pipe
}

/// What the presence index and its hashes say, worker by worker (as read, not yet judged).
#[derive(Debug, Default)]
struct Presence {
    /// Worker id and its last presence (unix seconds).
    seen: Vec<(String, f64)>,
    agents: HashMap<String, u64>,
    /// Worker id → JSON of its [`WorkerInfo`].
    info: HashMap<String, String>,
    warm: HashMap<String, u64>,
}

/// The reply of [`pipeline`].
fn decode(reply: &[redis::Value]) -> redis::RedisResult<(QueueCounts, SessionCounts, Presence)> {
    let at = |i: usize| {
        reply
            .get(i)
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Parse, "short status reply")))
    };
    let count = |i: usize| -> redis::RedisResult<u64> { Ok(redis::from_redis_value_ref(at(i)?)?) };
    let jobs = QueueCounts {
        ready: count(0)?,
        scheduled: count(1)?,
        // The done set is the inbox retention has not indexed yet; both are kept jobs.
        done: count(2)? + count(3)?,
        dead: count(4)?,
        inflight: reply
            .iter()
            .skip(11)
            .map(|v| redis::from_redis_value_ref::<u64>(v).unwrap_or(0))
            .sum(),
    };
    let sessions = SessionCounts {
        starting: count(5)?,
        ready: count(6)?,
    };
    let presence = Presence {
        seen: redis::from_redis_value_ref(at(7)?)?,
        agents: redis::from_redis_value_ref(at(8)?)?,
        info: redis::from_redis_value_ref(at(9)?)?,
        warm: redis::from_redis_value_ref(at(10)?)?,
    };
    Ok((jobs, sessions, presence))
}

impl Presence {
    /// The workers at `now`, most recently seen first; silent for longer than
    /// `orphan_timeout` is not alive.
    fn rows(self, now: u64, orphan_timeout: Duration) -> Vec<WorkerRow> {
        let Self {
            seen,
            agents,
            info,
            warm,
        } = self;
        let mut rows: Vec<WorkerRow> = seen
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
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_judged_by_their_last_presence_and_unreadable_info_is_unknown() {
        let info = WorkerInfo {
            host: "h".into(),
            version: "1".into(),
            max_agents: 4,
            clock_offset_ms: -3,
            started_at: 100,
            draining_since: None,
            agents: Vec::new(),
            zygote: None,
        };
        let presence = Presence {
            seen: vec![("old".into(), 900.0), ("new".into(), 990.0)],
            agents: HashMap::from([("new".into(), 2)]),
            info: HashMap::from([
                ("new".into(), serde_json::to_string(&info).unwrap()),
                ("old".into(), "{not json".into()),
            ]),
            warm: HashMap::from([("old".into(), 0)]),
        };
        let rows = presence.rows(1000, Duration::from_secs(30));
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["new", "old"], "most recently seen first");
        assert_eq!(
            (rows[0].last_seen_secs, rows[0].alive, rows[0].agents),
            (10, true, 2)
        );
        assert_eq!(rows[0].info.as_ref(), Some(&info));
        assert_eq!(rows[0].warm_idle, None);
        assert_eq!(
            (rows[1].last_seen_secs, rows[1].alive, rows[1].agents),
            (100, false, 0)
        );
        assert_eq!((rows[1].info.as_ref(), rows[1].warm_idle), (None, Some(0)));
    }

    #[test]
    fn a_short_reply_is_an_error_not_a_panic() {
        let reply = vec![redis::Value::Int(1); 5];
        assert!(decode(&reply).is_err());
    }
}
